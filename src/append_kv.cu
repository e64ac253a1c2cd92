// flash_attn_with_kvcache's append where the split-KV kernel does not do it (long queries, which
// run the forward kernel): new row i of batch row b goes to cache position cache_seqlens[b] + i
// of its cache row, or of the page the block table names. A batch row whose index values leave
// the cache (cache_span) appends nothing, and an entry of the block table that is not a page
// takes no row: nothing is written outside the caches.
#include <cstdint>

#include "flash_cute/cuda_check.h"
#include "flash_cute/params.h"
#include "flash_cute/seqlen.h"

namespace flash_cute {
namespace {

constexpr int kAppendThreads = 128;

// Grid (seqlen_new, batch): one CTA copies one new row (every KV head) of K and of V. Elements
// are 2 bytes (fp16, bf16); the last dimension is contiguous.
__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(const DecodeParams p) {
  const int i = blockIdx.x, batch = blockIdx.y;
  const CacheSpan span = cache_span(p, batch);
  if (span.bad) return;
  const int64_t position = int64_t(span.cached) + i;
  int64_t cache_row = span.cache_row, row = position;
  if (p.block_table != nullptr) {
    cache_row = p.block_table[batch * p.block_table_batch_stride + position / p.page_size];
    if (!is_page(cache_row, p.cache_batch)) return;
    row = position % p.page_size;
  }
  auto k_dst = static_cast<uint16_t*>(const_cast<void*>(p.k)) + cache_row * p.k_batch_stride + row * p.k_row_stride;
  auto v_dst = static_cast<uint16_t*>(const_cast<void*>(p.v)) + cache_row * p.v_batch_stride + row * p.v_row_stride;
  auto k_src = static_cast<const uint16_t*>(p.k_new) + batch * p.k_new_batch_stride + i * p.k_new_row_stride;
  auto v_src = static_cast<const uint16_t*>(p.v_new) + batch * p.v_new_batch_stride + i * p.v_new_row_stride;
  for (int e = threadIdx.x; e < p.heads_k * p.head_dim; e += kAppendThreads) {
    const int head = e / p.head_dim, c = e % p.head_dim;
    k_dst[head * p.k_head_stride + c] = k_src[head * p.k_new_head_stride + c];
    v_dst[head * p.v_head_stride + c] = v_src[head * p.v_new_head_stride + c];
  }
}

}  // namespace

void run_append_kv(const DecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen_new == 0) return;
  append_kv_kernel<<<dim3(unsigned(p.seqlen_new), unsigned(p.batch)), kAppendThreads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "append_kv kernel launch");
}

}  // namespace flash_cute
