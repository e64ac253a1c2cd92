// FlashAttention-2 forward kernel.
//
// One CTA owns kBlockM query rows of one (batch, head) and walks the key blocks from the last to
// the first (the masked blocks come first, then the loop runs without masking). Per key block:
//   S = Q K^T (tensor cores, operands from swizzled shared memory through LDSM),
//   mask, online softmax (S becomes P in registers), O += P V (P stays in registers).
// Global -> shared traffic is cp.async: V of block n streams in while S is computed, K of block n-1
// while softmax and P V run, so loads overlap the math with one K and one V buffer. At d128 the
// first block's V comes with Q and its K in the prologue (FwdTraits::kFirstVInPrologue): waiting
// for it after the first, short S GEMM cost each CTA about one global-memory latency.
#pragma once
#include <cute/tensor.hpp>

#include "flash_cute/fwd_traits.h"
#include "flash_cute/options.h"
#include "flash_cute/params.h"
#include "flash_cute/seqlen.h"
#include "flash_cute/softmax.h"
#include "flash_cute/utils.h"

namespace flash_cute {
using namespace cute;

// One query block (kBlockM rows of query block m_block) of one head of sequence `seq`. Every
// kernel takes the local window of p.opt (causal: its right side is 0). kOptions (an OptionKind):
// also softcap and/or ALiBi; kDropout: and dropout (its own kernel: the code for it costs the
// others registers and scheduling); kSMask: and return_attn_probs's matrix (p.s_dmask), in a kernel
// of its own too: its branch in the loop cost the forward with dropout 3% (H200, bf16 d128 4k).
template <class Traits, bool kVarlen, int kOptions, bool kDropout, bool kSMask>
CUTE_DEVICE void fwd_block(const FwdParams& p, typename Traits::SharedStorage& smem, const SeqSpan& seq,
                           int m_block, int head, int batch) {
  static_assert(!kSMask || kDropout, "S_dmask encodes dropout's decisions");
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;

  const int tid = threadIdx.x;
  const int head_k = head / (p.heads / p.heads_k);
  const int seqlen_q = seq.len_q, seqlen_k = seq.len_k;
  const int row0 = m_block * kBlockM;
  const int rows_q = min(kBlockM, seqlen_q - row0);  // valid query rows of this block

  const int diagonal = seqlen_k - seqlen_q;
  // The key blocks [n_begin, n_blocks) that a row of this block sees: all, or those of the local
  // window (causal: its right side is 0), the others are skipped.
  const KeyRange range(row0, kBlockM, seqlen_k, diagonal, p.opt, kBlockN);
  const int n_begin = range.begin, n_blocks = range.end;

  // ------------------------------------------------------------------------------------------
  // Global tiles (64-bit offsets) and their shared-memory homes
  // ------------------------------------------------------------------------------------------
  const int64_t q_row = seq.q_row0 + row0;
  auto q_ptr = static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride +
               q_row * p.q_row_stride;
  // Paged K/V: the pages hold the rows and the block table finds them (see kv_block below).
  const bool paged = kVarlen && p.block_table != nullptr;
  const int64_t kv_batch = paged ? 0 : batch;
  auto k_ptr = static_cast<const Element*>(p.k) + kv_batch * p.k_batch_stride + head_k * p.k_head_stride +
               seq.k_row0 * p.k_row_stride;
  auto v_ptr = static_cast<const Element*>(p.v) + kv_batch * p.v_batch_stride + head_k * p.v_head_stride +
               seq.k_row0 * p.v_row_stride;
  auto o_ptr = static_cast<Element*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride +
               q_row * p.o_row_stride;
  float* lse_ptr = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + q_row;

  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), TileQ{}, make_stride(p.q_row_stride, _1{}));
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), TileQ{}, make_stride(p.o_row_stride, _1{}));
  // (kBlockN, kHeadDim, n): key block n at rows [n * kBlockN, (n + 1) * kBlockN)
  Tensor gK = make_tensor(make_gmem_ptr(k_ptr), make_shape(Int<kBlockN>{}, Int<kHeadDim>{}, max(n_blocks, 1)),
                          make_stride(p.k_row_stride, _1{}, p.k_row_stride * kBlockN));
  Tensor gV = make_tensor(make_gmem_ptr(v_ptr), make_shape(Int<kBlockN>{}, Int<kHeadDim>{}, max(n_blocks, 1)),
                          make_stride(p.v_row_stride, _1{}, p.v_row_stride * kBlockN));

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});
  Tensor sO = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutO{});

  // Output path: registers -> shared (sO) -> 16-byte global stores, rows and columns predicated.
  typename Traits::GmemTiledCopyStore store_copy;
  auto store_thr = store_copy.get_thread_slice(tid);
  Tensor tOsO = store_thr.partition_S(sO);                            // (CPY, CPY_M, CPY_K)
  Tensor tOgO = store_thr.partition_D(gO);                            // (CPY, CPY_M, CPY_K)
  Tensor tOcO = store_thr.partition_D(make_identity_tensor(TileQ{}));  // (row, col) of each

  if (n_blocks <= n_begin) {
    // No query row of this block sees any key (causal with seqlen_q > seqlen_k, a window past
    // the keys, or no keys at all): output 0 and lse +inf, as the official package.
    Tensor zeros = make_tensor<Element>(shape(tOgO));
    clear(zeros);
    copy_predicated</*kZeroFill=*/false>(store_copy, zeros, tOgO, tOcO, rows_q, p.head_dim);
    for (int r = tid; r < rows_q; r += Traits::kThreads) lse_ptr[r] = INFINITY;
    return;
  }

  typename Traits::GmemTiledCopyAsync load_copy;
  auto load_thr = load_copy.get_thread_slice(tid);
  Tensor tQgQ = load_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_K)
  Tensor tQsQ = load_thr.partition_D(sQ);
  Tensor tQcQ = load_thr.partition_S(make_identity_tensor(TileQ{}));
  Tensor tKgK = load_thr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n)
  Tensor tKsK = load_thr.partition_D(sK);
  Tensor tVgV = load_thr.partition_S(gV);  // (CPY, CPY_N, CPY_K, n)
  Tensor tVsV = load_thr.partition_D(sV);
  Tensor tKcK = load_thr.partition_S(make_identity_tensor(TileKV{}));

  // ------------------------------------------------------------------------------------------
  // MMA partitions
  // ------------------------------------------------------------------------------------------
  typename Traits::TiledMma mma;
  auto thr_mma = mma.get_thread_slice(tid);
  Tensor tSrQ = make_tensor<Element>(partition_shape_A(mma, TileQ{}));   // (MMA, MMA_M, MMA_K)
  Tensor tSrK = make_tensor<Element>(partition_shape_B(mma, TileKV{}));  // (MMA, MMA_N, MMA_K)
  Tensor tOrVt = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kHeadDim>, Int<kBlockN>>{}));
  Tensor acc_o = partition_fragment_C(mma, TileQ{});  // (MMA, MMA_M, MMA_D) fp32
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));  // (rows, cols)

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);
  Tensor tSsQ = smem_copy_q.get_thread_slice(tid).partition_S(sQ);    // (CPY, MMA_M, MMA_K)
  Tensor tSsK = smem_copy_k.get_thread_slice(tid).partition_S(sK);    // (CPY, MMA_N, MMA_K)
  Tensor tOsVt = smem_copy_v.get_thread_slice(tid).partition_S(sVt);  // (CPY, MMA_D, MMA_N)

  // (row, col) of every score this thread holds, for masking
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));

  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;

  // ------------------------------------------------------------------------------------------
  // Prologue: Q and the last key block
  // ------------------------------------------------------------------------------------------
  const int d = p.head_dim;
  // Key block n of a partitioned K or V (rows n * kBlockN onwards). Paged: the block lies inside
  // one page (page_size is a multiple of kBlockN), found through the block table.
  auto kv_block = [&](auto const& tXgX, int n, int64_t page_stride, int64_t row_stride) {
    Tensor block = tXgX(_, _, _, n);
    int64_t delta = 0;
    if (paged) {
      const int row = n * kBlockN;
      const int64_t page = p.block_table[batch * p.block_table_batch_stride + row / p.page_size];
      delta = page * page_stride + (row % p.page_size - row) * row_stride;
    }
    return make_tensor(block.data() + delta, block.layout());
  };
  // Key block n needs row predicates (and zero fill) only when it runs past seqlen_k; columns
  // need them only when the head dim is below the kernel's. Full tiles take the plain copy.
  auto load_kv = [&](auto const& src, auto& dst, int n) {
    const int rows = seqlen_k - n * kBlockN;
    if (rows >= kBlockN && d == kHeadDim) copy(load_copy, src, dst);
    else copy_predicated</*kZeroFill=*/true>(load_copy, src, dst, tKcK, rows, d);
  };
  auto load_k = [&](int n) { load_kv(kv_block(tKgK, n, p.k_batch_stride, p.k_row_stride), tKsK, n); };
  auto load_v = [&](int n) { load_kv(kv_block(tVgV, n, p.v_batch_stride, p.v_row_stride), tVsV, n); };
  copy_predicated</*kZeroFill=*/true>(load_copy, tQgQ, tQsQ, tQcQ, rows_q, d);
  load_k(n_blocks - 1);
  if constexpr (Traits::kFirstVInPrologue) load_v(n_blocks - 1);  // the loop loads V from the second block on
  cp_async_fence();

  const float slope = alibi_slope<kOptions>(p.opt, batch, head);
  const bool softcap = softcap_on<kOptions>(p.opt), alibi = alibi_on<kOptions>(slope);
  const MaskFreeBlocks mask_free(row0, kBlockM, seqlen_k, diagonal, p.opt, kBlockN);
  // softcap bounds the scores: tanh in [-1, 1], logits in [-c, c] log2 units, c = scale_log2 (=
  // softcap * log2 e). Without ALiBi, bf16 P can then be taken against a fixed maximum, m (in tanh
  // units) with c - m c = max(0, 2c - 120), which puts every exp2 in [2^-120, 2^(2c - 120)]:
  // normal floats, for c <= 75 (softcap <= 52; Gemma 2's 50 included) at most 2^30, and no running
  // maximum at all (the max over each row and its rescale were about half softcap's cost at d128).
  // The largest probability is then not exactly 1 and rounds in bf16 P (see OnlineSoftmax::update),
  // but tanh.approx's error, c * 2^-11 in the logit, is ten times that rounding.
  // fp16 P would lose the small ones (f16 stops at 2^-24). The softcap kernel only: in the dropout
  // kernel the extra branch cost more than it saved (forward with dropout 1.33x -> 1.39x plain).
  constexpr bool kMayFixMax = kOptions == kSoftcap && !kDropout && std::is_same_v<Element, cute::bfloat16_t>;
  const bool fixed_max = kMayFixMax && softcap && !alibi && p.scale_log2 <= 75.f;
  if (fixed_max) softmax.fix_max(1.f - fmaxf(0.f, 2.f - 120.f / p.scale_log2));
  Dropout dropout;
  if constexpr (kDropout) dropout = Dropout(p, batch, head);
  // ------------------------------------------------------------------------------------------
  // Main loop over key blocks, last to first. One call site for the body keeps it inlined (the
  // accumulators must stay in registers); masking is a uniform branch.
  // ------------------------------------------------------------------------------------------
  for (int n = n_blocks - 1; n >= n_begin; --n) {
    Tensor acc_s = partition_fragment_C(mma, TileS{});  // (MMA, MMA_M, MMA_N) fp32
    clear(acc_s);
    cp_async_wait<0>();  // K[n] has landed ...
    __syncthreads();     // ... for every thread, and nobody still reads V[n + 1]
    if (!Traits::kFirstVInPrologue || n < n_blocks - 1) load_v(n);
    cp_async_fence();

    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma, smem_copy_q, smem_copy_k);
    Tensor scores = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    // The options; the mask where the block runs past seqlen_k or crosses a window edge.
    if (softcap) apply_softcap(scores, p.opt.softcap_pre);
    // One branch around ALiBi and the mask: the kernels that read ALiBi at run time ran 1.4-1.7%
    // faster than with a branch for each (softcap, dropout; H200 bf16 d128 4k).
    if (const bool mask = mask_free.needs_mask(n); alibi || mask)
      apply_bias_and_mask(
          scores, tScS_rc, [&](int r) { return row0 + get<0>(tScS_rc(r, 0)); }, [&](int) { return slope; },
          n * kBlockN, seqlen_k, diagonal, p.opt, alibi, mask);

    cp_async_wait<0>();  // V[n] has landed ...
    __syncthreads();     // ... and nobody still reads K[n]
    if (n > n_begin) {
      load_k(n - 1);
      cp_async_fence();
    }

    // Dropout's random words, drawn here: their integer work fills the softmax's latencies.
    const auto words = [&] {
      if constexpr (kDropout) return dropout.draw_tile(acc_s, tScS, row0, n * kBlockN);
      else return 0;
    }();
    softmax.update(scores, acc_o_rc, p.scale_log2, fixed_max);
    if constexpr (kSMask) {
      store_s_dmask(acc_s, tScS, row0, n * kBlockN, dropout, words,
                    static_cast<Element*>(p.s_dmask) + batch * p.s_dmask_batch_stride + head * p.s_dmask_head_stride,
                    p.s_dmask_row_stride, p.s_dmask_rows, p.s_dmask_cols);
    }
    Tensor rP = make_converted<Element>(acc_s);
    if constexpr (kDropout) apply_keep_masks(rP, dropout.keep_masks<true>(acc_s, tScS, n * kBlockN, words));
    Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a_layout(rP.layout()));  // (MMA, MMA_M, MMA_N / 2)
    gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, mma, smem_copy_v);
  }

  // ------------------------------------------------------------------------------------------
  // Epilogue: normalise, write lse, stage O through shared memory, store
  // ------------------------------------------------------------------------------------------
  float lse[kRows];
  softmax.finalize(acc_o_rc, p.lse_scale, lse, kDropout ? p.rp_dropout : 1.f);

  Tensor tOcO_mma = thr_mma.partition_C(make_identity_tensor(TileQ{}));
  Tensor tOcO_rc = make_tensor(tOcO_mma.data(), rowcol_layout(tOcO_mma.layout()));
  if (get<1>(tOcO_rc(0, 0)) == 0) {  // one thread of each quad holds column 0 of its rows
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int row = get<0>(tOcO_rc(r, 0));
      if (row < rows_q) lse_ptr[row] = lse[r];
    }
  }

  // Q's buffer is free: every thread passed the barrier after its last S = Q K^T.
  Tensor rO = make_converted<Element>(acc_o);
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma);
  copy(smem_copy_o, make_tensor(rO.data(), smem_copy_o.retile(rO.layout())), smem_copy_o.get_thread_slice(tid).partition_D(sO));
  __syncthreads();
  Tensor tOrO = make_tensor<Element>(shape(tOsO));
  copy(store_copy, tOsO, tOrO);
  copy_predicated</*kZeroFill=*/false>(store_copy, tOrO, tOgO, tOcO, rows_q, d);
}

// Grid: (query blocks, heads, batch). Padded batches: one CTA per query block. Varlen: the grid
// covers the longest sequence by the max_seqlen_q hint, and a CTA takes query blocks blockIdx.x,
// blockIdx.x + gridDim.x, ... of its sequence, so a hint that is too small costs time, never
// correctness. Causal: the last query blocks see the most keys; launching them first shortens
// the tail.
template <class Traits, bool kVarlen, int kOptions, bool kDropout, bool kSMask = false>
__global__ void __launch_bounds__(Traits::kThreads, 1) fwd_kernel(const __grid_constant__ FwdParams p) {
  extern __shared__ __align__(128) char smem_bytes[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_bytes);
  constexpr int kBlockM = Traits::kBlockM;
  const SeqSpan seq = seq_span<kVarlen>(p, blockIdx.z);
  const int m_blocks = kVarlen ? ceil_div(seq.len_q, kBlockM) : int(gridDim.x);
  if constexpr (kVarlen) {
    if (seq.bad || (p.block_table != nullptr && !pages_in_bounds(p, blockIdx.z, 0, seq.len_k))) {
      // Index values out of range (see seq_span): this CTA's rows of the sequence get NaN.
      using Element = typename Traits::Element;
      const int head = blockIdx.y, d = p.head_dim;
      for (int i = blockIdx.x; i < m_blocks; i += gridDim.x) {
        const int row0 = seq.q_row0 + i * kBlockM, rows = min(kBlockM, seq.len_q - i * kBlockM);
        for (int e = threadIdx.x; e < rows * d; e += Traits::kThreads) {
          static_cast<Element*>(p.o)[(row0 + e / d) * p.o_row_stride + head * p.o_head_stride + e % d] = Element(NAN);
        }
        for (int r = threadIdx.x; r < rows; r += Traits::kThreads)
          p.lse[head * p.lse_head_stride + row0 + r] = NAN;
      }
      return;
    }
  }
  for (int i = blockIdx.x; i < m_blocks; i += gridDim.x) {
    if (i != int(blockIdx.x)) __syncthreads();  // every thread is done with the previous block's tiles
    fwd_block<Traits, kVarlen, kOptions, kDropout, kSMask>(p, smem, seq, Traits::kCausal ? m_blocks - 1 - i : i, blockIdx.y, blockIdx.z);
    if constexpr (!kVarlen) break;
  }
}

}  // namespace flash_cute
