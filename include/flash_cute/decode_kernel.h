// Split-KV decoding kernel (Flash-Decoding) for flash_attn_with_kvcache.
//
// Decoding reads the whole key/value cache for a handful of query rows, so the kernel is bound by
// memory bandwidth, and it is organised to keep the cache streaming:
//   * GQA packing: the query heads that share a KV head become rows of one tile, packed row
//     R = i * group + h for query row i and head h of the group, so each K/V element is read
//     once per group, not once per query head. A CTA owns 16 packed rows (one m16 MMA tile).
//   * Split-KV: grid.x splits the keys of every (batch, KV head) into equal shares of key blocks,
//     enough CTAs to fill the GPU even at batch 1; each writes a partial output and lse that the
//     combine pass (src/decode_combine.cu) merges. One split writes the output directly.
//   * Warp-private pipelines: inside a CTA, warp w takes key blocks w, w + warps, ... of the
//     split, each block 16 keys, through its own `stages`-deep cp.async ring, with its own online
//     softmax and O accumulator and only __syncwarp between steps. The warps merge once at the end.
// The share of a split is computed on the device from the current lengths, so a launch captured
// in a CUDA graph stays correct while cache_seqlens grow.
#pragma once
#include <cute/tensor.hpp>

#include "flash_cute/fwd_traits.h"
#include "flash_cute/launch.h"
#include "flash_cute/options.h"
#include "flash_cute/params.h"
#include "flash_cute/seqlen.h"
#include "flash_cute/softmax.h"
#include "flash_cute/utils.h"

namespace flash_cute {
using namespace cute;

template <DType kDType, int kHeadDim_>
struct DecodeTraits : TraitsBase<typename ElementOf<kDType>::type, kHeadDim_, decode_tile(kHeadDim_).warps> {
  using Base = TraitsBase<typename ElementOf<kDType>::type, kHeadDim_, decode_tile(kHeadDim_).warps>;
  using typename Base::Element;
  using typename Base::MmaAtom;
  using typename Base::SmemLayoutAtom;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = Base::kWarps;
  static constexpr int kStages = decode_tile(kHeadDim).stages;
  static constexpr int kBlockN = decode_tile(kHeadDim).block_n;  // keys per warp step
  static constexpr int kRows = kDecodeRows;
  static_assert(kBlockN == 16 && kRows == 16, "one m16n8k16 tile of rows and one k16 step of keys");

  // Every warp multiplies the whole 16-row tile by its own keys.
  using WarpMma = TiledMMA<MmaAtom, Layout<Shape<_1, _1, _1>>, Tile<_16, _16, _16>>;

  // A 16 x kHeadDim tile in shared memory: a K block, a V block, or Q on its way to registers.
  using SmemLayoutTile = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kRows>, Int<kHeadDim>>{}));
  using SmemLayoutTileT = decltype(composition(
      SmemLayoutTile{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  static constexpr int kTileElems = cosize_v<SmemLayoutTile>;

  // One warp's global -> shared copy of a 16-row tile: 16-byte cp.async, zero-filled where predicated.
  static constexpr int kRowsPerPass = 32 / Base::kThreadsPerRow;
  using WarpGmemCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{},
      Layout<Shape<Int<kRowsPerPass>, Int<Base::kThreadsPerRow>>, Stride<Int<Base::kThreadsPerRow>, _1>>{},
      typename Base::GmemValLayout{}));

  // The merged output is staged as float32 rows padded by 4 floats (conflict-free float2 writes
  // from the MMA layout, aligned float4 reads).
  static constexpr int kStageRowFloats = kHeadDim + 4;

  struct SharedStorage {
    // [warp][stage][K, V] tiles; after the main loop, the float32 O of every warp.
    cute::array_aligned<Element, kWarps * kStages * 2 * kTileElems> kv;
    float row_max[kWarps][kRows];
    float row_sum[kWarps][kRows];
  };
  static_assert(kWarps * kRows * kStageRowFloats * sizeof(float) <= sizeof(SharedStorage::kv),
                "the O staging area must fit in the K/V buffers");
  static constexpr int kSmemBytes = int(sizeof(SharedStorage));
  static_assert(kSmemBytes <= decode_smem_bytes(kHeadDim) + 128, "decode_smem_bytes must match the layout");
  static_assert(kSmemBytes <= kSmallSmemBytes, "the decode tile must fit every supported GPU");
};

// The merged softmax statistics of one packed row over the warps: the maximum (raw score units)
// and the sum of exp(scale * (s - max)). max = -inf and sum = 0 when no warp saw a key.
template <int kWarps, class Smem>
CUTE_DEVICE void merged_row_stats(const Smem& smem, int row, float scale_log2, float& max, float& sum) {
  max = -INFINITY;
  CUTE_UNROLL
  for (int w = 0; w < kWarps; ++w) max = fmaxf(max, smem.row_max[w][row]);
  sum = 0.f;
  if (max == -INFINITY) return;
  CUTE_UNROLL
  for (int w = 0; w < kWarps; ++w) sum += smem.row_sum[w][row] * exp2f((smem.row_max[w][row] - max) * scale_log2);
}

// Grid: (num_splits, packed-row tiles * heads_k, batch); Traits::kThreads threads.
template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads) decode_kernel(const __grid_constant__ DecodeParams p) {
  using Element = typename Traits::Element;
  constexpr int kWarps = Traits::kWarps;
  constexpr int kStages = Traits::kStages;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kRows = Traits::kRows;
  constexpr int kHeadDim = Traits::kHeadDim;
  using TileQ = Shape<Int<kRows>, Int<kHeadDim>>;
  using TileS = Shape<Int<kRows>, Int<kBlockN>>;

  extern __shared__ __align__(128) char smem_bytes[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // ------------------------------------------------------------------------------------------
  // Which rows and keys
  // ------------------------------------------------------------------------------------------
  const int group = p.heads / p.heads_k;
  const int packed_rows = p.seqlen_q * group;
  const int m_tiles = ceil_div(packed_rows, kRows);
  const int split = blockIdx.x, head_k = blockIdx.y / m_tiles, batch = blockIdx.z;
  const int row0 = (blockIdx.y % m_tiles) * kRows;
  const int rows = min(kRows, packed_rows - row0);

  const bool paged = p.block_table != nullptr;
  // A row whose index values leave the cache sees no key and gets NaN (so does one with a
  // block-table entry that is not a page: page_bad below).
  const CacheSpan span = cache_span(p, batch);
  const int leftpad = span.leftpad;
  const int len_k = span.bad ? 0 : span.cached + p.seqlen_new - leftpad;  // visible keys, at positions leftpad + j
  const int diagonal = len_k - p.seqlen_q;
  // Keys this tile can see: [block0 * kBlockN, keys), cut by the window of its first and last
  // query row (causal: the window's right side is 0).
  const int64_t row_first = row0 / group + diagonal, row_last = (row0 + rows - 1) / group + diagonal;
  const int keys = int(max(int64_t(0), min(int64_t(len_k), row_last + p.opt.window_right + 1)));
  const int block0 = int(max(int64_t(0), row_first - p.opt.window_left) / kBlockN);
  const int blocks = max(0, ceil_div(keys, kBlockN) - block0);
  // The split's share: whole rounds of kWarps blocks [round_begin, round_end).
  const int rounds = ceil_div(blocks, kWarps);
  const int round_begin = int(int64_t(split) * rounds / p.num_splits);
  const int round_end = int(int64_t(split + 1) * rounds / p.num_splits);
  // This warp's blocks are block0 + (round * kWarps + warp) for round in [round_begin, warp_end).
  const int warp_end = min(round_end, blocks > warp ? ceil_div(blocks - warp, kWarps) : 0);
  const int steps = max(0, warp_end - round_begin);
  auto step_key = [&](int t) { return (block0 + (round_begin + t) * kWarps + warp) * kBlockN; };  // first key of step t

  // ------------------------------------------------------------------------------------------
  // Global memory
  // ------------------------------------------------------------------------------------------
  const Element* k_base = static_cast<const Element*>(p.k) + head_k * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + head_k * p.v_head_stride;
  if (!paged && !span.bad) {
    k_base += span.cache_row * p.k_batch_stride + int64_t(leftpad) * p.k_row_stride;
    v_base += span.cache_row * p.v_batch_stride + int64_t(leftpad) * p.v_row_stride;
  }
  // Paged: where this warp's key block of step t starts, as the offsets of its first row in K and
  // V. A page holds whole blocks (page_size % 16 == 0; paged caches have no left padding). Lane l
  // looks up step 32 c + l of chunk c, a chunk ahead of use, and the steps shuffle it out: one
  // table read per lane per 32 steps, its latency hidden behind the 32 steps before. An entry
  // that is not a page gives offset -1.
  auto lookup = [&](int chunk, int64_t& k_off, int64_t& v_off) {
    const int t = chunk * 32 + lane;
    k_off = v_off = 0;
    if (!paged || t >= steps) return;
    const int key = step_key(t);
    const int64_t page = p.block_table[batch * p.block_table_batch_stride + key / p.page_size];
    if (!is_page(page, p.cache_batch)) {
      k_off = v_off = -1;
      return;
    }
    const int64_t row = key % p.page_size;
    k_off = page * p.k_batch_stride + row * p.k_row_stride;
    v_off = page * p.v_batch_stride + row * p.v_row_stride;
  };
  int64_t k_off_cur, v_off_cur, k_off_next, v_off_next;  // chunks of the step being loaded, and the next
  lookup(0, k_off_cur, v_off_cur);
  lookup(1, k_off_next, v_off_next);

  // ------------------------------------------------------------------------------------------
  // This warp's ring of K/V tiles in shared memory, and its copies
  // ------------------------------------------------------------------------------------------
  Element* ring = smem.kv.data() + warp * kStages * 2 * Traits::kTileElems;
  auto k_tile = [&](int stage) { return ring + (2 * stage) * Traits::kTileElems; };
  auto v_tile = [&](int stage) { return ring + (2 * stage + 1) * Traits::kTileElems; };
  const typename Traits::SmemLayoutTile tile_layout;

  typename Traits::WarpGmemCopy load_copy;
  auto load_thr = load_copy.get_thread_slice(lane);
  Tensor tKcK = load_thr.partition_S(make_identity_tensor(TileQ{}));  // (row, col) of each vector
  Tensor tKsK0 = load_thr.partition_D(make_tensor(make_smem_ptr(ring), tile_layout));
  const int d = p.head_dim;
  constexpr int kVecs = kHeadDim / 8;  // 16-byte vectors per row

  // The appended keys are j >= new_begin. With k_new given they are read from k_new / v_new and
  // written into the cache by every CTA that reads them (the same values: the writes agree), so
  // no CTA depends on another's writes.
  const int new_begin = p.k_new != nullptr ? len_k - p.seqlen_new : len_k;

  // Issues the cp.async of this warp's key block of step t into `stage`; t advances by one per
  // call. Rows past the visible keys and columns past the head dim are zero-filled, so they add
  // nothing (and no NaN) to P V. A block whose block-table entry is not a page is neither read
  // nor appended to, and sets page_bad.
  bool page_bad = false;
  auto load_block = [&](int t, int stage) {
    const int key0 = step_key(t);
    int64_t k_off = int64_t(key0) * p.k_row_stride, v_off = int64_t(key0) * p.v_row_stride;
    if (paged) {
      if (t % 32 == 0 && t > 0) {  // the next chunk's lookups become current; look up the one after
        k_off_cur = k_off_next, v_off_cur = v_off_next;
        lookup(t / 32 + 1, k_off_next, v_off_next);
      }
      k_off = __shfl_sync(0xffffffff, k_off_cur, t % 32);
      v_off = __shfl_sync(0xffffffff, v_off_cur, t % 32);
    }
    const bool page_ok = k_off >= 0;
    page_bad |= !page_ok;
    const int valid = page_ok ? keys - key0 : 0;
    Tensor sK = make_tensor(tKsK0.data() + (k_tile(stage) - ring), tKsK0.layout());
    Tensor sV = make_tensor(tKsK0.data() + (v_tile(stage) - ring), tKsK0.layout());
    if (min(key0 + kBlockN, keys) <= new_begin) {  // old keys only: tiled copies from the cache
      Tensor gK = make_tensor(make_gmem_ptr(k_base + k_off), TileQ{}, make_stride(p.k_row_stride, _1{}));
      Tensor gV = make_tensor(make_gmem_ptr(v_base + v_off), TileQ{}, make_stride(p.v_row_stride, _1{}));
      if (valid >= kBlockN && d == kHeadDim) {
        copy(load_copy, load_thr.partition_S(gK), sK);
        copy(load_copy, load_thr.partition_S(gV), sV);
      } else {
        copy_predicated</*kZeroFill=*/true>(load_copy, load_thr.partition_S(gK), sK, tKcK, valid, d);
        copy_predicated</*kZeroFill=*/true>(load_copy, load_thr.partition_S(gV), sV, tKcK, valid, d);
      }
      return;
    }
    // A block with appended keys (rare: the last block or two of a sequence), row by row.
    Tensor sK_rc = make_tensor(make_smem_ptr(k_tile(stage)), tile_layout);
    Tensor sV_rc = make_tensor(make_smem_ptr(v_tile(stage)), tile_layout);
    for (int v = lane; v < kRows * kVecs; v += 32) {
      const int r = v / kVecs, c = (v % kVecs) * 8, key = key0 + r;
      const bool ok = r < valid && c < d;
      const cute::uint128_t* k_src = reinterpret_cast<const cute::uint128_t*>(k_base + k_off + r * p.k_row_stride + c);
      const cute::uint128_t* v_src = reinterpret_cast<const cute::uint128_t*>(v_base + v_off + r * p.v_row_stride + c);
      if (ok && key >= new_begin) {
        cute::uint128_t* k_dst = const_cast<cute::uint128_t*>(k_src);
        cute::uint128_t* v_dst = const_cast<cute::uint128_t*>(v_src);
        const int64_t i = key - new_begin;
        k_src = reinterpret_cast<const cute::uint128_t*>(static_cast<const Element*>(p.k_new) + batch * p.k_new_batch_stride +
                                                         i * p.k_new_row_stride + head_k * p.k_new_head_stride + c);
        v_src = reinterpret_cast<const cute::uint128_t*>(static_cast<const Element*>(p.v_new) + batch * p.v_new_batch_stride +
                                                         i * p.v_new_row_stride + head_k * p.v_new_head_stride + c);
        *k_dst = *k_src;  // the append
        *v_dst = *v_src;
      }
      if (!ok) k_src = v_src = reinterpret_cast<const cute::uint128_t*>(k_base);
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*k_src, *reinterpret_cast<cute::uint128_t*>(&sK_rc(r, c)), ok);
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*v_src, *reinterpret_cast<cute::uint128_t*>(&sV_rc(r, c)), ok);
    }
  };

  // ------------------------------------------------------------------------------------------
  // Prologue: Q through the last stage's K tile into registers, the first blocks in flight
  // ------------------------------------------------------------------------------------------
  {
    Element* q_tile = k_tile(kStages - 1);
    const Element* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride;
    Tensor sQ = make_tensor(make_smem_ptr(q_tile), tile_layout);
    for (int v = lane; v < kRows * kVecs; v += 32) {
      const int r = v / kVecs, c = (v % kVecs) * 8;
      const int packed = row0 + r;
      const bool ok = r < rows && c < d;
      const Element* src = q;
      if (ok) src += int64_t(packed / group) * p.q_row_stride + (head_k * group + packed % group) * p.q_head_stride + c;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(&sQ(r, c)), ok);
    }
    cp_async_fence();
  }
  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_block(s, s);
    cp_async_fence();
  }

  typename Traits::WarpMma mma;
  auto thr_mma = mma.get_thread_slice(lane);
  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, mma);

  Tensor tSrQ = make_tensor<Element>(partition_shape_A(mma, TileQ{}));  // (MMA, 1, kHeadDim / 16)
  cp_async_wait<kStages - 1>();  // Q has landed
  __syncwarp();
  {
    Tensor sQ = make_tensor(make_smem_ptr(k_tile(kStages - 1)), tile_layout);
    copy(smem_copy_q, smem_copy_q.get_thread_slice(lane).partition_S(sQ),
         make_tensor(tSrQ.data(), smem_copy_q.retile(tSrQ.layout())));
  }
  __syncwarp();  // the last stage's tile is free for key blocks

  Tensor tSrK = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  Tensor tOrVt = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kHeadDim>, Int<kBlockN>>{}));
  Tensor tSsK0 = smem_copy_k.get_thread_slice(lane).partition_S(make_tensor(make_smem_ptr(ring), tile_layout));
  Tensor tOsVt0 = smem_copy_v.get_thread_slice(lane).partition_S(
      make_tensor(make_smem_ptr(ring), typename Traits::SmemLayoutTileT{}));

  Tensor acc_o = partition_fragment_C(mma, TileQ{});  // (MMA, 1, kHeadDim / 8) fp32
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), rowcol_layout(acc_o.layout()));
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(TileS{}));
  Tensor tScS_rc = make_tensor(tScS.data(), rowcol_layout(tScS.layout()));
  constexpr int kThreadRows = decltype(size<0>(acc_o_rc))::value;  // 2: rows lane / 4 and lane / 4 + 8
  OnlineSoftmax<kThreadRows> softmax;
  // ALiBi slopes of the thread's rows (their query heads), in score units.
  float slopes[kThreadRows];
  CUTE_UNROLL
  for (int r = 0; r < kThreadRows; ++r)
    slopes[r] = alibi_slope(p.opt, batch, head_k * group + (row0 + get<0>(tScS_rc(r, 0))) % group);

  // ------------------------------------------------------------------------------------------
  // Main loop: this warp's key blocks, each a K and a V tile of 16 keys
  // ------------------------------------------------------------------------------------------
  for (int step = 0; step < steps; ++step) {
    const int ahead = step + kStages - 1;
    if (ahead < steps) load_block(ahead, ahead % kStages);
    cp_async_fence();
    cp_async_wait<kStages - 1>();  // this step's block has landed ...
    __syncwarp();                  // ... for every lane

    const int stage = step % kStages;
    Tensor acc_s = partition_fragment_C(mma, TileS{});  // (MMA, 1, 2) fp32
    clear(acc_s);
    gemm_reg_smem(acc_s, tSrQ, tSrK, make_tensor(tSsK0.data() + (k_tile(stage) - ring), tSsK0.layout()), mma,
                  smem_copy_k);
    Tensor scores = make_tensor(acc_s.data(), rowcol_layout(acc_s.layout()));
    const int key0 = step_key(step);
    if (p.opt.softcap_pre != 0.f) apply_softcap(scores, p.opt.softcap_pre);
    // A block needs the mask where it runs past the keys or crosses a window edge of some row.
    const bool mask = key0 + kBlockN > keys || key0 + kBlockN - 1 > row_first + p.opt.window_right ||
                      key0 < row_last - p.opt.window_left;
    apply_bias_and_mask(
        scores, tScS_rc, [&](int r) { return (row0 + get<0>(tScS_rc(r, 0))) / group; },
        [&](int r) { return slopes[r]; }, key0, len_k, diagonal, p.opt, p.opt.alibi_slopes != nullptr, mask);
    softmax.update(scores, acc_o_rc, p.scale_log2);
    Tensor rP = make_converted<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_operand_a_layout(rP.layout()));
    gemm_reg_smem(acc_o, tOrP, tOrVt, make_tensor(tOsVt0.data() + (v_tile(stage) - ring), tOsVt0.layout()), mma,
                  smem_copy_v);
    __syncwarp();  // every lane is done with the stage before the next step refills it
  }
  cp_async_wait<0>();
  // Paged: split 0 also checks the pages of the keys this tile never reads (a causal or local
  // window's), so that a row with a block-table entry that is not a page is NaN in every tile.
  if (paged && split == 0) {
    const int* table_row = p.block_table + batch * p.block_table_batch_stride;
    page_bad |= !thread_pages_ok(table_row, p.page_size, p.cache_batch, 0, min(block0 * kBlockN, len_k)) ||
                !thread_pages_ok(table_row, p.page_size, p.cache_batch, keys, len_k);
  }

  // ------------------------------------------------------------------------------------------
  // Merge the warps: each scales its O by exp(scale * (its max - the merged max)) / merged sum
  // ------------------------------------------------------------------------------------------
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(TileQ{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), rowcol_layout(tOcO.layout()));
  CUTE_UNROLL
  for (int r = 0; r < kThreadRows; ++r) {
    const float sum = quad_sum(softmax.row_sum[r]);
    if (lane % 4 == 0) {
      const int row = get<0>(tOcO_rc(r, 0));
      smem.row_max[warp][row] = softmax.row_max[r];
      smem.row_sum[warp][row] = sum;
    }
  }
  // The statistics are visible, every warp is done with its K/V ring, and the CTA knows whether
  // a block-table entry was not a page.
  const bool nan_out = span.bad || __syncthreads_or(page_bad);

  float* staged = reinterpret_cast<float*>(smem.kv.data());  // [warp][row][kStageRowFloats]
  CUTE_UNROLL
  for (int r = 0; r < kThreadRows; ++r) {
    const int row = get<0>(tOcO_rc(r, 0));
    float max, sum;
    merged_row_stats<kWarps>(smem, row, p.scale_log2, max, sum);
    const float factor = sum > 0.f ? exp2f((softmax.row_max[r] - max) * p.scale_log2) / sum : 0.f;
    float* dst = staged + (warp * kRows + row) * Traits::kStageRowFloats;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc_o_rc); c += 2) {
      const int col = get<1>(tOcO_rc(r, c));
      *reinterpret_cast<float2*>(dst + col) = make_float2(acc_o_rc(r, c) * factor, acc_o_rc(r, c + 1) * factor);
    }
  }
  __syncthreads();

  // ------------------------------------------------------------------------------------------
  // Epilogue: sum the warps' rows; one split writes out and lse, several write their partials
  // ------------------------------------------------------------------------------------------
  const bool partial = p.num_splits > 1;
  const int64_t accum_rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  for (int v = threadIdx.x; v < kRows * kVecs; v += Traits::kThreads) {
    const int r = v / kVecs, c = (v % kVecs) * 8;
    if (r >= rows || c >= d) continue;
    float acc[8] = {};
    CUTE_UNROLL
    for (int w = 0; w < kWarps; ++w) {
      const float4* src = reinterpret_cast<const float4*>(staged + (w * kRows + r) * Traits::kStageRowFloats + c);
      const float4 a = src[0], b = src[1];
      acc[0] += a.x, acc[1] += a.y, acc[2] += a.z, acc[3] += a.w;
      acc[4] += b.x, acc[5] += b.y, acc[6] += b.z, acc[7] += b.w;
    }
    CUTE_UNROLL
    for (int j = 0; j < 8; ++j) acc[j] = nan_out ? NAN : acc[j];
    const int packed = row0 + r, i = packed / group, head = head_k * group + packed % group;
    if (partial) {
      const int64_t row = (int64_t(batch) * p.heads + head) * p.seqlen_q + i;
      float4* dst = reinterpret_cast<float4*>(p.o_accum + (split * accum_rows + row) * d + c);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    } else {
      cutlass::Array<float, 8> in;
      CUTE_UNROLL
      for (int j = 0; j < 8; ++j) in[j] = acc[j];
      cutlass::NumericArrayConverter<Element, float, 8> convert;
      Element* out = static_cast<Element*>(p.o) + batch * p.o_batch_stride + i * p.o_row_stride +
                     head * p.o_head_stride + c;
      *reinterpret_cast<cutlass::Array<Element, 8>*>(out) = convert(in);
    }
  }
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float max, sum;
    merged_row_stats<kWarps>(smem, r, p.scale_log2, max, sum);
    const int packed = row0 + r, i = packed / group, head = head_k * group + packed % group;
    const bool empty = sum == 0.f && !nan_out;
    const float lse = nan_out ? NAN : max * p.lse_scale + __logf(sum);
    if (partial) {
      const int64_t row = (int64_t(batch) * p.heads + head) * p.seqlen_q + i;
      p.lse_accum[split * accum_rows + row] = empty ? -INFINITY : lse;
    } else {
      p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + i] = empty ? INFINITY : lse;
    }
  }
}

}  // namespace flash_cute
