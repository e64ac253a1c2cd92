// Around the split-KV decoding kernel, for both dtypes: the combine pass that merges the splits'
// partial outputs, and the host heuristic that picks how many splits a call gets.
#include <algorithm>
#include <cmath>
#include <string>

#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"
#include "flash_cute/native.h"

namespace flash_cute {
namespace {

constexpr int kCombineWarps = 4;
constexpr int kMaxHeadDim = 256;

// One CTA per output row (b, head, i): lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) o_s.
// Warp w sums splits w, w + 4, ...; its lanes hold 4 columns each (a float4) per 128 columns; the
// loop has no branch, so the loads of several splits are in flight together. Splits that saw no
// key have lse_s = -inf (weight 0) and o_s = 0; a row no split saw gets 0 and lse +inf, as a row
// with no visible key everywhere else.
template <DType kDType>
__global__ void __launch_bounds__(kCombineWarps * 32) decode_combine_kernel(const DecodeParams p) {
  using T = typename Native<kDType>::type;
  __shared__ float4 partial[kCombineWarps][kMaxHeadDim / 4];
  const int64_t rows = int64_t(p.batch) * p.heads * p.seqlen_q;
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float* lse_s = p.lse_accum + row;  // split s at lse_s[s * rows]

  // A NaN lse (a batch row whose index values were out of range) makes the row NaN: fmaxf would
  // drop it.
  auto max_nan = [](float a, float b) { return a != a || a > b ? a : b; };
  float max = -INFINITY;
  for (int s = lane; s < p.num_splits; s += 32) max = max_nan(max, lse_s[s * rows]);
  for (int offset = 16; offset > 0; offset /= 2) max = max_nan(max, __shfl_xor_sync(0xffffffff, max, offset));
  float sum = 0.f;
  if (max != -INFINITY)
    for (int s = lane; s < p.num_splits; s += 32) sum += __expf(lse_s[s * rows] - max);
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
  const bool empty = sum == 0.f;
  const float lse = empty ? INFINITY : max + __logf(sum);

  const float* o_s = p.o_accum + row * p.head_dim;  // split s at o_s[s * rows * head_dim]
  for (int c = lane * 4; c < p.head_dim; c += 32 * 4) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int s = warp; s < p.num_splits; s += kCombineWarps) {
      const float w = empty ? 0.f : __expf(lse_s[s * rows] - lse);  // 0 for lse_s = -inf
      const float4 o = *reinterpret_cast<const float4*>(o_s + s * rows * p.head_dim + c);
      acc.x += w * o.x, acc.y += w * o.y, acc.z += w * o.z, acc.w += w * o.w;
    }
    partial[warp][c / 4] = acc;
  }
  __syncthreads();

  const int i = int(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int head = int(bh % p.heads), batch = int(bh / p.heads);
  if (threadIdx.x == 0) p.lse[batch * p.lse_batch_stride + head * p.lse_head_stride + i] = lse;
  T* out = static_cast<T*>(p.o) + batch * p.o_batch_stride + i * p.o_row_stride + head * p.o_head_stride;
  for (int c = threadIdx.x * 4; c < p.head_dim; c += kCombineWarps * 32 * 4) {
    float4 acc = partial[0][c / 4];
    for (int w = 1; w < kCombineWarps; ++w) {
      const float4 o = partial[w][c / 4];
      acc.x += o.x, acc.y += o.y, acc.z += o.z, acc.w += o.w;
    }
    out[c] = Native<kDType>::from_float(acc.x);
    out[c + 1] = Native<kDType>::from_float(acc.y);
    out[c + 2] = Native<kDType>::from_float(acc.z);
    out[c + 3] = Native<kDType>::from_float(acc.w);
  }
}

}  // namespace

void run_decode_combine(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  const dim3 grid(unsigned(int64_t(p.batch) * p.heads * p.seqlen_q));
  if (dtype == DType::kFloat16) decode_combine_kernel<DType::kFloat16><<<grid, kCombineWarps * 32, 0, stream>>>(p);
  else decode_combine_kernel<DType::kBFloat16><<<grid, kCombineWarps * 32, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "decode combine kernel launch");
}

// Enough CTAs to fill every slot of the GPU in as few waves as possible, and no more splits than
// that needs: each split costs a partial output and a longer combine. Slots: CTAs per SM by shared
// memory (the decode kernel's limiter) times SMs. The smallest split count whose fill of the
// slots is within 95% of the best achievable wins; 1 when the CTAs without splitting fill the GPU.
int decode_num_splits(int batch, int heads_k, int packed_rows, int64_t capacity, int head_dim, int num_sms,
                      int smem_per_sm) {
  const int64_t ctas = int64_t(batch) * heads_k * ((packed_rows + kDecodeRows - 1) / kDecodeRows);
  const int per_sm = std::max(1, smem_per_sm / (decode_smem_bytes(head_dim_bucket(head_dim)) + 1024));
  const int64_t slots = int64_t(num_sms) * per_sm;
  const DecodeTile tile = decode_tile(head_dim_bucket(head_dim));
  const int64_t rounds = (capacity + tile.block_n * tile.warps - 1) / (tile.block_n * tile.warps);
  const int max_splits = int(std::min<int64_t>({128, std::max<int64_t>(1, rounds)}));
  if (ctas >= slots) return 1;
  auto fill = [&](int s) {
    const int64_t n = ctas * s;
    return double(n) / double((n + slots - 1) / slots * slots);
  };
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) best = std::max(best, fill(s));
  for (int s = 1; s <= max_splits; ++s)
    if (fill(s) >= 0.95 * best) return s;
  return 1;
}

}  // namespace flash_cute
