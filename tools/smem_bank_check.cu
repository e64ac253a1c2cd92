// Host-side model of the shared-memory bank conflicts of the backward kernel's LDSM copies (bf16,
// d128): for every warp and copy, the 8 row addresses of each ldmatrix phase must fall in 8
// distinct 16-byte bank groups. Development aid; build and run on any machine (no GPU):
//   nvcc -std=c++17 --expt-relaxed-constexpr -Iinclude -I<cutlass>/include -x cu \
//        tools/smem_bank_check.cu -o /tmp/smem_bank_check && /tmp/smem_bank_check
// 2026-11-26: every copy conflict-free by this model, while ncu counts 26 M shared-load bank
// conflicts in the kernel (official FA2: 0.7 M): their source is elsewhere.
#include <cstdio>
#include <set>
#include "flash_cute/bwd_traits.h"
using namespace cute;
using namespace flash_cute;

template <class TiledCopy, class SmemLayout>
void check(const char* name, TiledCopy cpy, SmemLayout L) {
  long worst = 0, total = 0, instrs = 0;
  for (int W = 0; W < 8; ++W) {
  auto id = make_identity_tensor(shape(L));
  auto p0 = cpy.get_thread_slice(0).partition_S(id);
  auto g0 = group_modes<1, decltype(rank(p0))::value>(p0);
  int n_rest = size<1>(g0);
  for (int i = 0; i < n_rest; ++i) {
    long addr[32];
    for (int t = W * 32; t < W * 32 + 32; ++t) {
      auto part = cpy.get_thread_slice(t).partition_S(id);
      auto g = group_modes<1, decltype(rank(part))::value>(part);
      addr[t - W * 32] = long(L(g(0, i))) * 2;  // bytes (16-bit elements)
    }
    for (int ph = 0; ph < 4; ++ph) {
      std::set<long> groups;
      for (int t = ph * 8; t < ph * 8 + 8; ++t) groups.insert((addr[t] / 16) % 8);
      long waves = 8 - (long)groups.size();
      total += waves; worst = std::max(worst, waves);
    }
    ++instrs;
  }
  }
  printf("%-28s copies/thread %3ld  extra-wavefront sum %4ld  worst phase %ld\n", name, instrs, total, worst);
}

int main() {
  using Tr = BwdTraits<DType::kBFloat16, 128>;
  typename Tr::SmemLayoutQ sQ; typename Tr::SmemLayoutKV sK; typename Tr::SmemLayoutKt sKt;
  typename Tr::SmemLayoutPdS sP; typename Tr::SmemLayoutPdSt sPt; typename Tr::SmemLayoutQt sQt;
  typename Tr::TiledMmaSdP mma_sdp; typename Tr::TiledMmadKV mma_dkv; typename Tr::TiledMmadQ mma_dq;
  check("sdp A (Q, dO) LDSM_N", make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma_sdp), sQ);
  check("sdp B (K, V) LDSM_N", make_tiled_copy_B(typename Tr::SmemCopyAtom{}, mma_sdp), sK);
  check("dkv A (P^T, dS^T) LDSM_T", make_tiled_copy_A(typename Tr::SmemCopyAtomTransposed{}, mma_dkv), sPt);
  check("dkv B (dO^T, Q^T) LDSM_T", make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, mma_dkv), sQt);
  check("dq A (dS) LDSM_N", make_tiled_copy_A(typename Tr::SmemCopyAtom{}, mma_dq), sP);
  check("dq B (K^T) LDSM_T", make_tiled_copy_B(typename Tr::SmemCopyAtomTransposed{}, mma_dq), sKt);
  return 0;
}
