// Host-side launch of the decoding kernel; included by the generated instantiation units only.
#pragma once
#include <string>

#include "flash_cute/cuda_check.h"
#include "flash_cute/decode_kernel.h"
#include "flash_cute/launch.h"

namespace flash_cute {

template <DType kDType, int kHeadDim>
void run_decode(const DecodeParams& p, cudaStream_t stream) {
  using Traits = DecodeTraits<kDType, kHeadDim>;
  const std::string name = std::string("decode kernel (") + dtype_name(kDType) + ", head dim " +
                           std::to_string(kHeadDim) + ")";
  constexpr int kSmem = Traits::kSmemBytes;
  auto kernel = &decode_kernel<Traits>;
  allow_dynamic_smem(kernel, kSmem, name);
  const int m_tiles = ceil_div(p.seqlen_q * (p.heads / p.heads_k), Traits::kRows);
  const dim3 grid(p.num_splits, m_tiles * p.heads_k, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  check_cuda(cudaGetLastError(), name + " launch");
  if (p.num_splits > 1) run_decode_combine(p, kDType, stream);
}

}  // namespace flash_cute
