// Every CuTe type the backward kernel uses, derived from (element type, head dim) and bwd_tile()
// (kSmallSmem: its tile for GPUs with 99 KB of shared memory per block).
#pragma once
#include "flash_cute/fwd_traits.h"

namespace flash_cute {
using namespace cute;

template <DType kDType, int kHeadDim_, bool kSmallSmem_ = false>
struct BwdTraits
    : TraitsBase<typename ElementOf<kDType>::type, kHeadDim_, bwd_tile(kHeadDim_, kSmallSmem_).warps> {
  using Base = TraitsBase<typename ElementOf<kDType>::type, kHeadDim_, bwd_tile(kHeadDim_, kSmallSmem_).warps>;
  using typename Base::Element;
  using typename Base::MmaAtom;
  using typename Base::SmemLayoutAtom;
  static constexpr bool kSmallSmem = kSmallSmem_;
  static constexpr BwdTile kTile = bwd_tile(kHeadDim_, kSmallSmem);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kQStages = kTile.q_stages;
  static constexpr int kDoStages = kTile.do_stages;
  static_assert((kQStages == 1 || kQStages == 2) && (kDoStages == 1 || kDoStages == 2) && kDoStages <= kQStages);

  // A TiledMMA with `wm` x (kWarps / wm) warps, each taking m16 x n16 per step (two n8 atoms, so
  // one LDSM.x4 feeds both), for a GEMM of shape (m, n).
  template <int wm, int m, int n>
  using Mma = std::enable_if_t<m % (16 * wm) == 0 && n % (16 * (kWarps / wm)) == 0,
                               TiledMMA<MmaAtom, Layout<Shape<Int<wm>, Int<kWarps / wm>, _1>>,
                                        Tile<Int<16 * wm>, Int<16 * (kWarps / wm)>, _16>>>;
  using TiledMmaSdP = Mma<kTile.sdp_warps_m, kBlockM, kBlockN>;  // S, dP: (block_m, block_n)
  // The kernel with dropout keeps TiledMmaSdP but holds the block's keys in another order. In
  // key order, TiledMmaSdP gives a thread n8 fragments 8 * kSdpWarpsN keys apart; one Philox call
  // of dropout serves four fragments of a thread in 32 consecutive keys (options.h). So position i
  // = (column in fragment, warp, repeat) of the rows of K, V, dK, dV in shared memory, and of the
  // columns of S, dP, P and dS, holds key DropoutKeyOrder(i) of the block: each warp's fragments
  // cover kSdpWarpCols consecutive keys (32, or its whole share). (Permuting TiledMmaSdP's N axis
  // instead, as the kernel did before, cost the backward ~6%: performance-log.md.)
  static constexpr int kSdpWarpsN = kWarps / kTile.sdp_warps_m;
  static constexpr int kSdpWarpCols = kBlockN / kSdpWarpsN < 32 ? kBlockN / kSdpWarpsN : 32;
  using DropoutKeyOrder = Layout<Shape<_8, Int<kSdpWarpsN>, Int<kSdpWarpCols / 8>>, Stride<_1, Int<kSdpWarpCols>, _8>>;
  static_assert(size(DropoutKeyOrder{}) == kBlockN);
  using TiledMmadKV = Mma<kTile.dkv_warps_n, kBlockN, kHeadDim>;  // dK, dV: (block_n, head_dim)
  using TiledMmadQ = Mma<kTile.dq_warps_m, kBlockM, kHeadDim>;    // dQ: (block_m, head_dim)

  static_assert(kBlockM % Base::kGmemRowsPerPass == 0 && kBlockN % Base::kGmemRowsPerPass == 0,
                "one pass of the global-memory copy must not cover more rows than a tile has");
  static constexpr bool kVInRegs = kTile.v_in_regs;

  // Q and dO: (block_m, head_dim), kQStages and kDoStages buffers; K and V: (block_n, head_dim).
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // P and dS: (block_m, block_n), written from the S/dP accumulators, read as they are (dQ = dS K)
  // and transposed (dV += P^T dO, dK += dS^T Q). Rows cut in 64-element chunks (32 where the
  // block has 32 keys), swizzled as Q's.
  static constexpr int kPdSChunk = kBlockN % 64 == 0 ? 64 : 32;
  static_assert(kBlockN % kPdSChunk == 0);
  using SmemLayoutPdS = decltype(tile_to_shape(
      composition(Swizzle<kPdSChunk == 64 ? 3 : 2, 3, 3>{},
                  Layout<Shape<_8, Int<kPdSChunk>>, Stride<Int<kPdSChunk>, _1>>{}),
      Shape<Int<kBlockM>, Int<kBlockN>>{}));

  // Transposed views of the same bytes: T(i, j) = X(j, i).
  template <class L, int rows, int cols>
  using Transposed = decltype(composition(L{}, make_layout(Shape<Int<rows>, Int<cols>>{}, GenRowMajor{})));
  using SmemLayoutPdSt = Transposed<SmemLayoutPdS, kBlockN, kBlockM>;  // (block_n, block_m)
  using SmemLayoutKt = Transposed<SmemLayoutKV, kHeadDim, kBlockN>;     // (head_dim, block_n)
  using SmemLayoutQt = Transposed<SmemLayoutQ, kHeadDim, kBlockM>;      // (head_dim, block_m)
  static constexpr int kQStageElems = cosize_v<SmemLayoutQ>;

  static constexpr int kKVElems = cosize_v<SmemLayoutKV>;
  static constexpr int kPdSElems = cosize_v<SmemLayoutPdS>;
  // V, then P, then dS; with V in registers (kVInRegs), P and dS take V's bytes once every thread
  // holds its V.
  static constexpr int kVPdSElems = kVInRegs ? cute::max(kKVElems, 2 * kPdSElems) : kKVElems + 2 * kPdSElems;
  struct SharedStorage {
    cute::array_aligned<Element, kQStages * kQStageElems> q;
    cute::array_aligned<Element, kDoStages * kQStageElems> dout;
    cute::array_aligned<Element, kKVElems> k;
    cute::array_aligned<Element, kVPdSElems> v_p_ds;
    // lse * log2(e) and rowsum(dO * O) of the block's rows, loaded with Q (read before dV += P^T dO)
    alignas(16) float lse_log2[kQStages][kBlockM];
    alignas(16) float dsum[kQStages][kBlockM];

    CUTE_DEVICE Element* v() { return v_p_ds.data(); }
    CUTE_DEVICE Element* p() { return v_p_ds.data() + (kVInRegs ? 0 : kKVElems); }
    CUTE_DEVICE Element* ds() { return p() + kPdSElems; }
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes == bwd_smem_bytes(kTile, kHeadDim), "the host's count (launch.h) is this struct's size");
  static_assert(kSmemBytes <= (kSmallSmem ? kSmallSmemBytes : 163 * 1024),
                "the backward tile must fit the shared memory of the GPUs it is for (A100: 163 KB)");
};

}  // namespace flash_cute
