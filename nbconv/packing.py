"""Pointwise weights packed once for many calls: inference with fixed weights.

nbconv's matrix product reads the pointwise weights (``K x F``, row-major)
where they lie, ``F`` elements apart per input channel.  With 1024 filters or
more (a row stride of 4 KiB or more in float32), the rows it reads in one
block all fall on the same few cache sets and are fetched again for every
block of pixels: on 7x7 and 10x10 images with 1024-2048 channels, where a
call has few pixel blocks to share them, the product runs at 75-80 % of what
it reaches on packed weights (docs/tuning.md).  Packing on every call costs
more than it saves (the copy pays the same strided reads), so it is done
once, here, as ONNX Runtime does when a session is created and XNNPACK when
an operator is.  bfloat16 products pack their pairs of rows here too, or
per panel inside the kernel for plain weights (:func:`nbconv._gemm.gemm_bf16`).
"""
import numpy as np

from . import _args, _dtypes
from ._gemm import pack_b, pack_pairs, pair_panel_width, panel_width

__all__ = ["PackedPointwiseKernel", "pack_pointwise_kernel"]


class PackedPointwiseKernel:
    """A pointwise kernel packed for nbconv's matrix product (see :func:`pack_pointwise_kernel`).

    Pass it wherever a pointwise kernel goes: ``pointwise_kernel`` of
    :func:`nbconv.separable_conv2d`, ``kernel`` of
    :func:`nbconv.pointwise_conv2d` (channels_last input takes the packed
    path; channels_first input, other dtypes and the backward functions use
    the kernel as it was).  ``np.asarray(packed)`` is the kernel itself, a
    read-only copy of the array it was made from.

    Attributes
    ----------
    shape : tuple
        The kernel's shape, ``(1, 1, K, F)`` or ``(K, F)`` as given.
    dtype : numpy.dtype
        The kernel's dtype.
    compute_dtype : numpy.dtype
        The products it was packed for: float32 or float64, or bfloat16
        (pairs of rows side by side, for bfloat16 products); calls computing
        in another dtype (a float64 input with float32 weights) use the
        unpacked kernel.

    Notes
    -----
    A snapshot: later changes to the array it was made from are not seen, and
    the object itself cannot be modified, so one instance may be shared by
    threads.
    """

    __slots__ = ("_kernel", "_panels", "_compute")

    def __init__(self, kernel, panels, compute):
        self._kernel = kernel
        self._panels = panels
        self._compute = compute

    @property
    def shape(self):
        return self._kernel.shape

    @property
    def dtype(self):
        return self._kernel.dtype

    @property
    def ndim(self):
        return self._kernel.ndim

    @property
    def compute_dtype(self):
        return self._compute

    def __array__(self, dtype=None, copy=None):
        if copy:
            return np.array(self._kernel, dtype=dtype, copy=True)
        return self._kernel if dtype is None else self._kernel.astype(dtype)

    def __repr__(self):
        return f"PackedPointwiseKernel(shape={self.shape}, dtype={self.dtype})"

    def panels_for(self, kind):
        """The packed operand when it was packed for ``kind`` (the products' float dtype, or bfloat16 bits
        ``uint16`` for bfloat16 products), else None."""
        return self._panels if self._panels.dtype == kind else None


def pack_pointwise_kernel(kernel, precision=None):
    """Pack a pointwise kernel once, for many forward calls with the same weights.

    Parameters
    ----------
    kernel : array_like of shape (1, 1, K, F) or (K, F)
        A Keras pointwise kernel (``SeparableConv2D.pointwise_kernel``, or a
        1x1 ``Conv2D`` kernel), float16, bfloat16, float32 or float64.
        float16 is packed in float32, the dtype nbconv computes it in, and
        bfloat16 for bfloat16 products.
    precision : {None, "float32", "bfloat16"}
        The products the packed weights serve, as ``precision=`` of the
        forward functions: "bfloat16" packs float32 weights rounded to
        bfloat16 (for calls with bfloat16 inputs or ``precision="bfloat16"``).

    Returns
    -------
    PackedPointwiseKernel
        Accepted as ``pointwise_kernel`` by :func:`nbconv.separable_conv2d`
        and as ``kernel`` by :func:`nbconv.pointwise_conv2d`; the results are
        those of the unpacked kernel.

    Examples
    --------
    >>> import numpy as np, nbconv
    >>> x = np.ones((1, 7, 7, 1024), np.float32)
    >>> dk = np.ones((3, 3, 1024, 1), np.float32)
    >>> pk = nbconv.pack_pointwise_kernel(np.full((1, 1, 1024, 1024), 1e-3, np.float32))
    >>> nbconv.separable_conv2d(x, dk, pk, padding="same").shape
    (1, 7, 7, 1024)
    """
    if isinstance(kernel, PackedPointwiseKernel):
        return kernel
    return pack_view(kernel, precision, snapshot=True)


def pack_view(kernel, precision=None, snapshot=False):
    """:func:`pack_pointwise_kernel`, keeping ``kernel`` itself (no copy) unless ``snapshot``.

    For a cache that knows when the array changes (a framework's version
    counter) and packs again before the next call after a change: the
    panels then cost no second copy of the plain weights.
    """
    kernel = _args.as_float_array(kernel, "kernel")
    if kernel.ndim not in (2, 4):
        raise ValueError(f"Expected `kernel` of shape (1, 1, K, filters) or (K, filters). "
                         f"Received: kernel with shape {kernel.shape}")
    matrix = _args.pointwise_matrix(kernel, kernel.shape[-2], "kernel")
    compute = _args.dtypes_for(kernel, precision=precision).compute
    # the panels stay writeable (private, never written): kernels are compiled for writeable operands
    if _dtypes.is_bf16(compute):
        panels = pack_pairs(_dtypes.bits(matrix).reshape(matrix.shape))
    else:
        panels = pack_b(_dtypes.operand(matrix, compute), compute).reshape(matrix.shape)
    if snapshot:
        kernel = np.array(kernel, copy=True)
        kernel.flags.writeable = False
    return PackedPointwiseKernel(kernel, panels, compute)


def packed_panels(kernel, kind):
    """The packed operand of ``kernel`` for ``kind`` (see :meth:`PackedPointwiseKernel.panels_for`), else None."""
    return kernel.panels_for(kind) if isinstance(kernel, PackedPointwiseKernel) else None


def packed_align(kernel, dt):
    """Filter blocks of a call (:class:`nbconv._args.Dtypes` ``dt``) must start on a panel of the packed operand:
    the alignment in filters."""
    if dt.bf16:
        return pair_panel_width() if packed_panels(kernel, _dtypes.BITS) is not None else 16
    return panel_width(dt.act) if packed_panels(kernel, dt.act) is not None else 16
