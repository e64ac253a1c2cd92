// Online softmax over the key blocks of one query block, in registers.
//
// For each query row the kernel keeps the running maximum m and the running sum l of
// exp(scale * (s - m)) over the keys seen so far; when a new block raises the maximum, the partial
// output and l are rescaled by exp(scale * (m_old - m_new)). exp(x) is computed as
// exp2(x * log2 e) so that scale * log2 e folds into one FFMA ahead of the EX2.
//
// A row whose scores are all -inf (every key masked) keeps m = -inf; it is exponentiated against 0
// instead, so its probabilities are 0 (never NaN) and finalize() reports sum 0: output 0, lse +inf.
#pragma once
#include <cmath>
#include <cute/tensor.hpp>

#include "flash_cute/utils.h"

namespace flash_cute {
using namespace cute;

template <int kRows>
struct OnlineSoftmax {
  // Before the first block: m = -inf and l = 0, so the first update's rescale multiplies the
  // (zero) accumulator by exp2(-inf) = 0 and needs no special case.
  float row_max[kRows];
  float row_sum[kRows];  // per-thread partial sums; reduced across the quad in finalize()

  CUTE_DEVICE OnlineSoftmax() {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // scores, acc_o: (rows, cols) views of the S and O accumulators. Overwrites scores with the
  // unnormalised probabilities exp(scale * (s - m)) and rescales acc_o to the new maximum. The
  // maximum is the exact running one: the largest probability is then exactly 1, which 16-bit P
  // holds without rounding. (A maximum allowed to lag by up to 2^8, rescaling O only when a row's
  // maximum rose by more, made the d128 forward 4% faster but doubled the error of rows that one
  // key dominates, past the tests' bound; rescaling only when some row's maximum rose at all saved
  // nothing. performance-log.md has the numbers.)
  //
  // fixed: the maximum was set by fix_max() and stays; scores are only exponentiated and summed.
  template <class S, class O>
  CUTE_DEVICE void update(S& scores, O& acc_o, float scale_log2, bool fixed = false) {
    static_assert(decltype(size<0>(scores))::value == kRows);
    // One branch around all rows' maxima (a branch per row kept the rows' exponentials apart:
    // softcap's forward 1.07x plain instead of 1.00x).
    float correction[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) correction[r] = 1.f;
    if (!fixed) {
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float m = row_max[r];
        CUTE_UNROLL
        for (int c = 0; c < size<1>(scores); ++c) m = fmaxf(m, scores(r, c));
        m = quad_max(m);
        const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
        // row_max[r] <= m, so the factor is in [0, 1]; exp2(-inf) = 0 for a row that had no key yet.
        correction[r] = exp2f(row_max[r] * scale_log2 - m_scaled);
        row_max[r] = m;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= correction[r];
      }
    }
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float m_scaled = row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const float p = exp2f(scores(r, c) * scale_log2 - m_scaled);
        scores(r, c) = p;
        sum += p;
      }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
  }

  // Sets every row's maximum to m for good (update(..., fixed = true)): for scores bounded so that
  // their exponentials against m are normal floats of moderate size (softcap's, see fwd_block).
  CUTE_DEVICE void fix_max(float m) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) row_max[r] = m;
  }

  // Normalises acc_o by the row sums (and multiplies it by o_scale); lse[r] gets
  // log(sum exp(scale * s)).
  template <class O>
  CUTE_DEVICE void finalize(O& acc_o, float scale, float (&lse)[kRows], float o_scale = 1.f) {
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 1.f : o_scale / sum;
      lse[r] = empty ? INFINITY : row_max[r] * scale + __logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) acc_o(r, c) *= inv;
    }
  }
};

}  // namespace flash_cute
