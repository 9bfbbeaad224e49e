// Register-tiled rank-r products (csrc/cpu/rank_products.h).
//
// Each product is cut into tiles whose accumulators stay in vector registers for the whole
// reduction, so that every vector loaded from memory feeds several multiply-adds:
//   dot_rows          MR rows x NK ranks of dot products along d: per W columns, MR + NK loads
//                     for MR * NK multiply-adds; the MR * NK vector sums are reduced W at a time
//                     by a shuffle tree (log2(W) levels) instead of one horizontal sum each.
//   combine_rows      MR rows x NC vectors of output columns, summed over the r ranks: per rank,
//                     NC loads of M and MR broadcasts of coef for MR * NC multiply-adds.
//   accumulate_outer  NK ranks x NC vectors of the partial sum P, summed over the kRows rows:
//                     per row, NC loads and NK broadcasts for NK * NC multiply-adds; P itself
//                     is loaded and stored once per block.
// Before (one row of the tile per weight vector) each multiply-add needed about one load, and
// at r = 64 the loads, not the arithmetic, bounded the kernels. Tile shapes per path (Tiles
// below) fit the register file: 32 x 16 floats on AVX-512, 16 x 8 on AVX2, 16 x 4 on SSE2
// (no FMA there: a product and an add, one more live register). Measured figures: commit log.
#include "rank_products.h"

#include "isa.h"
#include "lane_sums.h"
#include "rows.h"

namespace lor2c {
namespace cpu {
namespace {

template <int W>
LOR2C_INLINE typename Vec<W>::f vload(const float* p) {
  typename Vec<W>::f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <int W>
LOR2C_INLINE void vstore(float* p, typename Vec<W>::f v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// A store that bypasses the caches (the line is written whole, not read first); p aligned to
// the vector. Off x86 a plain store.
template <int W>
LOR2C_INLINE void vstream(float* p, typename Vec<W>::f v) {
#ifdef LOR2C_X86
  if constexpr (W == 4)
    asm("movntps %1, %0" : "=m"(*reinterpret_cast<typename Vec<W>::f*>(p)) : "x"(v));
  else
    asm("vmovntps %1, %0" : "=m"(*reinterpret_cast<typename Vec<W>::f*>(p)) : "v"(v));
#else
  vstore<W>(p, v);
#endif
}

template <typename Arch>
struct Tiles;

// Tile shapes per path, measured (r = 64, d = 768, one core of an AMD EPYC Zen 4 whose peak is
// one 16-lane FMA per cycle on either path; % of that peak; alternatives within a few %):
//   AVX-512  dot 8 x 2: 93%   combine 8 x 3: 97%   accumulate 4 x 5: 88% (6 x 4: 82%)
//   AVX2     dot 4 x 3: 91%   combine 4 x 3: 84%   accumulate 3 x 3: 90% (4 x 2: 89%)
//   SSE2     dot 4 x 2: 42%   combine 4 x 2: 31%   accumulate 2 x 4: 24%  (no FMA: half peak)
// The former kernels (one tile row per weight vector, 16-float vectors on every path) reached
// 60 / 97 / 75% on AVX-512 and 9 / 10 / 47% on AVX2, where 8 accumulators of two registers
// each spilled the 16-register file.
template <>
struct Tiles<Avx512> {
  static constexpr int dot_mr = 8, dot_nk = 2, comb_mr = 8, comb_nc = 3, acc_nk = 4, acc_nc = 5;
};
template <>
struct Tiles<Avx2> {
  static constexpr int dot_mr = 4, dot_nk = 3, comb_mr = 4, comb_nc = 3, acc_nk = 3, acc_nc = 3;
};
template <>
struct Tiles<Baseline> {
  static constexpr int dot_mr = 4, dot_nk = 2, comb_mr = 4, comb_nc = 2, acc_nk = 2, acc_nc = 4;
};

// Hides a pointer's value from the optimiser, so that loads through it are not moved out of
// the loop around (no instruction is emitted).
LOR2C_INLINE const float* opaque(const float* p) {
  asm("" : "+r"(p));
  return p;
}

// Makes the compiler hold v in a register: otherwise it may fold the load that made v into
// each multiply-add using it, and load it once per use (seen in dot_tile: 17 loads for 16 FMAs).
// x86 only (its loads fold into arithmetic; elsewhere they do not, and a 64-byte vector of the
// unused wide paths fits no register).
template <typename V>
LOR2C_INLINE void in_register(V& v) {
#ifdef LOR2C_X86
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// ---- dot_rows ------------------------------------------------------------------------------

// out[b * r + k0 + q] = dot(M[k0 + q, :], rows[b]) for b < MR, q < NK.
template <typename Arch, int MR, int NK>
LOR2C_INLINE void dot_tile(const float* __restrict M, int64_t r, int64_t d, int64_t k0,
                           const float* const* rows, float* __restrict out, Prefetch* pf) {
  constexpr int W = Arch::W, N = MR * NK, G = (N + W - 1) / W;
  using V = typename Vec<W>::f;
  const int64_t dv = d / W * W;
  const float* m[NK];
  for (int q = 0; q < NK; ++q) m[q] = M + (k0 + q) * d;
  const float* x[MR];
  for (int b = 0; b < MR; ++b) x[b] = rows[b];
  V acc[G * W] = {};  // input i = b * NK + q at group i / W, position bitrev(i % W)
  PrefetchLines lines(pf, dv / W, MR * dv / 16);  // MR rows of dv floats
  for (int64_t j = 0; j < dv; j += W) {
    lines.next();
    V w[NK];
#pragma GCC unroll 16
    for (int q = 0; q < NK; ++q) w[q] = vload<W>(m[q] + j);
#pragma GCC unroll 16
    for (int b = 0; b < MR; ++b) {
      V v = vload<W>(x[b] + j);
      in_register(v);
#pragma GCC unroll 16
      for (int q = 0; q < NK; ++q) {
        const int i = b * NK + q;
        acc[i / W * W + bitrev(i % W, W)] += v * w[q];
      }
    }
  }
  float sums[G * W];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    fold_levels<W, W / 2>(acc + g * W, W);
    vstore<W>(sums + g * W, acc[g * W]);
  }
  for (int b = 0; b < MR; ++b)
    for (int q = 0; q < NK; ++q) {
      float s = sums[b * NK + q];
      for (int64_t j = dv; j < d; ++j) s += m[q][j] * x[b][j];
      out[b * r + k0 + q] = s;
    }
}

// The last ranks' tile, NK' = rem < NK.
template <typename Arch, int MR, int NK>
LOR2C_INLINE void dot_rest(int rem, const float* M, int64_t r, int64_t d, int64_t k0,
                           const float* const* rows, float* out, Prefetch* pf) {
  if constexpr (NK > 0) {
    if (rem == NK) return dot_tile<Arch, MR, NK>(M, r, d, k0, rows, out, pf);
    dot_rest<Arch, MR, NK - 1>(rem, M, r, d, k0, rows, out, pf);
  }
}

template <typename Arch>
LOR2C_INLINE void dot_rows_impl_body(const float* __restrict M, int64_t r, int64_t d,
                                     const float* const* rows, int used, float* __restrict out,
                                     Prefetch* pf) {
  constexpr int MR = Tiles<Arch>::dot_mr, NK = Tiles<Arch>::dot_nk;
  static_assert(kRows % MR == 0, "row tiles split the block");
  int64_t k = 0;
  for (; k + NK <= r; k += NK)
    for (int b = 0; b < used; b += MR)
      dot_tile<Arch, MR, NK>(M, r, d, k, rows + b, out + b * r, pf);
  if (k < r)
    for (int b = 0; b < used; b += MR)
      dot_rest<Arch, MR, NK - 1>(static_cast<int>(r - k), M, r, d, k, rows + b, out + b * r, pf);
}

// ---- combine_rows --------------------------------------------------------------------------

// Columns j0 .. j0 + NC * W of rows b < MR.
template <typename Arch, int MR, int NC>
LOR2C_INLINE void combine_tile(const float* __restrict M, int64_t r, int64_t d, int64_t j0,
                               const float* __restrict coef, const float* const* base,
                               const float* const* mul, float* const* out, Prefetch* pf,
                               bool stream) {
  constexpr int W = Arch::W;
  using V = typename Vec<W>::f;
  V acc[MR * NC];
#pragma GCC unroll 16
  for (int b = 0; b < MR; ++b)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[b * NC + c] = base ? vload<W>(base[b] + j0 + c * W) : V{};
  const float* m = M + j0;
  PrefetchLines lines(pf, r, (base ? 2 : 1) * MR * NC * W / 16);  // out (and base)
  for (int64_t k = 0; k < r; ++k, m += d) {
    lines.next();
    V w[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) w[c] = vload<W>(m + c * W);
#pragma GCC unroll 16
    for (int b = 0; b < MR; ++b) {
      const float cb = coef[b * r + k];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[b * NC + c] += cb * w[c];
    }
  }
#pragma GCC unroll 16
  for (int b = 0; b < MR; ++b)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      float* o = out[b] + j0 + c * W;
      if (mul) acc[b * NC + c] *= vload<W>(mul[b] + j0 + c * W);
      if (stream)
        vstream<W>(o, acc[b * NC + c]);
      else
        vstore<W>(o, acc[b * NC + c]);
    }
}

template <typename Arch>
LOR2C_INLINE void combine_rows_impl_body(const float* __restrict M, int64_t r, int64_t d,
                                         const float* __restrict coef, const float* const* base,
                                         const float* const* mul, int used, float* const* out,
                                         Prefetch* pf, bool stream) {
  constexpr int W = Arch::W, MR = Tiles<Arch>::comb_mr, NC = Tiles<Arch>::comb_nc;
  static_assert(kRows % MR == 0, "row tiles split the block");
  const int64_t dv = d / W * W;
  // Non-temporal stores only where every row the tiles write (the used rows and the scratch rows
  // that fill their last row tile) is aligned to the vector: vmovntps faults otherwise.
  if (stream)
    for (int b = 0; b < (used + MR - 1) / MR * MR; ++b)
      stream = stream && reinterpret_cast<uintptr_t>(out[b]) % (4 * W) == 0;
  for (int b = 0; b < used; b += MR) {
    const float* const* bb = base ? base + b : nullptr;
    const float* const* mb = mul ? mul + b : nullptr;
    int64_t j = 0;
    for (; j + NC * W <= dv; j += NC * W)
      combine_tile<Arch, MR, NC>(M, r, d, j, coef + b * r, bb, mb, out + b, pf, stream);
    for (; j < dv; j += W)
      combine_tile<Arch, MR, 1>(M, r, d, j, coef + b * r, bb, mb, out + b, pf, stream);
  }
  for (int64_t j = dv; j < d; ++j)
    for (int b = 0; b < used; ++b) {
      float acc = base ? base[b][j] : 0.f;
      for (int64_t k = 0; k < r; ++k) acc += coef[b * r + k] * M[k * d + j];
      out[b][j] = mul ? acc * mul[b][j] : acc;
    }
  // Non-temporal stores are weakly ordered: make them visible before the rows are handed over.
  if (stream) stream_fence();
}

// ---- accumulate_outer ----------------------------------------------------------------------

// P[k0 + q, j0 .. j0 + NC * W] += sum_b coef[b * r + k0 + q] * rows[b][...], q < NK, b < used.
template <typename Arch, int NK, int NC>
LOR2C_INLINE void accumulate_tile(float* __restrict P, int64_t r, int64_t d, int64_t k0, int64_t j0,
                                  const float* __restrict coef, const float* const* rows, int used,
                                  Prefetch* pf) {
  constexpr int W = Arch::W;
  using V = typename Vec<W>::f;
  float* p = P + k0 * d + j0;
  // The kRows * NK coefficients do not change along j: opaque() keeps the compiler from
  // hoisting their broadcasts (or addresses) out of the caller's loop over j, which spills.
  const float* cf = coef + k0;
  V acc[NK * NC];
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) acc[q * NC + c] = vload<W>(p + q * d + c * W);
  PrefetchLines lines(pf, used, used * NC * W / 16);  // the rows' NC * W floats
  for (int b = 0; b < used; ++b) {
    lines.next();
    V x[NC];
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) x[c] = vload<W>(rows[b] + j0 + c * W);
#pragma GCC unroll 16
    for (int q = 0; q < NK; ++q) {
      const float cq = cf[q];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[q * NC + c] += cq * x[c];
    }
    cf = opaque(cf + r);
  }
#pragma GCC unroll 16
  for (int q = 0; q < NK; ++q)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) vstore<W>(p + q * d + c * W, acc[q * NC + c]);
}

template <typename Arch, int NK>
LOR2C_INLINE void accumulate_ranks(float* __restrict P, int64_t r, int64_t d, int64_t k0,
                                   const float* __restrict coef, const float* const* rows, int used,
                                   Prefetch* pf) {
  constexpr int W = Arch::W, NC = Tiles<Arch>::acc_nc;
  const int64_t dv = d / W * W;
  int64_t j = 0;
  for (; j + NC * W <= dv; j += NC * W)
    accumulate_tile<Arch, NK, NC>(P, r, d, k0, j, coef, rows, used, pf);
  for (; j < dv; j += W) accumulate_tile<Arch, NK, 1>(P, r, d, k0, j, coef, rows, used, pf);
  for (int q = 0; q < NK; ++q) {
    float* p = P + (k0 + q) * d;
    for (j = dv; j < d; ++j) {
      float acc = p[j];
      for (int b = 0; b < used; ++b) acc += coef[b * r + k0 + q] * rows[b][j];
      p[j] = acc;
    }
  }
}

template <typename Arch, int NK>
LOR2C_INLINE void accumulate_rest(int rem, float* P, int64_t r, int64_t d, int64_t k0,
                                  const float* coef, const float* const* rows, int used,
                                  Prefetch* pf) {
  if constexpr (NK > 0) {
    if (rem == NK) return accumulate_ranks<Arch, NK>(P, r, d, k0, coef, rows, used, pf);
    accumulate_rest<Arch, NK - 1>(rem, P, r, d, k0, coef, rows, used, pf);
  }
}

template <typename Arch>
LOR2C_INLINE void accumulate_outer_impl_body(float* __restrict P, int64_t r, int64_t d,
                                             const float* __restrict coef, const float* const* rows,
                                             int used, Prefetch* pf) {
  constexpr int NK = Tiles<Arch>::acc_nk;
  int64_t k = 0;
  for (; k + NK <= r; k += NK) accumulate_ranks<Arch, NK>(P, r, d, k, coef, rows, used, pf);
  if (k < r)
    accumulate_rest<Arch, NK - 1>(static_cast<int>(r - k), P, r, d, k, coef, rows, used, pf);
}

LOR2C_MULTIVERSION(dot_rows_impl,
                   (const float* __restrict M, int64_t r, int64_t d, const float* const* rows,
                    int used, float* __restrict out, Prefetch* pf),
                   (M, r, d, rows, used, out, pf))
LOR2C_MULTIVERSION(combine_rows_impl,
                   (const float* __restrict M, int64_t r, int64_t d, const float* __restrict coef,
                    const float* const* base, const float* const* mul, int used, float* const* out,
                    Prefetch* pf, bool stream),
                   (M, r, d, coef, base, mul, used, out, pf, stream))
LOR2C_MULTIVERSION(accumulate_outer_impl,
                   (float* __restrict P, int64_t r, int64_t d, const float* __restrict coef,
                    const float* const* rows, int used, Prefetch* pf),
                   (P, r, d, coef, rows, used, pf))

}  // namespace

void dot_rows(const float* M, int64_t r, int64_t d, const float* const* rows, int used, float* out,
              Prefetch* pf) {
  dot_rows_impl(M, r, d, rows, used, out, pf);
}

void combine_rows(const float* M, int64_t r, int64_t d, const float* coef, const float* const* base,
                  const float* const* mul, int used, float* const* out, Prefetch* pf, bool stream) {
  combine_rows_impl(M, r, d, coef, base, mul, used, out, pf, stream);
}

void accumulate_outer(float* P, int64_t r, int64_t d, const float* coef, const float* const* rows,
                      int used, Prefetch* pf) {
  accumulate_outer_impl(P, r, d, coef, rows, used, pf);
}

}  // namespace cpu
}  // namespace lor2c
