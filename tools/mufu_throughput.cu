// Throughput of tanh.approx and ex2.approx (the MUFU pipe) against FFMA, in operations per SM per
// clock at the rated clock: which of softcap's two transcendental functions per score is the
// dearer one. Dev aid; build here, run on the GPU host:
//   nvcc -O3 -arch=sm_90a -o .gpuX/mufu_throughput tools/mufu_throughput.cu   (carry .gpuX)
// H200 (2026-11-30): ex2 16.0, tanh 16.0, ffma 113.7.
#include <cstdio>
#include <cuda_runtime.h>

// Each thread runs 8 independent chains of n operations.
template <int kOp>
__global__ void chains(float* out, int n, float seed) {
  float x[8];
  for (int i = 0; i < 8; ++i) x[i] = seed * (threadIdx.x + i);
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float y;
      if (kOp == 0) asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x[i]));
      else if (kOp == 1) asm volatile("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x[i]));
      else asm volatile("fma.rn.ftz.f32 %0, %1, %1, %1;" : "=f"(y) : "f"(x[i]));
      x[i] = y;
    }
  }
  float s = 0;
  for (int i = 0; i < 8; ++i) s += x[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <int kOp>
double per_sm_per_clock(float* out, int sms) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  const int n = 4096, blocks = sms * 4, threads = 512;
  chains<kOp><<<blocks, threads>>>(out, n, 0.001f);  // warm-up
  cudaEventRecord(a);
  chains<kOp><<<blocks, threads>>>(out, n, 0.001f);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms;
  cudaEventElapsedTime(&ms, a, b);
  int khz;
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
  const double ops = double(blocks) * threads * n * 8;
  return ops / (ms * 1e-3) / sms / (khz * 1e3);
}

int main() {
  int sms;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  float* out;
  cudaMalloc(&out, sms * 4 * 512 * sizeof(float));
  const double ex2 = per_sm_per_clock<0>(out, sms), tanh = per_sm_per_clock<1>(out, sms),
               ffma = per_sm_per_clock<2>(out, sms);
  printf("operations per SM per clock (rated clock): ex2 %.1f tanh %.1f ffma %.1f\n", ex2, tanh, ffma);
}
