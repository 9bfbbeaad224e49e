// LoR2C residual op on the CPU: out = layer_out + s * dropout(x) @ A.T @ B.T and its backward.
//
// Forward is one pass over blocks of kRows rows; backward is one pass that produces dx and
// accumulates dA and dB into per-thread partial sums, reduced at the end. Nothing of size n x d
// is allocated besides the outputs: each thread works in row-sized scratch buffers. The dropout
// mask is regenerated from (seed, offset, row, column) with Philox (csrc/philox.h), never stored.
//
// The hot loops work on fp32 only (half-precision rows are widened into scratch first) and are
// compiled for AVX-512, AVX2+FMA and baseline x86-64, picked at load time by the CPU's features.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../lor2c_common.h"
#include "dropout.h"
#include "memory.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOR2C_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOR2C_CLONES
#endif

namespace lor2c {
namespace {

constexpr int kRows = 8;     // rows per block: each weight element loaded is used kRows times
constexpr int kLanes = 16;   // floats per vector: one AVX-512 register, two AVX2 ones

// GCC/Clang vector extensions: each target clone lowers them to its own instruction set.
typedef float vfloat __attribute__((vector_size(4 * kLanes)));

#define LOR2C_INLINE inline __attribute__((always_inline))

LOR2C_INLINE vfloat load(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

LOR2C_INLINE void store(float* p, vfloat v) { __builtin_memcpy(p, &v, sizeof(v)); }

LOR2C_INLINE float hsum(vfloat v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// out[b * r + k] = dot(M[k, :], rows[b]) for the kRows rows.
LOR2C_CLONES void dot_rows(const float* __restrict M, int64_t r, int64_t d,
                           const float* const* rows, float* __restrict out) {
  const int64_t dv = d / kLanes * kLanes;
  for (int64_t k = 0; k < r; ++k) {
    const float* __restrict m = M + k * d;
    vfloat acc[kRows] = {};
    for (int64_t j = 0; j < dv; j += kLanes) {
      const vfloat w = load(m + j);
#pragma GCC unroll 8
      for (int b = 0; b < kRows; ++b) acc[b] += w * load(rows[b] + j);
    }
    for (int b = 0; b < kRows; ++b) {
      float s = hsum(acc[b]);
      for (int64_t j = dv; j < d; ++j) s += m[j] * rows[b][j];
      out[b * r + k] = s;
    }
  }
}

// out[b][j] = (base ? base[b][j] : 0) + sum_k coef[b * r + k] * M[k, j] for the kRows rows.
LOR2C_CLONES void combine_rows(const float* __restrict M, int64_t r, int64_t d,
                               const float* __restrict coef, const float* const* base,
                               float* const* out) {
  const int64_t dv = d / kLanes * kLanes;
  for (int64_t j = 0; j < dv; j += kLanes) {
    vfloat acc[kRows] = {};
    if (base) {
#pragma GCC unroll 8
      for (int b = 0; b < kRows; ++b) acc[b] = load(base[b] + j);
    }
    for (int64_t k = 0; k < r; ++k) {
      const vfloat m = load(M + k * d + j);
#pragma GCC unroll 8
      for (int b = 0; b < kRows; ++b) acc[b] += coef[b * r + k] * m;
    }
#pragma GCC unroll 8
    for (int b = 0; b < kRows; ++b) store(out[b] + j, acc[b]);
  }
  for (int64_t j = dv; j < d; ++j) {
    for (int b = 0; b < kRows; ++b) {
      float acc = base ? base[b][j] : 0.f;
      for (int64_t k = 0; k < r; ++k) acc += coef[b * r + k] * M[k * d + j];
      out[b][j] = acc;
    }
  }
}

// P[k, j] += sum_b coef[b * r + k] * rows[b][j]: a rank-kRows update of the r x d partial sum.
LOR2C_CLONES void accumulate_outer(float* __restrict P, int64_t r, int64_t d,
                                   const float* __restrict coef, const float* const* rows) {
  const int64_t dv = d / kLanes * kLanes;
  for (int64_t k = 0; k < r; ++k) {
    float* __restrict p = P + k * d;
    float c[kRows];
    for (int b = 0; b < kRows; ++b) c[b] = coef[b * r + k];
    for (int64_t j = 0; j < dv; j += kLanes) {
      vfloat acc = load(p + j);
#pragma GCC unroll 8
      for (int b = 0; b < kRows; ++b) acc += c[b] * load(rows[b] + j);
      store(p + j, acc);
    }
    for (int64_t j = dv; j < d; ++j) {
      float acc = p[j];
      for (int b = 0; b < kRows; ++b) acc += c[b] * rows[b][j];
      p[j] = acc;
    }
  }
}

LOR2C_CLONES void multiply_into(float* out, const float* a, const float* __restrict b,
                                int64_t d) {
  for (int64_t j = 0; j < d; ++j) out[j] = a[j] * b[j];
}

template <typename T>
void widen(const T* src, float* dst, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename T>
void narrow(const float* src, T* dst, int64_t d) {
  for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<T>(src[j]);
}



// Per-thread scratch of a few rows; a row of it is handed out as the float view of a tensor row.
struct Scratch {
  int64_t stride;
  std::vector<float> data;
  Scratch(int64_t d, int64_t count) : stride(cpu::mask_padded(d)), data(stride * count, 0.f) {}
  float* row(int64_t i) { return data.data() + i * stride; }
};

// Float view of rows i0..i0+kRows of a (n, d) tensor with row stride `ld`: the tensor's own
// memory for fp32 (rows past n point at `zero`), else widened into `scratch`.
template <typename T>
void float_rows(const T* base, int64_t ld, int64_t i0, int nb, int64_t d, Scratch& scratch,
                const float* zero, const float* rows[kRows]) {
  for (int b = 0; b < kRows; ++b) {
    if (b >= nb) {
      rows[b] = zero;
    } else if constexpr (std::is_same_v<T, float>) {
      rows[b] = base + (i0 + b) * ld;
    } else {
      widen(base + (i0 + b) * ld, scratch.row(b), d);
      rows[b] = scratch.row(b);
    }
  }
}

// Rows of dropout(x) as floats; with dropout the mask rows are left in `mask`.
template <typename T>
void dropped_rows(const T* x, int64_t ld, int64_t i0, int nb, int64_t d, const DropoutParams& dp,
                  Scratch& xs, Scratch& mask, const float* zero, const float* rows[kRows]) {
  float_rows(x, ld, i0, nb, d, xs, zero, rows);
  if (!dp.enabled) return;
  for (int b = 0; b < nb; ++b) {
    cpu::draw_dropout_row(i0 + b, d, dp, mask.row(b));
    multiply_into(xs.row(b), rows[b], mask.row(b), d);
    rows[b] = xs.row(b);
  }
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& layer_out,
                                                const at::Tensor& A, const at::Tensor& B,
                                                double scale, const DropoutParams& dp) {
  const int64_t n = x.size(0), d_in = x.size(1), d_out = layer_out.size(1), r = A.size(0);
  const at::Tensor Af = A.to(at::kFloat).contiguous();
  const at::Tensor Btf = B.to(at::kFloat).t().contiguous();
  at::Tensor out = cpu::empty_output({n, d_out}, layer_out.options());
  at::Tensor t = at::empty({n, r}, x.options().dtype(at::kFloat));
  const T* xp = x.data_ptr<T>();
  const T* lop = layer_out.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  float* tp = t.data_ptr<float>();
  const float* ap = Af.data_ptr<float>();
  const float* btp = Btf.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldl = layer_out.stride(0);
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n + kRows - 1) / kRows;

  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    Scratch xs(d_in, kRows), mask(d_in, kRows), ys(d_out, kRows), zero(std::max(d_in, d_out), 1);
    std::vector<float> tbuf(kRows * r), coef(kRows * r);
    const float* xrows[kRows];
    const float* lrows[kRows];
    float* orows[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, n - i0));
      dropped_rows(xp, ldx, i0, nb, d_in, dp, xs, mask, zero.row(0), xrows);
      dot_rows(ap, r, d_in, xrows, tbuf.data());
      for (int b = 0; b < nb; ++b)
        for (int64_t k = 0; k < r; ++k) tp[(i0 + b) * r + k] = tbuf[b * r + k];
      for (int64_t q = 0; q < kRows * r; ++q) coef[q] = s * tbuf[q];
      float_rows(lop, ldl, i0, nb, d_out, ys, zero.row(0), lrows);
      for (int b = 0; b < kRows; ++b) {
        if constexpr (std::is_same_v<T, float>) {
          orows[b] = b < nb ? outp + (i0 + b) * d_out : ys.row(b);
        } else {
          orows[b] = ys.row(b);
        }
      }
      combine_rows(btp, r, d_out, coef.data(), lrows, orows);
      if constexpr (!std::is_same_v<T, float>) {
        for (int b = 0; b < nb; ++b) narrow(ys.row(b), outp + (i0 + b) * d_out, d_out);
      }
    }
  });
  return {out, t};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A,
    const at::Tensor& B, double scale, const DropoutParams& dp, bool need_dx, bool need_dA,
    bool need_dB) {
  const int64_t n = x.size(0), d_in = x.size(1), d_out = grad.size(1), r = A.size(0);
  const at::Tensor Af = A.to(at::kFloat).contiguous();
  const at::Tensor Btf = B.to(at::kFloat).t().contiguous();
  at::Tensor dx = need_dx ? cpu::empty_output({n, d_in}, x.options()) : at::empty({0}, x.options());
  const T* gp = grad.data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  const float* tp = t.data_ptr<float>();
  const float* ap = Af.data_ptr<float>();
  const float* btp = Btf.data_ptr<float>();
  const int64_t ldg = grad.stride(0), ldx = x.stride(0);
  const float s = static_cast<float>(scale);
  const int64_t blocks = (n + kRows - 1) / kRows;

  const int threads = at::get_num_threads();
  const int64_t part_a = need_dA ? r * d_in : 0, part_b = need_dB ? r * d_out : 0;
  std::vector<float> partials(static_cast<size_t>(threads) * (part_a + part_b), 0.f);

  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    float* pa = partials.data() + at::get_thread_num() * (part_a + part_b);
    float* pb = pa + part_a;
    Scratch gs(d_out, kRows), xs(d_in, kRows), mask(d_in, kRows), dxs(d_in, kRows);
    Scratch zero(std::max(d_in, d_out), 1);
    std::vector<float> u(kRows * r), tcoef(kRows * r), ucoef(kRows * r);
    const float* grows[kRows];
    const float* xrows[kRows];
    float* dxrows[kRows];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kRows;
      const int nb = static_cast<int>(std::min<int64_t>(kRows, n - i0));
      float_rows(gp, ldg, i0, nb, d_out, gs, zero.row(0), grows);
      dot_rows(btp, r, d_out, grows, u.data());  // u = g @ B
      for (int b = 0; b < kRows; ++b)
        for (int64_t k = 0; k < r; ++k) {
          tcoef[b * r + k] = b < nb ? tp[(i0 + b) * r + k] : 0.f;
          ucoef[b * r + k] = b < nb ? s * u[b * r + k] : 0.f;
        }
      if (need_dB) accumulate_outer(pb, r, d_out, tcoef.data(), grows);  // dB.T += t.T g
      if (!need_dA && !need_dx) continue;
      dropped_rows(xp, ldx, i0, nb, d_in, dp, xs, mask, zero.row(0), xrows);
      if (need_dA) accumulate_outer(pa, r, d_in, ucoef.data(), xrows);  // dA += s u.T xd
      if (need_dx) {
        for (int b = 0; b < kRows; ++b) dxrows[b] = dxs.row(b);
        combine_rows(ap, r, d_in, ucoef.data(), nullptr, dxrows);  // s u @ A
        for (int b = 0; b < nb; ++b) {
          float* row = dxs.row(b);
          if (dp.enabled) multiply_into(row, row, mask.row(b), d_in);
          narrow(row, dxp + (i0 + b) * d_in, d_in);
        }
      }
    }
  });

  at::Tensor dA = at::empty({0}, A.options()), dB = at::empty({0}, B.options());
  if (need_dA || need_dB) {
    at::Tensor all = at::from_blob(partials.data(), {threads, part_a + part_b},
                                   at::TensorOptions().dtype(at::kFloat))
                         .sum(0);
    if (need_dA) dA = all.narrow(0, 0, part_a).view({r, d_in}).to(A.scalar_type());
    if (need_dB)
      dB = (all.narrow(0, part_a, part_b).view({r, d_out}) * s).t().contiguous().to(
          B.scalar_type());
  }
  return {dx, dA, dB};
}

// Weights of either dtype are widened to fp32 once per call, so only x's dtype picks a kernel.
template <typename F>
auto dispatch_activation(const at::Tensor& x, F&& body) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return body(float{});
    case at::kHalf:
      return body(at::Half{});
    case at::kBFloat16:
      return body(at::BFloat16{});
    default:
      TORCH_CHECK(false, "x: expected float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

DropoutParams cpu_dropout_params(const at::Tensor& seed, double p) {
  const at::Tensor s = seed.to(at::kCPU);
  return dropout_params(p, s.data_ptr<int64_t>()[0], s.data_ptr<int64_t>()[1]);
}

std::tuple<at::Tensor, at::Tensor> lor2c_fwd_cpu(const at::Tensor& x, const at::Tensor& layer_out,
                                                 const at::Tensor& A, const at::Tensor& B,
                                                 double scale, double p, const at::Tensor& seed) {
  check_common(x, A, B, seed, p);
  check_rows(x, "x", x.size(0), x.size(1));
  check_rows(layer_out, "layer_out", x.size(0), B.size(0));
  TORCH_CHECK(layer_out.scalar_type() == x.scalar_type(), "layer_out: expected dtype ",
              x.scalar_type(), ", got ", layer_out.scalar_type());
  const DropoutParams dp = cpu_dropout_params(seed, p);
  return dispatch_activation(x, [&](auto tag) {
    return forward_impl<decltype(tag)>(x, layer_out, A, B, scale, dp);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lor2c_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A,
    const at::Tensor& B, double scale, double p, const at::Tensor& seed, bool need_dx,
    bool need_dA, bool need_dB) {
  check_common(x, A, B, seed, p);
  check_rows(x, "x", x.size(0), x.size(1));
  check_rows(grad, "grad", x.size(0), B.size(0));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "grad: expected dtype ", x.scalar_type(),
              ", got ", grad.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                  t.size(0) == x.size(0) && t.size(1) == A.size(0),
              "t: expected a contiguous float32 (", x.size(0), ", ", A.size(0), ") tensor");
  const DropoutParams dp = cpu_dropout_params(seed, p);
  return dispatch_activation(x, [&](auto tag) {
    return backward_impl<decltype(tag)>(grad, x, t, A, B, scale, dp, need_dx, need_dA, need_dB);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lor2c_ops_ext, CPU, m) {
  m.impl("lor2c_fwd", &lor2c_fwd_cpu);
  m.impl("lor2c_bwd", &lor2c_bwd_cpu);
}

}  // namespace lor2c
