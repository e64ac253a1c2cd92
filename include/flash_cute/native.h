// The CUDA-native 16-bit types behind each DType, for the plain-CUDA passes (no CuTe).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "flash_cute/params.h"

namespace flash_cute {

template <DType> struct Native;
template <> struct Native<DType::kFloat16> {
  using type = __half;
  static __device__ float2 to_float2(type a, type b) { return make_float2(__half2float(a), __half2float(b)); }
  static __device__ type from_float(float x) { return __float2half_rn(x); }
};
template <> struct Native<DType::kBFloat16> {
  using type = __nv_bfloat16;
  static __device__ float2 to_float2(type a, type b) { return make_float2(__bfloat162float(a), __bfloat162float(b)); }
  static __device__ type from_float(float x) { return __float2bfloat16_rn(x); }
};

}  // namespace flash_cute
