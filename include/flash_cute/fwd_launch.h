// Host-side launch of the forward kernel; included by the generated instantiation units only.
#pragma once
#include <string>

#include "flash_cute/cuda_check.h"
#include "flash_cute/fwd_kernel.h"
#include "flash_cute/launch.h"

namespace flash_cute {

template <DType kDType, int kHeadDim, bool kCausal>
void run_fwd(const FwdParams& p, cudaStream_t stream) {
  using Traits = FwdTraits<kDType, kHeadDim, kCausal>;
  constexpr int kSmem = Traits::kSmemBytes;
  const std::string name = std::string("forward kernel (") + dtype_name(kDType) + ", head dim " +
                           std::to_string(kHeadDim) + (kCausal ? ", causal)" : ")");
  auto kernel = &fwd_kernel<Traits>;
  int device = 0, smem_optin = 0;
  check_cuda(cudaGetDevice(&device), name + ": cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             name + ": reading the shared-memory limit");
  if (kSmem > smem_optin) {
    throw std::runtime_error("flash_cute: " + name + " needs " + std::to_string(kSmem) +
                             " bytes of shared memory per block; this GPU allows " +
                             std::to_string(smem_optin));
  }
  if (kSmem > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem),
               name + ": raising the shared-memory limit");
  }
  const dim3 grid(ceil_div(p.seqlen_q, Traits::kBlockM), p.heads, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  check_cuda(cudaGetLastError(), name + " launch");
}

}  // namespace flash_cute
