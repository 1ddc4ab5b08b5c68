"""Conversion between float32 and bfloat16 bits (``uint16``): the Python side's casts of whole arrays."""
from numba import prange

from ._jit import pjit
from ._simd import VECTOR_BYTES, convert_vector

#: elements per task (256 KiB of float32)
BLOCK = 1 << 16


@pjit
def convert(src, dst):
    """``dst[:] = src`` between float32 and bfloat16 bits, flat arrays of one length, in parallel over blocks.

    bfloat16 -> float32 is exact; float32 -> bfloat16 rounds to nearest,
    ties to even, and keeps NaN a NaN (:meth:`nbconv._simd.VectorBuilder.round_bf16`).
    """
    n = src.shape[0]
    lanes = VECTOR_BYTES // 4
    for blk in prange((n + BLOCK - 1) // BLOCK):
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), lanes):
            convert_vector(src, i, dst, i, min(lanes, n - i))
