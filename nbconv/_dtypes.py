"""bfloat16: the dtype, and the arrays the kernels take for it (its bits as ``uint16``).

Callers hand bfloat16 over as ``ml_dtypes.bfloat16`` arrays (what jax, Keras
and TensorFlow use); the kernels read and write its bits through ``uint16``
views (:func:`bits`), widen them to float32 as they load and round float32
sums back as they store (:mod:`nbconv._simd`).  Whole-array casts go through
the parallel :func:`nbconv._convert.convert` (NumPy's own casts to and from
``ml_dtypes.bfloat16`` run one element at a time).

``ml_dtypes`` is imported on first use (:func:`bfloat16`): its import takes
about half a second, and a process that never made a bfloat16 array has none
to hand over (:func:`is_bf16` answers without importing it).
"""
import sys

import numpy as np

from . import _compile
from ._convert import BLOCK, convert
from ._threads import launch, planning_threads

__all__ = ["BITS", "FLOAT32", "bfloat16", "is_bf16", "bits", "as_bfloat16", "as_dtype", "to_float32",
           "from_bits", "operand"]

#: how the kernels see bfloat16 arrays
BITS = np.dtype(np.uint16)
FLOAT32 = np.dtype(np.float32)
_compile.register(convert)
_BFLOAT16 = []


def bfloat16():
    """The bfloat16 dtype (``ml_dtypes.bfloat16``), importing ``ml_dtypes`` the first time."""
    if not _BFLOAT16:
        import ml_dtypes

        _BFLOAT16.append(np.dtype(ml_dtypes.bfloat16))
    return _BFLOAT16[0]


def is_bf16(dtype):
    """Whether ``dtype`` is bfloat16 (without importing ``ml_dtypes`` where nothing has: no such array exists)."""
    return "ml_dtypes" in sys.modules and dtype == bfloat16()


def _convert(src, dst_dtype):
    """``src`` (C-contiguous float32 or bits) converted into a new array of ``dst_dtype`` (float32 or bits)."""
    out = np.empty(src.shape, dst_dtype)
    if src.size:
        try:
            # small arrays (a layer's depthwise weights, a bias) on the calling thread alone: one block
            launch(convert, min(-(-src.size // BLOCK), planning_threads()), _compile.typed(src.reshape(-1)),
                   out.reshape(-1))
        except _compile.NotCompiled as exc:  # background mode, a cold cache: NumPy's casts meanwhile
            _compile.submit([exc.key])
            if dst_dtype == BITS:
                out[...] = src.astype(bfloat16()).view(BITS)
            else:
                out[...] = (src.astype(np.uint32) << 16).view(FLOAT32)
    return out


def bits(a):
    """The bfloat16 bits of ``a`` as a C-contiguous writeable ``uint16`` array: a view of a bfloat16 array, else
    ``a`` rounded to bfloat16 (float32 through the parallel kernel; other dtypes through float32)."""
    if is_bf16(a.dtype):
        return _compile.typed(np.ascontiguousarray(a).view(BITS))
    return _convert(_compile.operand(a, FLOAT32), BITS)


def to_float32(a):
    """``a`` as a C-contiguous writeable float32 array (bfloat16 widened by the parallel kernel)."""
    if is_bf16(a.dtype):
        return _convert(bits(a), FLOAT32)
    return _compile.operand(a, FLOAT32)


def operand(a, dtype):
    """``a`` as a kernel operand of ``dtype`` (C-contiguous, writeable): float32/float64, or :data:`BITS`."""
    dtype = np.dtype(dtype)
    if dtype == BITS:
        return bits(a)
    if is_bf16(a.dtype):
        a = to_float32(a)
    return _compile.operand(a, dtype)


def from_bits(b):
    """A ``uint16`` array of bfloat16 bits as a bfloat16 array (a view)."""
    return b.view(bfloat16())


def as_dtype(a, dtype):
    """``a`` as ``dtype``, through the parallel kernel between float32 and bfloat16 (NumPy otherwise)."""
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if is_bf16(dtype):
        return from_bits(bits(a))
    if is_bf16(a.dtype):
        return to_float32(a).astype(dtype, copy=False)
    return a.astype(dtype)


def as_bfloat16(a):
    """``a`` as a bfloat16 array: ``int16``/``uint16`` arrays are taken as bfloat16 bits (a view, no copy: a torch
    ``bfloat16`` tensor's ``.view(torch.int16).numpy()``); float arrays are rounded to nearest even.

    Parameters
    ----------
    a : array_like
        bfloat16 bits (int16 or uint16), or floats.

    Returns
    -------
    ndarray of dtype ``ml_dtypes.bfloat16``
    """
    a = np.asarray(a)
    if a.dtype in (np.dtype(np.int16), np.dtype(np.uint16)):
        return a.view(bfloat16())
    if a.dtype.kind != "f" and not is_bf16(a.dtype):
        raise TypeError(f"Expected `a` to hold bfloat16 bits (int16 or uint16) or floats. Received: a with dtype "
                        f"{a.dtype}")
    return as_dtype(a, bfloat16())


