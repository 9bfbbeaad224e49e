// LoR2C residual op on the CPU: out = layer_out + s * dropout(x) @ A.T @ B.T and its backward.
//
// Forward is one pass over blocks of kRows rows; backward is one pass that produces dx and
// accumulates dA and dB into per-thread partial sums, reduced at the end. Nothing of size n x d
// is allocated besides the outputs: each thread works in row-sized scratch buffers. The dropout
// mask is regenerated from (seed, offset, row, column) with Philox (csrc/philox.h), never stored.
//
// The hot loops work on fp32 only (half-precision rows are widened into scratch first) and are
// compiled for AVX-512, AVX2+FMA and baseline x86-64: the path in use is the widest the CPU runs
// unless LOR2C_CPU_ISA forces another (csrc/cpu/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../lor2c_common.h"
#include "bf16_products.h"
#include "blas.h"
#include "dropout.h"
#include "memory.h"
#include "rank_products.h"
#include "rows.h"

namespace lor2c {
namespace {

// From this rank on, calls of fewer than r rows run on ATen's matrix products (the GEMM path).
constexpr int64_t kGemmMinRank = 32;

using cpu::accumulate_outer;
using cpu::combine_rows;
using cpu::dispatch_activation;
using cpu::dot_rows;
using cpu::dropped_rows;
using cpu::float_rows;
using cpu::kRows;
using cpu::narrow;
using cpu::Scratch;

// Blocks of up to kRows rows (the blocked plan: more) that share an adapter (a row of the weight
// banks), in the order the kernels visit them. The plain op is one adapter over rows 0..n-1; a
// multi-adapter batch is grouped by adapter id with a counting sort, so unsorted ids still give
// full blocks.
struct RowPlan {
  std::vector<int64_t> order;  // row visiting order; empty means 0, 1, ..., n-1
  struct Block {
    int64_t start;    // position in `order` of the block's first row
    int32_t rows;     // 1..kRows (the blocked plan: 1..blocked_rows())
    int64_t adapter;  // bank row, or -1: these rows get no adapter
  };
  std::vector<Block> blocks;

  int64_t row(int64_t pos) const { return order.empty() ? pos : order[pos]; }

  void add_segment(int64_t begin, int64_t end, int64_t adapter, int64_t block_rows) {
    for (int64_t i = begin; i < end; i += block_rows)
      blocks.push_back({i, static_cast<int32_t>(std::min(block_rows, end - i)), adapter});
  }

  // block_rows: kRows for the fused kernel, blocked_rows() for the blocked plan.
  static RowPlan single(int64_t n, int64_t block_rows = kRows) {
    RowPlan plan;
    plan.add_segment(0, n, 0, block_rows);
    return plan;
  }

  static RowPlan grouped(const at::Tensor& ids, int64_t adapters, int64_t block_rows = kRows) {
    const at::Tensor ids64 = ids.to(at::kLong).contiguous();
    const int64_t* id = ids64.data_ptr<int64_t>();
    const int64_t n = ids64.numel();
    std::vector<int64_t> start(adapters + 2, 0);  // slot 0: id -1
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(id[i] >= -1 && id[i] < adapters, "adapter_ids: expected values in [-1, ",
                  adapters, "), got ", id[i]);
      ++start[id[i] + 2];
    }
    for (int64_t g = 1; g < adapters + 2; ++g) start[g] += start[g - 1];
    RowPlan plan;
    plan.order.resize(n);
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < n; ++i) plan.order[next[id[i] + 1]++] = i;
    for (int64_t g = -1; g < adapters; ++g)
      plan.add_segment(start[g + 1], start[g + 2], g, block_rows);
    return plan;
  }
};

// dst[j * rows + i] = scale * src[i * cols + j]: a rows x cols matrix transposed, in 32 x 32
// tiles (both sides' lines of a tile stay in L1). ATen's strided copy took 235 us for a 4096 x 64
// matrix, and the element-wise loop it replaces as much: twice per call each at small n.
template <typename Src, typename Dst>
__attribute__((noinline)) void transpose_into(const Src* __restrict src, int64_t rows, int64_t cols,
                                              float scale, Dst* __restrict dst) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile)
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t i1 = std::min(rows, i0 + kTile), j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i)
          dst[j * rows + i] = static_cast<Dst>(scale * static_cast<float>(src[i * cols + j]));
    }
}

// Runs worker(next) on up to `threads` threads, where next(begin, end) hands out the next chunk
// of [0, items) (chunks of `chunk` items, in order; false when none is left). Threads take
// chunks as they become free, so a thread slowed down (a core shared with another process, a
// core that runs slower) takes fewer: a static split makes every call wait for the slowest half.
// One worker, run inline, when `workers` is 1 or the caller already runs in a parallel region.
template <typename F>
void dynamic_for(int64_t items, int64_t chunk, int64_t workers, F&& worker) {
  workers = std::min<int64_t>(workers, (items + chunk - 1) / chunk);
  std::atomic<int64_t> cursor{0};
  auto next = [&](int64_t& begin, int64_t& end) {
    begin = cursor.fetch_add(chunk, std::memory_order_relaxed);
    if (begin >= items) return false;
    end = std::min(items, begin + chunk);
    return true;
  };
  if (workers <= 1 || at::in_parallel_region()) {
    worker(next);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

// Blocks per parallel chunk of the forward: enough multiply-adds (about 2^20, some 20 us) to
// pay for waking a thread. A fixed 8 blocks (64 rows) ran rank 64 on one thread up to n = 64.
int64_t grain_blocks(int64_t r, int64_t d) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, kRows * r * d));
}

// Adds the rows of block `blk` (if there is one) of a (rows x cols) tensor with row stride ld.
template <typename T>
void prefetch_rows(cpu::Prefetch& pf, const RowPlan& plan, int64_t blk, const T* base, int64_t ld,
                   int64_t cols) {
  if (blk >= static_cast<int64_t>(plan.blocks.size())) return;
  const RowPlan::Block& block = plan.blocks[blk];
  for (int b = 0; b < block.rows; ++b)
    pf.add(base + plan.row(block.start + b) * ld, cols * int64_t{sizeof(T)});
}

// Whether an fp32 output is written with non-temporal stores: where it is larger than the caches
// would keep for its reader anyway. Measured (n=8192 d=768 r=16, one core): 25 MiB outputs,
// forward + backward 20.5 -> 16.2 ms together with the prefetching; 3 n*d streams alone (read,
// read, write) 3.7 -> 2.7 ms. A small output written so would be read back from memory.
bool streams(const at::Tensor& out) { return out.nbytes() >= (size_t{16} << 20); }

// The weights as fp32, A as (G, r, d_in) and B transposed to (G, r, d_out), so that every hot loop
// runs along d with unit stride. A (r, d_in) / B (d_out, r) is a bank of one. A that is fp32 and
// contiguous is read in place; B^T is packed into a buffer the thread reuses (at tiny sizes a
// fresh tensor per call cost more than the products).
struct PackedWeights {
  const float* a = nullptr;
  const float* bt = nullptr;
  at::Tensor a_owned, bt_owned;  // only where A had to be converted, B^T was too large to reuse
  const float* A(int64_t g, int64_t r, int64_t d_in) const { return a + g * r * d_in; }
  const float* Bt(int64_t g, int64_t r, int64_t d_out) const { return bt + g * r * d_out; }
  PackedWeights(const at::Tensor& A_bank, const at::Tensor& B_bank) {
    if (A_bank.scalar_type() == at::kFloat && A_bank.is_contiguous()) {
      a = A_bank.data_ptr<float>();
    } else {
      a_owned = A_bank.to(at::kFloat).contiguous();
      a = a_owned.data_ptr<float>();
    }
    const at::Tensor src = B_bank.contiguous();
    const int64_t G = src.dim() == 3 ? src.size(0) : 1, d_out = src.size(-2), r = src.size(-1);
    float* dst = cpu::reusable_floats(cpu::kPackedB, G * r * d_out);
    if (dst == nullptr) {
      bt_owned = cpu::empty_cpu({G, r, d_out}, at::kFloat);
      dst = bt_owned.data_ptr<float>();
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "pack_B", [&] {
      const scalar_t* sp = src.data_ptr<scalar_t>();
      for (int64_t g = 0; g < G; ++g)
        transpose_into(sp + g * d_out * r, d_out, r, 1.f, dst + g * r * d_out);
    });
    bt = dst;
  }
};

// The backward's weight-gradient partial sums. The blocks are cut into `parts` contiguous ranges,
// each summing its partials (per adapter: dA, r x d_in, then dB transposed, r x d_out) into a
// buffer of its own; the threads take ranges as they get free and the buffers are summed in order
// at the end (weight_grads), so the result depends on the number of parts (a function of the
// shape and the thread count) only, not on which thread ran which part. Few blocks make one part:
// their O(r * d) buffers (zeroed, summed, written out), not the rows, are then the cost (n = 1,
// r = 64, d = 4096: 1.8 ms vs eager 0.5). A part's buffers cost about as much as two blocks of
// kRows rows' products (zeroed, summed: three passes over r * (d_in + d_out) floats against
// 4 * kRows multiply-adds per float): a part is worth its buffers from four such blocks on
// (`blocks_per_part`; a blocked-plan block is worth one).
constexpr int64_t kBlocksPerPart = 4;

int64_t partial_parts(int64_t blocks, int64_t per_part, int64_t blocks_per_part, int64_t threads) {
  // Two parts per thread where their buffers stay small (8 MiB in all), so that the threads,
  // taking parts as they get free, can even out a slow one; one per thread otherwise.
  constexpr int64_t kPartialBytes = int64_t{8} << 20;
  const int64_t part_bytes = std::max<int64_t>(1, per_part * int64_t{sizeof(float)});
  const int64_t want = 2 * threads * part_bytes <= kPartialBytes ? 2 * threads : threads;
  return std::max<int64_t>(1, std::min(want, per_part == 0 ? blocks : blocks / blocks_per_part));
}

// The parts' buffers: the calling thread's reused buffer where small, else allocated. Zeroed by
// the thread that runs each part (first touch), not here.
struct Partials {
  float* data;
  std::unique_ptr<float[]> owned;
  explicit Partials(int64_t count) : data(cpu::reusable_floats(cpu::kPartials, count)) {
    if (data == nullptr) {
      owned.reset(new float[static_cast<size_t>(count)]);
      data = owned.get();
    }
  }
};

// dA and dB from the parts' partials (per adapter g: dA then s * the transpose of dB.T), summed in
// order (deterministic for a part count) into the first part's, written out in the weights'
// dtype: plain loops, no ATen ops (at small sizes their dispatch cost was most of the backward's
// host time). A gradient not asked for is an empty tensor; the others have the weights' shapes (a
// bank, or one adapter's 2-D matrices).
std::tuple<at::Tensor, at::Tensor> weight_grads(float* partials, int64_t parts, int64_t G,
                                                int64_t r, int64_t d_in, int64_t d_out, float s,
                                                const at::Tensor& A_bank, const at::Tensor& B_bank,
                                                bool need_dA, bool need_dB) {
  const int64_t part_a = need_dA ? r * d_in : 0, part_b = need_dB ? r * d_out : 0;
  const int64_t per_part = G * (part_a + part_b);
  at::Tensor dA =
      cpu::empty_cpu(need_dA ? A_bank.sizes() : at::IntArrayRef{0}, A_bank.scalar_type());
  at::Tensor dB =
      cpu::empty_cpu(need_dB ? B_bank.sizes() : at::IntArrayRef{0}, B_bank.scalar_type());
  if (!need_dA && !need_dB) return {dA, dB};
  float* sum = partials;
  if (parts > 1)
    at::parallel_for(0, per_part, 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t part = 1; part < parts; ++part) {
        const float* other = partials + part * per_part;
        for (int64_t i = begin; i < end; ++i) sum[i] += other[i];
      }
    });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A_bank.scalar_type(), "dA_dB", [&] {
    for (int64_t g = 0; g < G; ++g) {
      const float* pa = sum + g * (part_a + part_b);  // dA (r x d_in) then dB.T (r x d_out)
      if (need_dA) {
        scalar_t* out = dA.data_ptr<scalar_t>() + g * r * d_in;
        for (int64_t i = 0; i < r * d_in; ++i) out[i] = static_cast<scalar_t>(pa[i]);
      }
      if (need_dB) {
        transpose_into(pa + part_a, r, d_out, s, dB.data_ptr<scalar_t>() + g * d_out * r);
      }
    }
  });
  return {dA, dB};
}

// What the single-pass forward plans (the fused kernel's, the bf16 kernels', the blocked plan's)
// share: the sizes and pointers, out and the fp32 t, and the loop that hands chunks of blocks to
// the threads. Rows without an adapter get out = layer_out (a copy: the two share a dtype) and
// t = 0; body(state, blk) runs every other block, with state a thread's scratch (make_state(),
// once per thread).
template <typename T>
struct ForwardPass {
  const RowPlan& plan;
  const int64_t n, d_in, d_out, r;
  at::Tensor out, t;
  const T* xp;
  const T* lop;
  T* outp;
  float* tp;
  const int64_t ldx, ldl;
  const float s;
  const int64_t blocks;

  ForwardPass(const at::Tensor& x, const at::Tensor& layer_out, const at::Tensor& A_bank,
              const RowPlan& plan_, double scale)
      : plan(plan_),
        n(x.size(0)),
        d_in(x.size(1)),
        d_out(layer_out.size(1)),
        r(A_bank.size(-2)),
        out(cpu::empty_output({n, d_out}, layer_out.options())),
        t(cpu::empty_cpu({n, r}, at::kFloat)),
        xp(x.data_ptr<T>()),
        lop(layer_out.data_ptr<T>()),
        outp(out.data_ptr<T>()),
        tp(t.data_ptr<float>()),
        ldx(x.stride(0)),
        ldl(layer_out.stride(0)),
        s(static_cast<float>(scale)),
        blocks(static_cast<int64_t>(plan_.blocks.size())) {}

  // Chunks of `chunk` blocks, taken by the threads as they get free.
  template <typename MakeState, typename Body>
  void run(int64_t chunk, MakeState&& make_state, Body&& body) {
    dynamic_for(blocks, chunk, at::get_num_threads(), [&](auto&& next_chunk) {
      auto state = make_state();
      int64_t begin, end;
      while (next_chunk(begin, end))
        for (int64_t blk = begin; blk < end; ++blk) {
          const RowPlan::Block& block = plan.blocks[blk];
          if (block.adapter < 0) {  // no adapter: out = layer_out, t = 0
            for (int64_t b = 0; b < block.rows; ++b) {
              const int64_t row = plan.row(block.start + b);
              std::copy(lop + row * ldl, lop + row * ldl + d_out, outp + row * d_out);
              std::fill(tp + row * r, tp + (row + 1) * r, 0.f);
            }
            continue;
          }
          body(state, blk);
        }
    });
  }

  // Into L2 while block blk computes: the next block's layer_out, x and (out_rows, unless written
  // non-temporally) out rows. An output row is fetched too
  // because a store reads its line first. Measured: bf16 forward n=8192 d=768 r=16, 2 threads,
  // 2.1 -> 1.8 ms with the out rows; fp32 n=4096 d=768, one core, r=16 3.3-3.5 -> 2.9-3.0 ms
  // and r=1 2.2 -> 1.9 ms against this block's layer_out and the next x only.
  void prefetch_next(cpu::Prefetch& pf, int64_t blk, bool out_rows) const {
    pf.clear();
    prefetch_rows(pf, plan, blk + 1, lop, ldl, d_out);
    prefetch_rows(pf, plan, blk + 1, xp, ldx, d_in);
    if (out_rows) prefetch_rows(pf, plan, blk + 1, outp, d_out, d_out);
  }

  std::tuple<at::Tensor, at::Tensor> finish() { return {out, t}; }
};

// What the two single-pass backward plans (the fused kernel's and the blocked plan's) share: the
// sizes and pointers, dx, the weight-gradient parts and their buffers, the loop that hands the
// parts to the threads (each zeroes its part's buffers and runs the part's blocks in order; rows
// without an adapter get dx = 0) and the gradients summed from the parts at the end. A plan
// constructs one, then calls run(make_state, body): make_state() builds a thread's scratch once,
// body(state, blk, part_begin, part_end, pa, pb) runs block blk (one with an adapter) of the part
// [part_begin, part_end), with pa / pb its adapter's dA / dB.T partial sums.
template <typename T>
struct BackwardPass {
  const RowPlan& plan;
  const int64_t n, d_in, d_out, G, r;
  const bool need_dx, need_dA, need_dB;
  const PackedWeights w;
  at::Tensor dx;
  const T* gp;
  const T* xp;
  T* dxp;
  const float* tp;
  const int64_t ldg, ldx;
  const float s;
  const int64_t blocks, part_a, part_b, per_part, threads, parts;
  const Partials partials;
  const at::Tensor& A_bank;
  const at::Tensor& B_bank;

  BackwardPass(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t,
               const at::Tensor& A_bank_, const at::Tensor& B_bank_, const RowPlan& plan_,
               double scale, bool need_dx_, bool need_dA_, bool need_dB_, int64_t blocks_per_part)
      : plan(plan_),
        n(x.size(0)),
        d_in(x.size(1)),
        d_out(grad.size(1)),
        G(A_bank_.dim() == 3 ? A_bank_.size(0) : 1),
        r(A_bank_.size(-2)),
        need_dx(need_dx_),
        need_dA(need_dA_),
        need_dB(need_dB_),
        w(A_bank_, B_bank_),
        dx(need_dx_ ? cpu::empty_output({n, d_in}, x.options())
                    : cpu::empty_cpu({0}, x.scalar_type())),
        gp(grad.data_ptr<T>()),
        xp(x.data_ptr<T>()),
        dxp(need_dx_ ? dx.data_ptr<T>() : nullptr),
        tp(t.data_ptr<float>()),
        ldg(grad.stride(0)),
        ldx(x.stride(0)),
        s(static_cast<float>(scale)),
        blocks(static_cast<int64_t>(plan_.blocks.size())),
        part_a(need_dA_ ? r * d_in : 0),
        part_b(need_dB_ ? r * d_out : 0),
        per_part(G * (part_a + part_b)),
        threads(at::get_num_threads()),
        parts(partial_parts(blocks, per_part, blocks_per_part, threads)),
        partials(parts * per_part),
        A_bank(A_bank_),
        B_bank(B_bank_) {}

  template <typename MakeState, typename Body>
  void run(MakeState&& make_state, Body&& body) {
    dynamic_for(parts, 1, threads, [&](auto&& next_chunk) {
      auto state = make_state();
      int64_t first_part, end_part;
      while (next_chunk(first_part, end_part))
        for (int64_t part = first_part; part < end_part; ++part) {
          float* mine = partials.data + part * per_part;
          std::fill(mine, mine + per_part, 0.f);
          const int64_t part_begin = blocks * part / parts, part_end = blocks * (part + 1) / parts;
          for (int64_t blk = part_begin; blk < part_end; ++blk) {
            const RowPlan::Block& block = plan.blocks[blk];
            if (block.adapter < 0) {  // no adapter: no gradient through x
              if (need_dx)
                for (int64_t b = 0; b < block.rows; ++b) {
                  const int64_t row = plan.row(block.start + b);
                  std::fill(dxp + row * d_in, dxp + (row + 1) * d_in, T(0));
                }
              continue;
            }
            float* pa = mine + block.adapter * (part_a + part_b);
            body(state, blk, part_begin, part_end, pa, pa + part_a);
          }
        }
    });
  }

  // Into L2 while block blk computes: the next block's grad rows, and its x rows (x_rows: where
  // the plan reads them) and dx rows (dx_rows: unless written non-temporally), as
  // ForwardPass::prefetch_next.
  void prefetch_next(cpu::Prefetch& pf, int64_t blk, bool x_rows, bool dx_rows) const {
    pf.clear();
    prefetch_rows(pf, plan, blk + 1, gp, ldg, d_out);
    if (x_rows) prefetch_rows(pf, plan, blk + 1, xp, ldx, d_in);
    if (dx_rows) prefetch_rows(pf, plan, blk + 1, dxp, d_in, d_in);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish() {
    auto [dA, dB] =
        weight_grads(partials.data, parts, G, r, d_in, d_out, s, A_bank, B_bank, need_dA, need_dB);
    return {dx, dA, dB};
  }
};

bool bf16_kernels(const at::Tensor& x, const at::Tensor& A_bank, const at::Tensor& B_bank);
std::tuple<at::Tensor, at::Tensor> forward_bf16(const at::Tensor& x, const at::Tensor& layer_out,
                                                const at::Tensor& A_bank, const at::Tensor& B_bank,
                                                const RowPlan& plan, double scale,
                                                const DropoutParams& dp);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const RowPlan& plan, double scale, const DropoutParams& dp,
    bool need_dx, bool need_dA, bool need_dB);

template <typename T>
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& layer_out,
                                                const at::Tensor& A_bank, const at::Tensor& B_bank,
                                                const RowPlan& plan, double scale,
                                                const DropoutParams& dp) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (bf16_kernels(x, A_bank, B_bank))
      return forward_bf16(x, layer_out, A_bank, B_bank, plan, scale, dp);
  ForwardPass<T> fp(x, layer_out, A_bank, plan, scale);
  const int64_t d_in = fp.d_in, d_out = fp.d_out, r = fp.r;
  const PackedWeights w(A_bank, B_bank);
  const bool stream = std::is_same_v<T, float> && streams(fp.out);
  struct State {
    Scratch xs, mask, ys, zero;
    std::vector<float> tbuf, coef;
    const float* xrows[kRows];
    const float* lrows[kRows];
    float* orows[kRows];
    cpu::Prefetch pf;
    int64_t idx[kRows];
    State(int64_t d_in, int64_t d_out, int64_t r)
        : xs(d_in, kRows),
          mask(d_in, kRows),
          ys(d_out, kRows),
          zero(std::max(d_in, d_out), 1),
          tbuf(kRows * r, 0.f),
          coef(kRows * r, 0.f) {}
  };
  // Chunks of at least grain_blocks, about 16 per thread.
  const int64_t chunk =
      std::max(grain_blocks(r, d_in + d_out), fp.blocks / (16 * at::get_num_threads()));
  fp.run(
      chunk, [&] { return State(d_in, d_out, r); },
      [&](State& st, int64_t blk) {
        const RowPlan::Block& block = plan.blocks[blk];
        const int nb = block.rows;
        const int64_t* idx = st.idx;
        for (int b = 0; b < nb; ++b) st.idx[b] = plan.row(block.start + b);
        float_rows(fp.lop, fp.ldl, idx, nb, d_out, st.ys, st.zero.row(0), st.lrows);
        dropped_rows(fp.xp, fp.ldx, idx, nb, d_in, dp, st.xs, st.mask, st.zero.row(0), st.xrows);
        fp.prefetch_next(st.pf, blk, /*out_rows=*/!stream);
        dot_rows(w.A(block.adapter, r, d_in), r, d_in, st.xrows, nb, st.tbuf.data(), &st.pf);
        for (int b = 0; b < nb; ++b)
          for (int64_t k = 0; k < r; ++k) fp.tp[idx[b] * r + k] = st.tbuf[b * r + k];
        for (int64_t q = 0; q < kRows * r; ++q) st.coef[q] = fp.s * st.tbuf[q];
        for (int b = 0; b < kRows; ++b) {
          if constexpr (std::is_same_v<T, float>) {
            st.orows[b] = b < nb ? fp.outp + idx[b] * d_out : st.ys.row(b);
          } else {
            st.orows[b] = st.ys.row(b);
          }
        }
        combine_rows(w.Bt(block.adapter, r, d_out), r, d_out, st.coef.data(), st.lrows, nullptr, nb,
                     st.orows, &st.pf, stream);
        if constexpr (!std::is_same_v<T, float>) {
          for (int b = 0; b < nb; ++b) narrow(st.ys.row(b), fp.outp + idx[b] * d_out, d_out);
        }
      });
  return fp.finish();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const RowPlan& plan, double scale, const DropoutParams& dp,
    bool need_dx, bool need_dA, bool need_dB) {
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (bf16_kernels(x, A_bank, B_bank))
      return backward_bf16(grad, x, t, A_bank, B_bank, plan, scale, dp, need_dx, need_dA, need_dB);
  BackwardPass<T> bp(grad, x, t, A_bank, B_bank, plan, scale, need_dx, need_dA, need_dB,
                     kBlocksPerPart);
  const int64_t d_in = bp.d_in, d_out = bp.d_out, r = bp.r;
  const bool stream = need_dx && streams(bp.dx);

  // The weight-gradient sums run over two blocks at once where they can (two consecutive full
  // blocks of one adapter in one part): the first block's rows and coefficients wait in slot 0
  // while the second's fill slot 1, then one accumulate_outer call takes the 2 * kRows rows.
  // That loads and stores the r x d partial sums once per 16 rows instead of 8. Measured (one
  // core, AVX-512, backward): n=8192 d=768 r=64 34.6 -> 32.5 ms, r=16 9.9 -> 9.1 ms,
  // n=2048 d=4096 r=64 57.1 -> 53.5 ms.
  struct State {
    Scratch gs[2], xs[2], mask, dxs, zero;
    std::vector<float> u, tcoef, ucoef;
    cpu::Prefetch pf;
    const float* grows[2 * kRows];
    const float* xrows[2 * kRows];
    float* dxrows[kRows];
    int64_t idx[kRows];
    int held = 0;  // 1: a block's rows wait in slot 0
    State(int64_t d_in, int64_t d_out, int64_t r)
        : gs{Scratch(d_out, kRows), Scratch(d_out, kRows)},
          xs{Scratch(d_in, kRows), Scratch(d_in, kRows)},
          mask(d_in, kRows),
          dxs(d_in, kRows),
          zero(std::max(d_in, d_out), 1),
          u(kRows * r),
          tcoef(2 * kRows * r),
          ucoef(2 * kRows * r) {}
  };
  bp.run(
      [&] { return State(d_in, d_out, r); },
      [&](State& st, int64_t blk, int64_t part_begin, int64_t part_end, float* pa, float* pb) {
        const RowPlan::Block& block = plan.blocks[blk];
        const int nb = block.rows;
        if (blk == part_begin) st.held = 0;
        for (int b = 0; b < nb; ++b) st.idx[b] = plan.row(block.start + b);
        const int64_t* idx = st.idx;
        const int h = st.held;
        const float** gr = st.grows + h * kRows;
        const float** xr = st.xrows + h * kRows;
        float* tc = st.tcoef.data() + h * kRows * r;
        float* uc = st.ucoef.data() + h * kRows * r;
        float_rows(bp.gp, bp.ldg, idx, nb, d_out, st.gs[h], st.zero.row(0), gr);
        bp.prefetch_next(st.pf, blk, /*x_rows=*/need_dA || need_dx, /*dx_rows=*/need_dx && !stream);
        const bool need_u = need_dA || need_dx;  // dB alone sums t and g
        if (need_u)
          dot_rows(bp.w.Bt(block.adapter, r, d_out), r, d_out, gr, nb, st.u.data(),
                   &st.pf);  // u = g B
        for (int b = 0; b < kRows; ++b)
          for (int64_t k = 0; k < r; ++k) {
            tc[b * r + k] = b < nb ? bp.tp[idx[b] * r + k] : 0.f;
            uc[b * r + k] = b < nb && need_u ? bp.s * st.u[b * r + k] : 0.f;
          }
        if (need_dA || need_dx)
          dropped_rows(bp.xp, bp.ldx, idx, nb, d_in, dp, st.xs[h], st.mask, st.zero.row(0), xr);
        if (need_dx) {  // dx = s (u A) * mask; fp32: straight into dx, else narrowed
          constexpr bool direct = std::is_same_v<T, float>;
          const float* mrows[kRows];
          for (int b = 0; b < kRows; ++b) {
            st.dxrows[b] =
                direct && b < nb ? reinterpret_cast<float*>(bp.dxp + idx[b] * d_in) : st.dxs.row(b);
            mrows[b] = st.mask.row(b);
          }
          combine_rows(bp.w.A(block.adapter, r, d_in), r, d_in, uc, nullptr,
                       dp.enabled ? mrows : nullptr, nb, st.dxrows, &st.pf, direct && stream);
          if constexpr (!direct)
            for (int b = 0; b < nb; ++b) narrow(st.dxrows[b], bp.dxp + idx[b] * d_in, d_in);
        }
        if (!need_dA && !need_dB) return;
        if (h == 0 && nb == kRows && blk + 1 < part_end &&
            plan.blocks[blk + 1].adapter == block.adapter) {
          st.held = 1;
          return;
        }
        const int rows = h * kRows + nb;
        if (need_dB)  // dB.T += t.T g
          accumulate_outer(pb, r, d_out, st.tcoef.data(), st.grows, rows, &st.pf);
        if (need_dA)  // dA += s u.T xd
          accumulate_outer(pa, r, d_in, st.ucoef.data(), st.xrows, rows, &st.pf);
        st.held = 0;
      });
  return bp.finish();
}

// ---- bf16 activations and weights on CPUs with native bf16 products (csrc/cpu/bf16_products.h)
// The fused single pass of forward_impl / backward_impl with the products in bf16 (fp32 sums):
// x and grad rows are read as bf16 in place (dropout(x) is rounded to bf16 as eager's is), t is
// saved in fp32 as on every path, and t, u and their scaled copies are rounded to bf16 where
// they feed a product, as eager's bf16 tensors are. The weight-gradient partial sums, their
// parts and dA / dB are the other plans' (BackwardPass, weight_grads).

// Whether a call takes it: bf16 activations and weights, and the kernels run on this CPU.
bool bf16_kernels(const at::Tensor& x, const at::Tensor& A_bank, const at::Tensor& B_bank) {
  return x.scalar_type() == at::kBFloat16 && A_bank.scalar_type() == at::kBFloat16 &&
         B_bank.scalar_type() == at::kBFloat16 && cpu::bf16_dot();
}

// The weights as the bf16 kernels read them: for the forward A (G, r, d_in) and B^T as rank
// pairs (cpu::pack_rank_pairs; y sums over the ranks), for the backward B^T (G, r, d_out) and A
// as rank pairs (dx sums over the ranks). Rows are lda = bf16_row_stride(d_in) and ldb =
// bf16_row_stride(d_out) elements apart (A in place where lda == d_in). B^T is transposed with
// transpose_into, as the fp32 kernels' PackedWeights does.
struct Bf16Weights {
  int64_t r, d_in, d_out, pairs, lda, ldb;
  at::Tensor A;  // contiguous
  std::vector<at::BFloat16> a16, bt;
  std::vector<uint32_t> a_pairs, bt_pairs;
  Bf16Weights(const at::Tensor& A_bank, const at::Tensor& B_bank, bool forward)
      : r(A_bank.size(-2)),
        d_in(A_bank.size(-1)),
        d_out(B_bank.size(-2)),
        pairs((r + 1) / 2),
        lda(cpu::bf16_row_stride(d_in)),
        ldb(cpu::bf16_row_stride(d_out)),
        A(A_bank.contiguous()) {
    const at::Tensor B = B_bank.contiguous();
    const int64_t G = A.dim() == 3 ? A.size(0) : 1;
    std::vector<at::BFloat16> dense(G * r * d_out);  // B^T, rows of d_out
    for (int64_t g = 0; g < G; ++g)
      transpose_into(B.data_ptr<at::BFloat16>() + g * d_out * r, d_out, r, 1.f,
                     dense.data() + g * r * d_out);
    const auto* a = reinterpret_cast<const uint16_t*>(A.data_ptr<at::BFloat16>());
    const auto* b = reinterpret_cast<const uint16_t*>(dense.data());
    if (forward) {
      bt_pairs.resize(G * pairs * ldb);
      for (int64_t g = 0; g < G; ++g)
        cpu::pack_rank_pairs(b + g * r * d_out, r, d_out, bt_pairs.data() + g * pairs * ldb, ldb);
      if (lda != d_in) a16 = strided(A.data_ptr<at::BFloat16>(), G * r, d_in, lda);
    } else {
      bt = ldb == d_out ? std::move(dense) : strided(dense.data(), G * r, d_out, ldb);
      a_pairs.resize(G * pairs * lda);
      for (int64_t g = 0; g < G; ++g)
        cpu::pack_rank_pairs(a + g * r * d_in, r, d_in, a_pairs.data() + g * pairs * lda, lda);
    }
  }
  // `rows` rows of d elements, ld apart.
  static std::vector<at::BFloat16> strided(const at::BFloat16* src, int64_t rows, int64_t d,
                                           int64_t ld) {
    std::vector<at::BFloat16> out(rows * ld);
    for (int64_t i = 0; i < rows; ++i)
      std::copy(src + i * d, src + (i + 1) * d, out.data() + i * ld);
    return out;
  }
  const uint16_t* A_(int64_t g) const {
    const at::BFloat16* base = a16.empty() ? A.data_ptr<at::BFloat16>() : a16.data();
    return reinterpret_cast<const uint16_t*>(base) + g * r * lda;
  }
  const uint16_t* Bt(int64_t g) const {
    return reinterpret_cast<const uint16_t*>(bt.data()) + g * r * ldb;
  }
  const uint32_t* A_pairs(int64_t g) const { return a_pairs.data() + g * pairs * lda; }
  const uint32_t* Bt_pairs(int64_t g) const { return bt_pairs.data() + g * pairs * ldb; }
};

// cp[b * pairs + k / 2] = (c(b, k), c(b, k + 1)) for b < nb (0 past r), 0 for the other rows of
// the block: the coefficients of a product summed over the ranks.
template <typename C>
void rank_pair_coefs(int nb, int64_t r, C&& c, uint32_t* cp) {
  const int64_t pairs = (r + 1) / 2;
  for (int b = 0; b < kRows; ++b)
    for (int64_t k = 0; k < r; k += 2)
      cp[b * pairs + k / 2] = b < nb ? cpu::bf16_pair(c(b, k), k + 1 < r ? c(b, k + 1) : 0.f) : 0u;
}

// The row pairs of a product summed over the rows: rp[q] = (rows[2q], rows[2q + 1]) interleaved
// and cp[q * r + k] = (c(2q, k), c(2q + 1, k)), for the (nb + 1) / 2 pairs (an odd last row with
// zeros); rp[q] = scratch + q * bf16_row_stride(d). Returns the number of pairs.
template <typename C>
int row_pairs(int nb, int64_t r, int64_t d, const uint16_t* const* rows, C&& c, uint32_t* scratch,
              const uint32_t** rp, uint32_t* cp) {
  const int pairs = (nb + 1) / 2;
  const int64_t ld = cpu::bf16_row_stride(d);
  for (int q = 0; q < pairs; ++q) {
    const bool two = 2 * q + 1 < nb;
    cpu::interleave_rows(rows[2 * q], two ? rows[2 * q + 1] : nullptr, d, scratch + q * ld);
    rp[q] = scratch + q * ld;
    for (int64_t k = 0; k < r; ++k)
      cp[q * r + k] = cpu::bf16_pair(c(2 * q, k), two ? c(2 * q + 1, k) : 0.f);
  }
  return pairs;
}

// Rows idx[0..nb) of x as bf16 (dropout(x) rounded to bf16 in one pass, cpu::dropout_bf16, the
// mask rows into `mask`; x16's rows bf16_row_stride(d) apart; without dropout x's own rows),
// `zero` for the rest of the block.
void bf16_x_rows(const at::BFloat16* x, int64_t ld, const int64_t* idx, int nb, int64_t d,
                 const DropoutParams& dp, Scratch& mask, uint16_t* x16, const uint16_t* zero,
                 const uint16_t* rows[kRows]) {
  for (int b = 0; b < kRows; ++b) {
    if (b >= nb) {
      rows[b] = zero;
      continue;
    }
    const auto* row = reinterpret_cast<const uint16_t*>(x + idx[b] * ld);
    if (!dp.enabled) {
      rows[b] = row;
    } else {
      cpu::draw_dropout_row(idx[b], d, dp, mask.row(b));
      uint16_t* dst = x16 + b * cpu::bf16_row_stride(d);
      cpu::dropout_bf16(row, mask.row(b), d, dst);
      rows[b] = dst;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward_bf16(const at::Tensor& x, const at::Tensor& layer_out,
                                                const at::Tensor& A_bank, const at::Tensor& B_bank,
                                                const RowPlan& plan, double scale,
                                                const DropoutParams& dp) {
  ForwardPass<at::BFloat16> fp(x, layer_out, A_bank, plan, scale);
  const int64_t d_in = fp.d_in, d_out = fp.d_out, r = fp.r;
  const Bf16Weights w(A_bank, B_bank, /*forward=*/true);
  const auto* lop16 = reinterpret_cast<const uint16_t*>(fp.lop);
  auto* outp16 = reinterpret_cast<uint16_t*>(fp.outp);
  struct State {
    Scratch mask;
    std::vector<uint16_t> x16, zero16;
    std::vector<float> tbuf;
    std::vector<uint32_t> cp;
    const uint16_t* xrows[kRows];
    const uint16_t* lrows[kRows];
    uint16_t* orows[kRows];
    cpu::Prefetch pf;
    int64_t idx[kRows];
    State(int64_t d_in, int64_t r, int64_t pairs)
        : mask(d_in, kRows),
          x16(kRows * cpu::bf16_row_stride(d_in)),
          zero16(d_in, 0),
          tbuf(kRows * r),
          cp(kRows * pairs) {}
  };
  const int64_t chunk =
      std::max(grain_blocks(r, d_in + d_out), fp.blocks / (16 * at::get_num_threads()));
  fp.run(
      chunk, [&] { return State(d_in, r, w.pairs); },
      [&](State& st, int64_t blk) {
        const RowPlan::Block& block = plan.blocks[blk];
        const int nb = block.rows;
        const int64_t* idx = st.idx;
        for (int b = 0; b < nb; ++b) st.idx[b] = plan.row(block.start + b);
        bf16_x_rows(fp.xp, fp.ldx, idx, nb, d_in, dp, st.mask, st.x16.data(), st.zero16.data(),
                    st.xrows);
        fp.prefetch_next(st.pf, blk, /*out_rows=*/true);
        cpu::dot_rows_bf16(w.A_(block.adapter), w.lda, r, d_in, st.xrows, nb, st.tbuf.data(),
                           &st.pf);
        for (int b = 0; b < nb; ++b)
          std::copy(st.tbuf.data() + b * r, st.tbuf.data() + (b + 1) * r, fp.tp + idx[b] * r);
        rank_pair_coefs(
            nb, r, [&](int b, int64_t k) { return fp.s * st.tbuf[b * r + k]; }, st.cp.data());
        for (int b = 0; b < nb; ++b) {
          st.lrows[b] = lop16 + idx[b] * fp.ldl;
          st.orows[b] = outp16 + idx[b] * d_out;
        }
        cpu::combine_rows_bf16(w.Bt_pairs(block.adapter), w.ldb, r, d_out, st.cp.data(), st.lrows,
                               nullptr, nb, st.orows, &st.pf);
      });
  return fp.finish();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const RowPlan& plan, double scale, const DropoutParams& dp,
    bool need_dx, bool need_dA, bool need_dB) {
  using T = at::BFloat16;
  BackwardPass<T> bp(grad, x, t, A_bank, B_bank, plan, scale, need_dx, need_dA, need_dB,
                     kBlocksPerPart);
  const Bf16Weights w(A_bank, B_bank, /*forward=*/false);
  const int64_t d_in = bp.d_in, d_out = bp.d_out, r = bp.r;
  const auto* gp = reinterpret_cast<const uint16_t*>(bp.gp);
  // The weight-gradient sums take the row pairs of up to kSumBlocks consecutive blocks of one
  // adapter at once (buffered, then one accumulate_outer_bf16 call per gradient): each call loads
  // and stores the r x d partial sums once, so more rows per call is less of that traffic.
  constexpr int kSumBlocks = 4, kMaxPairs = kSumBlocks * kRows / 2;
  struct State {
    Scratch mask;
    std::vector<uint16_t> x16, zero16;
    std::vector<float> u;
    std::vector<uint32_t> ucp, t_cp, u_cp, g_pairs, x_pairs;
    const uint16_t* grows[kRows];
    const uint16_t* xrows[kRows];
    uint16_t* dxrows[kRows];
    const uint32_t* g_rp[kMaxPairs];
    const uint32_t* x_rp[kMaxPairs];
    cpu::Prefetch pf;
    int64_t idx[kRows];
    int pending = 0, pending_blocks = 0;  // row pairs and blocks buffered for the sums
    State(int64_t d_in, int64_t d_out, int64_t r)
        : mask(d_in, kRows),
          x16(kRows * cpu::bf16_row_stride(d_in)),
          zero16(std::max(d_in, d_out), 0),
          u(kRows * r),
          ucp(kRows * ((r + 1) / 2)),
          t_cp(kMaxPairs * r),
          u_cp(kMaxPairs * r),
          g_pairs(kMaxPairs * cpu::bf16_row_stride(d_out)),
          x_pairs(kMaxPairs * cpu::bf16_row_stride(d_in)) {}
  };
  bp.run([&] { return State(d_in, d_out, r); },
         [&](State& st, int64_t blk, int64_t part_begin, int64_t part_end, float* pa, float* pb) {
           const RowPlan::Block& block = plan.blocks[blk];
           const int nb = block.rows;
           const int64_t* idx = st.idx;
           if (blk == part_begin) st.pending = st.pending_blocks = 0;
           for (int b = 0; b < nb; ++b) st.idx[b] = plan.row(block.start + b);
           for (int b = 0; b < kRows; ++b)
             st.grows[b] = b < nb ? gp + idx[b] * bp.ldg : st.zero16.data();
           bp.prefetch_next(st.pf, blk, /*x_rows=*/need_dA, /*dx_rows=*/need_dx);
           if (need_dA || need_dx)  // u = g B (dB alone sums t and g)
             cpu::dot_rows_bf16(w.Bt(block.adapter), w.ldb, r, d_out, st.grows, nb, st.u.data(),
                                &st.pf);
           const float s = bp.s;
           if (need_dA)  // dropout(x) as bf16 rows (and the mask rows)
             bf16_x_rows(bp.xp, bp.ldx, idx, nb, d_in, dp, st.mask, st.x16.data(), st.zero16.data(),
                         st.xrows);
           else if (need_dx && dp.enabled)  // dx needs the mask alone
             for (int b = 0; b < nb; ++b) cpu::draw_dropout_row(idx[b], d_in, dp, st.mask.row(b));
           if (need_dx) {  // dx = s (u A) * mask, narrowed
             rank_pair_coefs(
                 nb, r, [&](int b, int64_t k) { return s * st.u[b * r + k]; }, st.ucp.data());
             const float* mrows[kRows];
             for (int b = 0; b < kRows; ++b) {
               st.dxrows[b] =
                   b < nb ? reinterpret_cast<uint16_t*>(bp.dxp + idx[b] * d_in) : nullptr;
               mrows[b] = st.mask.row(b);
             }
             cpu::combine_rows_bf16(w.A_pairs(block.adapter), w.lda, r, d_in, st.ucp.data(),
                                    nullptr, dp.enabled ? mrows : nullptr, nb, st.dxrows, &st.pf);
           }
           if (!need_dA && !need_dB) return;
           const int at = st.pending;
           int pairs = 0;
           if (need_dB)  // rows of g, coefficients t
             pairs = row_pairs(
                 nb, r, d_out, st.grows, [&](int b, int64_t k) { return bp.tp[idx[b] * r + k]; },
                 st.g_pairs.data() + at * w.ldb, st.g_rp + at, st.t_cp.data() + at * r);
           if (need_dA)  // rows of dropout(x), coefficients s u
             pairs = row_pairs(
                 nb, r, d_in, st.xrows, [&](int b, int64_t k) { return s * st.u[b * r + k]; },
                 st.x_pairs.data() + at * w.lda, st.x_rp + at, st.u_cp.data() + at * r);
           st.pending += pairs;
           ++st.pending_blocks;
           if (st.pending_blocks < kSumBlocks && blk + 1 < part_end &&
               plan.blocks[blk + 1].adapter == block.adapter)
             return;
           if (need_dB)  // dB.T += t.T g
             cpu::accumulate_outer_bf16(pb, r, d_out, st.t_cp.data(), st.g_rp, st.pending, &st.pf);
           if (need_dA)  // dA += s u.T xd
             cpu::accumulate_outer_bf16(pa, r, d_in, st.u_cp.data(), st.x_rp, st.pending, &st.pf);
           st.pending = st.pending_blocks = 0;
         });
  return bp.finish();
}

// (check_forward / check_backward, the argument checks, are ../lor2c_common.h's, shared with the
// CUDA binding.)
DropoutParams cpu_dropout_params(const at::Tensor& seed, double p) {
  (void)cpu::isa();  // a bad LOR2C_CPU_ISA is refused on every path, the GEMM path included
  return host_dropout_params(seed, p);
}

// ---- The GEMM path -----------------------------------------------------------------------------
// Where the fused pass loses to the eager expression for want of rows (its O(r * d) work per
// call, packing B and the weight-gradient buffers, outweighs the rows'), the plain op runs as
// ATen's fp32 matrix products instead, as the expression does, with the same contract: t saved
// in fp32, the mask of csrc/philox.h (drawn into an n x d_in tensor), outputs in the inputs'
// dtypes. The rule (plan_for) and its figures: lor2c_ops/backends.py (the cpu backend's plans).

enum class Plan { kFused, kGemm, kBlocked };

// LOR2C_CPU_PLAN=fused|gemm (read once) forces one, for tests and measurements.
int forced_plan() {
  static const int forced = [] {
    const char* env = std::getenv("LOR2C_CPU_PLAN");
    if (env == nullptr || std::strcmp(env, "auto") == 0 || env[0] == 0) return -1;
    if (std::strcmp(env, "fused") == 0) return static_cast<int>(Plan::kFused);
    if (std::strcmp(env, "gemm") == 0) return static_cast<int>(Plan::kGemm);
    if (std::strcmp(env, "blocked") == 0) return static_cast<int>(Plan::kBlocked);
    return -2;
  }();
  TORCH_CHECK(forced != -2, "LOR2C_CPU_PLAN: expected fused, gemm, blocked or auto");
  TORCH_CHECK(forced != static_cast<int>(Plan::kBlocked) || cpu::blas_missing() == nullptr,
              "LOR2C_CPU_PLAN=blocked: ", cpu::blas_missing());
  return forced;
}

// The plan of a plain call of n rows and rank r (the multi-adapter op is always fused): the GEMM
// path for one row, and below r rows from rank 32 on. Measured (fwd+bwd fp32, fused vs GEMM
// path, ms, AMD EPYC Zen 4, 2 threads): d=4096 r=64: n=1 1.33 vs 0.44, n=32 2.60 vs 2.07, n=64
// 3.05 vs 3.60; d=768 r=64: n=32 0.39 vs 0.34, n=64 0.49 vs 0.47, n=128 0.77 vs 0.78;
// d=4096 r=8: n=1 0.21 vs 0.17, n=2 0.21 vs 0.30; d=768 r=8: n=1 0.136 vs 0.134, n=2 0.136 vs
// 0.159. Full table: lor2c_ops/backends.py.
//
// On the baseline path (SSE2: 4 lanes, no FMA) the blocked plan from rank 16 on, whatever n
// (where the process has a BLAS; else the GEMM plan): the BLAS runs on the CPU's widest vectors
// whichever path the kernels take, and from rank 16 on its products beat the fused SSE2 loops.
// Measured (fwd+bwd fp32, one thread, CPU time, vs the eager expression, AMD EPYC Zen 4 with
// LOR2C_CPU_ISA=baseline; fused -> GEMM path): n=8192 d=768 r=16 0.99x -> 1.39x (p=0), 1.06x ->
// 1.07x (p=0.1); r=64 0.52x -> 1.34x, 0.67x -> 1.27x; n=2048 d=4096 r=64 0.39x -> 1.57x, 0.75x ->
// 1.20x; n=2048 d=768 r=16 0.83x -> 1.07x, 0.85x -> 0.94x. The blocked plan, same method, ms
// (fused / GEMM / blocked, load 3, +-15%): n=8192 d=768 r=16 p=0 42 / 35 / 26, r=64 146 / 67 /
// 63; n=2048 d=4096 r=16 69 / 65 / 48, r=64 271 / 118 / 108-140. Below rank 16 the fused loops
// win or tie: d=1024 r=4 29 vs 39 ms, r=8 45 vs 42 (fused vs blocked), and against the GEMM plan
// d=1024 r=8 3.90x vs 1.48x eager (p=0), 2.59x vs 1.09x (p=0.1). (Not measured on a CPU without
// AVX2, where the BLAS would run on SSE2 too.)
//
// On the AVX2 path the blocked plan from rank 64 on: there the BLAS's products (MKL's AVX2
// kernels on this AMD CPU, as on an AVX2-only one) beat the AVX2 register tiles (4 x 3, 16
// registers). Measured (fwd+bwd fp32, p=0, ms, fused vs blocked, LOR2C_CPU_ISA=avx2, AMD EPYC
// Zen 4, load 1.0-1.3; one thread, then two): n=8192 d=1024 r=64 114 vs 92, 92-126 vs 71-91;
// n=2048 d=4096 r=64 126 vs 102, 82-85 vs 76-87; n=8192 d=768 r=64 58-63 vs 62, 43-45 vs 44-46
// (a tie); below that it is mixed: r=48 d=1024 105 vs 97, d=768 47 vs 53; r=32 d=768 31 vs
// 38-45, d=1024 66 vs 59, n=2048 d=4096 83 vs 86; r=16 d=1024 41-51 vs 41. On the AVX-512 path
// the fused kernel stays ahead (n=8192 d=768 r=64 58 vs 64 ms, d=1024 81 vs 95, n=2048 d=4096
// 90 vs 101; the BLAS here is MKL's AVX2 code: on an Intel CPU it would run AVX-512, not
// measured). Confirmed on a real AVX2-only CPU (AMD EPYC Zen 3, MKL on AVX2 as well; fwd+bwd
// fp32, p=0, 2 threads, ms, blocked vs fused, two runs): n=8192 d=768 r=64 52 / 59 vs 70 / 63,
// r=96 64 / 59 vs 110 / 87, r=128 88 vs 133; d=1024 r=64 82 / 86 vs 126 / 109; r=32-48 no clear
// winner (d=768 r=32 52 / 30 vs 48 / 26; n=2048 d=4096 r=32 77 / 63 vs 80 / 77).
constexpr int64_t kBaselineBlockedMinRank = 16, kAvx2BlockedMinRank = 64;

// Whether the path in use wants the blocked plan at rank r (and the process has a BLAS).
bool blocked_rank(int64_t r) {
  if (cpu::blas_missing() != nullptr) return false;
  const cpu::Isa path = cpu::isa();
  return (path == cpu::Isa::kBaseline && r >= kBaselineBlockedMinRank) ||
         (path == cpu::Isa::kAvx2 && r >= kAvx2BlockedMinRank);
}

Plan plan_for(int64_t n, int64_t r) {
  const int forced = forced_plan();
  if (forced >= 0) return static_cast<Plan>(forced);
  if (n <= 1 || (r >= kGemmMinRank && n < r)) return Plan::kGemm;
  if (blocked_rank(r)) return Plan::kBlocked;
  if (cpu::isa() == cpu::Isa::kBaseline && r >= kBaselineBlockedMinRank) return Plan::kGemm;
  return Plan::kFused;
}

// A multi-adapter batch of n rows, G adapters, rank r: its blocks hold one adapter's rows,
// gathered into scratch (they are not consecutive), which costs the blocked plan more than a
// plain call. Measured (fwd+bwd fp32, p=0, d=768, G=8, random ids, one thread, ms, fused vs
// blocked, AMD EPYC Zen 4): baseline path r=16 n=16 0.33 vs 0.54, n=128 1.47 vs 0.90, n=1024
// 7.4 vs 5.7, n=8192 47-100 vs 40-90; r=64 n=16 1.5 vs 2.0, n=128 5.0 vs 4.2, n=1024 21.8 vs
// 12.3, n=8192 156 vs 78; AVX2 path r=64 n=16 1.8 vs 2.2, n=128 3.2 vs 4.8, n=1024 11.0 vs
// 12.3-12.6, n=4096 35.6 vs 39.8, n=8192 109 vs 78. So: the blocked plan on the baseline path
// from rank 16 with at least 16 rows per adapter on average, else the fused kernel (on AVX2 it
// wins only from about 1024 rows per adapter: not taken). There is no GEMM plan for banks.
// LOR2C_CPU_PLAN=blocked forces the blocked plan, =gemm leaves the fused kernel.
constexpr int64_t kMultiBlockedRowsPerAdapter = 16;

Plan multi_plan_for(int64_t n, int64_t G, int64_t r) {
  const int forced = forced_plan();
  if (forced == static_cast<int>(Plan::kBlocked)) return Plan::kBlocked;
  if (forced >= 0) return Plan::kFused;
  const bool wanted = cpu::isa() == cpu::Isa::kBaseline && r >= kBaselineBlockedMinRank &&
                      n >= kMultiBlockedRowsPerAdapter * G && cpu::blas_missing() == nullptr;
  return wanted ? Plan::kBlocked : Plan::kFused;
}

std::string plan_name(Plan plan) {
  switch (plan) {
    case Plan::kGemm:
      return "gemm";
    case Plan::kBlocked:
      return "blocked";
    default:
      return "fused";
  }
}

std::string cpu_lor2c_plan(int64_t n, int64_t r) { return plan_name(plan_for(n, r)); }

std::string cpu_lor2c_multi_plan(int64_t n, int64_t G, int64_t r) {
  return plan_name(multi_plan_for(n, G, r));
}

// The dropout multiplier of rows 0..n-1, (n, d) in dtype.
at::Tensor mask_tensor(int64_t n, int64_t d, const DropoutParams& dp, at::ScalarType dtype) {
  const int64_t stride = cpu::mask_padded(d);
  at::Tensor m = at::empty({n, stride}, at::TensorOptions().dtype(at::kFloat));
  float* mp = m.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) cpu::draw_dropout_row(i, d, dp, mp + i * stride);
  });
  return m.narrow(1, 0, d).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> gemm_forward(const at::Tensor& x, const at::Tensor& layer_out,
                                                const at::Tensor& A, const at::Tensor& B,
                                                double scale, const DropoutParams& dp) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType ct = at::kFloat;
  at::Tensor xd = x.to(ct);
  if (dp.enabled) xd = xd * mask_tensor(x.size(0), x.size(1), dp, ct);
  const at::Tensor t = at::mm(xd, A.to(ct).t());
  const at::Tensor out = at::addmm(layer_out.to(ct), t, B.to(ct).t(), 1.0, scale);
  return {out.to(layer_out.scalar_type()), t.to(at::kFloat)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A,
    const at::Tensor& B, double scale, const DropoutParams& dp, bool need_dx, bool need_dA,
    bool need_dB) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::ScalarType ct = at::kFloat;
  const at::Tensor g = grad.to(ct);
  at::Tensor dx = at::empty({0}, x.options()), dA = at::empty({0}, A.options());
  at::Tensor dB = at::empty({0}, B.options());
  if (need_dx || need_dA) {
    const at::Tensor u = at::mm(g, B.to(ct)).mul_(scale);  // s g B
    const at::Tensor mask = dp.enabled ? mask_tensor(x.size(0), x.size(1), dp, ct) : at::Tensor();
    if (need_dx) {
      at::Tensor d = at::mm(u, A.to(ct));
      if (dp.enabled) d.mul_(mask);
      dx = d.to(x.scalar_type());
    }
    if (need_dA) {
      at::Tensor xd = x.to(ct);
      if (dp.enabled) xd = xd * mask;
      dA = at::mm(u.t(), xd).to(A.scalar_type());
    }
  }
  if (need_dB) dB = at::mm(g.t(), t.to(ct)).mul_(scale).to(B.scalar_type());
  return {dx, dA, dB};
}

// ---- The blocked plan --------------------------------------------------------------------------
// One pass over blocks of rows, as the fused kernel, but a block is tens of rows and its rank-r
// products are BLAS calls (csrc/cpu/blas.h): t = xd A^T and s t B^T forward; u = s g B, u A,
// u^T xd and t^T g backward. The block's rows stay in L2 between the calls, so memory sees the
// n x d data once per direction, as in the fused kernel; the products run on the widest vectors
// the CPU has whichever instruction-set path the library's loops take. Where the plan is used:
// plan_for. Same contract as the other plans (t saved in fp32, the mask of csrc/philox.h, never
// stored).

// Rows per block: 128, fewer where the block's x (or g) and output rows in fp32 would pass 4 MiB
// (d_in + d_out > 8192), at least 16. Measured (fwd+bwd, one thread, LOR2C_CPU_ISA=baseline,
// AMD EPYC Zen 4, loaded: +-15%), ms for 16 / 32 / 64 / 128 / 256 rows: n=8192 d=768 r=16
// 27 / 35 / 27 / 28 / 30, r=64 81 / 70 / 63 / 68 / 64; n=2048 d=4096 r=16 44 / 44 / 46 / 45 /
// 46, r=64 152 / 109 / 121 / 108 / 100: the outer products (dA, dB) want many rows per call, the
// rest does not care. LOR2C_CPU_BLOCK_ROWS (read once) overrides it, for tuning.
int64_t blocked_rows(int64_t d_in, int64_t d_out) {
  static const int64_t forced = [] {
    const char* v = std::getenv("LOR2C_CPU_BLOCK_ROWS");
    return v == nullptr ? int64_t{0} : static_cast<int64_t>(std::atoll(v));
  }();
  if (forced > 0) return forced;
  constexpr int64_t kBlockBytes = int64_t{4} << 20;
  const int64_t rows = kBlockBytes / (int64_t{sizeof(float)} * std::max<int64_t>(1, d_in + d_out));
  return std::clamp<int64_t>(rows / 16 * 16, 16, 128);
}

// out = a + b (T: the activations' type); fp32 with `stream` and 16-byte alignment: non-temporal
// stores.
template <typename T>
void add_row(const T* a, const float* b, T* out, int64_t d, float* scratch, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(__SSE2__)
    if (stream && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      int64_t j = 0;
      for (; j + 4 <= d; j += 4)
        _mm_stream_ps(out + j, _mm_add_ps(_mm_loadu_ps(a + j), _mm_loadu_ps(b + j)));
      for (; j < d; ++j) out[j] = a[j] + b[j];
      return;
    }
#endif
    (void)scratch;
    for (int64_t j = 0; j < d; ++j) out[j] = a[j] + b[j];
  } else {
    (void)stream;
    cpu::widen(a, scratch, d);
    for (int64_t j = 0; j < d; ++j) scratch[j] += b[j];
    cpu::narrow(scratch, out, d);
  }
}

// out = a * m (m: the mask row, or nullptr for none), stored as T.
template <typename T>
void mul_row(const float* a, const float* m, T* out, int64_t d, float* scratch, bool stream) {
  if constexpr (std::is_same_v<T, float>) {
    (void)scratch;
#if defined(__SSE2__)
    if (stream && m != nullptr && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      int64_t j = 0;
      for (; j + 4 <= d; j += 4)
        _mm_stream_ps(out + j, _mm_mul_ps(_mm_loadu_ps(a + j), _mm_loadu_ps(m + j)));
      for (; j < d; ++j) out[j] = a[j] * m[j];
      return;
    }
#endif
    (void)stream;
    if (m == nullptr) {
      std::memcpy(out, a, d * sizeof(float));
    } else {
      cpu::multiply_into(out, a, m, d);
    }
  } else {
    (void)stream;
    if (m == nullptr) {
      cpu::narrow(a, out, d);
    } else {
      cpu::multiply_into(scratch, a, m, d);
      cpu::narrow(scratch, out, d);
    }
  }
}

// A thread's scratch operands for the BLAS calls, 64-byte aligned: the BLAS may pick its code
// path, and so its rounding, by its operands' alignment, and a malloc'd buffer's alignment
// changes from run to run; this keeps a call's results the same. Contents uninitialised.
class BlasScratch {
 public:
  explicit BlasScratch(int64_t count)
      : p_(count > 0
               ? static_cast<float*>(std::aligned_alloc(
                     64, static_cast<size_t>((count * int64_t{sizeof(float)} + 63) / 64 * 64)))
               : nullptr) {
    TORCH_CHECK(count <= 0 || p_ != nullptr, "out of memory for ", count, " floats of scratch");
  }
  ~BlasScratch() { std::free(p_); }
  BlasScratch(const BlasScratch&) = delete;
  BlasScratch& operator=(const BlasScratch&) = delete;
  float* data() const { return p_; }

 private:
  float* p_;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> blocked_forward(const at::Tensor& x, const at::Tensor& layer_out,
                                                   const at::Tensor& A_bank,
                                                   const at::Tensor& B_bank, const RowPlan& plan,
                                                   double scale, const DropoutParams& dp) {
  ForwardPass<T> fp(x, layer_out, A_bank, plan, scale);
  const int64_t d_in = fp.d_in, d_out = fp.d_out, r = fp.r;
  const PackedWeights w(A_bank, B_bank);
  const T* xp = fp.xp;
  const T* lop = fp.lop;
  T* outp = fp.outp;
  float* tp = fp.tp;
  const int64_t ldx = fp.ldx, ldl = fp.ldl;
  const int64_t rows = blocked_rows(d_in, d_out);
  // In place where the block's rows are consecutive rows of the tensors: x (fp32, no dropout) and
  // t.
  const bool in_order = plan.order.empty();
  const bool x_direct = in_order && std::is_same_v<T, float> && !dp.enabled;
  const bool stream = std::is_same_v<T, float> && streams(fp.out);
  struct State {
    BlasScratch xs, ys, ts;
    std::vector<float> mask, row_scratch;
  };
  fp.run(
      1,
      [&] {
        return State{BlasScratch(x_direct ? 0 : rows * d_in), BlasScratch(rows * d_out),
                     BlasScratch(in_order ? 0 : rows * r),
                     std::vector<float>(cpu::mask_padded(d_in)),
                     std::vector<float>(std::max(d_in, d_out))};
      },
      [&](State& st, int64_t blk) {
        const RowPlan::Block& block = plan.blocks[blk];
        const int64_t nb = block.rows;
        auto row = [&](int64_t b) { return plan.row(block.start + b); };
        const float* xb = nullptr;
        int64_t ldxb = d_in;
        if constexpr (std::is_same_v<T, float>) {
          xb = xp + block.start * ldx;
          ldxb = ldx;
        }
        if (!x_direct) {
          for (int64_t b = 0; b < nb; ++b)
            cpu::dropped_row(xp + row(b) * ldx, row(b), d_in, dp, st.mask.data(),
                             st.xs.data() + b * d_in);
          xb = st.xs.data();
          ldxb = d_in;
        }
        float* tb = in_order ? tp + block.start * r : st.ts.data();
        cpu::gemm_rows(false, true, nb, r, d_in, 1.f, xb, ldxb, w.A(block.adapter, r, d_in), d_in,
                       0.f, tb, r);
        if (!in_order)
          for (int64_t b = 0; b < nb; ++b) std::copy(tb + b * r, tb + (b + 1) * r, tp + row(b) * r);
        cpu::gemm_rows(false, false, nb, d_out, r, fp.s, tb, r, w.Bt(block.adapter, r, d_out),
                       d_out, 0.f, st.ys.data(), d_out);
        for (int64_t b = 0; b < nb; ++b)
          add_row(lop + row(b) * ldl, st.ys.data() + b * d_out, outp + row(b) * d_out, d_out,
                  st.row_scratch.data(), stream);
      });
  if (stream) cpu::stream_fence();
  return fp.finish();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> blocked_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const RowPlan& plan, double scale, const DropoutParams& dp,
    bool need_dx, bool need_dA, bool need_dB) {
  BackwardPass<T> bp(grad, x, t, A_bank, B_bank, plan, scale, need_dx, need_dA, need_dB, 1);
  const int64_t d_in = bp.d_in, d_out = bp.d_out, r = bp.r;
  const T* gp = bp.gp;
  const T* xp = bp.xp;
  T* dxp = bp.dxp;
  const float* tp = bp.tp;
  const int64_t ldg = bp.ldg, ldx = bp.ldx;
  const int64_t rows = blocked_rows(d_in, d_out);
  constexpr bool is_float = std::is_same_v<T, float>;
  const bool stream = need_dx && is_float && streams(bp.dx);
  // In place where the block's rows are consecutive rows of the tensors (g, t, x and dx in fp32;
  // x without dropout). x rows are read for dA only: with dropout dx needs the mask alone.
  const bool in_order = plan.order.empty();
  const bool g_direct = in_order && is_float, x_direct = g_direct && !dp.enabled;
  const bool masks = dp.enabled && (need_dx || need_dA);
  const int64_t mstride = cpu::mask_padded(d_in);

  struct State {
    BlasScratch gs, u, ts, xs, dxs;
    std::vector<float> mask, row_scratch;
  };
  bp.run(
      [&] {
        return State{BlasScratch(g_direct ? 0 : rows * d_out),
                     BlasScratch(rows * r),
                     BlasScratch(in_order ? 0 : rows * r),
                     BlasScratch(need_dA && !x_direct ? rows * d_in : 0),
                     BlasScratch(need_dx ? rows * d_in : 0),
                     std::vector<float>(masks ? rows * mstride : 0),
                     std::vector<float>(d_in)};
      },
      [&](State& st, int64_t blk, int64_t, int64_t, float* pa, float* pb) {
        const RowPlan::Block& block = plan.blocks[blk];
        const int64_t nb = block.rows;
        auto row = [&](int64_t b) { return plan.row(block.start + b); };
        float* mask = st.mask.data();
        const float* gb = nullptr;
        int64_t ldgb = d_out;
        if constexpr (is_float) {
          gb = gp + block.start * ldg;
          ldgb = ldg;
        }
        if (!g_direct) {
          for (int64_t b = 0; b < nb; ++b)
            cpu::widen(gp + row(b) * ldg, st.gs.data() + b * d_out, d_out);
          gb = st.gs.data();
          ldgb = d_out;
        }
        // u = s g B (B^T packed as r x d_out); dB alone sums t and g
        if (need_dA || need_dx)
          cpu::gemm_rows(false, true, nb, r, d_out, bp.s, gb, ldgb,
                         bp.w.Bt(block.adapter, r, d_out), d_out, 0.f, st.u.data(), r);
        const float* xb = nullptr;
        int64_t ldxb = d_in;
        if (need_dA) {
          if constexpr (is_float) {
            xb = xp + block.start * ldx;
            ldxb = ldx;
          }
          if (!x_direct) {
            for (int64_t b = 0; b < nb; ++b)
              cpu::dropped_row(xp + row(b) * ldx, row(b), d_in, dp, mask + b * mstride,
                               st.xs.data() + b * d_in);
            xb = st.xs.data();
            ldxb = d_in;
          }
        } else if (masks) {
          for (int64_t b = 0; b < nb; ++b)
            cpu::draw_dropout_row(row(b), d_in, dp, mask + b * mstride);
        }
        const float* a = bp.w.A(block.adapter, r, d_in);
        if (need_dx) {  // dx = (u A) * mask
          if (g_direct && !dp.enabled) {
            cpu::gemm_rows(false, false, nb, d_in, r, 1.f, st.u.data(), r, a, d_in, 0.f,
                           reinterpret_cast<float*>(dxp) + block.start * d_in, d_in);
          } else {
            cpu::gemm_rows(false, false, nb, d_in, r, 1.f, st.u.data(), r, a, d_in, 0.f,
                           st.dxs.data(), d_in);
            for (int64_t b = 0; b < nb; ++b)
              mul_row(st.dxs.data() + b * d_in, masks ? mask + b * mstride : nullptr,
                      dxp + row(b) * d_in, d_in, st.row_scratch.data(), stream);
          }
        }
        if (need_dA)  // dA += u^T xd
          cpu::gemm_rows(true, false, r, d_in, nb, 1.f, st.u.data(), r, xb, ldxb, 1.f, pa, d_in);
        if (need_dB) {  // dB^T += t^T g
          const float* tb = tp + block.start * r;
          if (!in_order) {
            for (int64_t b = 0; b < nb; ++b)
              std::copy(tp + row(b) * r, tp + (row(b) + 1) * r, st.ts.data() + b * r);
            tb = st.ts.data();
          }
          cpu::gemm_rows(true, false, r, d_out, nb, 1.f, tb, r, gb, ldgb, 1.f, pb, d_out);
        }
      });
  if (stream) cpu::stream_fence();
  return bp.finish();
}

std::tuple<at::Tensor, at::Tensor> lor2c_fwd_cpu(const at::Tensor& x, const at::Tensor& layer_out,
                                                 const at::Tensor& A, const at::Tensor& B,
                                                 double scale, double p, const at::Tensor& seed) {
  check_forward(x, layer_out, A, B, seed, p);
  const DropoutParams dp = cpu_dropout_params(seed, p);
  const Plan how = plan_for(x.size(0), A.size(0));
  if (how == Plan::kGemm) return gemm_forward(x, layer_out, A, B, scale, dp);
  if (how == Plan::kBlocked) {
    const RowPlan plan = RowPlan::single(x.size(0), blocked_rows(x.size(1), layer_out.size(1)));
    return dispatch_activation(x, [&](auto tag) {
      return blocked_forward<decltype(tag)>(x, layer_out, A, B, plan, scale, dp);
    });
  }
  const RowPlan plan = RowPlan::single(x.size(0));
  return dispatch_activation(x, [&](auto tag) {
    return forward_impl<decltype(tag)>(x, layer_out, A, B, plan, scale, dp);  // a bank of one
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lor2c_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A,
    const at::Tensor& B, double scale, double p, const at::Tensor& seed, bool need_dx, bool need_dA,
    bool need_dB) {
  check_backward(grad, x, t, A, B, seed, p);
  const DropoutParams dp = cpu_dropout_params(seed, p);
  const Plan how = plan_for(x.size(0), A.size(0));
  if (how == Plan::kGemm)
    return gemm_backward(grad, x, t, A, B, scale, dp, need_dx, need_dA, need_dB);
  if (how == Plan::kBlocked) {
    const RowPlan plan = RowPlan::single(x.size(0), blocked_rows(x.size(1), grad.size(1)));
    return dispatch_activation(x, [&](auto tag) {
      return blocked_backward<decltype(tag)>(grad, x, t, A, B, plan, scale, dp, need_dx, need_dA,
                                             need_dB);
    });
  }
  const RowPlan plan = RowPlan::single(x.size(0));
  return dispatch_activation(x, [&](auto tag) {  // a bank of one: dA, dB come back 2-D
    return backward_impl<decltype(tag)>(grad, x, t, A, B, plan, scale, dp, need_dx, need_dA,
                                        need_dB);
  });
}

std::tuple<at::Tensor, at::Tensor> lor2c_multi_fwd_cpu(const at::Tensor& x,
                                                       const at::Tensor& layer_out,
                                                       const at::Tensor& A_bank,
                                                       const at::Tensor& B_bank,
                                                       const at::Tensor& ids, double scale,
                                                       double p, const at::Tensor& seed) {
  check_banks(A_bank, B_bank, ids, x.size(0));
  check_forward(x, layer_out, A_bank[0], B_bank[0], seed, p);
  const DropoutParams dp = cpu_dropout_params(seed, p);
  if (multi_plan_for(x.size(0), A_bank.size(0), A_bank.size(-2)) == Plan::kBlocked) {
    const RowPlan plan =
        RowPlan::grouped(ids, A_bank.size(0), blocked_rows(x.size(1), layer_out.size(1)));
    return dispatch_activation(x, [&](auto tag) {
      return blocked_forward<decltype(tag)>(x, layer_out, A_bank, B_bank, plan, scale, dp);
    });
  }
  const RowPlan plan = RowPlan::grouped(ids, A_bank.size(0));
  return dispatch_activation(x, [&](auto tag) {
    return forward_impl<decltype(tag)>(x, layer_out, A_bank, B_bank, plan, scale, dp);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lor2c_multi_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& t, const at::Tensor& A_bank,
    const at::Tensor& B_bank, const at::Tensor& ids, double scale, double p, const at::Tensor& seed,
    bool need_dx, bool need_dA, bool need_dB) {
  check_banks(A_bank, B_bank, ids, x.size(0));
  check_backward(grad, x, t, A_bank[0], B_bank[0], seed, p);
  const DropoutParams dp = cpu_dropout_params(seed, p);
  if (multi_plan_for(x.size(0), A_bank.size(0), A_bank.size(-2)) == Plan::kBlocked) {
    const RowPlan plan =
        RowPlan::grouped(ids, A_bank.size(0), blocked_rows(x.size(1), grad.size(1)));
    return dispatch_activation(x, [&](auto tag) {
      return blocked_backward<decltype(tag)>(grad, x, t, A_bank, B_bank, plan, scale, dp, need_dx,
                                             need_dA, need_dB);
    });
  }
  const RowPlan plan = RowPlan::grouped(ids, A_bank.size(0));
  return dispatch_activation(x, [&](auto tag) {
    return backward_impl<decltype(tag)>(grad, x, t, A_bank, B_bank, plan, scale, dp, need_dx,
                                        need_dA, need_dB);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lor2c_ops_ext, m) {
  // How the cpu backend runs a plain LoR2C call of n rows and rank r: "fused", "blocked" or
  // "gemm".
  m.def("cpu_lor2c_plan(int n, int r) -> str", &lor2c::cpu_lor2c_plan);
  // The same for a multi-adapter batch of n rows over G adapters: "fused" or "blocked".
  m.def("cpu_lor2c_multi_plan(int n, int G, int r) -> str", &lor2c::cpu_lor2c_multi_plan);
  // Why the blocked plan has no BLAS in this process, or "" where it has one (csrc/cpu/blas.h).
  m.def("cpu_blas_missing() -> str", [] {
    const char* why = cpu::blas_missing();
    return std::string(why == nullptr ? "" : why);
  });
  // Why bfloat16 calls do not run the bf16 product kernels here, or "" where they do
  // (csrc/cpu/bf16_products.h).
  m.def("cpu_bf16_dot_missing() -> str", [] {
    const char* why = cpu::bf16_dot_missing();
    return std::string(why == nullptr ? "" : why);
  });
}

TORCH_LIBRARY_IMPL(lor2c_ops_ext, CPU, m) {
  m.impl("lor2c_fwd", &lor2c_fwd_cpu);
  m.impl("lor2c_bwd", &lor2c_bwd_cpu);
  m.impl("lor2c_multi_fwd", &lor2c_multi_fwd_cpu);
  m.impl("lor2c_multi_bwd", &lor2c_multi_bwd_cpu);
}

}  // namespace lor2c
