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
def dropout_scale(seed_ptr, rows, col0, threshold, inv_keep, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) fp32 multipliers (0 or inv_keep) for columns col0 + [0, BLOCK_K).

    col0 must be a multiple of 4: one Philox call gives the draws of 4 adjacent columns.
    """
    seed = tl.load(seed_ptr)
    offset = tl.load(seed_ptr + 1)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    groups = (col0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    zero = tl.zeros((BLOCK_M, BLOCK_K // 4), dtype=tl.uint32)
    c0 = zero + groups[None, :]
    c1 = zero + rows.to(tl.uint32)[:, None]
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # join(join(r0, r2), join(r1, r3)) flattens to r0, r1, r2, r3 per counter: column order.
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    keep = draws.to(tl.int64) >= threshold
    return tl.where(keep, inv_keep, 0.0)
