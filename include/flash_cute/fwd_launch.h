// Host-side launch of the forward kernel; included by the generated instantiation units only.
#pragma once
#include <algorithm>
#include <string>
#include <type_traits>

#include "flash_cute/cuda_check.h"
#include "flash_cute/fwd_kernel.h"
#include "flash_cute/launch.h"

namespace flash_cute {

template <class Traits, int kOptions, bool kDropout>
void launch_fwd(const FwdParams& p, cudaStream_t stream, const std::string& name) {
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel_for = [&](auto s_mask) {  // padded or varlen, with or without the S_dmask store
    return p.cu_seqlens_q != nullptr ? &fwd_kernel<Traits, true, kOptions, kDropout, s_mask()>
                                     : &fwd_kernel<Traits, false, kOptions, kDropout, s_mask()>;
  };
  auto kernel = kernel_for(std::false_type{});
  if constexpr (kDropout) {  // return_attn_probs: the kernel that also stores S_dmask
    if (p.s_dmask != nullptr) kernel = kernel_for(std::true_type{});
  }
  allow_dynamic_smem(kernel, kSmem, name);
  // seqlen_q: the longest sequence's (varlen: the max_seqlen_q hint; the kernel loops past it).
  const dim3 grid(std::max(1, ceil_div(p.seqlen_q, Traits::kBlockM)), p.heads, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  check_cuda(cudaGetLastError(), name + " launch");
}

// kOptions (an OptionKind): the kernel with softcap and/or ALiBi (and the window every kernel
// takes); kDropout: and dropout. They are instantiated with the non-causal tile order (causal is a
// window).
template <DType kDType, int kHeadDim, bool kCausal, int kOptions, bool kDropout>
void run_fwd_variant(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdTraits<kDType, kHeadDim, kCausal>;
  constexpr bool kHasSmallTile = kSmallSmemTiles && !(fwd_tile(kHeadDim, kCausal) == fwd_tile(kHeadDim, kCausal, true));
  using SmallTraits = std::conditional_t<kHasSmallTile, FwdTraits<kDType, kHeadDim, kCausal, /*kSmallSmem=*/true>, Traits>;
  const std::string name = std::string("forward kernel (") + dtype_name(kDType) + ", head dim " +
                           std::to_string(kHeadDim) + (kCausal ? ", causal" : "") + option_kernel_name(kOptions, kDropout) + ")";
  const int smem_optin = max_smem_per_block(name);
  const bool small = runs_small_tile(kHasSmallTile, Traits::kSmemBytes, smem_optin);
  const int bytes = small ? SmallTraits::kSmemBytes : Traits::kSmemBytes;
  require_smem(name, bytes, smem_optin, kHasSmallTile);
  if constexpr (kHasSmallTile) {
    if (small) return launch_fwd<SmallTraits, kOptions, kDropout>(p, stream, name);
  }
  launch_fwd<Traits, kOptions, kDropout>(p, stream, name);
}

template <DType kDType, int kHeadDim, bool kCausal>
void run_fwd(const FwdParams& p, cudaStream_t stream) {
  run_fwd_variant<kDType, kHeadDim, kCausal, kNoOptions, /*kDropout=*/false>(p, stream);
}

template <DType kDType, int kHeadDim>
void run_fwd_options(const FwdParams& p, cudaStream_t stream) {
  if (p.dropout) return run_fwd_variant<kDType, kHeadDim, /*kCausal=*/false, kAnyOptions, /*kDropout=*/true>(p, stream);
  if (option_kind(p.opt) == kSoftcap) return run_fwd_variant<kDType, kHeadDim, false, kSoftcap, false>(p, stream);
  run_fwd_variant<kDType, kHeadDim, false, kAlibiOnly, false>(p, stream);
}

}  // namespace flash_cute
