"""Philox4x32-10 dropout masks inside Triton kernels.

The same function as csrc/philox.h and lor2c_ops/ref/philox.py (see csrc/philox.h for the mask
convention), written out here rather than taken from `tl.rand` so that the mask does not depend
on the Triton version and matches the CPU and CUDA kernels bit for bit.
"""

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed_ptr, rows, col0, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) booleans: whether each element of columns col0 + [0, BLOCK_K) of
    `rows` is kept. col0 and BLOCK_K must be multiples of 8: one Philox call gives the 16-bit
    draws of 8 adjacent columns (BLOCK_K // 8 calls per row); threshold is the 16-bit one.
    """
    tl.static_assert(BLOCK_K % 8 == 0, "dropout_keep: BLOCK_K must be a multiple of 8")
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    groups = (col0 // 8 + tl.arange(0, BLOCK_K // 8)).to(tl.uint32)
    zero = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.uint32)
    c0 = zero + groups[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # Column 8g + 2w + h takes half h (low first) of word w. join(join(a0, a2), join(a1, a3))
    # flattens to a0, a1, a2, a3 (index w); joining the lows' and the highs' (index h) gives 2w + h.
    lo = tl.join(tl.join(r0 & 0xFFFF, r2 & 0xFFFF), tl.join(r1 & 0xFFFF, r3 & 0xFFFF))
    hi = tl.join(tl.join(r0 >> 16, r2 >> 16), tl.join(r1 >> 16, r3 >> 16))
    draws = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_K))
    return draws.to(tl.int32) >= threshold  # draws < 2^16: exact as int32


@triton.jit
def dropout_scale(
    seed_ptr, rows, col0, threshold, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """(BLOCK_M, BLOCK_K) fp32 multipliers (0 or inv_keep): dropout_keep as numbers."""
    keep = dropout_keep(seed_ptr, rows, col0, threshold, BLOCK_M, BLOCK_K)
    return tl.where(keep, inv_keep, 0.0)
