// The two memory-bound passes around the backward kernel, for both dtypes:
//   D = rowsum(dO * O) in fp32 (the backward kernel's dS = P * (dP - D)), lse * log2(e), and the
//   zeroed dQ accumulator, all padded to the main kernel's tiles;
//   dQ = scale * dQ_accum, from the padded fp32 accumulator to the input dtype and dq's layout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <string>

#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"

namespace flash_cute {
namespace {

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

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / 32;  // one warp per (batch, row, head)

// One warp per (batch, row, head), rows up to rows_padded. Lane l reads elements [8 l, 8 l + 8)
// of dO and O as 16-byte vectors (head_dim <= 256 = 32 lanes x 8) and zeroes the same columns
// of the row's dQ accumulator; the warp sums. Padded rows get D = 0 and lse_log2 = +inf.
template <DType kDType>
__global__ void __launch_bounds__(kThreads) dot_do_o_kernel(const BwdParams p) {
  using T = typename Native<kDType>::type;
  const int64_t row_id = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= int64_t(p.batch) * p.rows_padded * p.heads) return;
  const int head = int(row_id % p.heads);
  const int row = int((row_id / p.heads) % p.rows_padded);
  const int batch = int(row_id / (int64_t(p.heads) * p.rows_padded));
  const int64_t out_row = (int64_t(batch) * p.heads + head) * p.rows_padded + row;
  if (row >= p.seqlen_q) {
    if (lane == 0) {
      p.dsum[out_row] = 0.f;
      p.lse_log2[out_row] = INFINITY;
    }
    return;
  }
  float sum = 0.f;
  if (lane * 8 < p.head_dim) {
    const T* o = static_cast<const T*>(p.o) + batch * p.o_batch_stride + row * p.o_row_stride +
                 head * p.o_head_stride + lane * 8;
    const T* dout = static_cast<const T*>(p.dout) + batch * p.dout_batch_stride + row * p.dout_row_stride +
                    head * p.dout_head_stride + lane * 8;
    const uint4 ov = *reinterpret_cast<const uint4*>(o);
    const uint4 dv = *reinterpret_cast<const uint4*>(dout);
    const T* oe = reinterpret_cast<const T*>(&ov);
    const T* de = reinterpret_cast<const T*>(&dv);
    for (int i = 0; i < 8; i += 2) {
      const float2 a = Native<kDType>::to_float2(oe[i], oe[i + 1]);
      const float2 b = Native<kDType>::to_float2(de[i], de[i + 1]);
      sum += a.x * b.x + a.y * b.y;
    }
  }
  if (lane * 8 < p.accum_cols) {
    float4* accum = reinterpret_cast<float4*>(p.dq_accum + out_row * p.accum_cols + lane * 8);
    accum[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    accum[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
  if (lane == 0) {
    p.dsum[out_row] = sum;
    p.lse_log2[out_row] = p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + row] * float(M_LOG2E);
  }
}

// dQ = scale * dq_accum: from the padded accumulator (batch, heads, rows_padded, accum_cols) to dq
// (batch, seqlen_q, heads, head_dim) with its strides; 4 columns per thread (head_dim is a
// multiple of 8).
template <DType kDType>
__global__ void __launch_bounds__(kThreads) convert_dq_kernel(const BwdParams p) {
  using T = typename Native<kDType>::type;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int col4 = p.head_dim / 4;
  if (i >= int64_t(p.batch) * p.seqlen_q * p.heads * col4) return;
  const int col = int(i % col4) * 4;
  const int64_t row_id = i / col4;  // (batch, row, head) in row-major order
  const int head = int(row_id % p.heads);
  const int row = int((row_id / p.heads) % p.seqlen_q);
  const int batch = int(row_id / (int64_t(p.heads) * p.seqlen_q));
  const float4 a = *reinterpret_cast<const float4*>(
      p.dq_accum + ((int64_t(batch) * p.heads + head) * p.rows_padded + row) * p.accum_cols + col);
  T out[4] = {Native<kDType>::from_float(a.x * p.scale), Native<kDType>::from_float(a.y * p.scale),
              Native<kDType>::from_float(a.z * p.scale), Native<kDType>::from_float(a.w * p.scale)};
  T* dst = static_cast<T*>(p.dq) + batch * p.dq_batch_stride + row * p.dq_row_stride + head * p.dq_head_stride + col;
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(out);
}

template <DType kDType>
void dot_do_o(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.rows_padded * p.heads;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  dot_do_o_kernel<kDType><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), std::string("backward rowsum(dout * out) kernel (") + dtype_name(kDType) + ") launch");
}

template <DType kDType>
void convert_dq(const BwdParams& p, cudaStream_t stream) {
  const int64_t n = int64_t(p.batch) * p.seqlen_q * p.heads * (p.head_dim / 4);
  const int64_t blocks = ceil_div(n, kThreads);
  convert_dq_kernel<kDType><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), std::string("backward dQ conversion kernel (") + dtype_name(kDType) + ") launch");
}

}  // namespace

void run_bwd_dot_do_o(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat16) dot_do_o<DType::kFloat16>(p, stream);
  else dot_do_o<DType::kBFloat16>(p, stream);
}

void run_bwd_convert_dq(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat16) convert_dq<DType::kFloat16>(p, stream);
  else convert_dq<DType::kBFloat16>(p, stream);
}

}  // namespace flash_cute
