"""Conversion between float32 and bfloat16 bits (``uint16``): the Python side's casts of whole arrays."""

from ._jit import jit
from ._simd import VECTOR_BYTES, convert_vector
from ._sync import PHASE2, claim, enter, leave

#: elements per task (256 KiB of float32)
BLOCK = 1 << 16


@jit
def convert(src, dst, sched, sig, lead):
    """``dst[:] = src`` between float32 and bfloat16 bits, flat arrays of one length, in parallel over blocks.

    bfloat16 -> float32 is exact; float32 -> bfloat16 rounds to nearest,
    ties to even, and keeps NaN a NaN (:meth:`nbconv._simd.VectorBuilder.round_bf16`).
    """
    n = src.shape[0]
    lanes = VECTOR_BYTES // 4
    enter(sched, sig, lead)
    nblocks = (n + BLOCK - 1) // BLOCK
    while True:
        blk = claim(sched, PHASE2, nblocks, lead)
        if blk < 0:
            break
        for i in range(blk * BLOCK, min(n, (blk + 1) * BLOCK), lanes):
            convert_vector(src, i, dst, i, min(lanes, n - i))
    leave(sched, sig, lead)
