// Host-side launch of the backward pass; included by the generated instantiation units only.
#pragma once
#include <algorithm>
#include <string>
#include <type_traits>

#include "flash_cute/bwd_kernel.h"
#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"

namespace flash_cute {

template <DType kDType, class Traits, int kOptions, bool kDropout>
void launch_bwd(const BwdParams& params, cudaStream_t stream, const std::string& name) {
  constexpr int kSmem = Traits::kSmemBytes;
  const bool varlen = params.cu_seqlens_q != nullptr;
  auto kernel = varlen ? &bwd_kernel<Traits, true, kOptions, kDropout> : &bwd_kernel<Traits, false, kOptions, kDropout>;
  allow_dynamic_smem(kernel, kSmem, name);
  // The workspace is padded to this kernel's tiles (the caller sized it, ws_rows, with the tile
  // that bwd_runs_small_tile picks).
  BwdParams p = params;
  p.ws_block_m = Traits::kBlockM;
  p.accum_cols = Traits::kHeadDim;
  run_bwd_dot_do_o(p, kDType, stream);
  // seqlen_k: the longest sequence's (varlen: the max_seqlen_k hint; the kernel loops past it).
  const dim3 grid(std::max(1, ceil_div(p.seqlen_k, Traits::kBlockN)), p.expand_gqa ? p.heads : p.heads_k, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  check_cuda(cudaGetLastError(), name + " launch");
  // dQ from the accumulator, which holds this kernel's tiles in its thread order.
  auto convert = varlen ? &convert_dq_kernel<Traits, true> : &convert_dq_kernel<Traits, false>;
  convert<<<dim3(std::max(1, ceil_div(p.seqlen_q, Traits::kBlockM)), p.batch, p.heads), Traits::kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), name + ": dQ conversion launch");
}

// kOptions (an OptionKind): the kernel with softcap and/or ALiBi (and the window every kernel
// takes); kDropout: and dropout. GPUs with less shared memory than the tile needs (sm_86, sm_89,
// sm_120: 99 KB) run the small-shared-memory tile, where the head dim has one.
template <DType kDType, int kHeadDim, int kOptions, bool kDropout>
void run_bwd_variant(const BwdParams& params, cudaStream_t stream) {
  using Traits = BwdTraits<kDType, kHeadDim>;
  constexpr bool kHasSmallTile = bwd_has_small_tile(kHeadDim);
  using SmallTraits = std::conditional_t<
      kHasSmallTile, BwdTraits<kDType, bwd_kernel_head_dim(kHeadDim, true), /*kSmallSmem=*/true>, Traits>;
  const std::string name = std::string("backward kernel (") + dtype_name(kDType) + ", head dim " +
                           std::to_string(kHeadDim) + option_kernel_name(kOptions, kDropout) + ")";
  const int smem_optin = max_smem_per_block(name);
  const bool small = bwd_runs_small_tile(kHeadDim, smem_optin);
  const int bytes = small ? SmallTraits::kSmemBytes : Traits::kSmemBytes;
  require_smem(name, bytes, smem_optin, kHasSmallTile);
  if constexpr (kHasSmallTile) {
    if (small) return launch_bwd<kDType, SmallTraits, kOptions, kDropout>(params, stream, name);
  }
  launch_bwd<kDType, Traits, kOptions, kDropout>(params, stream, name);
}

template <DType kDType, int kHeadDim>
void run_bwd(const BwdParams& p, cudaStream_t stream) {
  run_bwd_variant<kDType, kHeadDim, kNoOptions, /*kDropout=*/false>(p, stream);
}

template <DType kDType, int kHeadDim>
void run_bwd_options(const BwdParams& p, cudaStream_t stream) {
  if (p.dropout) return run_bwd_variant<kDType, kHeadDim, kAnyOptions, /*kDropout=*/true>(p, stream);
  if (option_kind(p.opt) == kSoftcap) return run_bwd_variant<kDType, kHeadDim, kSoftcap, false>(p, stream);
  run_bwd_variant<kDType, kHeadDim, kAlibiOnly, false>(p, stream);
}

}  // namespace flash_cute
