// The memory-bound pass before the backward kernel, for both dtypes: D = rowsum(dO * O) in fp32
// (the backward kernel's dS = P * (dP - D)), lse * log2(e), and the zeroed dQ accumulator, all
// padded to the main kernel's tiles. (The pass after it, dQ = scale * dq_accum, reads the
// accumulator in the kernel's thread order: convert_dq_kernel in bwd_kernel.h.)
#include <algorithm>
#include <cmath>
#include <string>

#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"
#include "flash_cute/native.h"
#include "flash_cute/seqlen.h"

namespace flash_cute {
namespace {

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 8;                        // a row's lanes take 8 columns each, 64 per step
constexpr int kRowsPerPass = kThreads / kLanesPerRow;  // rows of one CTA at a time

// Where one (sequence, head) lives: its span, its first workspace row, its rows padded to tiles.
struct SeqRows {
  SeqSpan seq;
  int64_t ws_row0;  // in the (heads, ws_rows) workspace, this head's
  int padded;       // len_q rounded up to ws_block_m (a multiple of kRowsPerPass)
};

__device__ SeqRows seq_rows(const BwdParams& p, int batch, int head) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  SeqRows r;
  r.seq = varlen ? seq_span<true>(p, batch) : seq_span<false>(p, batch);
  r.ws_row0 = head * p.ws_rows + workspace_row0(varlen, p.ws_block_m, p.seqlen_q, batch, r.seq.q_row0);
  r.padded = (r.seq.len_q + p.ws_block_m - 1) / p.ws_block_m * p.ws_block_m;
  return r;
}

// Grid: (row groups of the longest sequence, batch, heads); a CTA takes kRowsPerPass
// rows of one (sequence, head) at a time, from blockIdx.x * kRowsPerPass in steps of the grid (more
// than one step only when a varlen max_seqlen_q hint was too small). No division in the loop.

// D = rowsum(dO * O) and lse * log2(e) of each row, 0 and +inf on the padding rows (their P is 0),
// and the row's dQ accumulator zeroed. 8 lanes per row read 16-byte vectors of dO and O.
template <DType kDType>
__global__ void __launch_bounds__(kThreads) dot_do_o_kernel(const BwdParams p) {
  using T = typename Native<kDType>::type;
  const int batch = blockIdx.y, head = blockIdx.z;
  const SeqRows r = seq_rows(p, batch, head);
  const int lane = threadIdx.x % kLanesPerRow;
  const T* o = static_cast<const T*>(p.o) + batch * p.o_batch_stride + head * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + batch * p.dout_batch_stride + head * p.dout_head_stride;
  const float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride + r.seq.q_row0;
  for (int row0 = blockIdx.x * kRowsPerPass; row0 < r.padded; row0 += gridDim.x * kRowsPerPass) {
    const int row = row0 + threadIdx.x / kLanesPerRow;
    const bool valid = row < r.seq.len_q;
    float sum = 0.f;
    if (valid) {
      const int64_t q_row = r.seq.q_row0 + row;
      for (int c = lane * 8; c < p.head_dim; c += kLanesPerRow * 8) {
        const uint4 ov = *reinterpret_cast<const uint4*>(o + q_row * p.o_row_stride + c);
        const uint4 dv = *reinterpret_cast<const uint4*>(dout + q_row * p.dout_row_stride + c);
        const T* oe = reinterpret_cast<const T*>(&ov);
        const T* de = reinterpret_cast<const T*>(&dv);
        for (int i = 0; i < 8; i += 2) {
          const float2 a = Native<kDType>::to_float2(oe[i], oe[i + 1]);
          const float2 b = Native<kDType>::to_float2(de[i], de[i + 1]);
          sum += a.x * b.x + a.y * b.y;
        }
      }
    }
    const int64_t ws_row = r.ws_row0 + row;
    for (int c = lane * 8; c < p.accum_cols; c += kLanesPerRow * 8) {
      float4* accum = reinterpret_cast<float4*>(p.dq_accum + ws_row * p.accum_cols + c);
      accum[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      accum[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
    if (lane == 0) {
      p.dsum[ws_row] = sum;
      p.lse_log2[ws_row] = valid ? lse[row] * float(M_LOG2E) : INFINITY;
    }
  }
}

// Row groups of the longest sequence (seqlen_q: varlen, the max_seqlen_q hint), at least one.
dim3 prep_grid(const BwdParams& p, int rows) {
  return dim3(unsigned(std::max<int64_t>(1, ceil_div(rows, kRowsPerPass))), unsigned(p.batch), unsigned(p.heads));
}

template <DType kDType>
void dot_do_o(const BwdParams& p, cudaStream_t stream) {
  const int padded = int(ceil_div(p.seqlen_q, p.ws_block_m) * p.ws_block_m);
  dot_do_o_kernel<kDType><<<prep_grid(p, padded), kThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), std::string("backward rowsum(dout * out) kernel (") + dtype_name(kDType) + ") launch");
}

}  // namespace

void run_bwd_dot_do_o(const BwdParams& p, DType dtype, cudaStream_t stream) {
  if (dtype == DType::kFloat16) dot_do_o<DType::kFloat16>(p, stream);
  else dot_do_o<DType::kBFloat16>(p, stream);
}

}  // namespace flash_cute
