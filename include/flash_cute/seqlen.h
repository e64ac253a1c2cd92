// Where each sequence of a batch lives: the same code serves padded batches (every sequence has
// seqlen_q / seqlen_k rows, at batch * batch_stride) and variable-length batches (cumulative
// lengths, batch stride 0). Device code; also included by the plain-CUDA passes in bwd_prep.cu.
#pragma once
#include <cstdint>

#include "flash_cute/params.h"

namespace flash_cute {

struct SeqSpan {
  int q_row0 = 0;  // first row of the sequence in q, o, dq (and in lse's last dimension)
  int k_row0 = 0;  // first row in k, v, dk, dv (0 when paged: the block table finds the rows)
  int len_q = 0, len_k = 0;
};

// kVarlen is a compile-time choice so that the padded-batch kernels read the lengths straight
// from the kernel parameters (no registers held for them: the backward kernel is at its register
// limit, and holding them cost it 3%).
template <bool kVarlen>
__device__ __forceinline__ SeqSpan seq_span(const FwdParams& p, int batch) {
  SeqSpan s;
  s.len_q = p.seqlen_q;
  s.len_k = p.seqlen_k;
  if constexpr (kVarlen) {
    s.q_row0 = p.cu_seqlens_q[batch];
    s.len_q = p.cu_seqlens_q[batch + 1] - s.q_row0;
    const int k0 = p.cu_seqlens_k[batch];
    s.len_k = p.cu_seqlens_k[batch + 1] - k0;
    if (p.block_table == nullptr) s.k_row0 = k0;
  }
  return s;
}

// First row of sequence `batch` in the backward workspace (BwdParams::dq_accum, dsum, lse_log2),
// a multiple of block_m (the backward tile's, BwdParams::ws_block_m). Padded batches:
// batch * round_up(seqlen_q, block_m). Varlen: round_down(q_row0 + batch * block_m, block_m), with
// q_row0 = cu_seqlens_q[batch]: every sequence gets its length rounded up to whole tiles before
// the next one starts, all within total_q + batch * block_m rows.
__host__ __device__ inline int64_t workspace_row0(bool varlen, int block_m, int seqlen_q, int batch, int q_row0) {
  const int64_t bm = block_m;
  if (varlen) return (q_row0 + batch * bm) / bm * bm;
  return batch * ((seqlen_q + bm - 1) / bm * bm);
}

}  // namespace flash_cute
