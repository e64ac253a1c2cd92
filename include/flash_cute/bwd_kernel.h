// FlashAttention-2 backward kernel.
//
// One CTA owns kBlockN keys of one KV head: their dK and dV accumulate in registers while the CTA
// walks the query blocks that see them (and, for GQA/MQA, every query head that shares the KV
// head). Per query block, with lse and D = rowsum(dO * O) from the earlier passes:
//   S  = Q K^T                 P  = exp(scale * S - lse)     (recomputed, never stored in memory)
//   dP = dO V^T                dS = P * (dP - D)
//   dV += P^T dO               dK += dS^T Q                  (P, dS staged in shared memory)
//   dQ += dS K                 (fp32 reductions into a global accumulator; other CTAs add theirs)
// deterministic: the CTAs add into each dQ block in a fixed (descending key block) order.
// The scale of dK and dQ is applied once at the end. Q and dO of the next block stream in with
// cp.async during the current one (BwdTile's q_stages, do_stages: with one dO buffer, after
// dV += P^T dO; with one of each, during dQ = dS K).
#pragma once
#include <cute/tensor.hpp>

#include "flash_cute/bwd_traits.h"
#include "flash_cute/options.h"
#include "flash_cute/params.h"
#include "flash_cute/seqlen.h"
#include "flash_cute/utils.h"

namespace flash_cute {
using namespace cute;

// dQ's fp32 accumulator holds each (kBlockM, head-dim bucket) tile of dQ in thread order: the
// element i of thread tid's TiledMmadQ fragment lives at dq_accum_offset<kThreads>(tid, i), so a
// warp's reduction adds into 32 consecutive vectors (512 bytes) where the tile's own order gave
// each instruction 8 rows of 32 bytes: the backward 5% faster at d32, 9-11% at d64 and d96,
// 14-16% at d128, d160 and d224, 20-23% at d192 and d256 (H200, bf16, seqlen 2k/8k; in the
// tile's order, adds of single floats instead of pairs ran it 1.5-2x slower: performance-log.md).
// The vector is 4 floats where RED has them (sm_90), else 1. The conversion pass
// (convert_dq_kernel) reads the tile back in the same order.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
inline constexpr int kDqVec = 4;
#else
inline constexpr int kDqVec = 1;
#endif
template <int kThreads>
CUTE_DEVICE int dq_accum_offset(int tid, int i) {
  return ((i / kDqVec) * kThreads + tid) * kDqVec + i % kDqVec;
}

// Adds vectors [v_begin, v_end) of a thread's dQ fragment into the accumulator tile at `tile`
// (padded so that no element needs a bounds check). The adds are fire-and-forget reductions
// (RED): atomicAdd on a float2 compiles to an ATOM whose result the thread waits for, which
// stalled the loop (ncu: long-scoreboard stalls 1.9 vs 0.8 per instruction).
template <int kThreads, class Acc>
CUTE_DEVICE void red_add_dq(Acc const& acc, float* tile, int tid, int v_begin, int v_end) {
  CUTE_UNROLL
  for (int v = 0; v < int(size(acc)) / kDqVec; ++v) {  // the whole range: a trip count known before inlining
    if (v < v_begin || v >= v_end) continue;
    float* dst = tile + dq_accum_offset<kThreads>(tid, v * kDqVec);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(acc(4 * v)), "f"(acc(4 * v + 1)),
                 "f"(acc(4 * v + 2)), "f"(acc(4 * v + 3))
                 : "memory");
#else
    atomicAdd(dst, acc(v));  // the result is unused: compiles to RED
#endif
  }
}

// Stages a (rows, head_dim) accumulator through shared memory (`smem`, a free buffer of that
// shape) and stores it to global memory with 16-byte stores, rows >= max_rows and columns >= d
// skipped (`coords`: gmem's identity tensor). Ends with the shared buffer read by every thread.
template <class Traits, class Acc, class TiledMma, class SmemTensor, class GmemTensor, class Coords>
CUTE_DEVICE void store_acc(Acc const& acc, float scale, TiledMma const& mma, SmemTensor& smem, GmemTensor& gmem,
                           Coords const& coords, int max_rows, int d, int tid) {
  using Element = typename Traits::Element;
  Tensor scaled = make_tensor<float>(acc.layout());
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) scaled(i) = acc(i) * scale;
  Tensor r = make_converted<Element>(scaled);
  auto smem_copy = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma);
  copy(smem_copy, make_tensor(r.data(), smem_copy.retile(r.layout())),
       smem_copy.get_thread_slice(tid).partition_D(smem));
  __syncthreads();
  typename Traits::GmemTiledCopyStore store_copy;
  auto thr = store_copy.get_thread_slice(tid);
  Tensor tS = thr.partition_S(smem);
  Tensor tG = thr.partition_D(gmem);
  Tensor tC = thr.partition_D(coords);
  Tensor tR = make_tensor<Element>(shape(tS));
  copy(store_copy, tS, tR);
  copy_predicated</*kZeroFill=*/false>(store_copy, tR, tG, tC, max_rows, d);
}

// P and dS with flash_attn's options (kOptions kernels). The plain kernel computes P before
// dP = dO V^T and stores it after; ptxas interleaves its exponentials with the GEMM's MMAs. In the
// options kernels it moved that work after the GEMM instead, where nothing overlaps it. So there,
// bwd_block places the work on P inside the GEMMs itself ("P inside the GEMMs"): a slice of
// fragments after each k step's MMAs, P's stores to shared memory a step later, which keep the
// GEMM's later operand loads (and so the work) in place.
// - softcap (kernel kSoftcap) without ALiBi and mask: S in two halves of the keys; the tanh,
//   exponentials and stores of the first half inside the second half's GEMM, the rest inside
//   dP = dO V^T. 1.13x -> 1.11-1.12x the plain backward (H200, bf16 d128 4k); all inside
//   dP = dO V^T: 1.115x.
// - dropout (kDropout) without softcap, at d128 (kDropoutInGemm): the random words inside
//   S = Q K^T, the exponentials, drop decisions and P's stores inside dP = dO V^T: 1.16x -> 1.13x
//   plain; other head dims keep the order before. The drop decisions are masks on 16-bit pairs
//   (Dropout::fragment_masks, keep_masks), which pick dS between its values for a kept and a
//   dropped score (options_ds): with DropoutKeyOrder, 1% faster than flash_attn's sign encoding
//   on the permuted TiledMMA; either change alone measured 1-2% slower (performance-log.md).
// - softcap with ALiBi or the mask: t = tanh(S * softcap_pre) before the GEMM (options_s), the
//   rest after it (options_p); with dropout too, all of P before the GEMM, as dz = 1 - t^2 would
//   stay live across it.
//
// options_s: softcap's t = tanh(S * softcap_pre), in place of S = Q K^T in acc_s.
template <int kOptions, class Acc>
CUTE_DEVICE void options_s(const BwdParams& p, Acc& acc_s) {
  if (softcap_on<kOptions>(p.opt)) apply_softcap(acc_s, p.opt.softcap_pre);
}

// options_bias: ALiBi and the mask on options_s's acc_s (the tile at (row0, col0) of a query head).
template <int kOptions, int kBlockM, int kBlockN, class Acc, class CoordsRC>
CUTE_DEVICE void options_bias(const BwdParams& p, Acc& acc_s, CoordsRC const& coords_rc, int row0, int col0,
                              int seqlen_k, int diagonal, float slope) {
  Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
  // No outer `if (alibi || mask)` as in the forward: here it made the softcap backward 1.5-2%
  // slower (performance-log.md, 2026-11-30 third session).
  apply_bias_and_mask(
      s, coords_rc, [&](int r) { return row0 + get<0>(coords_rc(r, 0)); }, [&](int) { return slope; }, col0,
      seqlen_k, diagonal, p.opt, alibi_on<kOptions>(slope),
      tile_needs_mask(row0, kBlockM, col0, kBlockN, seqlen_k, diagonal, p.opt));
}

// options_exp: options_bias, then P = exp(z - lse) in place (lse * log2(e) of the tile's rows in
// shared memory), z the score after softcap, ALiBi and the mask (kDropout: P / keep, what the
// kept entries weigh).
template <int kOptions, int kBlockM, int kBlockN, bool kDropout, class Acc, class CoordsRC>
CUTE_DEVICE void options_exp(const BwdParams& p, Acc& acc_s, CoordsRC const& coords_rc, int row0, int col0,
                             int seqlen_k, int diagonal, const float* lse_log2, float slope) {
  options_bias<kOptions, kBlockM, kBlockN>(p, acc_s, coords_rc, row0, col0, seqlen_k, diagonal, slope);
  Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    const float lse = lse_log2[get<0>(coords_rc(r, 0))] - (kDropout ? p.log2_rp_dropout : 0.f);
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) s(r, c) = exp2f(s(r, c) * p.scale_log2 - lse);
  }
}

// The dropout decisions of a tile when there are none (kDropout false).
struct NoDropout {};

// options_dropout: from options_exp's P in acc_s, returns P in 16 bits for dV += P^T dO and
// dropout's keep masks (Dropout::keep_masks; kDropout: the dropped entries of P are 0, the kept
// ones P / keep). The tile's random words: `words` if kDrawn, else drawn here.
template <bool kDropout, bool kRuns32, bool kDrawn, class Element, class Acc, class Coords, class Words>
CUTE_DEVICE auto options_dropout(Acc const& acc_s, Coords const& coords, int row0, int col0, const Dropout& dropout,
                                 Words const& words) {
  Tensor rP = make_converted<Element>(acc_s);
  if constexpr (kDropout) {
    auto keep = dropout.template keep_masks<kRuns32>(acc_s, coords, col0,
                                                     kDrawn ? words : dropout.draw_tile(acc_s, coords, row0, col0));
    apply_keep_masks(rP, keep);
    return cute::make_tuple(rP, keep);
  } else {
    return cute::make_tuple(rP, NoDropout{});
  }
}

// options_p: options_exp and options_dropout, and leaves in acc_s P * dz/ds (softcap: dz/ds =
// 1 - t^2 from options_s's t).
template <int kOptions, int kBlockM, int kBlockN, bool kDropout, bool kRuns32, bool kDrawn, class Element, class Acc,
          class Coords, class CoordsRC, class Words>
CUTE_DEVICE auto options_p(const BwdParams& p, Acc& acc_s, Coords const& coords, CoordsRC const& coords_rc,
                           int row0, int col0, int seqlen_k, int diagonal, const float* lse_log2, float slope,
                           const Dropout& dropout, Words const& words) {
  const bool softcap = softcap_on<kOptions>(p.opt);
  Tensor dz = make_fragment_like(acc_s);  // softcap's dz/ds = 1 - t^2
  if (softcap) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) dz(i) = 1.f - acc_s(i) * acc_s(i);
  }
  options_exp<kOptions, kBlockM, kBlockN, kDropout>(p, acc_s, coords_rc, row0, col0, seqlen_k, diagonal, lse_log2,
                                                   slope);
  auto p_and_keep = options_dropout<kDropout, kRuns32, kDrawn, Element>(acc_s, coords, row0, col0, dropout, words);
  if (softcap) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= dz(i);
  }
  return p_and_keep;
}

// options_ds: dS in 16 bits from a = P * dz/ds (acc_s; kDropout: P / keep * dz/ds) and dP = dO V^T
// (acc_dp, overwritten); D of the tile's rows in shared memory. dS = a * (dP - d), d = D (kDropout:
// D * keep); where dropout drops the score, dP does not reach it, and dS = -a * d. Both 16-bit
// pairs are made and the keep masks pick (no per-score branch or test).
template <bool kDropout, class Element, class Acc, class CoordsRC, class Keep>
CUTE_DEVICE auto options_ds(const BwdParams& p, Acc const& acc_s, Acc& acc_dp, CoordsRC const& coords_rc,
                            const float* dsum, Keep const& keep) {
  Tensor s = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
  Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
  if constexpr (!kDropout) {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(dp); ++r) {
      const float d = dsum[get<0>(coords_rc(r, 0))];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dp); ++c) dp(r, c) = s(r, c) * (dp(r, c) - d);
    }
    return make_converted<Element>(acc_dp);
  } else {
    Tensor ds = make_tensor<Element>(acc_dp.layout());
    uint32_t* pairs = reinterpret_cast<uint32_t*>(ds.data());
    CUTE_UNROLL
    for (int r = 0; r < size<0>(dp); ++r) {
      const float d = dsum[get<0>(coords_rc(r, 0))] * p.keep_prob;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(dp); c += 2) {  // columns c, c + 1: one 32-bit pair
        const int pair = dp.layout()(r, c) / 2;
        const uint32_t kept = pack_pair<Element>(s(r, c) * (dp(r, c) - d), s(r, c + 1) * (dp(r, c + 1) - d));
        const uint32_t dropped = pack_pair<Element>(-s(r, c) * d, -s(r, c + 1) * d);
        pairs[pair] = (kept & keep[pair]) | (dropped & ~keep[pair]);
      }
    }
    return ds;
  }
}

// The backward's P inside the GEMMs takes the m16n8 fragments of a thread's S accumulator (acc:
// ((2, 2), MMA_M, MMA_N), compact) in the order of copy_pds's view of it (copy: the view's flat
// index -> the register). These hold for every head dim's layouts: fragment f is the view's
// elements 4f .. 4f + 3, registers 4 (m + MMA_M n) .. + 3 for one (m, n) in value order ...
template <class CopyView, class AccLayout>
constexpr bool p_fragments_in_copy_order(CopyView copy, AccLayout acc) {
  constexpr int kM = decltype(size<1>(acc))::value, kValues = decltype(size(acc))::value;
  for (int f = 0; f < kValues / 4; ++f) {
    const int base = copy(4 * f), m = base / 4 % kM, n = base / 4 / kM;
    if (base % 4 != 0) return false;
    for (int v = 0; v < 4; ++v)
      if (int(copy(4 * f + v)) != base + v || int(acc(v, m, n)) != base + v) return false;
  }
  return true;
}
// ... and, where S is computed in two halves of the keys, the first half of the fragments are the
// registers of the first half's accumulator (acc_s's first half: its MMA_N is the outer mode).
template <class CopyView>
constexpr bool p_fragments_split(CopyView copy, int frags) {
  for (int f = 0; f < frags / 2; ++f)
    if (int(copy(4 * f)) >= 2 * frags) return false;
  return true;
}

// Key block n_block (kBlockN keys) of KV head `slot` (with expand_gqa: query head `slot`) of
// sequence `seq`, whose rows start at ws_row0 in the workspace. Every kernel takes the local
// window of p.opt (causal: right side 0); kOptions (an OptionKind): also softcap and/or ALiBi;
// kDropout: and dropout.
template <class Traits, int kOptions, bool kDropout>
CUTE_DEVICE void bwd_block(const BwdParams& p, typename Traits::SharedStorage& smem, const SeqSpan& seq,
                           int64_t ws_row0, int n_block, int slot, int batch) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kQStages = Traits::kQStages;
  constexpr int kDoStages = Traits::kDoStages;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  using TileKV = Shape<Int<kBlockN>, Int<kHeadDim>>;
  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;

  const int tid = threadIdx.x;
  const int groups = p.heads / p.heads_k;
  const int heads_per_cta = p.expand_gqa ? 1 : groups;
  const int head_begin = p.expand_gqa ? slot : slot * groups;
  const int head_k = head_begin / groups;
  const int seqlen_q = seq.len_q, seqlen_k = seq.len_k;
  const int n_blocks = ceil_div(seqlen_k, kBlockN);
  const int col0 = n_block * kBlockN;
  const int rows_k = min(kBlockN, seqlen_k - col0);
  const int d = p.head_dim;
  const int diagonal = seqlen_k - seqlen_q;  // key j visible from query i iff j <= i + diagonal

  // Query blocks that see a key of this block: those whose rows i have a key j of the block in
  // the window [i + diagonal - left, i + diagonal + right] (causal: right = 0; no window: all).
  const int m_begin = int(max(int64_t(0), int64_t(col0) - diagonal - p.opt.window_right) / kBlockM);
  const int64_t last_row = int64_t(col0) + kBlockN - 1 - diagonal + p.opt.window_left;  // may be < 0
  const int m_blocks = last_row < 0 ? 0 : int(min(int64_t(ceil_div(seqlen_q, kBlockM)), last_row / kBlockM + 1));
  const int steps_per_head = max(0, m_blocks - m_begin);
  const int steps = heads_per_cta * steps_per_head;

  const int64_t k_row = seq.k_row0 + col0;
  auto k_ptr = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + head_k * p.k_head_stride +
               k_row * p.k_row_stride;
  auto v_ptr = static_cast<const Element*>(p.v) + batch * p.v_batch_stride + head_k * p.v_head_stride +
               k_row * p.v_row_stride;
  // Row i of K, V, dK, dV in shared memory holds key KeyOrder(i) of the block (the kernel with
  // dropout: BwdTraits::DropoutKeyOrder), and so does column i of S, dP, P and dS.
  using KeyOrder = std::conditional_t<kDropout, typename Traits::DropoutKeyOrder, Layout<Int<kBlockN>>>;
  auto key_rows = [](auto const& tile) { return composition(tile, make_tile(KeyOrder{}, _)); };
  Tensor gK = key_rows(make_tensor(make_gmem_ptr(k_ptr), TileKV{}, make_stride(p.k_row_stride, _1{})));
  Tensor gV = key_rows(make_tensor(make_gmem_ptr(v_ptr), TileKV{}, make_stride(p.v_row_stride, _1{})));
  Tensor gdK = key_rows(make_tensor(make_gmem_ptr(static_cast<Element*>(p.dk) + batch * p.dk_batch_stride +
                                                  slot * p.dk_head_stride + k_row * p.dk_row_stride),
                                    TileKV{}, make_stride(p.dk_row_stride, _1{})));
  Tensor gdV = key_rows(make_tensor(make_gmem_ptr(static_cast<Element*>(p.dv) + batch * p.dv_batch_stride +
                                                  slot * p.dv_head_stride + k_row * p.dv_row_stride),
                                    TileKV{}, make_stride(p.dv_row_stride, _1{})));
  Tensor cK = key_rows(make_identity_tensor(TileKV{}));  // (key, column) of each element of those tiles

  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v()), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sP = make_tensor(make_smem_ptr(smem.p()), typename Traits::SmemLayoutPdS{});
  Tensor sPt = make_tensor(make_smem_ptr(smem.p()), typename Traits::SmemLayoutPdSt{});
  Tensor sdS = make_tensor(make_smem_ptr(smem.ds()), typename Traits::SmemLayoutPdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem.ds()), typename Traits::SmemLayoutPdSt{});
  auto sQ_at = [&](int stage) {
    return make_tensor(make_smem_ptr(smem.q.data() + stage * Traits::kQStageElems), typename Traits::SmemLayoutQ{});
  };
  auto sdO_at = [&](int stage) {
    return make_tensor(make_smem_ptr(smem.dout.data() + stage * Traits::kQStageElems), typename Traits::SmemLayoutQ{});
  };
  auto sQt_at = [&](int stage) {
    return make_tensor(make_smem_ptr(smem.q.data() + stage * Traits::kQStageElems), typename Traits::SmemLayoutQt{});
  };
  auto sdOt_at = [&](int stage) {
    return make_tensor(make_smem_ptr(smem.dout.data() + stage * Traits::kQStageElems), typename Traits::SmemLayoutQt{});
  };

  typename Traits::TiledMmadKV mma_dkv;
  Tensor acc_dk = partition_fragment_C(mma_dkv, TileKV{});  // (MMA, MMA_N, MMA_D) fp32
  Tensor acc_dv = partition_fragment_C(mma_dkv, TileKV{});
  clear(acc_dk);
  clear(acc_dv);

  if (steps == 0) {
    // No query row sees these keys (causal): their gradients are zero.
    store_acc<Traits>(acc_dk, 0.f, mma_dkv, sK, gdK, cK, rows_k, d, tid);
    store_acc<Traits>(acc_dv, 0.f, mma_dkv, sV, gdV, cK, rows_k, d, tid);
    return;
  }

  // ------------------------------------------------------------------------------------------
  // Global -> shared copies: K, V once; Q, dO per step
  // ------------------------------------------------------------------------------------------
  typename Traits::GmemTiledCopyAsync load_copy;
  auto load_thr = load_copy.get_thread_slice(tid);
  Tensor tKcK = load_thr.partition_S(cK);
  Tensor tQcQ = load_thr.partition_S(make_identity_tensor(TileQ{}));
  copy_predicated</*kZeroFill=*/true>(load_copy, load_thr.partition_S(gK), load_thr.partition_D(sK), tKcK, rows_k, d);
  copy_predicated</*kZeroFill=*/true>(load_copy, load_thr.partition_S(gV), load_thr.partition_D(sV), tKcK, rows_k, d);

  // The steps walk (query head, query block): heads_per_cta heads, blocks m_begin .. m_blocks - 1.
  auto advance = [&](int& head, int& m_block) {
    if (++m_block == m_blocks) {
      m_block = m_begin;
      ++head;
    }
  };
  // Rows row0 .. row0 + kBlockM - 1 of query head `head` of Q or dO (at `ptr`, with its strides)
  // into the (kBlockM, kHeadDim) buffer `dst`.
  auto load_rows = [&](const void* ptr, int64_t batch_stride, int64_t head_stride, int64_t row_stride, int head,
                       int row0, auto dst) {
    auto src = static_cast<const Element*>(ptr) + batch * batch_stride + head * head_stride +
               (seq.q_row0 + row0) * row_stride;
    Tensor g = make_tensor(make_gmem_ptr(src), TileQ{}, make_stride(row_stride, _1{}));
    const int rows = seqlen_q - row0;
    if (rows >= kBlockM && d == kHeadDim)
      copy(load_copy, load_thr.partition_S(g), load_thr.partition_D(dst));
    else
      copy_predicated<true>(load_copy, load_thr.partition_S(g), load_thr.partition_D(dst), tQcQ, rows, d);
  };
  // dO of one step into dO's buffer `stage`.
  auto load_do = [&](int head, int m_block, int stage) {
    load_rows(p.dout, p.dout_batch_stride, p.dout_head_stride, p.dout_row_stride, head, m_block * kBlockM,
              sdO_at(stage));
  };
  // Q, lse_log2 and D of one step into Q's buffer `stage`.
  auto load_q = [&](int head, int m_block, int stage) {
    const int row0 = m_block * kBlockM;
    load_rows(p.q, p.q_batch_stride, p.q_head_stride, p.q_row_stride, head, row0, sQ_at(stage));
    // The row vectors are padded to whole tiles: 16-byte copies, no predicates.
    constexpr int kChunks = kBlockM / 4;
    static_assert(2 * kChunks <= Traits::kThreads);
    const int64_t row_offset = head * p.ws_rows + ws_row0 + row0;
    if (tid < 2 * kChunks) {
      const bool is_lse = tid < kChunks;
      const int chunk = is_lse ? tid : tid - kChunks;
      const float* src = (is_lse ? p.lse_log2 : p.dsum) + row_offset + 4 * chunk;
      float* dst = (is_lse ? smem.lse_log2[stage] : smem.dsum[stage]) + 4 * chunk;
      SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(src),
                                                        *reinterpret_cast<cute::uint128_t*>(dst));
    }
  };
  // Q and dO of one step into buffers `stage` and `do_stage`. This form (each tile under its own
  // test, the row vectors between them) measured best of five in the kernels with options (H200,
  // bf16 d128 4k): against the one before (both tiles under one test, then the row vectors), the
  // softcap backward 1.6% and the ALiBi one 1.3% faster, dropout's 0.7% slower (performance-log.md).
  auto load_step = [&](int head, int m_block, int stage, int do_stage) {
    load_q(head, m_block, stage);
    load_do(head, m_block, do_stage);
  };
  // Softcap and dropout take options_p / options_ds (P stored before dP = dO V^T); ALiBi alone
  // is the plain kernel's path with the bias added (1.10x -> 1.06x the plain backward, H200 bf16 d128 4k).
  constexpr bool kOptionsPath = kOptions == kSoftcap || kOptions == kAnyOptions;
  static_assert(!kDropout || kOptionsPath, "dropout runs in the kernel with options");
  int head = head_begin, m_block = m_begin;  // the current step
  Dropout dropout;  // with_head() gives each step's query head its numbers
  if constexpr (kDropout) dropout = Dropout(p, batch, head);
  int next_head = head, next_m = m_block;    // the step after it
  load_step(head, m_block, 0, 0);
  cp_async_fence();

  // ------------------------------------------------------------------------------------------
  // MMA partitions
  // ------------------------------------------------------------------------------------------
  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmadQ mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);

  // S = Q K^T and dP = dO V^T: A from Q / dO, B from K / V, all (rows, head_dim) in smem.
  auto copy_sdp_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto copy_sdp_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ_at(0));   // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);         // (MMA, MMA_N, MMA_K)
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO_at(0));
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  Tensor tSsK = copy_sdp_b.get_thread_slice(tid).partition_S(sK);
  Tensor tdPsV = copy_sdp_b.get_thread_slice(tid).partition_S(sV);

  // dV += P^T dO and dK += dS^T Q: A from P^T / dS^T, B from dO^T / Q^T (transposed reads).
  auto copy_dkv_a = make_tiled_copy_A(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  auto copy_dkv_b = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dkv);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPt);       // (MMA, MMA_N, MMA_M)
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt_at(0));  // (MMA, MMA_D, MMA_M)
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sdSt);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt_at(0));
  Tensor tdVsPt = copy_dkv_a.get_thread_slice(tid).partition_S(sPt);
  Tensor tdKsdSt = copy_dkv_a.get_thread_slice(tid).partition_S(sdSt);

  // dQ = dS K: A from dS, B from K^T.
  auto copy_dq_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_dq);
  auto copy_dq_b = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma_dq);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);   // (MMA, MMA_M, MMA_N)
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);   // (MMA, MMA_D, MMA_N)
  Tensor tdQsdS = copy_dq_a.get_thread_slice(tid).partition_S(sdS);
  Tensor tdQsKt = copy_dq_b.get_thread_slice(tid).partition_S(sKt);

  // P and dS go from the S/dP accumulators to shared memory.
  auto copy_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_sdp);
  Tensor tPsP = copy_pds.get_thread_slice(tid).partition_D(sP);
  Tensor tdSsdS = copy_pds.get_thread_slice(tid).partition_D(sdS);

  // (row, col) of every S element this thread holds.
  Tensor tScS = thr_sdp.partition_C(composition(make_identity_tensor(TileS{}), make_tile(_, KeyOrder{})));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  if constexpr (Traits::kVInRegs) {
    // V into registers once; P and dS then overwrite its shared buffer (after the barrier).
    cp_async_wait<0>();
    __syncthreads();
    copy(copy_sdp_b, tdPsV, make_tensor(tdPrV.data(), copy_sdp_b.retile(tdPrV.layout())));
    __syncthreads();
  }

  // ------------------------------------------------------------------------------------------
  // Main loop over (query head, query block)
  // ------------------------------------------------------------------------------------------
  for (int t = 0; t < steps; ++t) {
    const int stage = kQStages == 2 ? t % 2 : 0;  // Q's buffer (and lse's, D's)
    const int do_stage = kDoStages == 2 ? t % 2 : 0;
    const int row0 = m_block * kBlockM;
    advance(next_head, next_m);

    cp_async_wait<0>();  // Q, dO, lse, D of this step (and, at t = 0, K and V) have landed ...
    __syncthreads();     // ... for every thread, and nobody still reads the buffers reused below
    if (kQStages == 2 && t + 1 < steps) {
      if constexpr (kDoStages == 2) {
        load_step(next_head, next_m, stage ^ 1, do_stage ^ 1);
      } else {
        load_q(next_head, next_m, stage ^ 1);  // dO after dV += P^T dO
      }
      cp_async_fence();
    }
    Tensor sQ = sQ_at(stage);
    Tensor sdO = sdO_at(do_stage);
    // ALiBi's slope of this step's head, loaded early: its latency hides behind S = Q K^T.
    const float slope = alibi_slope<kOptions>(p.opt, batch, head);
    // lse (as log2) and D of this thread's rows.
    float lse_log2[kRows], dsum[kRows];
    if constexpr (!kOptionsPath) {  // (options_p and options_ds read them where they need them: fewer live registers)
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = get<0>(tScS_rc(r, 0));
        lse_log2[r] = smem.lse_log2[stage][row];
        dsum[r] = smem.dsum[stage][row];
      }
    }

    // S = Q K^T, masked, and P = exp(scale * S - lse), in registers.
    Tensor acc_s = partition_fragment_C(mma_sdp, TileS{});  // (MMA, MMA_M, MMA_N) fp32
    clear(acc_s);
    // The softcap kernel puts P inside the GEMMs (below) on tiles without ALiBi and mask; the
    // dropout kernel without softcap on every tile, where kDropoutInGemm.
    bool softcap_in_gemm = false;
    if constexpr (kOptions == kSoftcap && !kDropout)
      softcap_in_gemm =
          !alibi_on<kOptions>(slope) && !tile_needs_mask(row0, kBlockM, col0, kBlockN, seqlen_k, diagonal, p.opt);
    constexpr int kFragM = decltype(size<1>(acc_s))::value, kFragN = decltype(size<2>(acc_s))::value;
    constexpr int kFrags = kFragM * kFragN;
    // S in two halves of the keys: where the half tile's accumulator is half of acc_s (not d160,
    // d224, whose TiledMMA spans all 64 keys of the tile).
    using TileHalfS = Shape<Int<kBlockM>, Int<kBlockN / 2>>;
    constexpr int kHalf = decltype(size(partition_fragment_C(mma_sdp, TileHalfS{})))::value;
    constexpr bool kSplitS = kOptions == kSoftcap && !kDropout && 2 * kHalf == kFrags * 4;
    // The kernel with dropout puts P inside the GEMMs where each k step of dP = dO V^T gets one
    // fragment (d128): there the backward with dropout went from 1.16x to 1.13x the plain one;
    // with 4 fragments per step (d64) it went from 1.15x to 1.55x, with 4/3 (d96) from 1.10x to
    // 1.125x, with 1/4 (d256) from 1.00x to 1.01x (H200, bf16, seqlen 4k). Its random words are
    // then drawn inside S = Q K^T, whose MMAs they do not need.
    constexpr int kSteps = decltype(size<2>(tdPrdO))::value;  // k steps of S = Q K^T and dP = dO V^T
    static_assert(kSteps == decltype(size<2>(tSrQ))::value);
    constexpr bool kDropoutInGemm = kDropout && kFrags == kSteps;
    Dropout step_dropout;  // dropout with this step's query head: set before its first use
    if constexpr (kDropoutInGemm) step_dropout = dropout.with_head(batch, p.heads, head);
    decltype(dropout.draw_tile(acc_s, tScS, 0, 0)) words;
    if (!(kSplitS && softcap_in_gemm))
      gemm_smem_smem(acc_s, tSrQ, tSrK, copy_sdp_a.get_thread_slice(tid).partition_S(sQ), tSsK, mma_sdp,
                     copy_sdp_a, copy_sdp_b, [&](int k) {
                       if constexpr (kDropoutInGemm)
                         if (k == 0) words = step_dropout.draw_tile(acc_s, tScS, row0, col0);
                     });
    Tensor scores = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    Tensor acc_dp = partition_fragment_C(mma_sdp, TileS{});
    Tensor dp = make_tensor(acc_dp.data(), rowcol_layout(acc_dp.layout()));
    auto dp_gemm_with = [&](auto&& work) {  // dP += dO V^T, work(k) after its k step's MMAs
      if constexpr (Traits::kVInRegs)
        gemm_smem_reg(acc_dp, tdPrdO, tdPrV, copy_sdp_a.get_thread_slice(tid).partition_S(sdO), mma_sdp, copy_sdp_a,
                      std::forward<decltype(work)>(work));
      else
        gemm_smem_smem(acc_dp, tdPrdO, tdPrV, copy_sdp_a.get_thread_slice(tid).partition_S(sdO), tdPsV, mma_sdp,
                       copy_sdp_a, copy_sdp_b, std::forward<decltype(work)>(work));
    };
    auto dp_gemm = [&] {  // dP = dO V^T
      clear(acc_dp);
      dp_gemm_with([](int) {});
    };
    // P and dS = P * (dP - D) to shared memory, in the input dtype.
    auto store_pds = [&](auto const& r, auto& dst) {  // a 16-bit S/dP-shaped fragment to sP or sdS
      copy(copy_pds, make_tensor(r.data(), copy_pds.retile(r.layout())), dst);
    };
    // P inside the GEMMs: the element-wise work on P of each m16n8 fragment (m, n) of acc_s goes
    // between the MMAs of a GEMM's k steps (work(k) of gemm_smem_smem), a slice of fragments per
    // step, and each slice's 16-bit P goes to shared memory one step later: those stores keep the
    // GEMM's later operand loads behind them (they might alias), so the work cannot drift past
    // the MMAs, as ptxas otherwise schedules it.
    Tensor rP = make_tensor<Element>(acc_s.layout());
    uint32_t* p_pairs = reinterpret_cast<uint32_t*>(rP.data());
    // Fragments are taken in the order of copy_pds's view of P (kCopyView: its flat index -> the
    // register): fragment f is the view's elements 4f .. 4f + 3, registers fragment_base(f) ..
    // + 3 of acc_s, so its rows h and h + 8 are the 32-bit pairs at 4f + 2h (checked at compile
    // time by p_fragments_in_copy_order).
    constexpr auto kCopyView = decltype(copy_pds.retile(rP.layout())){};
    static_assert(p_fragments_in_copy_order(kCopyView, acc_s.layout()));
    auto fragment_base = [](int f) { return int(kCopyView(4 * f)); };
    auto fragment_m = [&](int f) { return fragment_base(f) / 4 % kFragM; };
    auto fragment_n = [&](int f) { return fragment_base(f) / 4 / kFragM; };
    auto store_fragment = [&](int f) {
      CUTE_UNROLL
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<uint32_t*>(raw_pointer_cast(&tPsP(4 * f + 2 * h))) = p_pairs[kCopyView(4 * f + 2 * h) / 2];
    };
    // work(k) for a GEMM of k_steps steps over fragments f0 .. f1 - 1: compute(f) on slice k,
    // finish(f) on slice k - 1 (and the last slice after the last step).
    auto spread = [&](int f0, int f1, int k_steps, auto& compute, auto& finish) {
      return [=, &compute, &finish](int k) {
        auto first = [=](int step) { return f0 + step * (f1 - f0) / k_steps; };
        CUTE_UNROLL
        for (int f = first(k); f < first(k + 1); ++f) compute(f);
        if (k > 0) {
          CUTE_UNROLL
          for (int f = first(k - 1); f < first(k); ++f) finish(f);
        }
        if (k == k_steps - 1) {
          CUTE_UNROLL
          for (int f = first(k); f < f1; ++f) finish(f);
        }
      };
    };
    if (softcap_in_gemm) {
      float lse_rows[kRows], dsum_rows[kRows];
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        lse_rows[r] = smem.lse_log2[stage][get<0>(tScS_rc(r, 0))];
        dsum_rows[r] = smem.dsum[stage][get<0>(tScS_rc(r, 0))];
      }
      // t = tanh(S * softcap_pre), P = exp2(t * scale_log2 - lse); acc_s keeps a = P (1 - t^2).
      auto compute = [&](int f) {
        const int m = fragment_m(f), n = fragment_n(f);
        CUTE_UNROLL
        for (int h = 0; h < 2; ++h) {  // rows h and h + 8 of the fragment
          float pv[2];
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) {
            const float tv = tanh_approx(acc_s(2 * h + c, m, n) * p.opt.softcap_pre);
            pv[c] = exp2f(tv * p.scale_log2 - lse_rows[h + 2 * m]);
            acc_s(2 * h + c, m, n) = pv[c] * (1.f - tv * tv);
          }
          p_pairs[acc_s.layout()(2 * h, m, n) / 2] = pack_pair<Element>(pv[0], pv[1]);
        }
      };
      constexpr int kFirst = kSplitS ? kFrags / 2 : 0;  // fragments done inside S = Q K^T
      if constexpr (kSplitS) {
        // S in two halves of the keys; the first half's P inside the second half's GEMM.
        static_assert(p_fragments_split(kCopyView, kFrags), "the first half of the fragments hold the first keys");
        auto s_half = [&](int h, auto&& work) {
          Tensor sK_h = local_tile(sK, Shape<Int<kBlockN / 2>, Int<kHeadDim>>{}, make_coord(h, 0));
          Tensor rK_h = thr_sdp.partition_fragment_B(sK_h);
          Tensor acc_h = make_tensor(acc_s.data() + h * kHalf, partition_fragment_C(mma_sdp, TileHalfS{}).layout());
          gemm_smem_smem(acc_h, tSrQ, rK_h, copy_sdp_a.get_thread_slice(tid).partition_S(sQ),
                         copy_sdp_b.get_thread_slice(tid).partition_S(sK_h), mma_sdp, copy_sdp_a, copy_sdp_b, work);
        };
        s_half(0, [](int) {});
        s_half(1, spread(0, kFirst, kSteps, compute, store_fragment));
      }
      clear(acc_dp);
      if constexpr (Traits::kVInRegs)
        dp_gemm_with(spread(kFirst, kFrags, kSteps, compute, store_fragment));
      else  // the same GEMM written out: through dp_gemm_with, nvcc emits other PTX for these tuned kernels
        gemm_smem_smem(acc_dp, tdPrdO, tdPrV, copy_sdp_a.get_thread_slice(tid).partition_S(sdO), tdPsV, mma_sdp,
                       copy_sdp_a, copy_sdp_b, spread(kFirst, kFrags, kSteps, compute, store_fragment));
      // dS with D held in registers since before the GEMMs: options_ds, which reads D from shared
      // memory here, measured 0.5% slower (performance-log.md, 2026-11-30 sixth session).
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(dp); ++c) dp(r, c) = scores(r, c) * (dp(r, c) - dsum_rows[r]);
      }
      store_pds(make_converted<Element>(acc_dp), tdSsdS);
    } else if constexpr (kOptionsPath) {
      options_s<kOptions>(p, acc_s);
      if constexpr (!kDropoutInGemm) step_dropout = dropout.with_head(batch, p.heads, head);
      auto p_tile = [&] {
        return options_p<kOptions, kBlockM, kBlockN, kDropout, Traits::kSdpWarpCols == 32, kDropoutInGemm, Element>(
            p, acc_s, tScS, tScS_rc, row0, col0, seqlen_k, diagonal, smem.lse_log2[stage], slope, step_dropout,
            words);
      };
      auto store_ds = [&](auto const& keep) {
        store_pds(options_ds<kDropout, Element>(p, acc_s, acc_dp, tScS_rc, smem.dsum[stage], keep), tdSsdS);
      };
      if constexpr (kDropout) {
        if (softcap_on<kOptions>(p.opt)) {
          auto [rP, keep] = p_tile();
          store_pds(rP, tPsP);
          dp_gemm();
          store_ds(keep);
        } else if constexpr (!kDropoutInGemm) {
          // The exponentials before the GEMM, as in the plain kernel (ptxas moves them after it),
          // the random words, decisions and P's stores after it.
          options_exp<kOptions, kBlockM, kBlockN, kDropout>(p, acc_s, tScS_rc, row0, col0, seqlen_k, diagonal,
                                                           smem.lse_log2[stage], slope);
          dp_gemm();
          auto [rP, keep] = options_dropout<kDropout, Traits::kSdpWarpCols == 32, false, Element>(
              acc_s, tScS, row0, col0, step_dropout, words);
          store_pds(rP, tPsP);
          store_ds(keep);
        } else {
          // ALiBi and the mask before dP = dO V^T; inside it, the exponentials (P / keep) of a
          // slice of fragments per step and, a step later, their drop decisions, 16-bit P and stores.
          options_bias<kOptions, kBlockM, kBlockN>(p, acc_s, tScS_rc, row0, col0, seqlen_k, diagonal, slope);
          float lse_rows[kRows];
          CUTE_UNROLL
          for (int r = 0; r < kRows; ++r) lse_rows[r] = smem.lse_log2[stage][get<0>(tScS_rc(r, 0))] - p.log2_rp_dropout;
          auto compute = [&](int f) {
            const int m = fragment_m(f), n = fragment_n(f);
            CUTE_UNROLL
            for (int v = 0; v < 4; ++v) acc_s(v, m, n) = exp2f(acc_s(v, m, n) * p.scale_log2 - lse_rows[v / 2 + 2 * m]);
          };
          auto finish = [&](int f) {
            const int m = fragment_m(f), n = fragment_n(f);
            const uint2 mask = step_dropout.fragment_masks(
                step_dropout.word<Traits::kSdpWarpCols == 32>(acc_s, tScS, col0, words, m, n));
            const int pair = acc_s.layout()(0, m, n) / 2;
            p_pairs[pair] = pack_pair<Element>(acc_s(0, m, n), acc_s(1, m, n)) & mask.x;
            p_pairs[pair + 1] = pack_pair<Element>(acc_s(2, m, n), acc_s(3, m, n)) & mask.y;
            store_fragment(f);
          };
          clear(acc_dp);
          if constexpr (Traits::kVInRegs)
            dp_gemm_with(spread(0, kFrags, kSteps, compute, finish));
          else  // the same GEMM written out: through dp_gemm_with, nvcc emits other PTX for these tuned kernels
            gemm_smem_smem(acc_dp, tdPrdO, tdPrV, copy_sdp_a.get_thread_slice(tid).partition_S(sdO), tdPsV, mma_sdp,
                           copy_sdp_a, copy_sdp_b, spread(0, kFrags, kSteps, compute, finish));
          // dS's keep masks made again from the words: held across the GEMM, they cost registers
          // (5.31 -> 5.28 ms without them, H200 bf16 4k).
          store_ds(step_dropout.keep_masks<Traits::kSdpWarpCols == 32>(acc_s, tScS, col0, words));
        }
      } else {
        dp_gemm();
        auto [rP, keep] = p_tile();
        store_pds(rP, tPsP);
        store_ds(keep);
      }
    } else {
      const bool mask = tile_needs_mask(row0, kBlockM, col0, kBlockN, seqlen_k, diagonal, p.opt);
      if (kOptions == kAlibiOnly || mask)
        apply_bias_and_mask(
            scores, tScS_rc, [&](int r) { return row0 + get<0>(tScS_rc(r, 0)); }, [&](int) { return slope; }, col0,
            seqlen_k, diagonal, p.opt, /*alibi=*/kOptions == kAlibiOnly, mask);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(scores); ++c) scores(r, c) = exp2f(scores(r, c) * p.scale_log2 - lse_log2[r]);
      }
      dp_gemm();
      store_pds(make_converted<Element>(acc_s), tPsP);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        CUTE_UNROLL
        for (int c = 0; c < size<1>(dp); ++c) dp(r, c) = scores(r, c) * (dp(r, c) - dsum[r]);  // dS = P * (dP - D)
      }
      store_pds(make_converted<Element>(acc_dp), tdSsdS);
    }
    __syncthreads();

    // dV += P^T dO
    gemm_smem_smem(acc_dv, tdVrPt, tdVrdOt, tdVsPt, copy_dkv_b.get_thread_slice(tid).partition_S(sdOt_at(do_stage)),
                   mma_dkv, copy_dkv_a, copy_dkv_b);
    if constexpr (kQStages == 2 && kDoStages == 1) {
      if (t + 1 < steps) {
        __syncthreads();  // every thread is done with dO
        load_do(next_head, next_m, 0);
        cp_async_fence();
      }
    }

    // With one Q/dO buffer, the kernel runs dK += dS^T Q before dQ, so that the next block's
    // Q and dO load during dQ = dS K and its reductions instead of being waited for at the top of
    // the loop (H200, bf16, seqlen 2k/8k: d256 4-10% faster, d192 2-4%, d192's small tile 5-13%,
    // d128's 1-3% when it had one Q buffer).
    constexpr bool kLoadDuringDq = kQStages == 1;
    auto dk_gemm = [&](auto&& work) {  // dK += dS^T Q, work(k) after its k step's MMAs
      gemm_smem_smem(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, copy_dkv_b.get_thread_slice(tid).partition_S(sQt_at(stage)),
                     mma_dkv, copy_dkv_a, copy_dkv_b, work);
    };
    if constexpr (kLoadDuringDq) {
      dk_gemm([](int) {});
      if (t + 1 < steps) {
        __syncthreads();  // every thread is done with Q and dO
        load_step(next_head, next_m, 0, 0);
        cp_async_fence();
      }
    }

    // dQ += dS K, added into the fp32 accumulator. Deterministic mode: key blocks add in order.
    Tensor acc_dq = partition_fragment_C(mma_dq, TileQ{});  // (MMA, MMA_M, MMA_D) fp32
    clear(acc_dq);
    gemm_smem_smem(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, copy_dq_a, copy_dq_b);
    constexpr int kDqVecs = decltype(size(acc_dq))::value / kDqVec;
    // The accumulator is (heads, ws_rows, kHeadDim): rows and columns padded.
    const int64_t ws_row = head * p.ws_rows + ws_row0 + row0;
    int* semaphore = nullptr;
    if (p.dq_semaphore != nullptr) {
      semaphore = p.dq_semaphore + ws_row / kBlockM;
      // This query block's contributors are key blocks 0 .. n_last (those whose first key some
      // row of it sees); they add from n_last down, so key block n_block goes after n_last - n_block.
      const int n_last = KeyRange(row0, kBlockM, seqlen_k, diagonal, p.opt, kBlockN).end - 1;
      if (tid == 0) {
        while (atomicAdd(semaphore, 0) != n_last - n_block) {
        }
      }
      __syncthreads();
    }
    auto red_vecs = [&](int v_begin, int v_end) {
      red_add_dq<Traits::kThreads>(acc_dq, p.dq_accum + ws_row * kHeadDim, tid, v_begin, v_end);
    };
    // With two buffers dK += dS^T Q comes after dQ = dS K (the next block is loading already),
    // and dQ's reductions go inside it, a slice of them after each k step, rather than all at
    // once before it. In the tile's own order of the accumulator (8 rows of 32 bytes per RED)
    // that ran the backward with options 2-5% faster, the plain one 1-7% but at d128 1-1.5%
    // slower; in thread order, the plain d128 kernel 1% faster too (H200, bf16; performance-log.md).
    if constexpr (!kLoadDuringDq) {
      constexpr int kDkSteps = decltype(size<2>(tdKrdSt))::value;
      dk_gemm([&](int k) { red_vecs(k * kDqVecs / kDkSteps, (k + 1) * kDqVecs / kDkSteps); });
    } else {
      red_vecs(0, kDqVecs);
    }
    if (semaphore != nullptr) {
      __threadfence();
      __syncthreads();
      if (tid == 0) atomicAdd(semaphore, 1);
    }
    head = next_head;
    m_block = next_m;
  }

  // ------------------------------------------------------------------------------------------
  // Epilogue: dK (scaled) and dV through K's and V's buffers to global memory
  // ------------------------------------------------------------------------------------------
  __syncthreads();  // every thread is done reading K and V
  store_acc<Traits>(acc_dk, p.scale, mma_dkv, sK, gdK, cK, rows_k, d, tid);
  store_acc<Traits>(acc_dv, 1.f, mma_dkv, sV, gdV, cK, rows_k, d, tid);
}

// Grid: (key blocks, KV heads (or query heads with expand_gqa), batch). Padded batches: one CTA
// per key block. Varlen: the grid covers the longest sequence by the max_seqlen_k hint, and a CTA
// takes more than one key block of its sequence only when the hint was too small.
// Deterministic mode adds into dQ in descending key-block order and launches the last key block
// first: with causal the last key blocks see the fewest query blocks, so they finish their adds
// early (ascending order made key block 0, which sees every query block, pace all others: 2x
// slower). A CTA with several blocks takes a run of consecutive ones, top first, so every block
// waits only for blocks of CTAs launched before it or for its own earlier ones: no CTA can wait
// for one that is not yet resident. Otherwise a CTA takes blocks blockIdx.x + i * gridDim.x.
template <class Traits, bool kVarlen, int kOptions, bool kDropout>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_kernel(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) char smem_bytes[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_bytes);
  constexpr int kBlockN = Traits::kBlockN;
  const int batch = blockIdx.z;
  const SeqSpan seq = seq_span<kVarlen>(p, batch);
  const int64_t ws_row0 = workspace_row0(kVarlen, Traits::kBlockM, p.seqlen_q, batch, seq.q_row0);
  const int n_blocks = kVarlen ? ceil_div(seq.len_k, kBlockN) : int(gridDim.x);
  const int ctas = gridDim.x, cta = blockIdx.x;
  // This CTA's key blocks: `count` of them, from `first`, `step` apart.
  int first = cta, step = ctas, count = cta < n_blocks ? ceil_div(n_blocks - cta, ctas) : 0;
  if (p.dq_semaphore != nullptr) {
    const int run = ceil_div(n_blocks, ctas);
    first = n_blocks - 1 - cta * run;
    step = -1;
    count = max(0, min(run, first + 1));
  }
  for (int j = 0; j < count; ++j) {
    if (j > 0) __syncthreads();  // every thread is done with the previous block's tiles
    bwd_block<Traits, kOptions, kDropout>(p, smem, seq, ws_row0, first + j * step, blockIdx.y, batch);
    if constexpr (!kVarlen) break;
  }
}

// dQ = scale * dq_accum in the input dtype, one (kBlockM, head dim) tile of one (sequence, query
// head) at a time: each thread reads its fragment of the tile in thread order (dq_accum_offset)
// and the tile goes through shared memory to dq, as dK and dV do. Grid: (query blocks of the
// longest sequence, batch, query heads); varlen: the max_seqlen_q hint, looping past it.
template <class Traits, bool kVarlen>
__global__ void __launch_bounds__(Traits::kThreads) convert_dq_kernel(const __grid_constant__ BwdParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kBlockM>, Int<kHeadDim>>;
  __shared__ alignas(128) char smem[sizeof(Element) * cosize_v<typename Traits::SmemLayoutQ>];
  const int tid = threadIdx.x, batch = blockIdx.y, head = blockIdx.z;
  const SeqSpan seq = seq_span<kVarlen>(p, batch);
  const int64_t ws_row0 = workspace_row0(kVarlen, kBlockM, p.seqlen_q, batch, seq.q_row0);  // as bwd_kernel's
  typename Traits::TiledMmadQ mma_dq;
  Tensor sdQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor cdQ = make_identity_tensor(TileQ{});
  for (int m_block = blockIdx.x; m_block * kBlockM < seq.len_q; m_block += gridDim.x) {
    const int row0 = m_block * kBlockM;
    const float* tile = p.dq_accum + (head * p.ws_rows + ws_row0 + row0) * kHeadDim;  // as bwd_block's ws_row
    Tensor acc = partition_fragment_C(mma_dq, TileQ{});
    CUTE_UNROLL
    for (int v = 0; v < size(acc) / kDqVec; ++v) {
      if constexpr (kDqVec == 4) {
        const float4 x = *reinterpret_cast<const float4*>(tile + dq_accum_offset<Traits::kThreads>(tid, 4 * v));
        acc(4 * v) = x.x, acc(4 * v + 1) = x.y, acc(4 * v + 2) = x.z, acc(4 * v + 3) = x.w;
      } else {
        acc(v) = tile[dq_accum_offset<Traits::kThreads>(tid, v)];
      }
    }
    Tensor gdQ = make_tensor(make_gmem_ptr(static_cast<Element*>(p.dq) + batch * p.dq_batch_stride +
                                           head * p.dq_head_stride + (seq.q_row0 + row0) * p.dq_row_stride),
                             TileQ{}, make_stride(p.dq_row_stride, _1{}));
    if (m_block != blockIdx.x) __syncthreads();  // every thread is done reading the previous tile
    store_acc<Traits>(acc, p.scale, mma_dq, sdQ, gdQ, cdQ, seq.len_q - row0, p.head_dim, tid);
  }
}

}  // namespace flash_cute
