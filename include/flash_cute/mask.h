// Masking of a tile of scores: keys past seqlen_k, and with causal the keys above the diagonal.
#pragma once
#include <cmath>
#include <cute/tensor.hpp>

namespace flash_cute {
using namespace cute;

// scores: a (rows, cols) view of an accumulator; coords: the same view of the identity tensor,
// (row, col) within the tile. The tile starts at query row0, key col0. Causal is bottom-right
// aligned: key j is visible from query i iff j <= i + seqlen_k - seqlen_q. Masked scores become
// -inf. `causal` is a compile-time constant in the forward kernel and folds away there.
template <class Scores, class Coords>
CUTE_DEVICE void mask_scores(Scores& scores, Coords const& coords, int row0, int col0, int seqlen_q,
                             int seqlen_k, bool causal) {
  const int diagonal = seqlen_k - seqlen_q;
  CUTE_UNROLL
  for (int r = 0; r < size<0>(scores); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(scores); ++c) {
      const int row = row0 + get<0>(coords(r, c));
      const int col = col0 + get<1>(coords(r, c));
      if (col >= seqlen_k || (causal && col > row + diagonal)) scores(r, c) = -INFINITY;
    }
  }
}

}  // namespace flash_cute
