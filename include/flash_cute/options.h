// flash_attn's options on a tile of scores: softcap, ALiBi, the local window (ScoreOptions in
// params.h), and dropout's random numbers. Shared by the forward, backward and decoding kernels;
// each applies them to its own (rows, cols) view of an S accumulator, with `coords` the same view of
// the identity tensor. Every step is a separate loop behind a uniform branch, so an option that
// is off costs one test per tile.
#pragma once
#include <cmath>
#include <cstdint>
#include <cute/tensor.hpp>

#include "flash_cute/params.h"

namespace flash_cute {
using namespace cute;

CUTE_DEVICE float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// s -> tanh(s * pre) on every score.
template <class Scores>
CUTE_DEVICE void apply_softcap(Scores& scores, float pre) {
  CUTE_UNROLL
  for (int i = 0; i < size(scores); ++i) scores(i) = tanh_approx(scores(i) * pre);
}

// The ALiBi slope of (batch, head), already in score units (0 without ALiBi).
CUTE_DEVICE float alibi_slope(const ScoreOptions& o, int batch, int head) {
  return o.alibi_slopes == nullptr ? 0.f : o.alibi_slopes[batch * o.alibi_batch_stride + head] * o.alibi_scale;
}

// What a forward or backward kernel applies beyond the window that every kernel takes (the
// kOptions template argument). ALiBi alone runs a kernel made for it; softcap runs one with ALiBi
// read at run time (a kernel for softcap alone measured no faster: 1.135x vs 1.143x the plain
// forward); dropout one with both at run time (kDropout: a kernel for dropout alone measured no
// faster, 2.114 vs 2.101 ms forward, 5.624 vs 5.599 ms backward). The kernel that read softcap and
// ALiBi at run time cost 7% (forward) and 11% (backward) with neither on, its uniform branches
// splitting the loop body; the ALiBi kernel costs 5% / 7% with slopes of 0 (H200, bf16 d128 4k).
enum OptionKind : int { kNoOptions = 0, kSoftcap = 1, kAlibiOnly = 2, kAnyOptions = 3 };

template <int kOptions>
CUTE_DEVICE bool softcap_on(const ScoreOptions& o) {
  return kOptions == kSoftcap || (kOptions == kAnyOptions && o.softcap_pre != 0.f);
}
// The ALiBi slope of (batch, head) in a kernel that may apply ALiBi, else 0.
template <int kOptions>
CUTE_DEVICE float alibi_slope(const ScoreOptions& o, int batch, int head) {
  return kOptions != kNoOptions ? alibi_slope(o, batch, head) : 0.f;
}
template <int kOptions>
CUTE_DEVICE bool alibi_on(float slope) {
  return kOptions == kAlibiOnly || (kOptions != kNoOptions && slope != 0.f);
}

// The kernel with options for a call without dropout (host side; the caller knows one is on).
inline OptionKind option_kind(const ScoreOptions& o) { return o.softcap_pre != 0.f ? kSoftcap : kAlibiOnly; }
inline const char* option_kernel_name(int options, bool dropout) {
  return dropout ? ", dropout" : options == kSoftcap ? ", softcap" : options == kAlibiOnly ? ", ALiBi" : "";
}

// ALiBi (when `alibi`) and, when `mask`, -inf for keys outside [0, seqlen_k) and the window.
// row_of(r): the query row of tile row r (its index in the sequence), slope_of(r) its ALiBi slope
// in score units; col0 + the coordinate's column: the key. diagonal = seqlen_k - seqlen_q.
template <class Scores, class Coords, class RowOf, class SlopeOf>
CUTE_DEVICE void apply_bias_and_mask(Scores& scores, Coords const& coords, RowOf row_of, SlopeOf slope_of, int col0,
                                     int seqlen_k, int diagonal, const ScoreOptions& o, bool alibi, bool mask) {
  if (alibi) {
    // -slope * |row + diagonal - col| in float arithmetic: a thread's columns are its first one
    // plus compile-time offsets, so per score one FADD and one FFMA (no int-to-float conversion).
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int col_first = get<1>(coords(r, 0));
      const float distance0 = float(row_of(r) + diagonal - col0 - col_first);
      const float slope = slope_of(r);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c)
        scores(r, c) -= slope * fabsf(distance0 - float(get<1>(coords(r, c)) - col_first));
    }
  }
  if (mask) {
    CUTE_UNROLL
    for (int r = 0; r < size<0>(scores); ++r) {
      const int row = row_of(r) + diagonal;
      const int lo = max(0, row - o.window_left);
      const int hi = min(seqlen_k - 1, row + o.window_right);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        const int col = col0 + get<1>(coords(r, c));
        if (col < lo || col > hi) scores(r, c) = -INFINITY;
      }
    }
  }
}

// The key blocks [begin, end) of block_n keys that query rows [row0, row0 + rows) can see.
struct KeyRange {
  int begin, end;
  CUTE_DEVICE KeyRange(int row0, int rows, int seqlen_k, int diagonal, const ScoreOptions& o, int block_n) {
    const int64_t hi = min(int64_t(seqlen_k), int64_t(row0 + rows - 1 + diagonal) + o.window_right + 1);  // keys < hi
    const int64_t lo = max(int64_t(0), int64_t(row0 + diagonal) - o.window_left);
    end = hi <= 0 ? 0 : int((hi + block_n - 1) / block_n);
    begin = int(lo / block_n);
  }
};

// The key blocks [begin, end) of block_n keys that need no mask for query rows [row0, row0 + rows):
// inside seqlen_k and inside every row's window. Computed once per query block, so the main loop
// tests a block with two integer compares.
struct MaskFreeBlocks {
  int begin, end;
  CUTE_DEVICE MaskFreeBlocks(int row0, int rows, int seqlen_k, int diagonal, const ScoreOptions& o, int block_n) {
    // a block is free iff its last key <= min(seqlen_k - 1, first row + right) and its first key
    // >= last row - left
    const int64_t last_ok = min(int64_t(seqlen_k) - 1, int64_t(row0 + diagonal) + o.window_right);
    const int64_t first_ok = int64_t(row0 + rows - 1 + diagonal) - o.window_left;
    end = last_ok < 0 ? 0 : int((last_ok + 1) / block_n);
    begin = first_ok <= 0 ? 0 : int(min(int64_t(1) << 30, (first_ok + block_n - 1) / block_n));
  }
  CUTE_DEVICE bool needs_mask(int n) const { return n >= end || n < begin; }
};

// Whether the tile of query rows [row0, row0 + rows) and keys [col0, col0 + cols) needs the mask:
// it runs past seqlen_k or crosses a window edge.
CUTE_DEVICE bool tile_needs_mask(int row0, int rows, int col0, int cols, int seqlen_k, int diagonal,
                                 const ScoreOptions& o) {
  const int col_last = col0 + cols - 1;
  return col_last >= seqlen_k || int64_t(col_last) > int64_t(row0 + diagonal) + o.window_right ||
         int64_t(col0) < int64_t(row0 + rows - 1 + diagonal) - o.window_left;
}

// ------------------------------------------------------------------------------------------------
// Dropout: Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
// ------------------------------------------------------------------------------------------------

// Rounds of the Philox bijection. Salmon et al. find 7 rounds of Philox4x32 pass BigCrush (10 is
// their default, a safety margin); flash_attn and PyTorch's copy of it draw dropout with 7, and so
// do we: with 10, the forward with dropout took 1.42x the plain forward's time, ~1/3 of it the
// three extra rounds (H200, bf16 d128 4k).
constexpr int kPhiloxRounds = 7;

CUTE_DEVICE uint4 philox4x32(uint4 ctr, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  CUTE_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod0 = uint64_t(kMul0) * ctr.x, prod1 = uint64_t(kMul1) * ctr.z;  // one IMAD.WIDE each
    const uint32_t hi0 = uint32_t(prod0 >> 32), lo0 = uint32_t(prod0);
    const uint32_t hi1 = uint32_t(prod1 >> 32), lo1 = uint32_t(prod1);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return ctr;
}

// 0xffff in each 16-bit half of the result where that half of a <= that half of b, as unsigned
// integers below 2^10 (compared as the f16 subnormals they are, which order like the integers:
// one HSET2 for two scores; the integer SIMD compares are emulated on sm_80+).
CUTE_DEVICE uint32_t le_mask_u16x2(uint32_t a, uint32_t b) {
  uint32_t mask;
  asm("set.le.u32.f16x2 %0, %1, %2;" : "=r"(mask) : "r"(a), "r"(b));
  return mask;
}

// Dropout's random numbers for one (sequence, head): the key and counter words from the
// (seed, offset) the caller drew from torch's generator, read from the device once per CTA (a
// read per tile stalled the warp on its latency every tile).
//
// One Philox call gives 16 random bytes for 16 scores of a thread: rows {row, row + 8} x columns
// {col, col + 1} of each of the 4 m16n8 fragments in 32 consecutive keys, (row, col) the first
// one's (query, key): row % 16 < 8, col % 8 even. It is keyed by (row / 16, col / 32, the
// fragment's place in its m16n8 tile), so the numbers are a function of the coordinates only and
// the forward and backward kernels draw the same ones, whichever fragments their warps hold.
// Fragment (col % 32) / 8 takes word (col % 32) / 8, value v byte v: (row + 8 * (v / 2), col + v % 2).
// A score is kept iff its byte <= keep_byte (flash_attn's 8-bit threshold, floor(keep * 255)).
struct Dropout {
  uint2 key;
  uint32_t offset, bh, keep_byte;
  Dropout() = default;
  CUTE_DEVICE Dropout(const FwdParams& p, int seq, int head) {
    const uint64_t seed = uint64_t(p.rng_state[0]);
    key = make_uint2(uint32_t(seed), uint32_t(seed >> 32));
    offset = uint32_t(p.rng_state[1]);
    bh = uint32_t(seq) * uint32_t(p.heads) + uint32_t(head);
    keep_byte = p.keep_byte;
  }
  CUTE_DEVICE Dropout with_head(int seq, int heads, int head) const {
    Dropout d = *this;
    d.bh = uint32_t(seq) * uint32_t(heads) + uint32_t(head);
    return d;
  }
  CUTE_DEVICE uint4 draw(int row, int col) const {
    const uint32_t lane = (row % 8) * 4 + (col % 8) / 2;
    return philox4x32(make_uint4(uint32_t(row / 16), uint32_t(col / 32) * 32u + lane, bh, offset), key);
  }
  // Whether value v of a fragment whose random word is w is kept.
  CUTE_DEVICE bool kept(uint32_t w, int v) const { return ((w >> (8 * v)) & 0xffu) <= keep_byte; }

  // The random words of an (MMA = 4, MMA_M, MMA_N) accumulator of m16n8 fragments, one Philox call
  // per fragments n = 4g .. 4g + 3 of each m: the kernels' layouts put a thread's fragments of a
  // row 8 keys apart, in runs of 32 aligned keys (the forward's: all of the tile's; the
  // backward's with dropout: BwdTraits::DropoutKeyOrder), and the tests against the forward's
  // S_dmask would catch a layout that did not. coords: the accumulator's identity partition, the
  // tile at (row0, col0) of the sequence. Drawn apart from their use (for_each_fragment), the
  // integer work can go where the scheduler finds room.
  template <class Acc, class Coords>
  CUTE_DEVICE auto draw_tile(Acc const& acc, Coords const& coords, int row0, int col0) const {
    static_assert(decltype(size<0>(acc))::value == 4, "m16n8 accumulator fragments");
    constexpr int kM = decltype(size<1>(acc))::value, kCalls = (decltype(size<2>(acc))::value + 3) / 4;
    cute::array<uint4, kM * kCalls> words;
    CUTE_UNROLL
    for (int m = 0; m < kM; ++m) {
      CUTE_UNROLL
      for (int g = 0; g < kCalls; ++g)
        words[m * kCalls + g] = draw(row0 + get<0>(coords(0, m, 4 * g)), col0 + get<1>(coords(0, m, 4 * g)));
    }
    return words;
  }

  // The random word of fragment (m, n) of an accumulator (see kept()), from draw_tile's words.
  // kRuns32: the thread holds every fragment of its rows in runs of 32 keys (the forward, the
  // backward where BwdTraits::kSdpWarpCols is 32): fragment n takes word n % 4, known at compile
  // time; else word (col % 32) / 8 of its call.
  template <bool kRuns32, class Acc, class Coords, class Words>
  CUTE_DEVICE uint32_t word(Acc const& acc, Coords const& coords, int col0, Words const& words, int m, int n) const {
    constexpr int kCalls = (decltype(size<2>(acc))::value + 3) / 4;
    const uint4 w = words[m * kCalls + n / 4];
    const int sub = kRuns32 ? n % 4 : ((col0 + get<1>(coords(0, m, n))) % 32) / 8;
    return sub == 0 ? w.x : sub == 1 ? w.y : sub == 2 ? w.z : w.w;
  }

  // Calls f(m, n, w) for every fragment (m, n) of the accumulator, w its word().
  template <bool kRuns32, class Acc, class Coords, class Words, class F>
  CUTE_DEVICE void for_each_fragment(Acc const& acc, Coords const& coords, int col0, Words const& words, F&& f) const {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(acc); ++m) {
      CUTE_UNROLL
      for (int n = 0; n < size<2>(acc); ++n) f(m, n, word<kRuns32>(acc, coords, col0, words, m, n));
    }
  }

  // Dropout's decisions on the four values of a fragment whose word is w, as masks on 32-bit pairs
  // of their 16-bit copies (values 0, 1 and values 2, 3): 0xffff in each half whose score is kept.
  // One byte permute and one HSET2 per pair.
  CUTE_DEVICE uint2 fragment_masks(uint32_t w) const {
    const uint32_t keep2 = keep_byte * 0x10001u;
    return make_uint2(le_mask_u16x2(__byte_perm(w, 0, 0x4140), keep2),   // values 0, 1: bytes 0, 1 as two u16
                      le_mask_u16x2(__byte_perm(w, 0, 0x4342), keep2));  // values 2, 3: bytes 2, 3
  }

  // fragment_masks of every fragment of an accumulator of P (as for draw_tile), in the
  // accumulator's order of pairs.
  template <bool kRuns32, class Acc, class Coords, class Words>
  CUTE_DEVICE auto keep_masks(Acc const& acc, Coords const& coords, int col0, Words const& words) const {
    cute::array<uint32_t, decltype(size(acc))::value / 2> masks;
    for_each_fragment<kRuns32>(acc, coords, col0, words, [&](int m, int n, uint32_t w) {
      const int pair = acc.layout()(0, m, n) / 2;
      const uint2 mask = fragment_masks(w);
      masks[pair] = mask.x;
      masks[pair + 1] = mask.y;
    });
    return masks;
  }
};

// Stores the return_attn_probs matrix of one tile (a debugging aid, kept out of the normal path):
// P (acc: an (MMA = 4, MMA_M, MMA_N) accumulator of m16n8 fragments, coords its identity
// partition, (row0, col0) the tile's origin in the sequence, words its draw_tile) into s_dmask (this (sequence, head)'s
// matrix, row stride `ld`, rows x cols of it exist), negated where dropout drops it.
template <class Element, class Acc, class Coords, class Words>
CUTE_DEVICE void store_s_dmask(Acc const& acc, Coords const& coords, int row0, int col0, const Dropout& dropout,
                               Words const& words, Element* s_dmask, int64_t ld, int rows, int cols) {
  dropout.for_each_fragment<true>(acc, coords, col0, words, [&](int m, int n, uint32_t w) {
    const int row = row0 + get<0>(coords(0, m, n)), col = col0 + get<1>(coords(0, m, n));
    CUTE_UNROLL
    for (int v = 0; v < 4; ++v) {
      const int r = row + 8 * (v / 2), c = col + v % 2;
      if (r < rows && c < cols) s_dmask[r * ld + c] = Element(dropout.kept(w, v) ? acc(v, m, n) : -acc(v, m, n));
    }
  });
}

// Applies dropout to P converted to 16 bits (rP, in the layout of the accumulator that keep_masks
// saw): dropped entries become 0 (the 1 / keep scaling is left to the epilogue or folded into P).
template <class Frag, class Masks>
CUTE_DEVICE void apply_keep_masks(Frag& rP, Masks const& masks) {
  static_assert(sizeof(typename Frag::value_type) == 2, "16-bit P");
  uint32_t* pairs = reinterpret_cast<uint32_t*>(rP.data());
  CUTE_UNROLL
  for (int i = 0; i < size(rP) / 2; ++i) pairs[i] &= masks[i];
}

}  // namespace flash_cute
