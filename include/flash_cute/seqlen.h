// Where each sequence of a batch lives: the same code serves padded batches (every sequence has
// seqlen_q / seqlen_k rows, at batch * batch_stride) and variable-length batches (cumulative
// lengths, batch stride 0). Device code; also included by the plain-CUDA passes in bwd_prep.cu.
#pragma once
#include <cstdint>

#include "flash_cute/params.h"

namespace flash_cute {

struct SeqSpan {
  int64_t q_row0 = 0;  // first row of the sequence in q, o, dq (and in lse's last dimension)
  int64_t k_row0 = 0;  // first row in k, v, dk, dv (0 when paged: the block table finds the rows)
  int len_q = 0, len_k = 0;
};

__device__ __forceinline__ SeqSpan seq_span(const FwdParams& p, int batch) {
  SeqSpan s;
  s.len_q = p.seqlen_q;
  s.len_k = p.seqlen_k;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[batch];
    s.len_q = p.cu_seqlens_q[batch + 1] - int(s.q_row0);
  }
  if (p.cu_seqlens_k != nullptr) {
    const int k0 = p.cu_seqlens_k[batch];
    s.len_k = p.cu_seqlens_k[batch + 1] - k0;
    if (p.block_table == nullptr) s.k_row0 = k0;
  }
  return s;
}

// First row of sequence `batch` in the backward workspace (BwdParams::dq_accum, dsum, lse_log2),
// a multiple of ws_block_m. Padded batches: batch * round_up(seqlen_q, ws_block_m). Varlen:
// round_down(cu_seqlens_q[b] + b * ws_block_m, ws_block_m), which leaves every sequence its
// length rounded up to whole tiles before the next one starts, within total_q + batch * ws_block_m.
__host__ __device__ inline int64_t workspace_row0(const BwdParams& p, int batch, int64_t q_row0) {
  const int64_t bm = p.ws_block_m;
  if (p.cu_seqlens_q != nullptr) return (q_row0 + batch * bm) / bm * bm;
  return batch * ((p.seqlen_q + bm - 1) / bm * bm);
}

// The last b in [0, batch] with first_row(b) <= row, for a non-decreasing first_row with
// first_row(0) <= row: the sequence that a row of the concatenated rows belongs to (b == batch:
// past the last one; empty sequences are skipped over). A binary search over cumulative lengths.
template <class FirstRow>
__device__ __forceinline__ int find_sequence(int batch, int64_t row, FirstRow first_row) {
  int lo = 0, hi = batch;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_row(mid) <= row) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace flash_cute
