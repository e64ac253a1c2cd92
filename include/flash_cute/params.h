// The plain-old-data interface between the host (binding, dispatch) and the kernels.
// No CuTe, no CUDA and no torch in here: the binding and the dispatch layer include only this.
#pragma once
#include <cstdint>

namespace flash_cute {

// Window sides this wide are unbounded (the host maps flash_attn's -1 to it).
inline constexpr int kUnboundedWindow = 1 << 30;

// flash_attn's options on the scores s = q . k (raw dot products), in the order applied:
//   softcap: s -> tanh(s * softcap_pre) (softcap_pre = scale / softcap; the softmax then
//            multiplies by softcap: scale_log2 = softcap * log2(e));
//   ALiBi:   + alibi_scale * slope * -|i + seqlen_k - seqlen_q - j| (alibi_scale = 1 / lse_scale:
//            the bias in natural-log units, whatever the score units);
//   window:  key j visible from query i iff i + diagonal - left <= j <= i + diagonal + right.
struct ScoreOptions {
  float softcap_pre = 0.f;                // 0: off
  float alibi_scale = 0.f;
  const float* alibi_slopes = nullptr;    // float32 (batch, heads) via alibi_batch_stride (0: (heads,))
  int64_t alibi_batch_stride = 0;
  int window_left = kUnboundedWindow;
  int window_right = kUnboundedWindow;
};

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

inline const char* dtype_name(DType t) { return t == DType::kFloat16 ? "fp16" : "bf16"; }

// Forward pass of softmax(Q K^T * scale) V for tensors laid out as (batch, seqlen, heads, head_dim)
// with the last dimension contiguous. All strides are in elements.
struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // (batch, heads, seqlen_q), float32

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;  // the seqlen stride of lse is 1

  int batch = 0, seqlen_q = 0, seqlen_k = 0;
  int heads = 0, heads_k = 0;  // heads % heads_k == 0 (MQA / GQA)
  int head_dim = 0;            // runtime head dim, <= the kernel's compile-time head dim, multiple of 8

  float scale = 0.f;       // softmax scale (the backward's dQ, dK multiplier)
  float scale_log2 = 0.f;  // score -> exp2 argument: scale * log2(e), or with softcap softcap * log2(e)
  float lse_scale = 0.f;   // score -> natural log units (lse = max * lse_scale + log(sum)): scale or softcap
  bool causal = false;     // bottom-right aligned: query i sees keys j <= i + seqlen_k - seqlen_q
  // flash_attn's options (ScoreOptions above). The window (causal: window_right = 0) in every
  // kernel; softcap and ALiBi in the kernels with kOptions only.
  ScoreOptions opt;
  // Dropout on the probabilities (kOptions kernels): keep an entry iff its random byte <=
  // keep_byte (floor(keep probability * 255), as flash_attn); the kept ones are scaled by
  // 1 / keep probability (rp_dropout; the backward takes keep and log2(rp_dropout) from here too,
  // constants rather than live registers). rng_state: int64 (seed, offset) on the device, drawn from
  // torch's generator by the caller. See Dropout in options.h.
  bool dropout = false;
  uint32_t keep_byte = 0;
  float rp_dropout = 1.f;
  float keep_prob = 1.f, log2_rp_dropout = 0.f;
  const int64_t* rng_state = nullptr;
  // return_attn_probs with dropout: the unnormalised probabilities, negated where dropped,
  // (batch, heads, s_dmask_rows, s_dmask_cols) in the input dtype; nullptr: not wanted.
  void* s_dmask = nullptr;
  int64_t s_dmask_batch_stride = 0, s_dmask_head_stride = 0, s_dmask_row_stride = 0;
  int s_dmask_rows = 0, s_dmask_cols = 0;

  // Variable-length batches (nullptr: every sequence has seqlen_q / seqlen_k rows). int32
  // (batch + 1) cumulative lengths: sequence b owns rows [cu[b], cu[b + 1]) of q, o (and lse's
  // last dim) and of k, v; the batch strides are then 0 and seqlen_q / seqlen_k are only the
  // grid's size hint (max_seqlen): the kernels loop when a sequence is longer.
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  // Paged K/V (forward only; nullptr: contiguous). k, v are (pages, page_size, heads_k, d) with
  // k/v_batch_stride the page stride; key j of sequence b is row j % page_size of page
  // block_table[b * block_table_batch_stride + j / page_size]. page_size % the tile's block_n == 0.
  const int* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int page_size = 0;
  // Bounds of the index values above, which the host does not read (varlen only): the rows of q
  // (total_q), the rows of k, v or, paged, their pages (total_k), the block table's columns
  // (block_table_width). A sequence whose cu_seqlens or pages fall outside them reads and writes
  // only inside the tensors, and the forward gives its rows NaN (see seq_span in seqlen.h).
  int total_q = 0, total_k = 0, block_table_width = 0;
};

// Whether a call needs the kernels with options (run_fwd_options, run_bwd_options): every kernel
// takes local windows (and causal as one), the plain ones nothing else.
inline bool uses_options(const FwdParams& p) {
  return p.dropout || p.opt.softcap_pre != 0.f || p.opt.alibi_slopes != nullptr;
}

// Backward pass: the forward's inputs, output o and lse, plus the output gradient dout, and the
// gradients dq (batch, seqlen_q, heads, d), dk and dv (batch, seqlen_k, dkv_heads, d).
struct BwdParams : FwdParams {
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Workspace, float32, with every sequence's rows padded to whole tiles of the backward kernel
  // (ws_block_m rows; see workspace_row0 in seqlen.h for where sequence b starts), all written by
  // the rowsum pass before the main kernel reads them:
  //   dq_accum (heads, ws_rows, head-dim bucket): the dQ accumulator, zeroed; each tile of
  //            ws_block_m rows in the kernel's thread order (dq_accum_offset in bwd_kernel.h);
  //   dsum     (heads, ws_rows): rowsum(dout * o), 0 on padded rows;
  //   lse_log2 (heads, ws_rows): lse * log2(e), +inf on padded rows (their P is 0).
  // ws_rows: batch * round_up(seqlen_q, ws_block_m), or round_up(total_q + batch * ws_block_m,
  // ws_block_m) (varlen).
  float* dq_accum = nullptr;
  float* dsum = nullptr;
  float* lse_log2 = nullptr;
  int64_t ws_rows = 0;
  int ws_block_m = 0;
  int accum_cols = 0;
  // deterministic: int32 counters (heads, ws_rows / ws_block_m), zeroed; the CTAs add into
  // dq_accum in key-block order. nullptr: unordered atomics.
  int* dq_semaphore = nullptr;

  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  // GQA/MQA: false: one CTA per KV head walks all the query heads that share it and writes dk, dv
  // with heads_k heads. true: one CTA per query head; dk, dv have `heads` heads, summed by the caller.
  bool expand_gqa = false;
};

// Decoding (flash_attn_with_kvcache): a few query rows against a key/value cache, split along
// the keys (Flash-Decoding). q, o: (batch, seqlen_q, heads, d); k, v: the cache, rows of
// (cache rows, capacity, heads_k, d), or pages (pages, page_size, heads_k, d) with a block table.
// Batch row b attends to its visible keys j = 0 .. len_k - 1, len_k = cache_seqlens[b] (or
// seqlen_k) + seqlen_new - leftpad[b], stored at cache position leftpad[b] + j.
struct DecodeParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // (batch, heads, seqlen_q) through lse_batch/head_stride, seqlen stride 1

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;  // batch: cache row or page
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  int batch = 0, seqlen_q = 0, heads = 0, heads_k = 0, head_dim = 0;
  int seqlen_k = 0;    // the cached rows of every batch row when cache_seqlens is nullptr
  int seqlen_new = 0;  // rows appended by this call, visible too (keys len_k - seqlen_new ..)
  // The appended rows (batch, seqlen_new, heads_k, d). Given: the kernel reads them from here and
  // writes them into the cache at positions cache_seqlens[b] ..; nullptr: already in the cache.
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_new_batch_stride = 0, k_new_row_stride = 0, k_new_head_stride = 0;
  int64_t v_new_batch_stride = 0, v_new_row_stride = 0, v_new_head_stride = 0;
  const int* cache_seqlens = nullptr;    // int32 (batch,) or nullptr
  const int* cache_batch_idx = nullptr;  // int32 (batch,): the cache row of batch row b; nullptr: b
  const int* leftpad = nullptr;          // int32 (batch,): the first visible cache position; nullptr: 0
  const int* block_table = nullptr;      // int32 (batch, pages per row), nullptr: contiguous rows
  int64_t block_table_batch_stride = 0;
  int page_size = 0;  // a multiple of 16 (of decode_tile().block_n)
  // Bounds of the index values above, which the host does not read: the cache rows, or pages, of
  // k and v (cache_batch), and the positions of one batch row (capacity: the cache length, or
  // the block table's width times page_size). A batch row whose values fall outside them gets NaN
  // in its output and lse, and neither reads nor writes outside the caches (see decode_kernel).
  int cache_batch = 0, capacity = 0;

  float scale = 0.f, scale_log2 = 0.f, lse_scale = 0.f;  // as in FwdParams
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + len_k - seqlen_q
  ScoreOptions opt;     // softcap, window (causal included: window_right = 0), ALiBi

  // num_splits > 1: split s of every (batch, KV head) covers an equal share of its key blocks and
  // writes its normalised partial output and lse (float32, -inf when it saw no key) to
  // o_accum (num_splits, batch * heads * seqlen_q, head_dim) and lse_accum (num_splits, same rows);
  // row (b * heads + h) * seqlen_q + i. The combine pass merges them into o and lse.
  int num_splits = 1;
  float* o_accum = nullptr;
  float* lse_accum = nullptr;
};

}  // namespace flash_cute
