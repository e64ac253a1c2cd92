// Picks the compiled kernel for a call and launches it on the caller's device and stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "flash_cute/params.h"

namespace flash_cute {

// Throws std::runtime_error (no kernel for this configuration in this build, unsupported GPU,
// CUDA error). The caller has validated shapes, strides and alignment.
void fwd(const FwdParams& params, DType dtype, int device, cudaStream_t stream);

// Backward pass: rowsum(dout * out), the main kernel and the dQ conversion. Same errors as fwd().
void bwd(const BwdParams& params, DType dtype, int device, cudaStream_t stream);

// flash_attn_with_kvcache's split-KV kernel (and the combine pass when num_splits > 1).
void decode(const DecodeParams& params, DType dtype, int device, cudaStream_t stream);

// flash_attn_with_kvcache's append of k_new, v_new into the caches, for the calls whose attention
// runs the forward kernel (the split-KV kernel appends itself). Uses DecodeParams' cache fields.
void append_kv(const DecodeParams& params, int device, cudaStream_t stream);

// The split count that num_splits = 0 means on `device` (see decode_num_splits in launch.h).
int decode_splits(int batch, int heads_k, int packed_rows, int64_t capacity, int head_dim, int device);

// (dtype name, head-dim bucket, causal) of every forward kernel in this build.
std::vector<std::tuple<std::string, int, bool>> built_fwd_kernels();

// (dtype name, head-dim bucket) of every decoding kernel in this build.
std::vector<std::tuple<std::string, int>> built_decode_kernels();

// (dtype name, head-dim bucket) of every forward/backward kernel pair with options in this build.
std::vector<std::tuple<std::string, int>> built_option_kernels();

// (dtype name, head-dim bucket) of every backward kernel in this build.
std::vector<std::tuple<std::string, int>> built_bwd_kernels();

}  // namespace flash_cute
