// Small device building blocks shared by the kernels: register-layout views, the two GEMM shapes
// of attention, predicated tile copies and quad reductions.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace flash_cute {
using namespace cute;

// ---------------------------------------------------------------------------------------------
// Layout views of an m16n8 accumulator fragment ((2, 2), MMA_M, MMA_N)
// ---------------------------------------------------------------------------------------------

// As (rows, cols): a thread's value (v0, v1) of an atom is (column pair, row pair), so rows are
// (v1, MMA_M) and columns (v0, MMA_N). Softmax and masking index the accumulator this way.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto rowcol_layout(Layout acc) {
  static_assert(decltype(rank<0>(acc))::value == 2);
  return make_layout(make_layout(get<0, 1>(acc), get<1>(acc)),
                     make_layout(get<0, 0>(acc), get<2>(acc)));
}

// As the A operand of the next m16n8k16 MMA: two n8 accumulator atoms side by side hold exactly
// the (2, 2, 2) values an A fragment needs for one k16 step, so P never leaves registers.
template <class Layout>
CUTE_HOST_DEVICE constexpr auto acc_as_operand_a_layout(Layout acc) {
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
  return make_layout(make_layout(get<0, 0>(l), get<0, 1>(l), get<2, 0>(l)), get<1>(l),
                     get<2, 1>(l));
}

template <class To, class Engine, class Layout>
CUTE_DEVICE auto make_converted(Tensor<Engine, Layout> const& src) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(src))::value;
  Tensor dst = make_tensor<To>(src.layout());
  cutlass::NumericArrayConverter<To, From, N> convert;
  *reinterpret_cast<cutlass::Array<To, N>*>(dst.data()) =
      convert(*reinterpret_cast<const cutlass::Array<From, N>*>(src.data()));
  return dst;
}

// Two floats rounded to nearest into one 32-bit pair of To (bf16 or f16), lo in the low half.
template <class To>
CUTE_DEVICE uint32_t pack_pair(float lo, float hi) {
  uint32_t pair;
  if constexpr (std::is_same_v<To, cute::bfloat16_t>)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pair) : "f"(hi), "f"(lo));
  return pair;
}

// ---------------------------------------------------------------------------------------------
// GEMMs. Operands are copied from shared memory one k16 slice ahead of the MMAs that use them,
// so the LDSM of slice k+1 is in flight while the tensor cores work on slice k.
// ---------------------------------------------------------------------------------------------

// acc += A B^T with A and B in shared memory. work(k) runs after the MMAs of slice k are issued:
// element-wise work placed there interleaves with the GEMM's MMAs in program order.
template <class Acc, class RA, class RB, class SA, class SB, class TiledMma, class CopyA, class CopyB,
          class Work>
CUTE_DEVICE void gemm_smem_smem(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB, TiledMma const& mma,
                                CopyA const& copy_a, CopyB const& copy_b, Work&& work) {
  Tensor rA_view = make_tensor(rA.data(), copy_a.retile(rA.layout()));  // (CPY, MMA_M, MMA_K)
  Tensor rB_view = make_tensor(rB.data(), copy_b.retile(rB.layout()));  // (CPY, MMA_N, MMA_K)
  CUTE_STATIC_ASSERT_V(size<1>(sA) == size<1>(rA_view));
  CUTE_STATIC_ASSERT_V(size<1>(sB) == size<1>(rB_view));
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
    work(k);
  }
}
template <class Acc, class RA, class RB, class SA, class SB, class TiledMma, class CopyA, class CopyB>
CUTE_DEVICE void gemm_smem_smem(Acc& acc, RA& rA, RB& rB, SA const& sA, SB const& sB,
                                TiledMma const& mma, CopyA const& copy_a, CopyB const& copy_b) {
  gemm_smem_smem(acc, rA, rB, sA, sB, mma, copy_a, copy_b, [](int) {});
}

// acc += A B^T with A in shared memory and B already in registers (the backward's V, kVInRegs).
template <class Acc, class RA, class RB, class SA, class TiledMma, class CopyA, class Work>
CUTE_DEVICE void gemm_smem_reg(Acc& acc, RA& rA, RB const& rB, SA const& sA, TiledMma const& mma,
                               CopyA const& copy_a, Work&& work) {
  Tensor rA_view = make_tensor(rA.data(), copy_a.retile(rA.layout()));
  CUTE_STATIC_ASSERT_V(size<1>(sA) == size<1>(rA_view));
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
    work(k);
  }
}

// acc += A B^T with A already in registers (P) and B in shared memory (V^T).
template <class Acc, class RA, class RB, class SB, class TiledMma, class CopyB>
CUTE_DEVICE void gemm_reg_smem(Acc& acc, RA const& rA, RB& rB, SB const& sB, TiledMma const& mma,
                               CopyB const& copy_b) {
  Tensor rB_view = make_tensor(rB.data(), copy_b.retile(rB.layout()));
  CUTE_STATIC_ASSERT_V(size<1>(sB) == size<1>(rB_view));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k + 1 < size<2>(rA)) copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Predicated tile copy. `coord` is the identity tensor partitioned like `src`: element i holds the
// (row, col) it copies. Rows >= max_rows and columns >= max_cols are not read. With kZeroFill
// (loads into shared memory) they are zero-filled instead, so a ragged tile computes as if padded
// with zeros: a NaN left over in shared memory would survive a multiplication by a zero
// probability. Without it (stores to global memory) they are skipped.
// ---------------------------------------------------------------------------------------------
template <bool kZeroFill, class TiledCopy, class Src, class Dst, class Coord>
CUTE_DEVICE void copy_predicated(TiledCopy const& tiled_copy, Src const& src, Dst&& dst,
                                 Coord const& coord, int max_rows, int max_cols) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    const bool row_ok = get<0>(coord(0, m, 0)) < max_rows;
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      if (row_ok && get<1>(coord(0, m, k)) < max_cols) copy(tiled_copy, src(_, m, k), dst(_, m, k));
      else if constexpr (kZeroFill) clear(dst(_, m, k));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The four threads of a quad (lanes 4r..4r+3) share the rows of an m16n8 accumulator.
// ---------------------------------------------------------------------------------------------
CUTE_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
CUTE_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace flash_cute
