"""Public backward functions: gradients of depthwise, pointwise and separable 2-D convolution on NumPy arrays.

Each function takes the gradient of the loss with respect to the forward
output (``grad_output``) and the forward inputs, and returns a named tuple
with the gradients of the convolution plus bias with respect to the inputs
named in ``wrt`` (the others are None and not computed).  A fused relu or
relu6 is differentiated when the call passes ``activation=`` and the forward
result as ``output=``; any other activation is the caller's.  Arguments are
normalised and validated by :mod:`nbconv._args` exactly as in
:mod:`nbconv.forward`; nothing here loops over data.
"""
from typing import NamedTuple, Optional

import math
import threading

import numpy as np

from . import _args, _compile, _dtypes, _fallback, _plan
from . import forward as _forward
from ._backward import (
    ACT_BLOCK,
    COLSUM_ROWS,
    COLSUM_WIDEN,
    add_halos_nchw,
    add_halos_nhwc,
    dk3_nhwc,
    dwsep_backward_nchw,
    dwsep_backward_nhwc,
    pointwise_backward_nchw,
    pointwise_backward_nhwc,
    reduce_chunks,
    activation_grad,
    col_sums,
    transpose_into,
    weight_grad_bf16,
    weight_grad_nhwc,
)
from ._elementwise import RELU6
from ._gemm import pack_pairs, panel_scratch
from ._pointwise import GEMM_CHARS
from ._runtime import BLAS_THREADS
from ._threads import POOL, launch

__all__ = [
    "DepthwiseConv2DGrads",
    "PointwiseConv2DGrads",
    "SeparableConv2DGrads",
    "depthwise_conv2d_backward",
    "pointwise_conv2d_backward",
    "separable_conv2d_backward",
]

_compile.register(add_halos_nchw, add_halos_nhwc, col_sums, dk3_nhwc, dwsep_backward_nchw, dwsep_backward_nhwc,
                  pointwise_backward_nchw, pointwise_backward_nhwc, reduce_chunks, activation_grad, transpose_into,
                  weight_grad_bf16, weight_grad_nhwc)


def _threads(ntasks):
    """Threads for a launch of ``ntasks`` tasks (chunks or blocks): the pool's, at most one per task."""
    return max(1, min(ntasks, _plan.pool_threads()))


def _stream_threads(elements):
    """Threads for a memory-bound launch over ``elements`` elements: one per :data:`ACT_BLOCK` of them, so a
    launch of a few microseconds runs on the calling thread alone (a helper would join as it ends)."""
    return _threads(elements // ACT_BLOCK)


class DepthwiseConv2DGrads(NamedTuple):
    """Gradients of :func:`nbconv.depthwise_conv2d` (None for those not requested)."""

    x: Optional[np.ndarray]
    kernel: Optional[np.ndarray]
    bias: Optional[np.ndarray]


class PointwiseConv2DGrads(NamedTuple):
    """Gradients of :func:`nbconv.pointwise_conv2d` (None for those not requested)."""

    x: Optional[np.ndarray]
    kernel: Optional[np.ndarray]
    bias: Optional[np.ndarray]


class SeparableConv2DGrads(NamedTuple):
    """Gradients of :func:`nbconv.separable_conv2d` (None for those not requested)."""

    x: Optional[np.ndarray]
    depthwise_kernel: Optional[np.ndarray]
    pointwise_kernel: Optional[np.ndarray]
    bias: Optional[np.ndarray]


def _normalize_wrt(wrt, fields):
    """``wrt`` (a name or an iterable of names) -> frozenset, checked against ``fields``."""
    if isinstance(wrt, str):
        names = (wrt,)
    else:
        try:
            names = tuple(wrt)
        except TypeError:
            names = None
    if names is None or not all(isinstance(v, str) for v in names) or not set(names) <= set(fields):
        raise ValueError(
            f"Expected `wrt` to be a subset of {fields} (names of the forward inputs). Received: wrt={wrt!r}"
        )
    return frozenset(names)


def _check_grad_output(grad_output, expected, func_name):
    grad_output = _args.as_float_array(grad_output, "grad_output")
    if grad_output.shape != tuple(expected):
        raise ValueError(
            f"Expected `grad_output` of shape {tuple(expected)} (the output shape of {func_name} for these "
            f"inputs). Received: grad_output with shape {grad_output.shape}"
        )
    return grad_output


def _activation_mask(activation, output, grad_output):
    """Validate ``activation``/``output``; return the activation code and ``output`` as an array (or None)."""
    act = _args.normalize_activation(activation)
    if act == 0:
        return act, None
    if output is None:
        raise ValueError(
            f"Expected `output` (the forward call's result) with activation={activation!r}: the derivative is read "
            f"off it. Received: output=None"
        )
    output = _args.as_float_array(output, "output")
    if output.shape != grad_output.shape:
        raise ValueError(
            f"Expected `output` of the shape of `grad_output`, {grad_output.shape}. "
            f"Received: output with shape {output.shape}"
        )
    return act, output


#: bits of bfloat16 6 and infinity, as int16: the bounds of :func:`nbconv._backward.activation_grad` on bits
_BF16_SIX, _BF16_INF = 0x40C0, 0x7F80


def _masked(gc, act, output, compute):
    """``gc`` times the activation's derivative, in a new array (``gc`` may be the caller's)."""
    if act == 0:
        return gc
    yc = _dtypes.operand(output, compute)
    out = np.empty_like(gc)
    launch(activation_grad, _stream_threads(gc.size), gc.reshape(-1), yc.reshape(-1), out.reshape(-1),
           6.0 if act == RELU6 else np.inf)
    return out


def _masked_bits(grad_output, act, output):
    """The bits (``uint16``) of bfloat16 ``grad_output`` times the derivative of the activation ``act`` (not 0)
    read off bfloat16 ``output``: a new array, compared on the bits (no float32 copies)."""
    g = _dtypes.bits(grad_output)
    out = np.empty_like(g)
    launch(activation_grad, _stream_threads(g.size), g.reshape(-1).view(np.int16),
           _dtypes.bits(output).reshape(-1).view(np.int16), out.reshape(-1).view(np.int16),
           _BF16_SIX if act == RELU6 else _BF16_INF)
    return out


def _x_and_grad(g, x, grad_output, act, output, want_dk, compute, nhwc_kernels):
    """``(x, grad_output)`` as the backward kernels read them, the activation's derivative applied.

    bfloat16 ``x`` and ``grad_output`` stay bfloat16 bits (masked on the bits) when ``nhwc_kernels``, the NHWC
    kernels that widen them as they read them, take the call: they read ``x`` only through packed rows, so a
    kernel gradient must be 3x3 (the scatter kernel reads ``x`` as it lies), and a relu mask needs a bfloat16
    ``output``.  Otherwise both are widened whole to ``compute`` first.
    """
    if (nhwc_kernels and _dtypes.is_bf16(x.dtype) and _dtypes.is_bf16(grad_output.dtype)
            and (not want_dk or (g.kh, g.kw) == (3, 3))):
        if act == 0:
            return _dtypes.bits(x), _dtypes.bits(grad_output)
        if _dtypes.is_bf16(output.dtype):
            return _dtypes.bits(x), _masked_bits(grad_output, act, output)
    return _dtypes.operand(x, compute), _masked(_dtypes.operand(grad_output, compute), act, output, compute)


def _finish(arr, result_dtype):
    return _dtypes.as_dtype(arr, result_dtype)


def _gemm_buffers(nchunks, compute):
    return np.empty((nchunks, 8), np.int32), np.array([1, 0, 1], compute)


def _reduce(parts, compute):
    """Sum ``parts`` of shape ``(nchunks, ...)`` over axis 0 in chunk order."""
    out = np.empty(parts.shape[1:], compute)
    if out.size:
        block = _plan.tunables().reduce_block
        launch(reduce_chunks, _stream_threads(parts.size), parts.reshape(parts.shape[0], -1), out.reshape(-1),
               block)
    return out


def _bias_grad(g2, compute):
    """Column sums of ``g2`` (P, G), float or bfloat16 bits: per-block partials in parallel, added in block order
    (NumPy's ``sum(axis=0)`` runs on one thread and adds the rows one by one)."""
    rows, cols = g2.shape
    parts = np.empty((-(-rows // COLSUM_ROWS), cols), compute)
    threads = _threads(parts.shape[0])
    gscr = np.empty((threads, max(cols, COLSUM_WIDEN)) if g2.dtype == _dtypes.BITS else (1, 1), compute)
    launch(col_sums, threads, g2, parts, gscr)
    return _reduce(parts, compute)


def _dwsep_backward(g, xc, dkc, wc, gc, want_dx, want_dk, want_pw, want_b, compute, result=None):
    """Run the depthwise / separable backward kernel; return ``(dx, dk, dpw, db)`` (None where not wanted).

    ``dkc`` is in the kernel layout of ``g.channels_last`` (``(KH, KW, C*dm)``
    or ``(C*dm, KH, KW)``), ``wc`` the ``(C*dm, F)`` pointwise matrix or an
    empty ``(0, 0)`` array for a plain depthwise backward; ``gc`` has the
    output's layout.  ``dx`` comes in ``result`` (bfloat16) where the kernel stores its rows once, else in
    ``compute``.
    """
    cm = g.c * g.dm
    sep = wc.shape[0] > 0
    f = wc.shape[1] if sep else cm
    nchunks, tile_p, th, xs_size = _plan.dwsep_backward(g, f, sep, want_pw, want_dk, compute.itemsize)
    # NHWC separable, dm 1: each tile's own dx rows, complete, by the forward's micro-kernels
    gather = g.channels_last and sep and want_dx and g.dm == 1
    carry = -(-(g.kh - 1) * g.dh // g.sh) * g.ow if gather else 0
    hr = max(1, (g.kh - 1) * g.dh - g.sh + 1)
    one = (1,) * 3
    dx_dtype = _dtypes.BITS if gather and _dtypes.is_bf16(result) else compute
    dx = np.empty(xc.shape, dx_dtype) if want_dx else np.empty((1,) * 4, compute)
    halo_shape = (nchunks, hr, g.w, g.c) if g.channels_last else (nchunks, g.c, hr, g.w)
    # (a dummy of dx's dtype where the gather stores dx: the kernel's scatter path compiles for it)
    halo = np.empty(halo_shape if want_dx and not gather else (nchunks,) + one, dx.dtype)
    halo_pos = np.empty((nchunks, 2), np.int64)
    dkp = np.zeros((nchunks,) + dkc.shape if want_dk else (nchunks,) + one, compute)
    dpwp = np.zeros((nchunks, cm, f) if (sep and want_pw) else (nchunks, 1, 1), compute)
    dbp = np.zeros((nchunks, f) if want_b else (nchunks, 1), compute)
    if sep:
        tshape = (nchunks, tile_p, cm) if g.channels_last else (nchunks, cm, tile_p)
        dscr = np.empty(tshape if want_pw else (nchunks, 1, 1), compute)
        ddscr = np.empty((nchunks, tile_p + carry, cm) if gather else tshape if (want_dx or want_dk)
                         else (nchunks, 1, 1), compute)
    else:
        dscr = ddscr = np.empty((nchunks, 1, 1), compute)
    ibuf, consts = _gemm_buffers(nchunks, compute)
    if g.channels_last:
        # packed-row scratch and operands of the forward's depthwise row tiles (recompute of D)
        xs = np.empty((nchunks, xs_size), compute)
        wt = _compile.operand(dkc.reshape(g.kh * g.kw, cm))
        bits = gc.dtype == _dtypes.BITS
        # a tile of bfloat16 grad_output (bits) is widened here for the bias sum and the depthwise backward; the
        # separable products read the bits as they lie
        gscr = np.empty((nchunks, tile_p * f if bits and (want_b or not sep) else 1), compute)
        pairs_pw, pairs_dd = bits and sep and want_pw, bits and sep and (want_dx or want_dk)
        dtb = np.empty((nchunks, cm * tile_p if pairs_pw else 1), _dtypes.BITS)
        pscr = np.empty((nchunks, panel_scratch(tile_p) if pairs_pw else 1), _dtypes.BITS)
        wc_t = _transposed(wc)
        wpk = pack_pairs(_dtypes.bits(wc_t)) if pairs_dd else np.empty((1, 1), _dtypes.BITS)
        wp2, xs2_size = _plan.dx_gather(g, th) if gather else (1, 1)
        wf = _compile.operand(np.ascontiguousarray(dkc[::-1, ::-1]).reshape(g.kh * g.kw, cm)) if gather else wt
        with BLAS_THREADS:
            launch(dwsep_backward_nhwc, _threads(nchunks), xc, dkc, wc, wc_t, gc.reshape(-1, f), want_dx,
                   dx, want_dk, dkp, want_pw, dpwp, want_b, dbp, halo, halo_pos, g.sh, g.sw, g.dh, g.dw, g.pt, g.pl,
                   g.oh, g.ow, tile_p, nchunks, dscr, ddscr, ibuf, consts, GEMM_CHARS, wt, np.zeros(cm, compute), xs,
                   _plan.packed_width(g), gscr, gather, wf, wp2, np.empty((nchunks, xs2_size), compute), wpk, dtb,
                   pscr)
        if want_dx and not gather:
            _compile.k(add_halos_nhwc)(dx, halo, halo_pos)
    else:
        with BLAS_THREADS:
            launch(dwsep_backward_nchw, _threads(nchunks), xc, dkc, wc, gc.reshape(g.n, f, -1), want_dx, dx, want_dk,
                   dkp, want_pw, dpwp, want_b, dbp, halo, halo_pos, g.sh, g.sw, g.dh, g.dw, g.pt, g.pl, g.oh, g.ow,
                   tile_p, nchunks, dscr, ddscr, ibuf, consts, GEMM_CHARS)
        if want_dx:
            _compile.k(add_halos_nchw)(dx, halo, halo_pos)
    return (
        (_dtypes.from_bits(dx) if dx.dtype == _dtypes.BITS else dx) if want_dx else None,
        _reduce(dkp, compute) if want_dk else None,
        _reduce(dpwp, compute) if (sep and want_pw) else None,
        _reduce(dbp, compute) if want_b else None,
    )


_SCRATCH = threading.local()


def _intermediate(shape, dtype):
    """An uninitialised array for the whole depthwise intermediate, from a grow-only buffer private to the
    calling Python thread (reused by its next call, so it must not outlive this one).

    A fresh ``np.empty`` of 12 MiB is returned to the OS when freed and
    page-faults back in on the next call: milliseconds of a training step.
    The forward functions this backward calls keep their own scratch apart
    (:func:`nbconv.forward._workspace`).
    """
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.nbytes < nbytes + 64:
        buf = _SCRATCH.buf = np.empty(nbytes + 64, np.uint8)
    offset = -buf.ctypes.data % 64
    return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def _transposed(w):
    """``w.T`` as a new C-contiguous array (``w`` C-contiguous, 2-D)."""
    out = np.empty(w.shape[::-1], w.dtype)
    if w.size:
        _transpose_into(w, out)
    return out


def _transpose_into(a, out):
    """``out[...] = a.T`` (2-D, C-contiguous) by :func:`nbconv._backward.transpose_into`, in parallel tiles."""
    launch(transpose_into, _stream_threads(a.size), a, out)


def _weight_grad(x2, g2, want_b, compute):
    """``(x2.T @ g2, column sums of g2 or None)`` of ``(P, K)`` and ``(P, F)`` arrays, in parallel blocks."""
    k, f = x2.shape[1], g2.shape[1]
    mb, nb, parts = _plan.weight_grad_parts(k, f)
    dwp = np.empty((parts, k, f), compute)
    dbp = np.empty((parts, f) if want_b else (parts, 1), compute)
    with BLAS_THREADS:
        launch(weight_grad_nhwc, _threads(parts * -(-k // mb) * -(-f // nb)), x2, g2, parts, mb, nb, dwp, want_b, dbp)
    if parts == 1:
        return dwp[0], (dbp[0] if want_b else None)
    return _reduce(dwp, compute), (_reduce(dbp, compute) if want_b else None)


def _weight_grad_bf16(d2, g2, g2b, want_b, compute):
    """:func:`_weight_grad` with bfloat16 products: ``(d2.T @ g2b, column sums of g2 or None)``; ``d2`` float32
    ``(P, K)``, ``g2b`` the bfloat16 ``(P, F)`` gradient (``g2`` in float32 for the bias, or None: the bias is then
    summed from ``g2b``'s bits)."""
    p, k = d2.shape
    f = g2b.shape[1]
    if g2 is None:
        db = _bias_grad(_dtypes.bits(g2b), compute) if want_b else None
        return _weight_grad_bf16(d2, np.zeros((1, f), compute), g2b, False, compute)[0], db
    dt = np.empty((k, p), _dtypes.BITS)
    _transpose_into(d2, dt)
    mb, nb, parts = _plan.weight_grad_parts(k, f)
    qb = _plan.tunables().weight_grad_pixels
    tasks = parts * -(-k // mb) * -(-f // nb)
    dwp = np.empty((parts, k, f), compute)
    dbp = np.empty((parts, f) if want_b else (parts, 1), compute)
    p_scr = np.empty((tasks, panel_scratch(qb)), _dtypes.BITS)
    launch(weight_grad_bf16, _threads(tasks), dt, _dtypes.bits(g2b), g2, parts, mb, nb, qb, dwp, want_b, dbp, p_scr)
    if parts == 1:
        return dwp[0], (dbp[0] if want_b else None)
    return _reduce(dwp, compute), (_reduce(dbp, compute) if want_b else None)


def _sep_backward_whole(g, xc, dk, wc, gc, want_dx, want_dk, want_pw, want_b, compute, bf16=False):
    """NHWC separable backward with the depthwise intermediate held whole (:func:`nbconv._plan.whole_intermediate`).

    ``D`` comes from the forward depthwise kernels, ``dPW = D^T G`` from
    :func:`_weight_grad`, then ``dD = G PW^T`` (the forward pointwise
    kernel) overwrites ``D``, and the depthwise backward of ``dD`` gives
    ``dx`` and the depthwise-kernel gradient.  Each product runs once over
    all pixels, in blocks of its own output: the tiled path
    (:func:`_dwsep_backward`) re-reads the ``C*dm x F`` weights and partial
    sums for every tile of a few hundred pixels, which on small images with
    many channels (7x7x1024) cost more than the products.  With ``bf16``
    both products multiply bfloat16 pairs (``G`` and ``D`` rounded,
    float32 sums): :func:`_weight_grad_bf16`, and the forward's pointwise
    kernel with ``precision="bfloat16"``.
    """
    strides, dilation = (g.sh, g.sw), (g.dh, g.dw)
    padding = ((g.pt, g.pb), (g.pl, g.pr))
    cm, f = wc.shape
    buf = _intermediate((g.n, g.oh, g.ow, cm), compute)
    dpw = db = dx = ddk = None
    # bfloat16 x and grad_output may come as their bits (:func:`_x_and_grad`): D's depthwise widens x as it
    # loads it, and the products read G as it lies (no float32 copy of either, nor G rounded back)
    bits = gc.dtype == _dtypes.BITS
    if want_pw:
        xd = _dtypes.from_bits(xc) if bits else xc
        # (with bits, the depthwise weights as given: a mixed policy's float32 ones are not rounded)
        _forward.depthwise_conv2d(xd, dk, strides=strides, padding=padding, dilation_rate=dilation, out=buf,
                                  precision="bfloat16" if bits else None, output_dtype=compute)
    g2 = gc.reshape(-1, f)
    if bits:
        gb = _dtypes.from_bits(gc)
    else:
        gb = _dtypes.from_bits(_dtypes.bits(gc)) if bf16 and (want_pw or want_dx or want_dk) else None
    if want_pw or want_b:
        if want_pw and bf16:
            dpw, db = _weight_grad_bf16(buf.reshape(-1, cm), None if bits else g2, gb.reshape(-1, f), want_b,
                                        compute)
        elif want_pw:
            dpw, db = _weight_grad(buf.reshape(-1, cm), g2, want_b, compute)
        else:
            db = _bias_grad(g2, compute)
    if want_dx or want_dk:
        if bf16:
            _forward.pointwise_conv2d(gb, _transposed(wc), out=buf, precision="bfloat16", output_dtype=compute)
        else:
            _forward.pointwise_conv2d(gc, _transposed(wc), out=buf)
        dx, ddk = _dw_grads_nhwc(g, xc, _dtypes.operand(dk, compute), buf, want_dx, want_dk, compute)
    return dx, ddk, dpw, db


def _dw_grads_nhwc(g, xc, dk, gd, want_dx, want_dk, compute):
    """``(dx, kernel gradient (KH, KW, C*dm))`` of an NHWC depthwise convolution, given ``gd``, the gradient of its
    output, and ``dk`` in Keras's layout; None for those not wanted.

    3x3 kernel gradients run in vector micro-kernels over packed rows
    (:func:`nbconv._backward.dk3_nhwc`).  At stride 1 and ``dm == 1`` the
    input gradient is a forward depthwise convolution of ``gd`` with the
    kernel flipped and the complementary padding, so it runs in the
    forward's micro-kernels.  Other cases take the scalar scatter kernel.
    ``xc`` and ``gd`` may be bfloat16 bits when the kernel gradient, if
    wanted, is 3x3 (the scatter kernel reads ``x`` as it lies); bits ``xc``
    beside a float ``gd`` are widened for the scatter kernel.
    """
    gd = _compile.typed(gd)
    bits = gd.dtype == _dtypes.BITS
    cm = g.c * g.dm
    flip_pad = (((g.kh - 1) * g.dh - g.pt, (g.kh - 1) * g.dh - g.pb),
                ((g.kw - 1) * g.dw - g.pl, (g.kw - 1) * g.dw - g.pr))
    fast_dx = want_dx and g.sh == g.sw == 1 and g.dm == 1 and min(min(p) for p in flip_pad) >= 0
    fast_dk = want_dk and g.kh == g.kw == 3
    dx = ddk = None
    if fast_dk:
        th, nchunks, xs_shape = _plan.dk3(g, compute.itemsize)
        xs = np.empty(xs_shape, compute)
        dkp = np.zeros((nchunks, 9 * cm), compute)
        gscr = np.empty((nchunks, th * g.ow * cm if bits else 1), compute)
        launch(dk3_nhwc, _threads(nchunks), xc, gd.reshape(-1, cm), g.dm, g.sh, g.sw, g.dh, g.dw, g.pt, g.pl, g.oh,
               g.ow, _plan.packed_width(g), th, nchunks, xs, dkp, gscr)
        ddk = _reduce(dkp, compute).reshape(3, 3, cm)
    if fast_dx:
        flipped = np.ascontiguousarray(dk[::-1, ::-1])
        if bits:
            # the forward widens bfloat16 gd as it loads it (its depthwise part sums in float32 with the weights as
            # given): the values of the float32 path, without a float32 copy of gd
            dx = _forward.depthwise_conv2d(_dtypes.from_bits(gd), flipped, padding=flip_pad,
                                           dilation_rate=(g.dh, g.dw), precision="bfloat16", output_dtype=compute)
        else:
            dx = _forward.depthwise_conv2d(gd, flipped, padding=flip_pad, dilation_rate=(g.dh, g.dw))
    slow_dx, slow_dk = want_dx and not fast_dx, want_dk and not fast_dk
    if (slow_dx or slow_dk) and xc.dtype == _dtypes.BITS and not bits:
        # the scatter kernel reads x and gd in one dtype (bits x beside a float32 gd: the whole-intermediate path)
        xc = _dtypes.operand(_dtypes.from_bits(xc), compute)
    if slow_dx or slow_dk:
        no_pw = np.empty((0, 0), compute)
        sdx, sdk, _, _ = _dwsep_backward(g, xc, _internal_dk(dk, g, compute), no_pw, gd,
                                         slow_dx, slow_dk, False, False, compute)
        dx = sdx if slow_dx else dx
        ddk = sdk if slow_dk else ddk
    return dx, ddk


def _dk_to_keras(dk, g):
    """Kernel gradient from the kernel's internal layout back to Keras's ``(kh, kw, C, dm)``."""
    if not g.channels_last:
        dk = dk.transpose(1, 2, 0)
    return np.ascontiguousarray(dk).reshape(g.kh, g.kw, g.c, g.dm)


def _internal_dk(dk, g, compute):
    cm = g.c * g.dm
    if g.channels_last:
        return _dtypes.operand(dk.reshape(g.kh, g.kw, cm), compute)
    return _dtypes.operand(dk.reshape(g.kh, g.kw, cm).transpose(2, 0, 1), compute)


@_compile.entry(_fallback.depthwise_conv2d_backward)
def depthwise_conv2d_backward(grad_output, x, kernel, *, strides=_args.DEFAULT, padding="valid",
                              dilation_rate=_args.DEFAULT, data_format="channels_last",
                              wrt=("x", "kernel", "bias"), activation=None, output=None, **aliases):
    """Gradients of :func:`nbconv.depthwise_conv2d`.

    Parameters
    ----------
    grad_output : array_like of shape (N, OH, OW, C*dm) or, channels_first, (N, C*dm, OH, OW)
        Gradient of the loss with respect to the forward output.
    x : array_like of shape (N, H, W, C) or (N, C, H, W)
    kernel : array_like of shape (kh, kw, C, depth_multiplier)
    strides, padding, dilation_rate, data_format
        As in :func:`nbconv.depthwise_conv2d` (``stride=`` and ``dilation=`` accepted too).
    wrt : iterable of {"x", "kernel", "bias"}
        Gradients to compute; the others are returned as None.
    activation, output
        See :func:`separable_conv2d_backward`.

    Returns
    -------
    DepthwiseConv2DGrads
        ``x`` of the shape of ``x``, ``kernel`` of shape (kh, kw, C, dm), ``bias`` of
        shape (C*dm,), in the NumPy-promoted dtype of the inputs (float16 is
        computed in float32).

    Notes
    -----
    One parallel kernel computes all requested gradients in a single pass
    over ``grad_output``: the input gradient as a transposed depthwise
    convolution (each chunk of threads owns disjoint rows of it), the kernel
    and bias gradients as per-chunk partial sums reduced in a fixed order
    (deterministic for a given thread count).  Extra memory: the partial
    sums ``4 * threads * (kh*kw + 1) * C*dm`` and ``4 * threads`` halo rows
    of ``dx`` (at most ``(kh-1)*dilation`` rows each).
    """
    POOL.wake()
    strides, dilation_rate = _args.resolve_aliases("depthwise_conv2d_backward", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    names = _normalize_wrt(wrt, DepthwiseConv2DGrads._fields)
    x = _args.as_float_array(x, "x")
    kernel = _args.as_float_array(kernel, "kernel")
    g = _args.depthwise_geometry(x, kernel, strides, padding, dilation_rate, channels_last)
    cm = g.c * g.dm
    grad_output = _check_grad_output(grad_output, g.out_shape(cm), "depthwise_conv2d")
    act, output = _activation_mask(activation, output, grad_output)
    compute, result = _args.dtypes_for(grad_output, x, kernel, precision="float32")

    want_dx, want_dk, want_b = "x" in names, "kernel" in names, "bias" in names
    if not (want_dx or want_dk or want_b):
        return DepthwiseConv2DGrads(None, None, None)
    if grad_output.size == 0 or x.size == 0:
        return DepthwiseConv2DGrads(
            np.zeros(x.shape, result) if want_dx else None,
            np.zeros(kernel.shape, result) if want_dk else None,
            np.zeros(cm, result) if want_b else None,
        )
    xc, gc = _x_and_grad(g, x, grad_output, act, output, want_dk, compute, channels_last)
    if channels_last:
        dx, dk = _dw_grads_nhwc(g, xc, _dtypes.operand(kernel, compute), gc, want_dx, want_dk, compute)
        db = _bias_grad(gc.reshape(-1, cm), compute) if want_b else None
    else:
        no_pw = np.empty((0, 0), compute)
        dx, dk, _, db = _dwsep_backward(g, xc, _internal_dk(kernel, g, compute), no_pw, gc,
                                        want_dx, want_dk, False, want_b, compute)
    return DepthwiseConv2DGrads(
        _finish(dx, result) if want_dx else None,
        _finish(_dk_to_keras(dk, g), result) if want_dk else None,
        _finish(db, result) if want_b else None,
    )


@_compile.entry(_fallback.pointwise_conv2d_backward)
def pointwise_conv2d_backward(grad_output, x, kernel, *, data_format="channels_last", wrt=("x", "kernel", "bias"),
                              activation=None, output=None):
    """Gradients of :func:`nbconv.pointwise_conv2d`.

    Parameters
    ----------
    grad_output : array_like of shape (N, H, W, F) or, channels_first, (N, F, H, W)
    x : array_like of shape (N, H, W, K) or (N, K, H, W)
    kernel : array_like of shape (1, 1, K, F) or (K, F)
    data_format : {"channels_last", "channels_first"} or None (channels_last)
    wrt : iterable of {"x", "kernel", "bias"}
    activation, output
        See :func:`separable_conv2d_backward`.

    Returns
    -------
    PointwiseConv2DGrads
        ``kernel`` has the shape the caller passed.

    Notes
    -----
    Parallel over chunks of pixel tiles: ``dx = G W^T`` per tile in place,
    ``dW = x^T G`` as per-chunk partial sums (at most about 16 MiB in all,
    fewer chunks when ``K*F`` is large) reduced in a fixed order.
    """
    POOL.wake()
    channels_last = _args.normalize_data_format(data_format)
    names = _normalize_wrt(wrt, PointwiseConv2DGrads._fields)
    x = _args.as_float_array(x, "x")
    kernel = _args.as_float_array(kernel, "kernel")
    _args.check_ndim(x, "x", 4, "of shape " + ("(N, H, W, C)" if channels_last else "(N, C, H, W)"))
    k = x.shape[3] if channels_last else x.shape[1]
    wmat = _args.pointwise_matrix(kernel, k, "kernel")
    f = wmat.shape[1]
    n = x.shape[0]
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    grad_output = _check_grad_output(grad_output, (n, h, w, f) if channels_last else (n, f, h, w),
                                     "pointwise_conv2d")
    act, output = _activation_mask(activation, output, grad_output)
    compute, result = _args.dtypes_for(grad_output, x, kernel, precision="float32")

    want_dx, want_w, want_b = "x" in names, "kernel" in names, "bias" in names
    if not (want_dx or want_w or want_b):
        return PointwiseConv2DGrads(None, None, None)
    if x.size == 0 or grad_output.size == 0:
        return PointwiseConv2DGrads(
            np.zeros(x.shape, result) if want_dx else None,
            np.zeros(kernel.shape, result) if want_w else None,
            np.zeros(f, result) if want_b else None,
        )
    xc = _dtypes.operand(x, compute)
    gc = _masked(_dtypes.operand(grad_output, compute), act, output, compute)
    wc = _dtypes.operand(wmat, compute)
    tile_p, nchunks = _plan.pointwise_backward(n, h * w, k, f, channels_last, want_w, compute.itemsize)
    dx = np.empty(xc.shape, compute) if want_dx else np.empty((1,) * 4, compute)
    dwp = np.zeros((nchunks, k, f) if want_w else (nchunks, 1, 1), compute)
    dbp = np.zeros((nchunks, f) if want_b else (nchunks, 1), compute)
    ibuf, consts = _gemm_buffers(nchunks, compute)
    if channels_last:
        with BLAS_THREADS:
            launch(pointwise_backward_nhwc, _threads(nchunks), xc.reshape(-1, k), wc, _transposed(wc),
                   gc.reshape(-1, f), want_dx, dx.reshape(-1, k) if want_dx else dx.reshape(1, 1), want_w, dwp, want_b,
                   dbp, tile_p, nchunks, ibuf, consts, GEMM_CHARS)
    else:
        with BLAS_THREADS:
            launch(pointwise_backward_nchw, _threads(nchunks), xc.reshape(n, k, -1), wc, gc.reshape(n, f, -1),
                   want_dx, dx.reshape(n, k, -1) if want_dx else dx.reshape(1, 1, 1), want_w, dwp, want_b, dbp, tile_p,
                   nchunks, ibuf, consts, GEMM_CHARS)
    return PointwiseConv2DGrads(
        _finish(dx, result) if want_dx else None,
        _finish(_reduce(dwp, compute).reshape(kernel.shape), result) if want_w else None,
        _finish(_reduce(dbp, compute), result) if want_b else None,
    )


@_compile.entry(_fallback.separable_conv2d_backward)
def separable_conv2d_backward(grad_output, x, depthwise_kernel, pointwise_kernel, *, strides=_args.DEFAULT,
                              padding="valid", dilation_rate=_args.DEFAULT, data_format="channels_last",
                              wrt=("x", "depthwise_kernel", "pointwise_kernel", "bias"), activation=None,
                              output=None, **aliases):
    """Gradients of :func:`nbconv.separable_conv2d` (without depthwise bias or depthwise activation).

    Parameters
    ----------
    grad_output : array_like of shape (N, OH, OW, F) or, channels_first, (N, F, OH, OW)
    x : array_like of shape (N, H, W, C) or (N, C, H, W)
    depthwise_kernel : array_like of shape (kh, kw, C, depth_multiplier)
    pointwise_kernel : array_like of shape (1, 1, C*depth_multiplier, F) or (C*depth_multiplier, F)
    strides, padding, dilation_rate, data_format
        As in :func:`nbconv.separable_conv2d` (``stride=`` and ``dilation=`` accepted too).
    wrt : iterable of {"x", "depthwise_kernel", "pointwise_kernel", "bias"}
    activation : {None, "linear", "relu", "relu6"}
        The forward call's fused activation.  ``grad_output`` is the gradient
        with respect to the activated output; with "relu" or "relu6" it is
        masked by the activation's derivative first (in parallel, into a new
        array), read off ``output``.
    output : array_like of the shape of ``grad_output``, optional
        The forward call's result; required with "relu" and "relu6".

    Returns
    -------
    SeparableConv2DGrads
        Gradients in the shapes of the corresponding inputs (``pointwise_kernel``
        in the shape the caller passed).

    Notes
    -----
    One fused parallel pass: per tile of output pixels the depthwise tile
    ``D`` is recomputed (only when the pointwise-kernel gradient is wanted),
    ``dPW += D^T G`` and ``dD = G PW^T`` run in nbconv's GEMM micro-kernel,
    and the depthwise backward of ``dD`` gives the depthwise-kernel and input
    gradients.  The depthwise intermediate is never stored: scratch is two
    tiles of at most 256 KiB per chunk, plus per-chunk partial sums of the
    weight gradients (``nchunks * C*dm * F``, with ``nchunks`` cut down
    towards the thread count when that exceeds about 16 MiB) and ``nchunks``
    halo rows of ``dx``.

    Exception, NHWC with pointwise weights over 256 KiB (few pixels, many
    channels): when the intermediate is at most 16 MiB it is held whole, in
    one buffer (``D``, then ``dD``), and each product runs once over all
    pixels in parallel blocks of its result; re-reading megabytes of weights
    and partial sums per tile of a few hundred pixels cost more than the
    products there.
    """
    POOL.wake()
    strides, dilation_rate = _args.resolve_aliases("separable_conv2d_backward", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    names = _normalize_wrt(wrt, SeparableConv2DGrads._fields)
    x, dk, pk, g, wmat = _args.separable_operands(x, depthwise_kernel, pointwise_kernel, strides, padding,
                                                  dilation_rate, channels_last)
    cm, f = wmat.shape
    grad_output = _check_grad_output(grad_output, g.out_shape(f), "separable_conv2d")
    act, output = _activation_mask(activation, output, grad_output)
    compute, result = _args.dtypes_for(grad_output, x, dk, pk, precision="float32")
    # bfloat16 activations (x and grad_output; the weights bfloat16 too, or a mixed policy's float32 ones, rounded
    # as they are packed): the two pointwise products of the backward multiply bfloat16 pairs, as the tiled
    # kernel's do on the bits
    bf16 = _dtypes.is_bf16(x.dtype) and _dtypes.is_bf16(grad_output.dtype)

    want_dx, want_dk = "x" in names, "depthwise_kernel" in names
    want_pw, want_b = "pointwise_kernel" in names, "bias" in names
    if not (want_dx or want_dk or want_pw or want_b):
        return SeparableConv2DGrads(None, None, None, None)
    if grad_output.size == 0 or x.size == 0:
        return SeparableConv2DGrads(
            np.zeros(x.shape, result) if want_dx else None,
            np.zeros(dk.shape, result) if want_dk else None,
            np.zeros(pk.shape, result) if want_pw else None,
            np.zeros(f, result) if want_b else None,
        )
    whole = _plan.whole_intermediate(g, f, compute.itemsize)
    # the whole-intermediate path takes them as bits for bfloat16 products only (its depthwise recompute widens x
    # as it loads it), else widened
    xc, gc = _x_and_grad(g, x, grad_output, act, output, want_dk, compute, g.channels_last and (bf16 or not whole))
    wc = _dtypes.operand(wmat, compute)
    if whole:
        dx, ddk, dpw, db = _sep_backward_whole(g, xc, dk if bf16 else _dtypes.operand(dk, compute), wc, gc, want_dx,
                                               want_dk, want_pw, want_b, compute, bf16)
    else:
        dx, ddk, dpw, db = _dwsep_backward(g, xc, _internal_dk(dk, g, compute), wc, gc, want_dx, want_dk, want_pw,
                                           want_b, compute, result)
    return SeparableConv2DGrads(
        _finish(dx, result) if want_dx else None,
        _finish(_dk_to_keras(ddk, g), result) if want_dk else None,
        _finish(dpw.reshape(pk.shape), result) if want_pw else None,
        _finish(db, result) if want_b else None,
    )
