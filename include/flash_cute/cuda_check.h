// CUDA errors become C++ exceptions that name the kernel (pybind11 turns them into RuntimeError).
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#ifndef FLASH_CUTE_CUDA_ARCHS_STR
#define FLASH_CUTE_CUDA_ARCHS_STR "unknown"
#endif

namespace flash_cute {

inline void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  std::string msg = "flash_cute: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")";
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    msg += ". This build has machine code for CUDA architectures " FLASH_CUTE_CUDA_ARCHS_STR
           " only; rebuild with FLASH_CUTE_CUDA_ARCHS naming this GPU's architecture";
  }
  throw std::runtime_error(msg);
}

// The most shared memory a block may use on the current device (the opt-in limit).
inline int max_smem_per_block(const std::string& what) {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), what + ": cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             what + ": reading the shared-memory limit");
  return bytes;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (above 48 KB that needs an opt-in).
template <class Kernel>
void allow_dynamic_smem(Kernel kernel, int bytes, const std::string& what) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
               what + ": raising the shared-memory limit");
  }
}

}  // namespace flash_cute
