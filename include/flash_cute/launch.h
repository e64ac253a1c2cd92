// What the dispatch layer needs to know about the kernels, in plain C++ (no CuTe, no device code).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "flash_cute/params.h"

namespace flash_cute {

// Head dims that get a kernel. Every head dim up to 256 (a multiple of 8) runs on the smallest
// bucket that holds it; loads past the real head dim are predicated off and read as zero.
inline constexpr int kHeadDimBuckets[] = {32, 64, 96, 128, 160, 192, 224, 256};
inline constexpr int kMaxHeadDim = 256;

constexpr int head_dim_bucket(int head_dim) {
  for (int bucket : kHeadDimBuckets)
    if (head_dim <= bucket) return bucket;
  return 0;
}

// The forward tile: rows of Q per CTA, rows of K/V per main-loop step, warps per CTA.
// One table, read by the kernel traits on the device and by the dispatch layer on the host.
struct FwdTile {
  int block_m, block_n, warps;
  constexpr bool operator==(const FwdTile& o) const {
    return block_m == o.block_m && block_n == o.block_n && warps == o.warps;
  }
};

// Shared memory per block on the Ampere-or-newer GPUs with the least of it (sm_86, sm_89, sm_120).
inline constexpr int kSmallSmemBytes = 99 * 1024;

// Whether the build has the second tiles for those GPUs, where the default tiles need more (the
// forward at d224/d256, the backward at every head dim): FLASH_CUTE_SMALL_SMEM_TILES (CMakeLists.txt).
#ifndef FLASH_CUTE_SMALL_SMEM_TILES
#define FLASH_CUTE_SMALL_SMEM_TILES 1
#endif
inline constexpr bool kSmallSmemTiles = FLASH_CUTE_SMALL_SMEM_TILES;

// `small_smem`: the tile for GPUs with only kSmallSmemBytes per block; it differs from the
// default where the default needs more (d224, d256), and run_fwd picks it at run time.
constexpr FwdTile fwd_tile(int head_dim, bool /*causal*/, bool small_smem = false) {
  // Chosen on an H100 (benchmark/run.py; docs/performance-log.md has the numbers): 4 warps of
  // 32 query rows where the O and S accumulators fit the registers without (much) spilling;
  // d128: 128 x 32 ran 1.00x torch's FA2 where 128 x 64 (104 B of spills) ran 0.96x and
  // 128 x 64 with 8 warps 0.87x. Larger head dims take 8 warps of 16 rows so acc_o fits;
  // d256 with 128 x 64 ran 1.00-1.04x where 128 x 32 ran 0.84x.
  if (head_dim <= 64) return {128, 64, 4};
  if (head_dim <= 128) return {128, 32, 4};
  if (head_dim <= 192) return {128, 64, 8};  // 96 KB of shared memory at d192
  return small_smem ? FwdTile{64, 64, 4} : FwdTile{128, 64, 8};  // 96 KB : 112 / 128 KB
}

// The backward tile. A CTA owns block_n keys (dK, dV accumulate in its registers) and walks the
// query blocks of block_m rows. Its three GEMM shapes spread the warps differently:
//   S = Q K^T and dP = dO V^T   (block_m x block_n): sdp_warps_m warps along M, the rest along N;
//   dV += P^T dO, dK += dS^T Q  (block_n x head_dim): dkv_warps_n warps along N;
//   dQ = dS K                   (block_m x head_dim): dq_warps_m warps along M.
// `q_stages`, `do_stages`: Q and dO buffers. Two: the next block's Q (dO) loads during the whole
// iteration; one dO buffer beside two Q buffers: the next dO loads once dV += P^T dO is done; one
// of each: both load during dQ = dS K.
// `v_in_regs`: each thread loads its share of V (the B operand of dP = dO V^T) into registers once,
// and P and dS take V's shared buffer for the rest of the CTA's life.
struct BwdTile {
  int block_m, block_n, warps, sdp_warps_m, dkv_warps_n, dq_warps_m, q_stages, do_stages;
  bool v_in_regs = false;
  constexpr bool operator==(const BwdTile& o) const {
    return block_m == o.block_m && block_n == o.block_n && warps == o.warps && sdp_warps_m == o.sdp_warps_m &&
           dkv_warps_n == o.dkv_warps_n && dq_warps_m == o.dq_warps_m && q_stages == o.q_stages &&
           do_stages == o.do_stages && v_in_regs == o.v_in_regs;
  }
};

// The head dim of the backward kernel that runs a bucket (`small_smem`: its tile for GPUs with
// kSmallSmemBytes): the bucket's, but d224 there runs d256's small tile on zero-padded columns, as
// flash_attn runs every head dim above 192 on its d256 kernels. The workspace's dQ accumulator has
// this many columns.
constexpr int bwd_kernel_head_dim(int head_dim, bool small_smem) {
  return small_smem && head_dim == 224 ? 256 : head_dim;
}

constexpr BwdTile bwd_tile(int head_dim, bool small_smem = false) {
  // A warp's share of each GEMM must tile it: 16 * (warps / dkv_warps_n) and
  // 16 * (warps / dq_warps_m) divide the head dim. Shared memory: 114 KB (d32), 162 KB (d64),
  // 129 KB (d96), 161 KB (d128, d192), 137 KB (d160), 157 KB (d224), 145 KB (d256), within the
  // 163 KB of an A100.
  // `small_smem`: the tile for GPUs with kSmallSmemBytes per block (sm_86, sm_89, sm_120), where
  // the default needs more: the same warps on fewer rows, and fewer Q/dO buffers where two of each
  // do not fit (d32 65 KB, d64 97 KB, d96 89 KB, d128 97 KB with one dO buffer, d160 97 KB and
  // d192 80 KB with one of each). d256 (97 KB) runs 32 keys per block with V in registers,
  // P and dS in V's buffer: at 32 x 64 with one buffer of each, Q, dO, K and V alone take 96 KB.
  // d224 runs d256's small tile (bwd_kernel_head_dim): 8 warps cannot tile its dK/dV on 32 keys.
  // Measured under the testing hook on an H200 (bf16, seqlen 2k/8k): d128 with S/dP on 4 x 2 warps
  // ran 3.4-3.8% faster than on 2 x 4; d192 with two Q buffers (92 KB) 1.3-1.7% slower; d256's
  // small tile 0.68-0.72x its default's speed (performance-log.md, eleventh session).
  if (head_dim <= 64) return small_smem ? BwdTile{64, 128, 8, 2, 4, 4, 2, 2} : BwdTile{128, 128, 8, 2, 4, 4, 2, 2};
  if (head_dim <= 96) return small_smem ? BwdTile{64, 64, 8, 2, 4, 4, 2, 2} : BwdTile{64, 128, 8, 2, 4, 4, 2, 2};
  if (head_dim <= 128) return small_smem ? BwdTile{64, 64, 8, 4, 2, 2, 2, 1} : BwdTile{64, 128, 8, 2, 4, 2, 2, 2};
  // d192, d256: S/dP on 4 x 2 warps, dK/dV and dQ on 2 x 4 (bf16, seqlen 512..16k, geomean over
  // torch's flash backend): d256 0.81x where 2 x 4 / 4 x 2 / 4 x 2 ran 0.76x; d192 0.79x vs 0.76x.
  // d160 and d224 need 16 x 2 warps across the head dim.
  if (head_dim == 192 && small_smem) return {32, 64, 8, 2, 4, 2, 1, 1};
  if (small_smem && bwd_kernel_head_dim(head_dim, true) == 256) return {64, 32, 8, 4, 2, 2, 1, 1, /*v_in_regs=*/true};
  // d160, d192: two Q and two dO buffers (137 KB, 161 KB, within the A100's 163 KB) ran the plain
  // backward 3-4% faster than one of each, softcap and ALiBi 7-8%, dropout 2-3%. d224: two Q
  // buffers beside one dO (157 KB; two of each need 185 KB) ran 2.4-3.3% faster than one of each
  // once dQ's accumulator was in thread order, the options 2-5%; d256's two of each need 209 KB
  // (performance-log.md, eleventh to fourteenth sessions).
  if (head_dim == 160) return small_smem ? BwdTile{64, 64, 8, 2, 4, 4, 1, 1} : BwdTile{64, 64, 8, 2, 4, 4, 2, 2};
  if (head_dim == 192) return {64, 64, 8, 4, 2, 2, 2, 2};
  if (head_dim == 224) return {64, 64, 8, 2, 4, 4, 2, 1};
  return {64, 64, 8, 4, 2, 2, 1, 1};  // d256
}

// Shared memory of the backward tile (BwdTraits::SharedStorage, checked there): Q and dO
// (`q_stages`, `do_stages` buffers), K, V, P, dS in 16 bits (v_in_regs: P and dS in V's buffer);
// lse and D of each Q buffer's rows in fp32.
constexpr int bwd_smem_bytes(const BwdTile& t, int head_dim) {
  const int v = t.block_n * head_dim, pds = 2 * t.block_m * t.block_n;
  return 2 * ((t.q_stages + t.do_stages) * t.block_m * head_dim + t.block_n * head_dim +
              (t.v_in_regs ? (v > pds ? v : pds) : v + pds)) +
         4 * 2 * t.q_stages * t.block_m;
}

// FLASH_CUTE_FORCE_SMALL_SMEM_TILE (testing hook): run the small-shared-memory tiles on any GPU,
// so an H100 tests the kernels that sm_86 and sm_89 run.
inline bool force_small_smem_tile() { return std::getenv("FLASH_CUTE_FORCE_SMALL_SMEM_TILE") != nullptr; }

// A launcher's check that the tile it picked (`bytes` of shared memory) fits the GPU's limit; the
// error says why no smaller tile ran.
inline void require_smem(const std::string& kernel, int bytes, int smem_optin, bool has_small_tile) {
  if (bytes <= smem_optin) return;
  const char* why = has_small_tile   ? ""
                    : kSmallSmemTiles ? " (this head dim has no tile for less)"
                                      : " (this build was made with FLASH_CUTE_SMALL_SMEM_TILES=OFF: rebuild with it ON "
                                        "for the tiles of GPUs with 99 KB per block)";
  throw std::runtime_error("flash_cute: " + kernel + " needs " + std::to_string(bytes) +
                           " bytes of shared memory per block; this GPU allows " + std::to_string(smem_optin) + why);
}

// Whether a kernel runs its small-shared-memory tile: where the build has one for it, when the
// testing hook forces it or the default tile (`default_bytes`) needs more than the GPU allows.
inline bool runs_small_tile(bool has_small_tile, int default_bytes, int smem_optin) {
  return has_small_tile && (force_small_smem_tile() || default_bytes > smem_optin);
}

// Whether the build has a small-shared-memory backward tile for this head-dim bucket.
constexpr bool bwd_has_small_tile(int head_dim) {
  return kSmallSmemTiles && !(bwd_tile(head_dim, true) == bwd_tile(head_dim));
}

// Whether the backward for this head-dim bucket runs its small-shared-memory tile on a GPU that
// allows `smem_optin` bytes per block (the launcher and the workspace's padding both ask this).
inline bool bwd_runs_small_tile(int head_dim, int smem_optin) {
  return runs_small_tile(bwd_has_small_tile(head_dim), bwd_smem_bytes(bwd_tile(head_dim), head_dim), smem_optin);
}

// The decode tile (flash_attn_with_kvcache). A CTA owns 16 packed query rows of one KV head (the
// query rows times the query heads that share the KV head: GQA packing) and `warps` warps that
// each walk their own blocks of block_n keys with a private `stages`-deep cp.async pipeline and
// online softmax; the warps merge at the end. Shared memory: warps * stages K and V blocks,
// at most 96 KB, so sm_86/sm_89 (99 KB) run every head dim and an H100 holds two CTAs per SM.
struct DecodeTile {
  int warps, stages, block_n;
};
inline constexpr int kDecodeRows = 16;  // packed query rows per CTA: one m16 MMA tile

constexpr DecodeTile decode_tile(int head_dim) {
  const int warps = head_dim <= 128 ? 4 : 2;  // d > 128: the O accumulator of 16 x d per warp is large
  const int stages = (96 * 1024) / (warps * 2 * 16 * head_dim * 2);
  return {warps, stages > 4 ? 4 : stages, 16};
}

constexpr int decode_smem_bytes(int head_dim) {
  const DecodeTile t = decode_tile(head_dim);
  return t.warps * t.stages * 2 * t.block_n * head_dim * 2 + 2 * t.warps * kDecodeRows * 4;
}

// One explicit instantiation of this per (dtype, head-dim bucket, causal) lives in its own
// translation unit (generated by CMake from src/fwd_instance.cu.in). Throws std::runtime_error.
template <DType kDType, int kHeadDim, bool kCausal>
void run_fwd(const FwdParams& params, cudaStream_t stream);

// The forward kernels with flash_attn's options (softcap, ALiBi, and one with dropout too:
// FwdParams::opt and the dropout fields; every kernel takes the window), one instantiation per
// (dtype, head-dim bucket).
template <DType kDType, int kHeadDim>
void run_fwd_options(const FwdParams& params, cudaStream_t stream);

// Backward pass, one instantiation per (dtype, head-dim bucket); causal is a run-time flag (it
// changes which blocks a CTA visits and a uniform masking branch, not the code). Runs the
// rowsum(dout * o) pass, the main kernel and the dQ conversion on `stream`.
template <DType kDType, int kHeadDim>
void run_bwd(const BwdParams& params, cudaStream_t stream);

// The backward pass with flash_attn's options (as run_fwd_options).
template <DType kDType, int kHeadDim>
void run_bwd_options(const BwdParams& params, cudaStream_t stream);

// The small pass before the main backward kernel (src/bwd_prep.cu, both dtypes): it fills dsum
// and lse_log2 and zeroes dq_accum. (The pass after it, convert_dq_kernel in bwd_kernel.h, is
// launched with the kernel: it reads dq_accum in that kernel's thread order.)
void run_bwd_dot_do_o(const BwdParams& params, DType dtype, cudaStream_t stream);

// Decoding, one instantiation per (dtype, head-dim bucket); causal is a run-time flag. Runs the
// split-KV kernel and, with num_splits > 1, the combine pass (src/decode_combine.cu).
template <DType kDType, int kHeadDim>
void run_decode(const DecodeParams& params, cudaStream_t stream);
void run_decode_combine(const DecodeParams& params, DType dtype, cudaStream_t stream);
// flash_attn_with_kvcache's append for the calls that do not run the split-KV kernel (src/append_kv.cu).
void run_append_kv(const DecodeParams& params, cudaStream_t stream);

// The split count of num_splits = 0: from quantities fixed while a model decodes (batch, KV
// heads, packed query rows, cache capacity, the GPU), never the current lengths, so a CUDA graph
// captured for one step stays valid as the cache fills.
int decode_num_splits(int batch, int heads_k, int packed_rows, int64_t capacity, int head_dim, int num_sms,
                      int smem_per_sm);

}  // namespace flash_cute
