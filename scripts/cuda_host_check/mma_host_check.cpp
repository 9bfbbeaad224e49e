// Host-side check of the tensor-core LoR2C kernels (csrc/cuda/lor2c_mma.cuh), without a GPU.
//
// The kernels' own source is compiled with g++ and executed on the CPU:
//   - each CUDA block runs as 256 cooperative fibers (ucontext), one per CUDA thread, scheduled
//     deterministically: between two barriers each thread runs in turn, in thread order, or in
//     reverse order with --reverse (a missing barrier between a write and a read by another warp
//     shows up in one of the two orders); __syncthreads() is a real block barrier, and a barrier
//     that not every thread reaches is reported as a deadlock (divergent barrier);
//   - nvcuda::wmma is replaced by a scalar stand-in: a fragment holds the whole 16 x 16 tile, and
//     every *_sync call is a warp barrier (all 32 lanes arrive before any proceeds, as the real
//     warp-collective calls), so read-modify-write of shared tiles behaves as on the GPU. The
//     stand-in checks what the real API requires: 256-bit aligned pointers and ldm a multiple of
//     16 bytes. m16n16k16 products are fp32 sums of exact products (as on tensor cores, up to the
//     order of the additions);
//   - dynamic shared memory is filled with NaN bytes before each block, outputs and workspaces with
//     NaN sentinels plus guard zones, so unwritten elements and out-of-bounds writes are caught.
// The host driver reimplements the launchers' grids and plans (lor2c_fwd.cu, lor2c_bwd.cu) and the
// deterministic reduction of the partials, and compares out, t, dx, dA, dB with an fp64 reference,
// for fp16 and bf16 activations, 16-bit and fp32 weights, odd shapes, r from 1 to 130, dropout on
// and off, every need_dx / need_dA / need_dB subset, row strides, and multi-adapter batches.
//
// What this cannot check: anything about the real hardware (fragment register layouts are not
// modelled at all, which is why the kernels only load and store fragments through memory),
// timing, occupancy, memory-model races between warps that the barrier schedule hides.
//
//   scripts/check_cuda_mma_host.sh        builds this with g++ and runs it
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

// ---- the CUDA thread emulator -------------------------------------------------------------------
dim3 threadIdx, blockIdx, gridDim, blockDim;

namespace emu {
constexpr int kThreads = 256;
constexpr size_t kStack = 256 * 1024;
enum State { kRun, kBlockWait, kWarpWait, kDone };
ucontext_t main_ctx;
ucontext_t ctx[kThreads];
State st[kThreads];
int cur = 0;
std::vector<char> stacks(kThreads* kStack);
std::function<void()> body;
std::vector<unsigned char> smem;
bool reverse = false;  // run the threads from 255 down to 0 between barriers (--reverse)

void fail(const char* what) {
  std::fprintf(stderr, "EMULATOR FAIL: %s (block %u,%u,%u thread %d)\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, cur);
  std::exit(2);
}

void yield(State s) {
  st[cur] = s;
  swapcontext(&ctx[cur], &main_ctx);
}

void trampoline() {
  body();
  st[cur] = kDone;
  swapcontext(&ctx[cur], &main_ctx);
}

void run_block() {
  for (int i = 0; i < kThreads; ++i) {
    getcontext(&ctx[i]);
    ctx[i].uc_stack.ss_sp = stacks.data() + i * kStack;
    ctx[i].uc_stack.ss_size = kStack;
    ctx[i].uc_link = &main_ctx;
    makecontext(&ctx[i], trampoline, 0);
    st[i] = kRun;
  }
  for (;;) {
    for (int k = 0; k < kThreads; ++k) {
      const int i = reverse ? kThreads - 1 - k : k;
      if (st[i] != kRun) continue;
      cur = i;
      threadIdx = dim3(i, 0, 0);
      swapcontext(&main_ctx, &ctx[i]);
    }
    int done = 0, block_wait = 0;
    for (int i = 0; i < kThreads; ++i) {
      done += st[i] == kDone;
      block_wait += st[i] == kBlockWait;
    }
    if (done == kThreads) return;
    bool released = false;
    for (int w = 0; w < kThreads / 32; ++w) {  // warps whose 32 lanes all wait at a warp call
      int waiting = 0;
      for (int l = 0; l < 32; ++l) waiting += st[32 * w + l] == kWarpWait;
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) st[32 * w + l] = kRun;
        released = true;
      } else if (waiting > 0) {
        bool stuck = true;  // some lanes elsewhere: they must be able to make progress
        for (int l = 0; l < 32; ++l) stuck = stuck && st[32 * w + l] != kRun;
        if (stuck) {
          cur = 32 * w;
          fail("divergent warp-collective call (lanes at different sync points)");
        }
      }
    }
    if (released) continue;
    if (block_wait == kThreads) {
      for (int i = 0; i < kThreads; ++i) st[i] = kRun;
      continue;
    }
    fail("deadlock: __syncthreads() not reached by every thread");
  }
}

// Runs kernel() over the grid, one block at a time, with `smem_bytes` of dynamic shared memory.
void launch(dim3 grid, size_t smem_bytes, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = dim3(kThreads, 1, 1);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        smem.assign(smem_bytes + 256, 0xFF);  // NaN in every dtype
        body = kernel;
        run_block();
      }
}

unsigned char* dynamic_smem() {
  uintptr_t p = reinterpret_cast<uintptr_t>(smem.data());
  return reinterpret_cast<unsigned char*>((p + 127) / 128 * 128);
}
}  // namespace emu

void __syncthreads() { emu::yield(emu::kBlockWait); }
void __syncwarp(unsigned = 0xffffffffu) { emu::yield(emu::kWarpWait); }

// ---- the nvcuda::wmma stand-in ------------------------------------------------------------------
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "m16n16k16 only");
  float x[256];  // the whole tile, row-major (logical rows and columns of the operand)
};

inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) emu::fail("wmma ldm not a multiple of 16 bytes");
  if (reinterpret_cast<const unsigned char*>(p) < emu::smem.data() ||
      reinterpret_cast<const unsigned char*>(p) >= emu::smem.data() + emu::smem.size())
    emu::fail("wmma pointer outside shared memory");
}

inline void check_end(const void* p, size_t bytes) {
  if (reinterpret_cast<const unsigned char*>(p) + bytes > emu::smem.data() + emu::smem.size())
    emu::fail("wmma tile past the end of shared memory");
}

template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulators take a layout");
  emu::yield(emu::kWarpWait);
  check(p, ldm, sizeof(T));
  check_end(p, (15 * ldm + 16) * sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = tof(std::is_same<L, col_major>::value ? p[c * ldm + r] : p[r * ldm + c]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t l) {
  emu::yield(emu::kWarpWait);
  check(p, ldm, sizeof(float));
  check_end(p, (15 * ldm + 16) * sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t l) {
  emu::yield(emu::kWarpWait);
  check(p, ldm, sizeof(float));
  check_end(p, (15 * ldm + 16) * sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      (l == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * 16 + c];
}

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "16-bit operands only");
  emu::yield(emu::kWarpWait);
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) s += a.x[i * 16 + k] * b.x[k * 16 + j];
      out[i * 16 + j] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#define LOR2C_DYNAMIC_SMEM(name) unsigned char* const name = emu::dynamic_smem()

// Device-only helpers of the CUDA-core kernels' header (lor2c_products.cuh, included by
// lor2c_mma.cuh): declared so that it parses; the tensor-core kernels never call them.
#include "philox.h"
namespace lor2c {
void dropout_pair_keep8(const DropoutParams&, bool, int64_t, int64_t, unsigned*);
}
template <typename V>
V __shfl_xor_sync(unsigned, V, int);

#include "cuda/lor2c_mma.cuh"

using namespace lor2c::cuda;
using lor2c::DropoutParams;

// ---- host driver --------------------------------------------------------------------------------
template <typename T>
float f32(T v) {
  return nvcuda::wmma::tof(v);
}
template <typename T>
T cast(float v);
template <>
float cast<float>(float v) {
  return v;
}
template <>
__half cast<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__nv_bfloat16 cast<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A device array stand-in: `guard` sentinel elements on both sides, checked afterwards.
template <typename T>
struct Buf {
  static constexpr int kGuard = 64;
  std::vector<T> v;
  size_t n;
  explicit Buf(size_t n_, float fill = NAN) : v(n_ + 2 * kGuard, cast<T>(fill)), n(n_) {
    for (int i = 0; i < kGuard; ++i) v[i] = v[n + kGuard + i] = cast<T>(-12345.f);
  }
  T* p() { return v.data() + kGuard; }
  T& operator[](size_t i) { return v[kGuard + i]; }
  bool guards_ok() const {
    for (int i = 0; i < kGuard; ++i)
      if (f32(v[i]) != f32(cast<T>(-12345.f)) || f32(v[n + kGuard + i]) != f32(cast<T>(-12345.f)))
        return false;
    return true;
  }
};

struct Case {
  int64_t n, d_in, d_out, r;
  int64_t ldx_pad = 0, ldl_pad = 0, ldg_pad = 0;  // extra row stride
  float p = 0.f;
  bool need_dx = true, need_dA = true, need_dB = true;
  int bm = 64;                                    // forward rows per block
  int64_t g_rows = 64, g_splits = 2, g_sub = 64;  // kernel 1: rows per block, slices, range rows
  int64_t x_rows = 64;                            // kernel 2 rows per block
  int G = 0;                                      // > 0: multi-adapter batch with G adapters
  uint32_t seed = 1;
};

struct Err {
  double worst = 0;
  std::string where;
  void add(const char* name, double e) {
    if (!(e <= worst)) {  // NaN counts as worst
      worst = std::isnan(e) ? INFINITY : e;
      where = name;
    }
  }
};

// max |a - b| / max(max |b|, tiny) over one array
double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double m = 1e-30, e = 0;
  for (double v : ref) m = std::max(m, std::fabs(v));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double d = std::fabs(got[i] - ref[i]);
    if (std::isnan(got[i])) return INFINITY;
    e = std::max(e, d);
  }
  return e / m;
}

template <typename T, typename W>
bool run_case(const Case& c, const char* label) {
  constexpr bool kHalf = std::is_same<T, __half>::value;
  const int64_t n = c.n, d_in = c.d_in, d_out = c.d_out, r = c.r;
  const int64_t G = c.G > 0 ? c.G : 1;
  const int64_t ldx = d_in + c.ldx_pad, ldl = d_out + c.ldl_pad, ldg = d_out + c.ldg_pad;
  std::mt19937 rng(c.seed * 7919 + n * 31 + d_in * 17 + r);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  Buf<T> x(n * ldx, 0.f), lo(n * ldl, 0.f), g(n * ldg, 0.f);
  Buf<W> A(G * r * d_in, 0.f), B(G * d_out * r, 0.f);
  for (int64_t i = 0; i < n * ldx; ++i) x[i] = cast<T>(U(rng));
  for (int64_t i = 0; i < n * ldl; ++i) lo[i] = cast<T>(U(rng));
  for (int64_t i = 0; i < n * ldg; ++i) g[i] = cast<T>(U(rng));
  const float wa = 1.f / std::sqrt(static_cast<float>(std::max<int64_t>(d_in, 1)));
  const float wb = 1.f / std::sqrt(static_cast<float>(std::max<int64_t>(r, 1)));
  for (int64_t i = 0; i < G * r * d_in; ++i) A[i] = cast<W>(U(rng) * wa);
  for (int64_t i = 0; i < G * d_out * r; ++i) B[i] = cast<W>(U(rng) * wb);
  std::vector<int64_t> ids(n, 0);
  if (c.G > 0)
    for (int64_t i = 0; i < n; ++i)
      ids[i] = static_cast<int64_t>(rng() % (c.G + 1)) - 1;  // -1: none
  const float scale = 0.75f;

  // dropout, as the kernels draw it (csrc/philox.h)
  int64_t seed_words[2] = {0x1234567887654321LL + c.seed, 0x42LL + c.seed};
  DropoutArgs dargs{};
  dargs.seed = seed_words;
  dargs.enabled = c.p > 0.f;
  dargs.threshold = lor2c::dropout_threshold(c.p);
  dargs.inv_keep = c.p > 0.f ? 1.f / (1.f - c.p) : 1.f;
  DropoutParams dp{};
  dp.enabled = dargs.enabled;
  dp.threshold = dargs.threshold;
  dp.inv_keep = dargs.inv_keep;
  lor2c::dropout_seed(dp, seed_words[0], seed_words[1]);
  std::vector<double> m(n * d_in, 1.0);
  if (dp.enabled)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t gq = 0; gq < (d_in + 7) / 8; ++gq) {
        float mm[8];
        lor2c::dropout_keep8(dp, i, gq, mm);
        for (int b = 0; b < 8 && 8 * gq + b < d_in; ++b) m[i * d_in + 8 * gq + b] = mm[b];
      }

  // fp64 reference
  std::vector<double> t_ref(n * r, 0), out_ref(n * d_out), u_ref(n * r, 0), dx_ref(n * d_in, 0),
      dA_ref(G * r * d_in, 0), dB_ref(G * d_out * r, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = ids[i];
    for (int64_t j = 0; j < d_out; ++j) out_ref[i * d_out + j] = f32(lo[i * ldl + j]);
    if (a < 0) continue;
    const W* Aa = A.p() + a * r * d_in;
    const W* Ba = B.p() + a * d_out * r;
    for (int64_t k = 0; k < r; ++k) {
      double s = 0, su = 0;
      for (int64_t j = 0; j < d_in; ++j)
        s += f32(x[i * ldx + j]) * m[i * d_in + j] * f32(Aa[k * d_in + j]);
      for (int64_t j = 0; j < d_out; ++j) su += f32(g[i * ldg + j]) * f32(Ba[j * r + k]);
      t_ref[i * r + k] = s;
      u_ref[i * r + k] = su;
    }
    for (int64_t j = 0; j < d_out; ++j) {
      double s = 0;
      for (int64_t k = 0; k < r; ++k) s += t_ref[i * r + k] * f32(Ba[j * r + k]);
      out_ref[i * d_out + j] += scale * s;
      for (int64_t k = 0; k < r; ++k)
        dB_ref[a * d_out * r + j * r + k] += scale * f32(g[i * ldg + j]) * t_ref[i * r + k];
    }
    for (int64_t j = 0; j < d_in; ++j) {
      double s = 0;
      for (int64_t k = 0; k < r; ++k) s += u_ref[i * r + k] * f32(Aa[k * d_in + j]);
      dx_ref[i * d_in + j] = scale * s * m[i * d_in + j];
      for (int64_t k = 0; k < r; ++k)
        dA_ref[a * r * d_in + k * d_in + j] +=
            scale * u_ref[i * r + k] * f32(x[i * ldx + j]) * m[i * d_in + j];
    }
  }

  // multi-adapter plan, as lor2c_multi_plan_kernel builds it (stable sort by id)
  std::vector<int64_t> order(n), sorted(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  for (int64_t i = 0; i < n; ++i) sorted[i] = ids[order[i]];
  const int64_t S = G + 2;
  std::vector<int64_t> seg(S + 1);
  for (int64_t s = 0; s <= S; ++s)
    seg[s] = s == 0   ? 0
             : s == S ? n
                      : std::lower_bound(sorted.begin(), sorted.end(), s - 1) - sorted.begin();
  auto table = [&](int64_t rows, std::vector<int64_t>& bp) {
    bp.assign(S + 1, 0);
    for (int64_t s = 0; s < S; ++s)
      bp[s + 1] = bp[s] + (s >= 1 && s <= G ? (seg[s + 1] - seg[s] + rows - 1) / rows : 0);
    return MultiTable{order.data(), seg.data(), bp.data(), S, rows};
  };
  const bool multi = c.G > 0;
  std::vector<int64_t> bp_f, bp_g, bp_x;

  Err err;
  // ---------------- forward ----------------
  Buf<T> out(n * d_out);
  Buf<float> t(n * r);
  {
    FwdArgs fa{};  // filled as the launchers fill theirs (fwd_params, lor2c_params.cuh)
    fa.x = x.p();
    fa.ldx = ldx;
    fa.layer_out = lo.p();
    fa.ldl = ldl;
    fa.A = A.p();
    fa.B = B.p();
    fa.out = out.p();
    fa.t = t.p();
    fa.n = n;
    fa.d_in = d_in;
    fa.d_out = d_out;
    fa.r = r;
    fa.scale = scale;
    fa.dropout = dargs;
    const FwdParams<T, W> p =
        fwd_params<T, W>(fa, multi ? table(c.bm, bp_f) : MultiTable{}, kMmaLanes);
    const int64_t blocks = (n + c.bm - 1) / c.bm + (multi ? G : 0);
    const int rt = mma_rank_tile(r);
    auto go = [&](auto rt_tag, auto bm_tag) {
      constexpr int RT = decltype(rt_tag)::value, BM = decltype(bm_tag)::value;
      emu::launch(dim3(blocks), MmaFwdSmem<RT, BM>::kBytes, [&] {
        if (multi)
          lor2c_fwd_mma_kernel<T, W, RT, BM, true>(p);
        else
          lor2c_fwd_mma_kernel<T, W, RT, BM, false>(p);
      });
    };
    using I16 = std::integral_constant<int, 16>;
    using I32 = std::integral_constant<int, 32>;
    using I64 = std::integral_constant<int, 64>;
    if (c.bm == 64) {
      if (rt == 16)
        go(I16{}, I64{});
      else if (rt == 32)
        go(I32{}, I64{});
      else
        go(I64{}, I64{});
    } else {
      if (rt == 16)
        go(I16{}, I32{});
      else if (rt == 32)
        go(I32{}, I32{});
      else
        go(I64{}, I32{});
    }
    if (multi)  // rows without an adapter: lor2c_multi_none_kernel's job (out = layer_out, t = 0)
      for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0) {
          for (int64_t j = 0; j < d_out; ++j) out[i * d_out + j] = lo[i * ldl + j];
          for (int64_t k = 0; k < r; ++k) t[i * r + k] = 0.f;
        }
    std::vector<double> o(n * d_out), tv(n * r);
    for (int64_t i = 0; i < n * d_out; ++i) o[i] = f32(out[i]);
    for (int64_t i = 0; i < n * r; ++i) tv[i] = t[i];
    err.add("out", rel_err(o, out_ref) / (kHalf ? 2e-3 : 1.6e-2));
    err.add("t", rel_err(tv, t_ref) / 1e-4);
    if (!out.guards_ok() || !t.guards_ok()) err.add("fwd guard", INFINITY);
  }
  // the backward takes t from the forward (as the op does)

  // ---------------- backward ----------------
  const bool need_u = (c.need_dx || c.need_dA) && d_in > 0;
  const int rt = mma_rank_tile(r);
  const int64_t nrc = (r + rt - 1) / rt;
  Buf<float> u(n * r);
  Buf<T> dx(n * d_in);
  BwdArgs ba{};  // filled as the launchers fill theirs (g_params, x_params: lor2c_params.cuh)
  ba.grad = g.p();
  ba.ldg = ldg;
  ba.x = x.p();
  ba.ldx = ldx;
  ba.t = t.p();
  ba.A = A.p();
  ba.B = B.p();
  ba.dx = dx.p();
  ba.n = n;
  ba.d_in = d_in;
  ba.d_out = d_out;
  ba.r = r;
  ba.scale = scale;
  ba.need_dx = c.need_dx;
  ba.need_dA = c.need_dA;
  ba.need_dB = c.need_dB;
  ba.dropout = dargs;
  // kernel 1 plan
  int64_t g_splits = std::min(c.g_splits, (n + c.g_rows - 1) / c.g_rows), g_split_rows = 0;
  if (multi) {
    g_split_rows = ((n + g_splits - 1) / g_splits + c.g_rows - 1) / c.g_rows * c.g_rows;
    g_splits = (n + g_split_rows - 1) / g_split_rows + G;
  }
  Buf<float> ws_dB(g_splits * r * d_out);
  if (need_u || c.need_dB) {
    BwdGParams<T, W> p =
        g_params<T, W>(ba, c.g_rows, multi ? table(g_split_rows, bp_g) : MultiTable{}, need_u,
                       c.need_dB, u.p(), ws_dB.p(), kMmaLanes);
    p.rows = c.g_sub;  // shared-memory ranges within the block's range of c.g_rows rows
    auto go = [&](auto rt_tag) {
      constexpr int RT = decltype(rt_tag)::value;
      const size_t smem = MmaGSmem<RT>::bytes(p.rows);
      if (multi) {
        p.range0 = 0;
        p.accumulate = false;
        emu::launch(dim3(g_splits, nrc), smem, [&] { lor2c_bwd_g_mma_kernel<T, W, RT, true>(p); });
      } else {
        const int64_t ranges = (n + c.g_rows - 1) / c.g_rows;
        for (int64_t range0 = 0; range0 < ranges; range0 += g_splits) {
          const int64_t blocks = std::min(ranges - range0, g_splits);
          p.range0 = range0;
          p.accumulate = range0 > 0;
          emu::launch(dim3(blocks, nrc), smem, [&] { lor2c_bwd_g_mma_kernel<T, W, RT, false>(p); });
        }
      }
    };
    if (rt == 16)
      go(std::integral_constant<int, 16>{});
    else if (rt == 32)
      go(std::integral_constant<int, 32>{});
    else
      go(std::integral_constant<int, 64>{});
  }
  // kernel 2
  const int64_t x_splits = (n + c.x_rows - 1) / c.x_rows + (multi ? G : 0);
  Buf<float> ws_dA(x_splits * r * d_in);
  if (need_u && (c.need_dx || c.need_dA)) {
    const BwdXParams<T, W> p = x_params<T, W>(
        ba, c.x_rows, multi ? table(c.x_rows, bp_x) : MultiTable{}, u.p(), ws_dA.p(), kMmaLanes);
    const int64_t gy = multi ? std::min<int64_t>(x_splits, 3) : x_splits;  // multi: loop over units
    const dim3 grid((d_in + 127) / 128, gy, c.need_dA ? nrc : 1);
    auto go = [&](auto rt_tag) {
      constexpr int RT = decltype(rt_tag)::value;
      emu::launch(grid, MmaXSmem<RT>::kBytes, [&] {
        if (multi)
          lor2c_bwd_x_mma_kernel<T, W, RT, true>(p);
        else
          lor2c_bwd_x_mma_kernel<T, W, RT, false>(p);
      });
    };
    if (rt == 16)
      go(std::integral_constant<int, 16>{});
    else if (rt == 32)
      go(std::integral_constant<int, 32>{});
    else
      go(std::integral_constant<int, 64>{});
  }
  if (c.need_dx) {
    if (multi)
      for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0)
          for (int64_t j = 0; j < d_in; ++j) dx[i * d_in + j] = cast<T>(0.f);
    if (!need_u)
      for (int64_t i = 0; i < n * d_in; ++i) dx[i] = cast<T>(0.f);
    std::vector<double> v(n * d_in);
    for (int64_t i = 0; i < n * d_in; ++i) v[i] = f32(dx[i]);
    err.add("dx", rel_err(v, dx_ref) / (kHalf ? 2e-3 : 1.6e-2));
  }
  // the reduction (lor2c_reduce_kernel): fixed order over slices, per adapter for multi
  auto reduce = [&](Buf<float>& ws, const std::vector<int64_t>& bp, int64_t splits, int64_t R,
                    int64_t C, bool transpose, std::vector<double>& outv) {
    outv.assign(G * R * C, 0.0);
    for (int64_t a = 0; a < G; ++a) {
      const int64_t first = multi ? bp[a + 1] : 0, last = multi ? bp[a + 2] : splits;
      for (int64_t e = 0; e < R * C; ++e) {
        double s = 0;
        for (int64_t sp = first; sp < last; ++sp) s += ws[sp * R * C + e];
        const int64_t i = e / C, j = e % C;
        outv[a * R * C + (transpose ? j * R + i : e)] = scale * s;
      }
    }
  };
  if (c.need_dA) {
    std::vector<double> v;
    if (need_u)
      reduce(ws_dA, bp_x, x_splits, r, d_in, false, v);
    else
      v.assign(G * r * d_in, 0.0);
    err.add("dA", rel_err(v, dA_ref) / 1e-3);
  }
  if (c.need_dB) {
    std::vector<double> v;
    reduce(ws_dB, bp_g, g_splits, r, d_out, true, v);
    err.add("dB", rel_err(v, dB_ref) / 1e-3);
  }
  if (need_u) {
    std::vector<double> v(n * r), ref(n * r);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k < r; ++k) {
        v[i * r + k] = ids[i] < 0 ? 0.0 : u[i * r + k];
        ref[i * r + k] = ids[i] < 0 ? 0.0 : u_ref[i * r + k];
      }
    err.add("u", rel_err(v, ref) / 1e-4);
  }
  if (!u.guards_ok() || !ws_dA.guards_ok() || !ws_dB.guards_ok() || !dx.guards_ok())
    err.add("bwd guard", INFINITY);
  const bool ok = err.worst <= 1.0;
  std::printf(
      "%s %-28s n=%-4ld d_in=%-4ld d_out=%-4ld r=%-3ld p=%.2f G=%d need=%d%d%d bm=%d "
      "g_rows=%ld/%ld x_rows=%ld  worst %.3g of tolerance (%s)\n",
      ok ? "OK  " : "FAIL", label, (long)n, (long)d_in, (long)d_out, (long)r, c.p, c.G, c.need_dx,
      c.need_dA, c.need_dB, c.bm, (long)c.g_rows, (long)c.g_sub, (long)c.x_rows, err.worst,
      err.where.c_str());
  return ok;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--smem") {  // the kernels' shared memory, bytes
    std::printf("forward BM=64: RT16 %zu RT32 %zu RT64 %zu\n", MmaFwdSmem<16, 64>::kBytes,
                MmaFwdSmem<32, 64>::kBytes, MmaFwdSmem<64, 64>::kBytes);
    std::printf("forward BM=32: RT16 %zu RT32 %zu RT64 %zu\n", MmaFwdSmem<16, 32>::kBytes,
                MmaFwdSmem<32, 32>::kBytes, MmaFwdSmem<64, 32>::kBytes);
    std::printf("kernel 1, 64 rows: RT16 %zu RT32 %zu RT64 %zu; per row %zu %zu %zu\n",
                MmaGSmem<16>::bytes(64), MmaGSmem<32>::bytes(64), MmaGSmem<64>::bytes(64),
                MmaGSmem<16>::kPerRow, MmaGSmem<32>::kPerRow, MmaGSmem<64>::kPerRow);
    std::printf("kernel 2: RT16 %zu RT32 %zu RT64 %zu\n", MmaXSmem<16>::kBytes,
                MmaXSmem<32>::kBytes, MmaXSmem<64>::kBytes);
    return 0;
  }
  bool quick = false;
  for (int a = 1; a < argc; ++a) {
    quick = quick || std::string(argv[a]) == "--quick";
    emu::reverse = emu::reverse || std::string(argv[a]) == "--reverse";
  }
  int failed = 0, total = 0;
  auto both = [&](Case c, const char* label) {
    total += 4;
    failed += !run_case<__nv_bfloat16, __nv_bfloat16>(c, label);
    failed += !run_case<__half, float>(c, label);
    if (quick) return;
    failed += !run_case<__half, __half>(c, label);
    failed += !run_case<__nv_bfloat16, float>(c, label);
  };
  Case c{};
  c = {200, 256, 256, 16};
  both(c, "aligned r=16");
  c = {77, 300, 200, 7};
  c.p = 0.1f;
  both(c, "odd d, r=7, dropout");
  c = {130, 136, 260, 32};
  c.bm = 32;
  c.ldx_pad = 5;
  c.ldl_pad = 3;
  c.ldg_pad = 1;
  both(c, "strides, bm=32, r=32");
  c = {150, 129, 131, 64};
  c.p = 0.3f;
  c.g_rows = 128;
  c.g_sub = 64;
  c.g_splits = 1;  // two waves of one block, sub-ranges
  both(c, "r=64, waves, sub-ranges");
  if (!quick) {
    c = {100, 140, 70, 70};
    c.p = 0.2f;
    both(c, "r=70 (two rank chunks)");
    c = {40, 24, 40, 1};
    both(c, "r=1, tiny");
    c = {1, 50, 30, 3};
    c.p = 0.5f;
    both(c, "n=1");
    c = {33, 0, 40, 5};
    both(c, "d_in=0");
    c = {33, 40, 0, 5};
    both(c, "d_out=0");
    for (int s = 1; s < 8; ++s) {
      c = {90, 200, 150, 20};
      c.p = 0.15f;
      c.need_dx = s & 1;
      c.need_dA = (s >> 1) & 1;
      c.need_dB = (s >> 2) & 1;
      both(c, "need subsets");
    }
    c = {170, 136, 144, 12};
    c.G = 3;
    c.p = 0.1f;
    c.g_splits = 2;
    c.x_rows = 32;
    both(c, "multi G=3");
    c = {120, 130, 100, 70};
    c.G = 2;
    c.bm = 32;
    c.g_rows = 128;
    c.g_sub = 64;
    both(c, "multi G=2 r=70 sub-ranges");
  }
  std::printf("%d of %d cases failed (threads %s between barriers)\n", failed, total,
              emu::reverse ? "in reverse order" : "in order");
  return failed == 0 ? 0 : 1;
}
