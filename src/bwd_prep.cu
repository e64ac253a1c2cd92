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
#include "flash_cute/seqlen.h"

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

// The sequence that workspace row r (of one head) belongs to, and the row within it; row >=
// len_q marks padding (between sequences, or past a sequence's last tile).
struct WorkspaceRow {
  int batch;
  SeqSpan seq;
  int64_t ws_row0;
  int64_t row;
};

__device__ WorkspaceRow workspace_row(const BwdParams& p, int64_t r) {
  WorkspaceRow w;
  if (p.cu_seqlens_q != nullptr) {
    w.batch = find_sequence(p.batch, r, [&](int b) { return workspace_row0(p, b, p.cu_seqlens_q[b]); });
    w.batch = min(w.batch, p.batch - 1);
  } else {
    w.batch = int(r / workspace_row0(p, 1, 0));
  }
  w.seq = seq_span(p, w.batch);
  w.ws_row0 = workspace_row0(p, w.batch, w.seq.q_row0);
  w.row = r - w.ws_row0;
  return w;
}

// One warp per (workspace row, head), heads fastest. Lane l reads elements [8 l, 8 l + 8) of dO
// and O as 16-byte vectors (head_dim <= 256 = 32 lanes x 8) and zeroes the same columns of the
// row's dQ accumulator; the warp sums. Padded rows get D = 0 and lse_log2 = +inf.
template <DType kDType>
__global__ void __launch_bounds__(kThreads) dot_do_o_kernel(const BwdParams p) {
  using T = typename Native<kDType>::type;
  const int64_t row_id = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row_id >= p.ws_rows * p.heads) return;
  const int head = int(row_id % p.heads);
  const int64_t r = row_id / p.heads;
  const WorkspaceRow w = workspace_row(p, r);
  const int64_t out_row = head * p.ws_rows + r;
  if (w.row >= w.seq.len_q) {
    if (lane == 0) {
      p.dsum[out_row] = 0.f;
      p.lse_log2[out_row] = INFINITY;
    }
    return;
  }
  const int64_t q_row = w.seq.q_row0 + w.row;
  float sum = 0.f;
  if (lane * 8 < p.head_dim) {
    const T* o = static_cast<const T*>(p.o) + w.batch * p.o_batch_stride + q_row * p.o_row_stride +
                 head * p.o_head_stride + lane * 8;
    const T* dout = static_cast<const T*>(p.dout) + w.batch * p.dout_batch_stride + q_row * p.dout_row_stride +
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
    p.lse_log2[out_row] = p.lse[w.batch * p.lse_batch_stride + head * p.lse_head_stride + q_row] * float(M_LOG2E);
  }
}

// dQ = scale * dq_accum: from the padded accumulator (heads, ws_rows, accum_cols) to dq (rows of
// q, heads, head_dim) with its strides; 4 columns per thread (head_dim is a multiple of 8). Varlen
// rows past the last sequence get 0.
template <DType kDType>
__global__ void __launch_bounds__(kThreads) convert_dq_kernel(const BwdParams p) {
  using T = typename Native<kDType>::type;
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int col4 = p.head_dim / 4;
  if (i >= p.total_q * p.heads * col4) return;
  const int col = int(i % col4) * 4;
  const int64_t row_id = i / col4;  // (row of the concatenated rows, head) in row-major order
  const int head = int(row_id % p.heads);
  const int64_t q_row = row_id / p.heads;
  const int batch = p.cu_seqlens_q != nullptr
                        ? find_sequence(p.batch, q_row, [&](int b) { return int64_t(p.cu_seqlens_q[b]); })
                        : int(q_row / p.seqlen_q);
  // The rows of a padded batch entry are counted from 0 (dq's batch stride carries the rest).
  const int64_t first_row = p.cu_seqlens_q != nullptr ? 0 : int64_t(batch) * p.seqlen_q;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  if (batch < p.batch) {
    const SeqSpan seq = seq_span(p, batch);
    const int64_t ws_row = head * p.ws_rows + workspace_row0(p, batch, seq.q_row0) + (q_row - first_row - seq.q_row0);
    a = *reinterpret_cast<const float4*>(p.dq_accum + ws_row * p.accum_cols + col);
  }
  const int64_t row = q_row - first_row;
  T out[4] = {Native<kDType>::from_float(a.x * p.scale), Native<kDType>::from_float(a.y * p.scale),
              Native<kDType>::from_float(a.z * p.scale), Native<kDType>::from_float(a.w * p.scale)};
  T* dst = static_cast<T*>(p.dq) + min(batch, p.batch - 1) * p.dq_batch_stride + row * p.dq_row_stride +
           head * p.dq_head_stride + col;
  *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(out);
}

template <DType kDType>
void dot_do_o(const BwdParams& p, cudaStream_t stream) {
  const int64_t rows = p.ws_rows * p.heads;
  const int64_t blocks = ceil_div(rows, kRowsPerBlock);
  dot_do_o_kernel<kDType><<<dim3(unsigned(blocks)), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), std::string("backward rowsum(dout * out) kernel (") + dtype_name(kDType) + ") launch");
}

template <DType kDType>
void convert_dq(const BwdParams& p, cudaStream_t stream) {
  const int64_t n = p.total_q * p.heads * (p.head_dim / 4);
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
