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
  bool bad = false;  // varlen: its cu_seqlens left the tensors (the spans above are cut to them)
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
    // The host never reads cu_seqlens (that would cost a sync), so each span is cut to its
    // tensor here, and a sequence whose values had to be cut is bad: the forward gives its rows
    // in q NaN, and no kernel reads or writes outside the tensors.
    const int q0 = p.cu_seqlens_q[batch], q1 = p.cu_seqlens_q[batch + 1];
    const int k0 = p.cu_seqlens_k[batch], k1 = p.cu_seqlens_k[batch + 1];
    s.q_row0 = min(max(q0, 0), p.total_q);
    const int q_end = min(max(q1, s.q_row0), p.total_q);
    s.len_q = q_end - s.q_row0;
    s.bad = q0 != s.q_row0 || q1 != q_end || k1 < k0;
    if (p.block_table == nullptr) {
      s.k_row0 = min(max(k0, 0), p.total_k);
      const int k_end = min(max(k1, s.k_row0), p.total_k);
      s.len_k = k_end - s.k_row0;
      s.bad |= k0 != s.k_row0 || k1 != k_end;
    } else {  // paged: the keys must fit the block table's row (its entries: pages_in_bounds)
      s.len_k = max(k1 - k0, 0);
      s.bad |= k0 < 0 || int64_t(s.len_k) > int64_t(p.block_table_width) * p.page_size;
    }
  }
  return s;
}

// Whether a block-table entry names one of the cache's `pages` pages.
__device__ __forceinline__ bool is_page(int64_t entry, int pages) { return entry >= 0 && entry < pages; }

// Whether the entries of block-table row `table_row` that hold keys [key_begin, key_end) (pages of
// page_size keys) are pages: this thread's share of them, the CTA's threads taking every
// blockDim.x-th entry.
__device__ inline bool thread_pages_ok(const int* table_row, int page_size, int pages, int key_begin, int key_end) {
  bool ok = true;
  if (key_end > key_begin) {
    for (int j = key_begin / page_size + int(threadIdx.x); j <= (key_end - 1) / page_size; j += blockDim.x)
      ok &= is_page(table_row[j], pages);
  }
  return ok;
}

// Paged K/V: whether the block-table entries that hold keys [key_begin, key_end) of sequence
// `batch` are pages of k and v. The CTA's threads share the reads; every thread must call it.
__device__ inline bool pages_in_bounds(const FwdParams& p, int batch, int key_begin, int key_end) {
  return __syncthreads_and(
      thread_pages_ok(p.block_table + batch * p.block_table_batch_stride, p.page_size, p.total_k, key_begin, key_end));
}

// flash_attn_with_kvcache: batch row `batch` of a decoding call (DecodeParams) has `cached` rows
// in cache row `cache_row` (or in the pages of its block-table row) and sees positions leftpad
// .. cached + seqlen_new - 1. The host never reads these values (that would cost a sync), so the
// kernels check them here: a bad row reads and appends nothing, and gets NaN. (The pages
// themselves are checked where they are looked up.)
struct CacheSpan {
  int cached = 0, leftpad = 0;
  int64_t cache_row = 0;
  bool bad = false;
};

__device__ __forceinline__ CacheSpan cache_span(const DecodeParams& p, int batch) {
  CacheSpan c;
  c.cached = p.cache_seqlens != nullptr ? p.cache_seqlens[batch] : p.seqlen_k;
  c.leftpad = p.leftpad != nullptr ? p.leftpad[batch] : 0;
  c.cache_row = p.cache_batch_idx != nullptr ? p.cache_batch_idx[batch] : batch;
  c.bad = c.cached < 0 || c.leftpad < 0 || c.leftpad > c.cached || int64_t(c.cached) + p.seqlen_new > p.capacity ||
          (p.block_table == nullptr && (c.cache_row < 0 || c.cache_row >= p.cache_batch));
  return c;
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
