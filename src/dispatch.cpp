#include "dispatch.h"

#include <stdexcept>

#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"
#include "kernel_registry.h"  // generated: FLASH_CUTE_FWD_KERNELS(X), FLASH_CUTE_BWD_KERNELS(X)

namespace flash_cute {
namespace {

using FwdFn = void (*)(const FwdParams&, cudaStream_t);
struct FwdKernel {
  DType dtype;
  int head_dim;
  bool causal;
  FwdFn fn;
};

#define FLASH_CUTE_FWD_ENTRY(dt, hd, causal) {DType::dt, hd, causal, &run_fwd<DType::dt, hd, causal>},
constexpr FwdKernel kFwdKernels[] = {FLASH_CUTE_FWD_KERNELS(FLASH_CUTE_FWD_ENTRY)};
#undef FLASH_CUTE_FWD_ENTRY

using BwdFn = void (*)(const BwdParams&, cudaStream_t);
struct BwdKernel {
  DType dtype;
  int head_dim;
  BwdFn fn;
};

#define FLASH_CUTE_BWD_ENTRY(dt, hd) {DType::dt, hd, &run_bwd<DType::dt, hd>},
constexpr BwdKernel kBwdKernels[] = {FLASH_CUTE_BWD_KERNELS(FLASH_CUTE_BWD_ENTRY)};
#undef FLASH_CUTE_BWD_ENTRY

using DecodeFn = void (*)(const DecodeParams&, cudaStream_t);
struct DecodeKernel {
  DType dtype;
  int head_dim;
  DecodeFn fn;
};

#define FLASH_CUTE_DECODE_ENTRY(dt, hd) {DType::dt, hd, &run_decode<DType::dt, hd>},
constexpr DecodeKernel kDecodeKernels[] = {FLASH_CUTE_DECODE_KERNELS(FLASH_CUTE_DECODE_ENTRY)};
#undef FLASH_CUTE_DECODE_ENTRY

// The forward and backward kernels with options, per (dtype, head-dim bucket).
struct OptionKernel {
  DType dtype;
  int head_dim;
  FwdFn fwd;
  BwdFn bwd;
};

#define FLASH_CUTE_OPTION_ENTRY(dt, hd) {DType::dt, hd, &run_fwd_options<DType::dt, hd>, &run_bwd_options<DType::dt, hd>},
constexpr OptionKernel kOptionKernels[] = {FLASH_CUTE_OPTION_KERNELS(FLASH_CUTE_OPTION_ENTRY) {DType::kFloat16, 0, nullptr, nullptr}};
#undef FLASH_CUTE_OPTION_ENTRY

const OptionKernel* find_option_kernel(DType dtype, int bucket) {
  for (const OptionKernel& k : kOptionKernels)
    if (k.dtype == dtype && k.head_dim == bucket && k.fwd != nullptr) return &k;
  return nullptr;
}

std::string missing_option_kernel_message(const char* direction, DType dtype, int head_dim, int bucket) {
  return std::string("flash_cute: this build has no ") + direction + " kernel with options (softcap, window_size, " +
         "alibi_slopes, dropout) for " + dtype_name(dtype) + ", head dim " + std::to_string(head_dim) + " (bucket " +
         std::to_string(bucket) + "). It was built with FLASH_CUTE_OPTION_KERNELS=" FLASH_CUTE_OPTION_KERNELS_STR
         ", FLASH_CUTE_HEAD_DIMS=" FLASH_CUTE_HEAD_DIMS_STR " and FLASH_CUTE_DTYPES=" FLASH_CUTE_DTYPES_STR;
}

std::string missing_kernel_message(const char* direction, DType dtype, int head_dim, int bucket, bool causal) {
  return std::string("flash_cute: this build has no ") + direction + " kernel for " + dtype_name(dtype) +
         ", head dim " + std::to_string(head_dim) + " (bucket " + std::to_string(bucket) + ")" +
         (causal ? ", causal" : "") + ". It was built with FLASH_CUTE_HEAD_DIMS=" FLASH_CUTE_HEAD_DIMS_STR
         " and FLASH_CUTE_DTYPES=" FLASH_CUTE_DTYPES_STR "; rebuild with FLASH_CUTE_HEAD_DIMS including " +
         std::to_string(bucket) + " and FLASH_CUTE_DTYPES including " + dtype_name(dtype);
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void check_compute_capability(int device) {
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "reading the compute capability");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
             "reading the compute capability");
  if (major < 8) {
    throw std::runtime_error("flash_cute: needs an Ampere or newer GPU (compute capability >= 8.0); device " +
                             std::to_string(device) + " has " + std::to_string(major) + "." +
                             std::to_string(minor));
  }
}

}  // namespace

// Makes `device` current, checks it is Ampere or newer, runs `kernel` on it.
template <class Params, class Fn>
void launch(Fn kernel, const Params& p, int device, cudaStream_t stream) {
  DeviceGuard guard(device);
  check_compute_capability(device);
  kernel(p, stream);
}

void fwd(const FwdParams& p, DType dtype, int device, cudaStream_t stream) {
  const int bucket = head_dim_bucket(p.head_dim);
  if (uses_options(p)) {
    const OptionKernel* kernel = find_option_kernel(dtype, bucket);
    if (kernel == nullptr) throw std::runtime_error(missing_option_kernel_message("forward", dtype, p.head_dim, bucket));
    return launch(kernel->fwd, p, device, stream);
  }
  const FwdKernel* kernel = nullptr;
  for (const FwdKernel& k : kFwdKernels)
    if (k.dtype == dtype && k.head_dim == bucket && k.causal == p.causal) kernel = &k;
  if (kernel == nullptr) throw std::runtime_error(missing_kernel_message("forward", dtype, p.head_dim, bucket, p.causal));
  launch(kernel->fn, p, device, stream);
}

void bwd(const BwdParams& p, DType dtype, int device, cudaStream_t stream) {
  const int bucket = head_dim_bucket(p.head_dim);
  if (uses_options(p)) {
    const OptionKernel* kernel = find_option_kernel(dtype, bucket);
    if (kernel == nullptr) throw std::runtime_error(missing_option_kernel_message("backward", dtype, p.head_dim, bucket));
    return launch(kernel->bwd, p, device, stream);
  }
  const BwdKernel* kernel = nullptr;
  for (const BwdKernel& k : kBwdKernels)
    if (k.dtype == dtype && k.head_dim == bucket) kernel = &k;
  if (kernel == nullptr) throw std::runtime_error(missing_kernel_message("backward", dtype, p.head_dim, bucket, false));
  launch(kernel->fn, p, device, stream);
}

void decode(const DecodeParams& p, DType dtype, int device, cudaStream_t stream) {
  const int bucket = head_dim_bucket(p.head_dim);
  const DecodeKernel* kernel = nullptr;
  for (const DecodeKernel& k : kDecodeKernels)
    if (k.dtype == dtype && k.head_dim == bucket) kernel = &k;
  if (kernel == nullptr) throw std::runtime_error(missing_kernel_message("decoding", dtype, p.head_dim, bucket, false));
  launch(kernel->fn, p, device, stream);
}

void append_kv(const DecodeParams& p, int device, cudaStream_t stream) {
  launch(&run_append_kv, p, device, stream);
}

int decode_splits(int batch, int heads_k, int packed_rows, int64_t capacity, int head_dim, int device) {
  int sms = 0, smem = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "reading the SM count");
  check_cuda(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device),
             "reading the shared memory per SM");
  return decode_num_splits(batch, heads_k, packed_rows, capacity, head_dim, sms, smem);
}

std::vector<std::tuple<std::string, int>> built_decode_kernels() {
  std::vector<std::tuple<std::string, int>> out;
  for (const DecodeKernel& k : kDecodeKernels) out.emplace_back(dtype_name(k.dtype), k.head_dim);
  return out;
}

std::vector<std::tuple<std::string, int>> built_bwd_kernels() {
  std::vector<std::tuple<std::string, int>> out;
  for (const BwdKernel& k : kBwdKernels) out.emplace_back(dtype_name(k.dtype), k.head_dim);
  return out;
}

std::vector<std::tuple<std::string, int>> built_option_kernels() {
  std::vector<std::tuple<std::string, int>> out;
  for (const OptionKernel& k : kOptionKernels)
    if (k.fwd != nullptr) out.emplace_back(dtype_name(k.dtype), k.head_dim);
  return out;
}

std::vector<std::tuple<std::string, int, bool>> built_fwd_kernels() {
  std::vector<std::tuple<std::string, int, bool>> out;
  for (const FwdKernel& k : kFwdKernels) out.emplace_back(dtype_name(k.dtype), k.head_dim, k.causal);
  return out;
}

}  // namespace flash_cute
