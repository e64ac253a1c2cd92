// Every CuTe type the forward kernel uses, derived from (element type, head dim, tile).
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "flash_cute/launch.h"

namespace flash_cute {
using namespace cute;

template <DType kDType> struct ElementOf;
template <> struct ElementOf<DType::kFloat16> { using type = cutlass::half_t; };
template <> struct ElementOf<DType::kBFloat16> { using type = cutlass::bfloat16_t; };

// Shared by the kernel families: the tensor-core atom, shared-memory layouts and copies for
// row-major (rows, kHeadDim) tiles of 16-bit elements.
template <class Element_, int kHeadDim_, int kWarps_>
struct TraitsBase {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = kWarps * 32;
  static_assert(kHeadDim % 32 == 0, "head-dim buckets are multiples of 32");

  // m16n8k16 tensor-core MMA, fp32 accumulate. Warps tile M; the N permutation of 16 makes one
  // LDSM.x4 feed two n8 atoms.
  using MmaAtom = MMA_Atom<std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                              SM80_16x8x16_F32F16F16F32_TN,
                                              SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  // Shared memory rows are cut in 64-element (128-byte) chunks where the head dim allows,
  // otherwise 32; the XOR swizzle spreads the 8 rows an LDSM reads over all 32 banks.
  static constexpr int kSmemChunk = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kSmemChunk == 64 ? 3 : 2;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{},
      Layout<Shape<_8, Int<kSmemChunk>>, Stride<Int<kSmemChunk>, _1>>{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // Q, K (and dO later)
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // V as the B of P V
  using SmemCopyAtomO = Copy_Atom<UniversalCopy<uint32_t>, Element>;     // accumulator -> smem

  // Global <-> shared: 16-byte vectors, a row chunk per group of threads.
  static constexpr int kElemsPerVec = 16 / sizeof(Element);
  static constexpr int kThreadsPerRow = kSmemChunk / kElemsPerVec;
  static_assert(kThreads % kThreadsPerRow == 0);
  static constexpr int kGmemRowsPerPass = kThreads / kThreadsPerRow;
  using GmemThreadLayout = Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>,
                                  Stride<Int<kThreadsPerRow>, _1>>;
  using GmemValLayout = Layout<Shape<_1, Int<kElemsPerVec>>>;
  using GmemTiledCopyAsync = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
  using GmemTiledCopyStore = decltype(make_tiled_copy(
      Copy_Atom<UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));
};

template <DType kDType, int kHeadDim_, bool kCausal_, bool kSmallSmem_ = false>
struct FwdTraits : TraitsBase<typename ElementOf<kDType>::type, kHeadDim_,
                              fwd_tile(kHeadDim_, kCausal_, kSmallSmem_).warps> {
  using Base = TraitsBase<typename ElementOf<kDType>::type, kHeadDim_,
                          fwd_tile(kHeadDim_, kCausal_, kSmallSmem_).warps>;
  using typename Base::Element;
  using typename Base::SmemLayoutAtom;
  static constexpr bool kCausal = kCausal_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kSmallSmem = kSmallSmem_;
  static constexpr int kBlockM = fwd_tile(kHeadDim, kCausal, kSmallSmem).block_m;
  static constexpr int kBlockN = fwd_tile(kHeadDim, kCausal, kSmallSmem).block_n;
  // Whether the prologue loads the first key block's V with Q and its K (fwd_block). Measured on
  // an H200 (bf16, every head dim's kernels built both ways): d128 forward 2-5% faster at 64-512
  // keys, causal grid geomean 0.975 -> 0.997 of torch's FA2, no option kernel slower; at d96 and
  // d256 the same change made ptxas schedule the main loop 3-3.6% slower per key, at d64 mixed.
  static constexpr bool kFirstVInPrologue = kHeadDim == 128;
  static_assert(kBlockM % (16 * Base::kWarps) == 0, "each warp owns whole m16 row groups");
  static_assert(kBlockN % 16 == 0);
  static_assert(kBlockM % Base::kGmemRowsPerPass == 0 && kBlockN % Base::kGmemRowsPerPass == 0,
                "one pass of the global-memory copy must not cover more rows than a tile has");

  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V read as V^T (head_dim, block_n) for O += P V: the same bytes, a transposed view.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutO = SmemLayoutQ;  // O is staged through Q's buffer on its way out

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutKV>> v;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= (kSmallSmem ? kSmallSmemBytes : 227 * 1024),
                "the tile does not fit the shared memory of the GPUs it is for");
};

}  // namespace flash_cute
