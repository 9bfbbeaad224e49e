// The rank-r products of the LoR2C CPU kernels on a block of kRows fp32 rows: small matrix
// multiplies with one side r x d (the weights, L1/L2-resident) and the other kRows x d (the
// rows of the block, L1-resident), computed with register tiles so that each loaded vector
// feeds several multiply-adds (csrc/cpu/rank_products.cpp). Compiled per instruction-set path
// (csrc/cpu/isa.h). `rows`, `base` and `out` hold kRows row pointers, of which the first `used`
// (1..kRows) are the block's: the others are read as rows of zeros or not at all, and their
// results are not written or left unspecified (out rows past `used` may be scratch); coef is
// kRows x r, row-major.
#pragma once
#include <algorithm>
#include <cstdint>

namespace lor2c {
namespace cpu {

// Memory to bring into L2 while the products compute: the rows that the block loop reads next
// (this block's later operands, the next block's first ones), added as byte ranges in the order
// they will be needed. The register tiles take a few lines per vector step (rank_products.cpp),
// so that the next block's memory traffic overlaps this block's arithmetic instead of stalling
// it: the hardware prefetchers do not follow kRows short row streams across blocks. Prefetches
// never fault: a range may end anywhere, and lines left over when the products end are dropped.
struct Prefetch {
  static constexpr int kMax = 32;
  const char* begin[kMax];
  const char* end[kMax];
  int count = 0, cur = 0;
  void clear() { count = cur = 0; }
  void add(const void* p, int64_t bytes) {
    if (count == kMax || bytes <= 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
    begin[count] = reinterpret_cast<const char*>(a);
    end[count] = static_cast<const char*>(p) + bytes;
    ++count;
  }
  // Up to `want` lines of the current range: the first one's address, their number in *got.
  const char* take(int64_t want, int64_t* got) {
    while (cur < count && begin[cur] >= end[cur]) ++cur;
    if (cur == count) {
      *got = 0;
      return nullptr;
    }
    const char* p = begin[cur];
    const int64_t avail = (end[cur] - p + 63) / 64;
    *got = want < avail ? want : avail;
    begin[cur] = p + *got * 64;
    return p;
  }
};

// The lines a tile of `steps` vector steps prefetches, taken from pf and spread evenly over the
// steps: kPrefetchPerStep per step, or as many lines as the tile itself reads and writes of its
// rows (tile_lines) where that is more. The first keeps a step's prefetches few where the tile has
// many steps (the ranks' products): measured (n=8192 d=768, one core, AVX-512, fp32), one line
// per step covered too little of the next block in the forward, prefetcht0 and prefetchnta (into
// L1) evicted the block's own rows, and prefetcht2 (into L2) at two lines per step took the r=16
// forward + backward from 20.5 to 16.2 ms, with the non-temporal stores of combine_rows. The
// second keeps the prefetches ahead of the rows where a tile has few steps (small r, where the
// block loop streams): bf16 forward n=8192 d=768 one core, r=1 3.9 -> 2.6 ms, r=4 4.1 -> 2.9 ms;
// fp32 r=4 5.0 -> 4.5 ms; r >= 16 unchanged.
constexpr int kPrefetchPerStep = 2;

struct PrefetchLines {
  const char* p = nullptr;    // the next line to prefetch
  const char* end = nullptr;  // past the last one
  int64_t rate = 0;           // bytes per step
  inline __attribute__((always_inline)) PrefetchLines(Prefetch* pf, int64_t steps,
                                                      int64_t tile_lines) {
    if (pf != nullptr && steps > 0) {
      int64_t n = 0;
      p = pf->take(std::max<int64_t>(kPrefetchPerStep * steps, tile_lines), &n);
      rate = 64 * ((n + steps - 1) / steps);
      end = p + 64 * n;
    }
  }
  // The next step's lines (steps in order from the first). A running pointer, not the step's
  // index: the index form (lines [s * rate, min(n, (s + 1) * rate))) kept more integers live
  // beside the tiles' pointers and spilled one to the stack per step of the AVX2 dot loop. AMD
  // EPYC Zen 3, one core, dot_rows r=16 d=768 in cache: 34-44 -> 45-49 GFLOP/s (52-68 with no
  // prefetch code at all); end to end within that machine's noise.
  inline __attribute__((always_inline)) void next() {
    const char* e = std::min(end, p + rate);
    for (; p < e; p += 64) __builtin_prefetch(p, 0, 1);  // prefetcht2
  }
};

// out[b * r + k] = sum_j M[k * d + j] * rows[b][j]   (t = x A.T, u = g B)
void dot_rows(const float* M, int64_t r, int64_t d, const float* const* rows, int used, float* out,
              Prefetch* pf = nullptr);

// out[b][j] = ((base ? base[b][j] : 0) + sum_k coef[b * r + k] * M[k * d + j]) * (mul ? mul[b][j] :
// 1) (y; dx, with mul the dropout mask). stream: the out rows are written with non-temporal stores
// (no read of the lines before the write, no cache pollution) where every used row is aligned to
// the path's vector: for outputs in memory that nothing reads soon, never for scratch rows.
void combine_rows(const float* M, int64_t r, int64_t d, const float* coef, const float* const* base,
                  const float* const* mul, int used, float* const* out, Prefetch* pf = nullptr,
                  bool stream = false);

// P[k * d + j] += sum_b coef[b * r + k] * rows[b][j]   (dA, dB.T partial sums); here rows and
// coef hold `used` rows, any number (the backward passes two blocks' at once).
void accumulate_outer(float* P, int64_t r, int64_t d, const float* coef, const float* const* rows,
                      int used, Prefetch* pf = nullptr);

}  // namespace cpu
}  // namespace lor2c
