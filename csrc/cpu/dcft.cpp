// DCFT on the CPU (docs/math.md section 4): out = x @ W.T + b + s * dropout(x) @ D and its
// backward, with D = conv_transpose2d(A.T @ B.T, C, stride) never formed.
//
// Per row x (length d_in = (m_in - 1) * st + k), with windows X[p, a] = x[p * st + a]:
//   T = A @ X (r x k),   U = T @ C (r x k),   y[q * st + b] += s * (B @ U)[q, b].
// Element x[c] lies in window p = c / st - e at offset a = c % st + st * e, for every e >= 0
// with a < k and p in range: E = ceil(k / st) windows (one when st == k, the fast path). So with
// the "shifted" factor rows S_A[(j, e), c] = A[j, c / st - e] (zero where invalid),
//   T[j, c0 + st * e] = sum over c = c0 (mod st) of S_A[(j, e), c] * x[c]
// is r * E dot products over the row, each binned by column residue c % st; and the output is
//   y[c] += sum_(j, e) S_B[(j, e), c] * s * U[j, c % st + st * e]
// with S_B[(j, e), c] = B[c / st - e, j]: r * E rows combined with coefficients periodic in c.
// When st == k that is exactly "view x as (m_in, k), T = A X, U = T C, Y = B U": r * (d_in +
// d_out) + r * k^2 multiply-adds per row, the minimum; with st < k, E = ceil(k / st) times the
// projections, as the k * k shifted products require. Nothing of size d_in x d_out, nor n x d,
// is allocated besides the outputs.
//
// The base linear is fused by accumulation: the kernel writes b + s * dropout(x) @ D into the
// output rows and the GEMM adds x @ W.T onto them (addmm_, beta = 1), as F.linear itself writes
// the bias first and accumulates onto it. Backward likewise writes the adapter's dx and the GEMM
// adds g @ W. dA, dB, dC are per-thread partial sums (shifted layout), reduced and folded at the
// end; T (n x r*k, fp32) is saved by the forward, the dropout mask regenerated from the seed.
//
// The vector loops (compiled once per instruction-set path, csrc/cpu/isa.h: 16-float vectors
// are one AVX-512 register, two AVX2 or four SSE ones) run over contiguous columns in chunks
// of kLanes; chunk t holds columns whose residues mod st repeat with period
// nacc = st / gcd(kLanes, st) in t, so the loops visit the chunks of one residue class
// u = t mod nacc at a time, with per-class lane patterns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dcft_common.h"
#include "../lor2c_common.h"
#include "dropout.h"
#include "memory.h"

#include "rows.h"

namespace lor2c {
namespace {

using cpu::dispatch_activation;
using cpu::dropped_rows;
using cpu::float_rows;
using cpu::kLanes;
using cpu::kRows;
using cpu::multiply_into;
using cpu::narrow;
using cpu::Scratch;
using cpu::vfloat;

// Sizes of one call. R = r * E shifted factor rows, indexed j * E + e.
struct Geometry {
  int64_t n, d_in, d_out, r, k, st, E, R, m_in, m_out, nacc;
};

Geometry geometry(int64_t n, int64_t d_in, int64_t d_out, int64_t r, int64_t k, int64_t st,
                  int64_t m_in, int64_t m_out) {
  Geometry g{};
  g.n = n;
  g.d_in = d_in;
  g.d_out = d_out;
  g.r = r;
  g.k = k;
  g.st = st;
  g.E = (k + st - 1) / st;
  g.R = r * g.E;
  g.m_in = m_in;
  g.m_out = m_out;
  g.nacc = st / std::gcd<int64_t>(kLanes, st);
  return g;
}

// S[(j * E + e) * d + (p + e) * st + c0] = F(j, p) for c0 + st * e < k, zero elsewhere, where
// F(j, p) = f[j * fj + p * fp] (strides: A is read as it is, B transposed in place).
template <typename T>
void shifted_into(const T* f, int64_t fj, int64_t fp, const Geometry& g, int64_t m, int64_t d,
                  float* s) {
  std::fill(s, s + g.R * d, 0.f);
  for (int64_t j = 0; j < g.r; ++j)
    for (int64_t e = 0; e < g.E; ++e)
      for (int64_t p = 0; p < m; ++p)
        for (int64_t c0 = 0; c0 < g.st && c0 + g.st * e < g.k; ++c0)
          s[(j * g.E + e) * d + (p + e) * g.st + c0] = static_cast<float>(f[j * fj + p * fp]);
}

// The adjoint of `shifted`, scaled: out[j * oj + p * op] = scale * sum over (e, c0) of
// P[(j * E + e) * d + (p + e) * st + c0], in the factor's dtype (dA as (r, m_in); dB, transposed,
// as (m_out, r)).
template <typename T>
void fold_into(const float* P, const Geometry& g, int64_t m, int64_t d, float scale, int64_t oj,
               int64_t op, T* out) {
  for (int64_t j = 0; j < g.r; ++j)
    for (int64_t p = 0; p < m; ++p) {
      float acc = 0.f;
      for (int64_t e = 0; e < g.E; ++e)
        for (int64_t c0 = 0; c0 < g.st && c0 + g.st * e < g.k; ++c0)
          acc += P[(j * g.E + e) * d + (p + e) * g.st + c0];
      out[j * oj + p * op] = static_cast<T>(scale * acc);
    }
}

// bins[(b * R + q) * st + c % st] = sum over columns c of W[q, c] * rows[b][c], b < kRows.
template <typename Arch>
LOR2C_INLINE void binned_dot_rows_body(const float* __restrict W, int64_t R, int64_t d, int64_t st,
                                       int64_t nacc, const float* const* rows,
                                       float* __restrict bins) {
  const int64_t chunks = d / kLanes;
  std::fill(bins, bins + kRows * R * st, 0.f);
  for (int64_t q = 0; q < R; ++q) {
    const float* __restrict w = W + q * d;
    for (int64_t u = 0; u < nacc; ++u) {
      vfloat acc[kRows] = {};
      for (int64_t t = u; t < chunks; t += nacc) {
        const vfloat wv = cpu::load(w + t * kLanes);
#pragma GCC unroll 8
        for (int b = 0; b < kRows; ++b) acc[b] += wv * cpu::load(rows[b] + t * kLanes);
      }
      for (int b = 0; b < kRows; ++b) {
        float* out = bins + (b * R + q) * st;
        for (int l = 0; l < kLanes; ++l) out[(kLanes * u + l) % st] += acc[b][l];
      }
    }
    for (int64_t c = chunks * kLanes; c < d; ++c)
      for (int b = 0; b < kRows; ++b) bins[(b * R + q) * st + c % st] += w[c] * rows[b][c];
  }
}
LOR2C_MULTIVERSION(binned_dot_rows,
                   (const float* __restrict W, int64_t R, int64_t d, int64_t st, int64_t nacc,
                    const float* const* rows, float* __restrict bins),
                   (W, R, d, st, nacc, rows, bins))

// out[b][c] = (base ? base[b][c] : 0) + sum_q W[q, c] * pat[(b * R + q) * st + c % st].
// pv: scratch of kRows * R * kLanes floats (the patterns laid out as lanes).
template <typename Arch>
LOR2C_INLINE void periodic_combine_rows_body(const float* __restrict W, int64_t R, int64_t d,
                                             int64_t st, int64_t nacc, const float* __restrict pat,
                                             const float* const* base, float* const* out,
                                             float* __restrict pv) {
  const int64_t chunks = d / kLanes;
  for (int64_t u = 0; u < nacc; ++u) {
    for (int64_t bq = 0; bq < kRows * R; ++bq)
      for (int l = 0; l < kLanes; ++l) pv[bq * kLanes + l] = pat[bq * st + (kLanes * u + l) % st];
    for (int64_t t = u; t < chunks; t += nacc) {
      vfloat acc[kRows] = {};
      if (base) {
#pragma GCC unroll 8
        for (int b = 0; b < kRows; ++b) acc[b] = cpu::load(base[b] + t * kLanes);
      }
      for (int64_t q = 0; q < R; ++q) {
        const vfloat wv = cpu::load(W + q * d + t * kLanes);
#pragma GCC unroll 8
        for (int b = 0; b < kRows; ++b) acc[b] += wv * cpu::load(pv + (b * R + q) * kLanes);
      }
#pragma GCC unroll 8
      for (int b = 0; b < kRows; ++b) cpu::store(out[b] + t * kLanes, acc[b]);
    }
  }
  for (int64_t c = chunks * kLanes; c < d; ++c) {
    for (int b = 0; b < kRows; ++b) {
      float acc = base ? base[b][c] : 0.f;
      for (int64_t q = 0; q < R; ++q) acc += W[q * d + c] * pat[(b * R + q) * st + c % st];
      out[b][c] = acc;
    }
  }
}
LOR2C_MULTIVERSION(periodic_combine_rows,
                   (const float* __restrict W, int64_t R, int64_t d, int64_t st, int64_t nacc,
                    const float* __restrict pat, const float* const* base, float* const* out,
                    float* __restrict pv),
                   (W, R, d, st, nacc, pat, base, out, pv))

// P[q, c] += sum_b pat[(b * R + q) * st + c % st] * rows[b][c]: the weight-gradient update.
template <typename Arch>
LOR2C_INLINE void periodic_accumulate_outer_body(float* __restrict P, int64_t R, int64_t d,
                                                 int64_t st, int64_t nacc,
                                                 const float* __restrict pat,
                                                 const float* const* rows) {
  const int64_t chunks = d / kLanes;
  for (int64_t q = 0; q < R; ++q) {
    float* __restrict p = P + q * d;
    for (int64_t u = 0; u < nacc; ++u) {
      vfloat coef[kRows];
      for (int b = 0; b < kRows; ++b)
        for (int l = 0; l < kLanes; ++l) coef[b][l] = pat[(b * R + q) * st + (kLanes * u + l) % st];
      for (int64_t t = u; t < chunks; t += nacc) {
        vfloat acc = cpu::load(p + t * kLanes);
#pragma GCC unroll 8
        for (int b = 0; b < kRows; ++b) acc += coef[b] * cpu::load(rows[b] + t * kLanes);
        cpu::store(p + t * kLanes, acc);
      }
    }
    for (int64_t c = chunks * kLanes; c < d; ++c) {
      float acc = p[c];
      for (int b = 0; b < kRows; ++b) acc += pat[(b * R + q) * st + c % st] * rows[b][c];
      p[c] = acc;
    }
  }
}
LOR2C_MULTIVERSION(periodic_accumulate_outer,
                   (float* __restrict P, int64_t R, int64_t d, int64_t st, int64_t nacc,
                    const float* __restrict pat, const float* const* rows),
                   (P, R, d, st, nacc, pat, rows))

// Lays out a per-row (r x k) matrix Q as the periodic coefficients of the R shifted rows:
// pat[(b * R + j * E + a / st) * st + a % st] = factor * Q[(b * r + j) * k + a]. Entries with
// c0 + st * e >= k are never written (they stay zero).
void to_pattern(const float* Q, const Geometry& g, float factor, float* pat) {
  for (int b = 0; b < kRows; ++b)
    for (int64_t j = 0; j < g.r; ++j)
      for (int64_t a = 0; a < g.k; ++a)
        pat[(b * g.R + j * g.E + a / g.st) * g.st + a % g.st] = factor * Q[(b * g.r + j) * g.k + a];
}

// The inverse: Q[(b * r + j) * k + a] = bins[(b * R + j * E + a / st) * st + a % st].
void from_bins(const float* bins, const Geometry& g, float* Q) {
  for (int b = 0; b < kRows; ++b)
    for (int64_t j = 0; j < g.r; ++j)
      for (int64_t a = 0; a < g.k; ++a)
        Q[(b * g.r + j) * g.k + a] = bins[(b * g.R + j * g.E + a / g.st) * g.st + a % g.st];
}

// out[(b * r + j) * k + c] = sum_a in[(b * r + j) * k + a] * M[a, c] (or M[c, a] if transposed).
void times_kernel(const float* in, const float* M, const Geometry& g, bool transposed, float* out) {
  const int64_t k = g.k;
  for (int64_t row = 0; row < kRows * g.r; ++row)
    for (int64_t c = 0; c < k; ++c) {
      float acc = 0.f;
      for (int64_t a = 0; a < k; ++a)
        acc += in[row * k + a] * (transposed ? M[c * k + a] : M[a * k + c]);
      out[row * k + c] = acc;
    }
}

// The factors as the kernels read them, fp32: shifted A (R x d_in), shifted B (R x d_out), C (k x
// k). Built per call into buffers the calling thread reuses (fresh tensors and ATen copies per call
// were most of a tiny call's host time); tensors only where they are too large to keep.
struct Factors {
  const float* As = nullptr;
  const float* Bs = nullptr;
  const float* Cf = nullptr;
  at::Tensor owned;
};

Factors factors(const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const Geometry& g) {
  const int64_t a = g.R * g.d_in, b = g.R * g.d_out, c = g.k * g.k;
  float* buf = cpu::reusable_floats(cpu::kPackedA, a + b + c);
  Factors f;
  if (buf == nullptr) {
    f.owned = cpu::empty_cpu({a + b + c}, at::kFloat);
    buf = f.owned.data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "dcft_factors", [&] {
    // A (r, m_in), B (m_out, r), C (k, k) of any strides: read in place.
    shifted_into(A.data_ptr<scalar_t>(), A.stride(0), A.stride(1), g, g.m_in, g.d_in, buf);
    shifted_into(B.data_ptr<scalar_t>(), B.stride(1), B.stride(0), g, g.m_out, g.d_out, buf + a);
    const scalar_t* cs = C.data_ptr<scalar_t>();
    for (int64_t i = 0; i < g.k; ++i)
      for (int64_t j = 0; j < g.k; ++j)
        buf[a + b + i * g.k + j] = static_cast<float>(cs[i * C.stride(0) + j * C.stride(1)]);
  });
  f.As = buf;
  f.Bs = buf + a;
  f.Cf = buf + a + b;
  return f;
}

// The bias as fp32 (zeros without one), in the caller's reused buffer.
const float* bias_floats(const std::optional<at::Tensor>& bias, int64_t d_out, at::Tensor& owned) {
  float* out = cpu::reusable_floats(cpu::kPackedB, d_out);
  if (out == nullptr) {
    owned = cpu::empty_cpu({d_out}, at::kFloat);
    out = owned.data_ptr<float>();
  }
  if (!bias.has_value() || !bias->defined()) {
    std::fill(out, out + d_out, 0.f);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bias->scalar_type(), "dcft_bias", [&] {
    const scalar_t* b = bias->data_ptr<scalar_t>();
    const int64_t st = bias->stride(0);
    for (int64_t j = 0; j < d_out; ++j) out[j] = static_cast<float>(b[j * st]);
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const Factors& f, double scale, const Geometry& g,
                                                const DropoutParams& dp) {
  const int64_t n = g.n, d_in = g.d_in, d_out = g.d_out, rk = g.r * g.k;
  at::Tensor bias_owned;
  const float* biasp = bias_floats(bias, d_out, bias_owned);
  at::Tensor out = cpu::empty_output({n, d_out}, x.options());
  at::Tensor t = cpu::empty_cpu({n, rk}, at::kFloat);
  const T* xp = x.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  float* tp = t.data_ptr<float>();
  const float* asp = f.As;
  const float* bsp = f.Bs;
  const float* cp = f.Cf;
  const int64_t ldx = x.stride(0);
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n + kRows - 1) / kRows;

  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    Scratch xs(d_in, kRows), mask(d_in, kRows), ys(d_out, kRows), zero(std::max(d_in, d_out), 1);
    std::vector<float> bins(kRows * g.R * g.st), tb(kRows * rk), ub(kRows * rk);
    std::vector<float> pat(kRows * g.R * g.st, 0.f), pv(kRows * g.R * kLanes);
    const float* xrows[kRows];
    const float* brows[kRows];
    float* orows[kRows];
    int64_t idx[kRows];
    for (int b = 0; b < kRows; ++b) brows[b] = biasp;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, n - i0));
      cpu::consecutive(i0, nb, idx);
      dropped_rows(xp, ldx, idx, nb, d_in, dp, xs, mask, zero.row(0), xrows);
      binned_dot_rows(asp, g.R, d_in, g.st, g.nacc, xrows, bins.data());  // T = A X
      from_bins(bins.data(), g, tb.data());
      std::copy(tb.begin(), tb.begin() + nb * rk, tp + i0 * rk);
      times_kernel(tb.data(), cp, g, false, ub.data());  // U = T C
      to_pattern(ub.data(), g, s, pat.data());
      for (int b = 0; b < kRows; ++b) {
        if constexpr (std::is_same_v<T, float>) {
          orows[b] = b < nb ? outp + (i0 + b) * d_out : ys.row(b);
        } else {
          orows[b] = ys.row(b);
        }
      }
      // out = b + s * B U, overlap-added through the shifted rows of B
      periodic_combine_rows(bsp, g.R, d_out, g.st, g.nacc, pat.data(), brows, orows, pv.data());
      if constexpr (!std::is_same_v<T, float>) {
        for (int b = 0; b < nb; ++b) narrow(ys.row(b), outp + (i0 + b) * d_out, d_out);
      }
    }
  });
  if (n > 0) out.addmm_(x, weight.t());  // + x @ W.T, accumulated onto b + s * dropout(x) @ D
  return {out, t};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, const Factors& f, double scale,
    const Geometry& g, const DropoutParams& dp, bool need_dx, bool need_dA, bool need_dB,
    bool need_dC) {
  const int64_t n = g.n, d_in = g.d_in, d_out = g.d_out, rk = g.r * g.k, k = g.k;
  at::Tensor dx =
      need_dx ? cpu::empty_output({n, d_in}, x.options()) : cpu::empty_cpu({0}, x.scalar_type());
  const T* gp = grad.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  const float* tp = t.data_ptr<float>();
  const float* asp = f.As;
  const float* bsp = f.Bs;
  const float* cp = f.Cf;
  const int64_t ldg = grad.stride(0), ldx = x.stride(0);
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n + kRows - 1) / kRows;

  const int threads = at::get_num_threads();
  const int64_t part_a = need_dA ? g.R * d_in : 0, part_b = need_dB ? g.R * d_out : 0;
  const int64_t part_c = need_dC ? k * k : 0, part = part_a + part_b + part_c;
  std::vector<float> partials(static_cast<size_t>(threads) * part, 0.f);

  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    float* pa = partials.data() + at::get_thread_num() * part;
    float* pb = pa + part_a;
    float* pc = pb + part_b;
    Scratch gs(d_out, kRows), xs(d_in, kRows), mask(d_in, kRows), dxs(d_in, kRows);
    Scratch zero(std::max(d_in, d_out), 1);
    std::vector<float> bins(kRows * g.R * g.st), tb(kRows * rk), vb(kRows * rk), wb(kRows * rk);
    std::vector<float> pat(kRows * g.R * g.st, 0.f), pv(kRows * g.R * kLanes);
    const float* grows[kRows];
    const float* xrows[kRows];
    float* dxrows[kRows];
    int64_t idx[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, n - i0));
      cpu::consecutive(i0, nb, idx);
      float_rows(gp, ldg, idx, nb, d_out, gs, zero.row(0), grows);
      binned_dot_rows(bsp, g.R, d_out, g.st, g.nacc, grows, bins.data());  // V = B.T G
      from_bins(bins.data(), g, vb.data());
      std::fill(tb.begin(), tb.end(), 0.f);
      std::copy(tp + i0 * rk, tp + (i0 + nb) * rk, tb.begin());
      if (need_dB) {  // dB (shifted) += U (x) g, U = T C
        times_kernel(tb.data(), cp, g, false, wb.data());
        to_pattern(wb.data(), g, 1.f, pat.data());
        periodic_accumulate_outer(pb, g.R, d_out, g.st, g.nacc, pat.data(), grows);
      }
      if (need_dC) {  // dC += T.T V, summed over the rank
        for (int b = 0; b < nb; ++b)
          for (int64_t j = 0; j < g.r; ++j) {
            const float* tr = tb.data() + (b * g.r + j) * k;
            const float* vr = vb.data() + (b * g.r + j) * k;
            for (int64_t a = 0; a < k; ++a)
              for (int64_t c = 0; c < k; ++c) pc[a * k + c] += tr[a] * vr[c];
          }
      }
      if (!need_dA && !need_dx) continue;
      times_kernel(vb.data(), cp, g, true, wb.data());  // dT = s V C.T
      to_pattern(wb.data(), g, s, pat.data());
      if (need_dA) {  // dA (shifted) += dT (x) dropout(x)
        dropped_rows(xp, ldx, idx, nb, d_in, dp, xs, mask, zero.row(0), xrows);
        periodic_accumulate_outer(pa, g.R, d_in, g.st, g.nacc, pat.data(), xrows);
      } else if (dp.enabled) {
        for (int b = 0; b < nb; ++b) cpu::draw_dropout_row(i0 + b, d_in, dp, mask.row(b));
      }
      if (need_dx) {  // dx = (A.T dT, overlap-added) * mask; the GEMM adds g @ W afterwards
        for (int b = 0; b < kRows; ++b) {
          if constexpr (std::is_same_v<T, float>) {
            dxrows[b] = b < nb ? dxp + (i0 + b) * d_in : dxs.row(b);
          } else {
            dxrows[b] = dxs.row(b);
          }
        }
        periodic_combine_rows(asp, g.R, d_in, g.st, g.nacc, pat.data(), nullptr, dxrows, pv.data());
        for (int b = 0; b < nb; ++b) {
          if (dp.enabled) multiply_into(dxrows[b], dxrows[b], mask.row(b), d_in);
          if constexpr (!std::is_same_v<T, float>) narrow(dxrows[b], dxp + (i0 + b) * d_in, d_in);
        }
      }
    }
  });

  // The threads' partials summed into the first one's, then folded, scaled and written out in
  // the factors' dtypes: plain loops (ATen's sum, fold, transpose and casts were most of a tiny
  // call's backward). A gradient not asked for is an empty tensor.
  float* sum = partials.data();
  for (int th = 1; th < threads; ++th) {
    const float* other = partials.data() + th * part;
    for (int64_t i = 0; i < part; ++i) sum[i] += other[i];
  }
  at::Tensor dA = cpu::empty_cpu(need_dA ? A.sizes() : at::IntArrayRef{0}, A.scalar_type());
  at::Tensor dB = cpu::empty_cpu(need_dB ? B.sizes() : at::IntArrayRef{0}, B.scalar_type());
  at::Tensor dC = cpu::empty_cpu(need_dC ? C.sizes() : at::IntArrayRef{0}, C.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "dcft_grads", [&] {
    if (need_dA) fold_into(sum, g, g.m_in, d_in, 1.f, g.m_in, 1, dA.data_ptr<scalar_t>());
    if (need_dB) fold_into(sum + part_a, g, g.m_out, d_out, s, 1, g.r, dB.data_ptr<scalar_t>());
    if (need_dC) {
      scalar_t* dc = dC.data_ptr<scalar_t>();
      for (int64_t i = 0; i < k * k; ++i)
        dc[i] = static_cast<scalar_t>(s * sum[part_a + part_b + i]);
    }
  });
  if (need_dx && n > 0) dx.addmm_(grad, weight);  // + g @ W, accumulated onto the adapter's dx
  return {dx, dA, dB, dC};
}

Geometry geometry_of(const DcftSizes& z) {
  return geometry(z.n, z.d_in, z.d_out, z.r, z.k, z.stride, z.m_in, z.m_out);
}

std::tuple<at::Tensor, at::Tensor> dcft_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& A, const at::Tensor& B,
                                                const at::Tensor& C, double scale, int64_t stride,
                                                double p, const at::Tensor& seed) {
  const Geometry g = geometry_of(check_dcft(x, weight, bias, A, B, C, stride, seed, p));
  const DropoutParams dp = host_dropout_params(seed, p);
  const Factors f = factors(A, B, C, g);
  return dispatch_activation(
      x, [&](auto tag) { return forward_impl<decltype(tag)>(x, weight, bias, f, scale, g, dp); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dcft_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& weight,
    const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, double scale, int64_t stride,
    double p, const at::Tensor& seed, bool need_dx, bool need_dA, bool need_dB, bool need_dC) {
  const DcftSizes z = check_dcft(x, weight, std::nullopt, A, B, C, stride, seed, p);
  check_grad(grad, x, z);
  check_saved_t(t, z);
  const Geometry g = geometry_of(z);
  const DropoutParams dp = host_dropout_params(seed, p);
  const Factors f = factors(A, B, C, g);
  return dispatch_activation(x, [&](auto tag) {
    return backward_impl<decltype(tag)>(grad, x, t, weight, A, B, C, f, scale, g, dp, need_dx,
                                        need_dA, need_dB, need_dC);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lor2c_ops_ext, CPU, m) {
  m.impl("dcft_fwd", &dcft_fwd_cpu);
  m.impl("dcft_bwd", &dcft_bwd_cpu);
}

}  // namespace lor2c
