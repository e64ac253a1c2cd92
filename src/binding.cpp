// The Python module flash_cute._C. It takes plain values (device pointers as integers, sizes,
// strides in elements, the CUDA stream handle) and links no libtorch: Python validates and
// allocates with torch, so one wheel works with every torch version.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "dispatch.h"
#include "flash_cute/cuda_check.h"
#include "flash_cute/launch.h"

namespace py = pybind11;
using flash_cute::BwdParams;
using flash_cute::DType;
using flash_cute::FwdParams;
using Strides3 = std::array<int64_t, 3>;  // (batch, seqlen, head) strides; the head-dim stride is 1

namespace {

// softmax_scale, softcap, the local window (flash_attn's: -1 an unbounded side), ALiBi slopes
// (float32 (batch, heads) with batch stride alibi_batch_stride, 0 for (heads,)) into the scales
// and ScoreOptions of FwdParams or DecodeParams. causal: the window's right side is 0 (every kernel
// masks and skips by the window; the forward's causal kernels differ in their tile order only).
template <class Params>
void set_score_options(Params& p, double softmax_scale, bool causal, double softcap,
                       int window_left, int window_right, uintptr_t alibi_slopes, int64_t alibi_batch_stride) {
  const double softmax_units = softcap > 0 ? softcap : softmax_scale;  // what multiplies the kernel's scores
  p.scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_units * M_LOG2E);
  p.lse_scale = static_cast<float>(softmax_units);
  p.causal = causal;
  p.opt.softcap_pre = softcap > 0 ? static_cast<float>(softmax_scale / softcap) : 0.f;
  p.opt.alibi_slopes = reinterpret_cast<const float*>(alibi_slopes);
  p.opt.alibi_batch_stride = alibi_batch_stride;
  p.opt.alibi_scale = static_cast<float>(1.0 / softmax_units);
  p.opt.window_left = window_left < 0 ? flash_cute::kUnboundedWindow : window_left;
  p.opt.window_right = window_right < 0 ? flash_cute::kUnboundedWindow : window_right;
  if (causal) p.opt.window_right = 0;
}

// Dropout with probability dropout_p (0: none): rng_state is int64 (seed, offset) on the device.
void set_dropout(FwdParams& p, double dropout_p, uintptr_t rng_state) {
  p.dropout = dropout_p > 0;
  if (!p.dropout) return;
  const double keep = 1.0 - dropout_p;
  p.keep_byte = static_cast<uint32_t>(std::floor(keep * 255.0));
  p.rp_dropout = static_cast<float>(1.0 / keep);
  p.keep_prob = static_cast<float>(keep);
  p.log2_rp_dropout = static_cast<float>(-std::log2(keep));
  p.rng_state = reinterpret_cast<const int64_t*>(rng_state);
}

// The options of fwd() and bwd(), as Python passes them: (softcap, window_left, window_right,
// alibi_slopes pointer, alibi batch stride, dropout_p, rng_state pointer).
using Options = std::tuple<double, int, int, uintptr_t, int64_t, double, uintptr_t>;

void set_options(FwdParams& p, double softmax_scale, bool causal, const Options& o) {
  const auto& [softcap, left, right, alibi, alibi_stride, dropout_p, rng_state] = o;
  set_score_options(p, softmax_scale, causal, softcap, left, right, alibi, alibi_stride);
  set_dropout(p, dropout_p, rng_state);
}

// q, k, v, o, lse and their strides, the fields FwdParams and DecodeParams share.
template <class Params>
void set_tensors(Params& p, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, Strides3 q_stride,
                 Strides3 k_stride, Strides3 v_stride, Strides3 o_stride, std::array<int64_t, 2> lse_stride) {
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.o = reinterpret_cast<void*>(o);
  p.lse = reinterpret_cast<float*>(lse);
  std::tie(p.q_batch_stride, p.q_row_stride, p.q_head_stride) = std::tuple_cat(q_stride);
  std::tie(p.k_batch_stride, p.k_row_stride, p.k_head_stride) = std::tuple_cat(k_stride);
  std::tie(p.v_batch_stride, p.v_row_stride, p.v_head_stride) = std::tuple_cat(v_stride);
  std::tie(p.o_batch_stride, p.o_row_stride, p.o_head_stride) = std::tuple_cat(o_stride);
  p.lse_batch_stride = lse_stride[0];
  p.lse_head_stride = lse_stride[1];
}

// The forward's part of the parameters, shared by fwd() and bwd().
void set_fwd_params(FwdParams& p, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse,
                    int batch, int seqlen_q, int seqlen_k, int heads, int heads_k, int head_dim,
                    Strides3 q_stride, Strides3 k_stride, Strides3 v_stride, Strides3 o_stride,
                    std::array<int64_t, 2> lse_stride, double softmax_scale, bool causal, const Options& options,
                    uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, std::array<int, 3> varlen_bounds) {
  set_tensors(p, q, k, v, o, lse, q_stride, k_stride, v_stride, o_stride, lse_stride);
  p.batch = batch;
  p.seqlen_q = seqlen_q;
  p.seqlen_k = seqlen_k;
  p.heads = heads;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  set_options(p, softmax_scale, causal, options);
  p.cu_seqlens_q = reinterpret_cast<const int*>(cu_seqlens_q);
  p.cu_seqlens_k = reinterpret_cast<const int*>(cu_seqlens_k);
  std::tie(p.total_q, p.total_k, p.block_table_width) = std::tuple_cat(varlen_bounds);
}

// Varlen: cu_seqlens_q/k are device pointers to int32 (batch + 1) (0: none), the batch strides
// are 0 and seqlen_q/k the max_seqlen hints; varlen_bounds: (rows of q, rows or pages of k,
// block-table columns). Paged K/V: block_table (0: none), see FwdParams.
void fwd(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, int batch, int seqlen_q,
         int seqlen_k, int heads, int heads_k, int head_dim, Strides3 q_stride, Strides3 k_stride,
         Strides3 v_stride, Strides3 o_stride, std::array<int64_t, 2> lse_stride, double softmax_scale,
         bool causal, const Options& options, uintptr_t s_dmask, std::array<int64_t, 5> s_dmask_layout,
         uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k, std::array<int, 3> varlen_bounds, uintptr_t block_table,
         int64_t block_table_batch_stride, int page_size, int dtype, int device, uintptr_t stream) {
  FwdParams p;
  set_fwd_params(p, q, k, v, o, lse, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, q_stride,
                 k_stride, v_stride, o_stride, lse_stride, softmax_scale, causal, options, cu_seqlens_q, cu_seqlens_k,
                 varlen_bounds);
  // return_attn_probs with dropout: (batch, head, row) strides, rows, cols of S_dmask.
  p.s_dmask = reinterpret_cast<void*>(s_dmask);
  p.s_dmask_batch_stride = s_dmask_layout[0];
  p.s_dmask_head_stride = s_dmask_layout[1];
  p.s_dmask_row_stride = s_dmask_layout[2];
  p.s_dmask_rows = static_cast<int>(s_dmask_layout[3]);
  p.s_dmask_cols = static_cast<int>(s_dmask_layout[4]);
  p.block_table = reinterpret_cast<const int*>(block_table);
  p.block_table_batch_stride = block_table_batch_stride;
  p.page_size = page_size;
  flash_cute::fwd(p, static_cast<DType>(dtype), device, reinterpret_cast<cudaStream_t>(stream));
}

// The workspace dq_accum, dsum, lse_log2 (ws_rows rows per head) and dq_semaphore: see BwdParams.
void bwd(uintptr_t dout, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, uintptr_t lse, uintptr_t dq,
         uintptr_t dk, uintptr_t dv, uintptr_t dq_accum, uintptr_t dsum, uintptr_t lse_log2,
         uintptr_t dq_semaphore, int64_t ws_rows, int batch,
         int seqlen_q, int seqlen_k, int heads, int heads_k, int head_dim, bool expand_gqa,
         Strides3 q_stride, Strides3 k_stride, Strides3 v_stride, Strides3 o_stride, Strides3 dout_stride,
         Strides3 dq_stride, Strides3 dk_stride, Strides3 dv_stride, std::array<int64_t, 2> lse_stride,
         double softmax_scale, bool causal, const Options& options, uintptr_t cu_seqlens_q, uintptr_t cu_seqlens_k,
         std::array<int, 3> varlen_bounds, int dtype, int device, uintptr_t stream) {
  BwdParams p;
  set_fwd_params(p, q, k, v, o, lse, batch, seqlen_q, seqlen_k, heads, heads_k, head_dim, q_stride,
                 k_stride, v_stride, o_stride, lse_stride, softmax_scale, causal, options, cu_seqlens_q, cu_seqlens_k,
                 varlen_bounds);
  p.ws_rows = ws_rows;
  p.dout = reinterpret_cast<const void*>(dout);
  p.dq = reinterpret_cast<void*>(dq);
  p.dk = reinterpret_cast<void*>(dk);
  p.dv = reinterpret_cast<void*>(dv);
  p.dq_accum = reinterpret_cast<float*>(dq_accum);
  p.dsum = reinterpret_cast<float*>(dsum);
  p.lse_log2 = reinterpret_cast<float*>(lse_log2);
  p.dq_semaphore = reinterpret_cast<int*>(dq_semaphore);
  std::tie(p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride) = std::tuple_cat(dout_stride);
  std::tie(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride) = std::tuple_cat(dq_stride);
  std::tie(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride) = std::tuple_cat(dk_stride);
  std::tie(p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride) = std::tuple_cat(dv_stride);
  p.expand_gqa = expand_gqa;
  flash_cute::bwd(p, static_cast<DType>(dtype), device, reinterpret_cast<cudaStream_t>(stream));
}

// The cache fields of DecodeParams, shared by decode() and append_kv(): cache_bounds = (cache rows
// or pages, positions per batch row).
void set_cache(flash_cute::DecodeParams& p, uintptr_t k_new, uintptr_t v_new, Strides3 k_new_stride, Strides3 v_new_stride,
               int batch, int heads_k, int head_dim, int seqlen_k, int seqlen_new, uintptr_t cache_seqlens,
               uintptr_t cache_batch_idx, uintptr_t leftpad, uintptr_t block_table, int64_t block_table_batch_stride,
               int page_size, std::array<int, 2> cache_bounds) {
  p.k_new = reinterpret_cast<const void*>(k_new);
  p.v_new = reinterpret_cast<const void*>(v_new);
  std::tie(p.k_new_batch_stride, p.k_new_row_stride, p.k_new_head_stride) = std::tuple_cat(k_new_stride);
  std::tie(p.v_new_batch_stride, p.v_new_row_stride, p.v_new_head_stride) = std::tuple_cat(v_new_stride);
  p.batch = batch;
  p.heads_k = heads_k;
  p.head_dim = head_dim;
  p.seqlen_k = seqlen_k;
  p.seqlen_new = seqlen_new;
  p.cache_seqlens = reinterpret_cast<const int*>(cache_seqlens);
  p.cache_batch_idx = reinterpret_cast<const int*>(cache_batch_idx);
  p.leftpad = reinterpret_cast<const int*>(leftpad);
  p.block_table = reinterpret_cast<const int*>(block_table);
  p.block_table_batch_stride = block_table_batch_stride;
  p.page_size = page_size;
  std::tie(p.cache_batch, p.capacity) = std::tuple_cat(cache_bounds);
}

// Decoding against a K/V cache; see DecodeParams. k_new / v_new: the rows to append (0: none, or
// already appended). Optional int32 vectors are 0 when absent;
// o_accum / lse_accum are the float32 workspace of num_splits > 1 (0 otherwise).
void decode(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t k_new, uintptr_t v_new, uintptr_t o, uintptr_t lse,
            uintptr_t o_accum, uintptr_t lse_accum, int batch, int seqlen_q, int heads, int heads_k, int head_dim, int seqlen_k,
            int seqlen_new, Strides3 q_stride, Strides3 k_stride, Strides3 v_stride, Strides3 k_new_stride,
            Strides3 v_new_stride, Strides3 o_stride, std::array<int64_t, 2> lse_stride, uintptr_t cache_seqlens, uintptr_t cache_batch_idx,
            uintptr_t leftpad, uintptr_t block_table, int64_t block_table_batch_stride, int page_size,
            std::array<int, 2> cache_bounds, double softmax_scale, bool causal, double softcap, int window_left, int window_right, uintptr_t alibi_slopes,
            int64_t alibi_batch_stride, int num_splits, int dtype, int device, uintptr_t stream) {
  flash_cute::DecodeParams p;
  set_tensors(p, q, k, v, o, lse, q_stride, k_stride, v_stride, o_stride, lse_stride);
  set_cache(p, k_new, v_new, k_new_stride, v_new_stride, batch, heads_k, head_dim, seqlen_k, seqlen_new, cache_seqlens,
            cache_batch_idx, leftpad, block_table, block_table_batch_stride, page_size, cache_bounds);
  p.o_accum = reinterpret_cast<float*>(o_accum);
  p.lse_accum = reinterpret_cast<float*>(lse_accum);
  p.seqlen_q = seqlen_q;
  p.heads = heads;
  // One decoding kernel takes every option.
  set_score_options(p, softmax_scale, causal, softcap, window_left, window_right, alibi_slopes, alibi_batch_stride);
  p.num_splits = num_splits;
  flash_cute::decode(p, static_cast<DType>(dtype), device, reinterpret_cast<cudaStream_t>(stream));
}

// flash_attn_with_kvcache's append (k_new, v_new into the caches k, v) for the calls that run the
// forward kernel; the arguments as in decode().
void append_kv(uintptr_t k, uintptr_t v, uintptr_t k_new, uintptr_t v_new, int batch, int heads_k, int head_dim,
               int seqlen_k, int seqlen_new, Strides3 k_stride, Strides3 v_stride, Strides3 k_new_stride,
               Strides3 v_new_stride, uintptr_t cache_seqlens, uintptr_t cache_batch_idx, uintptr_t leftpad,
               uintptr_t block_table, int64_t block_table_batch_stride, int page_size, std::array<int, 2> cache_bounds,
               int device, uintptr_t stream) {
  flash_cute::DecodeParams p;
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  std::tie(p.k_batch_stride, p.k_row_stride, p.k_head_stride) = std::tuple_cat(k_stride);
  std::tie(p.v_batch_stride, p.v_row_stride, p.v_head_stride) = std::tuple_cat(v_stride);
  set_cache(p, k_new, v_new, k_new_stride, v_new_stride, batch, heads_k, head_dim, seqlen_k, seqlen_new, cache_seqlens,
            cache_batch_idx, leftpad, block_table, block_table_batch_stride, page_size, cache_bounds);
  flash_cute::append_kv(p, device, reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flash_cute kernels (CuTe); called by flash_cute.flash_attn_interface, not directly.";
  m.def("fwd", &fwd, py::call_guard<py::gil_scoped_release>(),
        "Forward attention on device pointers; see flash_cute/_ops.py for the arguments.");
  m.def("bwd", &bwd, py::call_guard<py::gil_scoped_release>(),
        "Backward attention on device pointers; see flash_cute/_ops.py for the arguments.");
  m.def("decode", &decode, py::call_guard<py::gil_scoped_release>(),
        "Split-KV decoding against a K/V cache; see flash_cute/_ops.py for the arguments.");
  m.def("append_kv", &append_kv, py::call_guard<py::gil_scoped_release>(),
        "flash_attn_with_kvcache's append for calls that run the forward kernel; see flash_cute/_ops.py.");
  m.def("decode_splits", &flash_cute::decode_splits,
        "the split count of num_splits=0: (batch, heads_k, packed_rows, capacity, head_dim, device)");
  m.def("decode_tile", [](int head_dim) {
    const flash_cute::DecodeTile t = flash_cute::decode_tile(flash_cute::head_dim_bucket(head_dim));
    return py::make_tuple(t.warps, t.stages, t.block_n);
  }, "(warps, stages, block_n) of the decoding kernel for this head dim");
  m.def("built_decode_kernels", &flash_cute::built_decode_kernels,
        "(dtype, head-dim bucket) of each decoding kernel in this build");
  m.def("built_option_kernels", &flash_cute::built_option_kernels,
        "(dtype, head-dim bucket) of each forward/backward kernel pair with options in this build");
  m.def("built_bwd_kernels", &flash_cute::built_bwd_kernels,
        "(dtype, head-dim bucket) of each backward kernel in this build");
  m.def("bwd_tile", [](int head_dim, int device) {
    const int bucket = flash_cute::head_dim_bucket(head_dim);
    bool small = false;
    if (device >= 0) {
      int bytes = 0;
      flash_cute::check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                             "reading the shared-memory limit");
      small = flash_cute::bwd_runs_small_tile(bucket, bytes);
    }
    const flash_cute::BwdTile t = flash_cute::bwd_tile(bucket, small);
    return py::make_tuple(t.block_m, t.block_n, t.warps, flash_cute::bwd_kernel_head_dim(bucket, small));
  }, py::arg("head_dim"), py::arg("device") = -1,
        "(block_m, block_n, warps, kernel head dim) of the backward kernel for this head dim: the tile it runs on "
        "CUDA device `device` (the small-shared-memory one where that GPU needs it), or its default tile "
        "(device -1); the kernel head dim is the columns of its dQ accumulator");
  m.def("built_fwd_kernels", &flash_cute::built_fwd_kernels,
        "(dtype, head-dim bucket, causal) of each forward kernel in this build");
  m.def("head_dim_bucket", &flash_cute::head_dim_bucket, "head dim -> the kernel head dim that runs it");
  m.def("fwd_tile", [](int head_dim, bool causal) {
    const flash_cute::FwdTile t = flash_cute::fwd_tile(flash_cute::head_dim_bucket(head_dim), causal);
    return py::make_tuple(t.block_m, t.block_n, t.warps);
  }, "(block_m, block_n, warps) of the forward kernel for this head dim");
  py::dict build;
  build["cuda_archs"] = FLASH_CUTE_CUDA_ARCHS_STR;
  build["head_dims"] = FLASH_CUTE_HEAD_DIMS_STR;
  build["dtypes"] = FLASH_CUTE_DTYPES_STR;
  build["option_kernels"] = FLASH_CUTE_OPTION_KERNELS_STR;
  build["small_smem_tiles"] = FLASH_CUTE_SMALL_SMEM_TILES_STR;
  build["cutlass"] = FLASH_CUTE_CUTLASS_STR;
  build["cuda_runtime"] = CUDART_VERSION;
  m.attr("build_config") = build;
  m.attr("kDTypeFloat16") = static_cast<int>(DType::kFloat16);
  m.attr("kDTypeBFloat16") = static_cast<int>(DType::kBFloat16);
}
