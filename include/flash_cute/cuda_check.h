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

}  // namespace flash_cute
