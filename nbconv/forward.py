"""Public forward functions: depthwise, pointwise and fused separable 2-D convolution on NumPy arrays.

Each function normalises and validates its arguments (:mod:`nbconv._args`),
picks the kernel and its tiling, allocates the output and calls the kernel;
from the third call with the same shapes and options a captured call replaces
all of that but the allocation (:mod:`nbconv._replay`).  Nothing here loops
over data.
"""
import math
import threading

import numpy as np

from . import _args, _compile, _dtypes, _fallback, _plan, _replay, packing
from ._depthwise import depthwise_packed
from ._gemm import panel_scratch
from ._pointwise import pointwise_nchw, pointwise_nhwc
from ._separable import separable
from ._threads import POOL, launch

__all__ = ["depthwise_conv2d", "pointwise_conv2d", "separable_conv2d"]

_WORKSPACE = threading.local()
#: the forward kernels: serial functions that the calling thread and the pool's helpers run at once
KERNELS = (depthwise_packed, pointwise_nhwc, pointwise_nchw, separable)
_compile.register(*KERNELS)


def _workspace(*specs):
    """Scratch arrays ``(shape, dtype)`` carved from one grow-only buffer private to the calling Python thread.

    Scratch is megabytes for large images: a fresh ``np.empty`` per call is
    returned to the OS when freed and page-faults back in on the next call.
    Each array starts 64-byte aligned.  A thread's
    next call reuses the buffer, so a call's scratch must not outlive it.
    The views of a repeated set of shapes are cached (a layer calls with the
    same shapes every time).
    """
    views = getattr(_WORKSPACE, "views", None)
    if views is None:
        views = _WORKSPACE.views = {}
    arrays = views.get(specs)
    if arrays is not None:
        return arrays
    nbytes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in specs]
    sizes = [-(-n // 64) * 64 for n in nbytes]
    buf = getattr(_WORKSPACE, "buf", None)
    if buf is None or buf.nbytes < sum(sizes) + 64:
        buf = _WORKSPACE.buf = np.empty(sum(sizes) + 64, np.uint8)
        views.clear()  # views of the old buffer would keep it alive
    offset = -buf.ctypes.data % 64
    arrays = []
    for (shape, dtype), n, size in zip(specs, nbytes, sizes):
        arrays.append(buf[offset:offset + n].view(dtype).reshape(shape))
        offset += size
    if len(views) >= 64:
        views.clear()
    views[specs] = arrays
    return arrays


def _scratch(nbytes):
    """The calling thread's workspace as one byte buffer of at least ``nbytes`` (a replayed call's scratch)."""
    return _workspace(((nbytes,), np.uint8))[0]


def _bias_array(bias, dtype):
    if bias is None:
        return np.empty(0, dtype)
    return _dtypes.operand(bias, dtype)


def _panel_scratch(dt, packed_k, k):
    """Per-chunk scratch (uint16 elements) where bfloat16 products pack panels of plain weights, else 0."""
    return panel_scratch(k) if dt.bf16 and packed_k == 0 else 0


def _x_operand(x, dt):
    """The input as the kernels read it: bfloat16 bits for bfloat16 products (float32 rounded), else ``dt.act``."""
    return _dtypes.operand(x, _dtypes.BITS if dt.bf16 else dt.act)


def _packed_dtype(xc, dt):
    """The packed-row scratch's dtype: bfloat16 bits for a bfloat16 input (half the bytes a tile packs and reads
    back; the micro-kernels widen as they load), else ``dt.act``."""
    return _dtypes.BITS if xc.dtype == _dtypes.BITS else dt.act


def _as_bits(dt, *arrays):
    """Whether bfloat16 products take these operands (None for absent ones) as their bfloat16 bits: every one is
    bfloat16, so the micro-kernels widen them as they load (no conversion launch, and the call stays replayable)."""
    return dt.bf16 and all(a is None or _dtypes.is_bf16(a.dtype) for a in arrays)


def _pointwise_bias(bias, dt, bits=True):
    """The pointwise bias as the kernels read it: a bfloat16 bias of bfloat16 products as its bits where ``bits``
    (the GEMM epilogue widens it), else :func:`_bias_array` in ``dt.act``."""
    if bits and bias is not None and _as_bits(dt, bias):
        return _dtypes.bits(bias)
    return _bias_array(bias, dt.act)


def _dw_operands(g, kernel, bias, dt):
    """Depthwise operands ``(wt, bt)``: weights per tap ``(KH*KW, C*dm)`` and the bias (zeros for none), for
    :func:`nbconv._depthwise.dw_packed_rows`, in ``dt.act`` (float32 for bfloat16 products; the weights as
    given, not rounded), or as bfloat16 bits where both are bfloat16 (:func:`_as_bits`)."""
    cm = g.c * g.dm
    wmat = kernel.reshape(g.kh * g.kw, cm)
    if _as_bits(dt, kernel, bias):
        return _dtypes.bits(wmat), (_dtypes.bits(bias) if bias is not None else np.zeros(cm, _dtypes.BITS))
    wt = _dtypes.operand(wmat, dt.act)
    bt = _bias_array(bias, dt.act) if bias is not None else np.zeros(cm, dt.act)
    return wt, bt


def _pointwise_operand(given, wmat, dt, as_b):
    """``(B operand (K, F), packed_k)`` of the pointwise product: the packed panels of a
    :class:`~nbconv.packing.PackedPointwiseKernel` made for the call's products when the kernel reads the weights
    as its ``B`` operand (``as_b``), else the weights row-major and 0.  For bfloat16 products plain weights are
    bfloat16 bits, or float32, rounded to bfloat16 as the kernel packs each panel (no cast of the whole kernel:
    a mixed-precision layer's float32 variables go in as they are)."""
    kind = _dtypes.BITS if dt.bf16 else dt.act
    panels = packing.packed_panels(given, kind) if as_b else None
    if panels is not None:
        return panels, wmat.shape[0]
    if dt.bf16 and not _dtypes.is_bf16(wmat.dtype):
        kind = _dtypes.FLOAT32
    return _dtypes.operand(wmat, kind), 0


def _finish(res, dt, out=None):
    """The caller's result from the kernel's: ``out`` (written unless the kernel wrote it), or ``res`` as the
    result dtype (bfloat16 bits viewed as bfloat16)."""
    if res.dtype == _dtypes.BITS:
        res = _dtypes.from_bits(res)
    if out is not None:
        if res.ctypes.data != out.ctypes.data:
            out[...] = _dtypes.as_dtype(res, out.dtype)
        return out
    return _dtypes.as_dtype(res, dt.result)


def _result(shape, dt, out, inputs):
    """The array the kernel writes: the caller's ``out`` (validated) if the kernel can write it, else a new one
    (:func:`_new_result`)."""
    _args.check_out(out, shape, dt.result, inputs)
    store = dt.store
    if out is not None and out.dtype == store:
        return out
    if out is not None and store == _dtypes.BITS:
        return out.view(store)
    return _new_result(shape, store)


def _new_result(shape, dtype):
    """A new result array, starting on a 64-byte boundary if it is large enough for non-temporal stores
    (:func:`nbconv._plan.stream`): only whole aligned vectors are stored so."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _plan.stream(nbytes):
        return np.empty(shape, dtype)
    buf = np.empty(nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start:start + nbytes].view(dtype).reshape(shape)


@_compile.entry(_fallback.depthwise_conv2d)
@_replay.replayable(_scratch, _new_result)
def depthwise_conv2d(x, kernel, bias=None, *, strides=_args.DEFAULT, padding="valid", dilation_rate=_args.DEFAULT,
                     data_format="channels_last", activation=None, out=None, precision=None, output_dtype=None,
                     **aliases):
    """Depthwise 2-D convolution (Keras's ``DepthwiseConv2D`` / ``ops.depthwise_conv``).

    Parameters
    ----------
    x : array_like of shape (N, H, W, C) or, channels_first, (N, C, H, W)
    kernel : array_like of shape (kh, kw, C, depth_multiplier)
        Keras layout, whatever the data format.
    bias : array_like of shape (C*depth_multiplier,), optional
    strides, dilation_rate : int or pair of int
        PyTorch spellings ``stride=`` and ``dilation=`` are accepted too.
    padding : {"valid", "same"}, int, (ph, pw) or ((top, bottom), (left, right))
        "same" follows Keras/TF: the odd extra row/column goes at the end.
        Integers are explicit zero padding (PyTorch's ``padding=1``).
    data_format : {"channels_last", "channels_first"} or None (channels_last)
    activation : {None, "linear", "relu", "relu6"}
        Fused into the kernel.
    out : ndarray, optional
        Where to write the result: C-contiguous, writeable, of the result's
        shape and dtype, sharing no memory with the inputs (for example a
        framework's output buffer).  Returned.
    precision : {None, "float32", "bfloat16"}
        None: the inputs' own (bfloat16 inputs are rounded to bfloat16 only at
        the end).  "bfloat16" rounds float32 inputs to bfloat16 first.
    output_dtype : dtype, optional
        The result's dtype (float16, bfloat16, float32 or float64), for
        example float32 results of bfloat16 inputs.

    Returns
    -------
    ndarray of shape (N, OH, OW, C*dm) or (N, C*dm, OH, OW)
        Output channel ``c*dm + m`` comes from input channel ``c``. The dtype
        follows NumPy promotion of the inputs (float16 is computed in float32,
        bfloat16 in float32 from its bfloat16 values), or ``output_dtype``.
    """
    POOL.wake()
    strides, dilation_rate = _args.resolve_aliases("depthwise_conv2d", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    act = _args.normalize_activation(activation)
    x = _args.as_float_array(x, "x")
    kernel = _args.as_float_array(kernel, "kernel")
    g = _args.depthwise_geometry(x, kernel, strides, padding, dilation_rate, channels_last)
    cm = g.c * g.dm
    bias = _args.check_bias(bias, "bias", cm)
    dt = _args.dtypes_for(x, kernel, biases=(bias,), precision=precision, output_dtype=output_dtype)

    res = _result(g.out_shape(cm), dt, out, (("x", x), ("kernel", kernel), ("bias", bias)))
    if res.size == 0:
        return _finish(res, dt, out)
    xc = _x_operand(x, dt)
    plan = _plan.depthwise(g, dt.act.itemsize)
    wt, bt = _dw_operands(g, kernel, bias, dt)
    (xs,) = _workspace((plan.xs_shape, _packed_dtype(xc, dt)))
    launch(depthwise_packed, plan.threads, xc, channels_last, wt, bt, act, res.reshape(-1), g.dm, g.sh, g.sw, g.dh,
           g.dw, g.pt, g.pl, g.kh, g.kw, g.oh, g.ow, _plan.packed_width(g), plan.th, plan.cg, plan.nchunks, xs)
    return _finish(res, dt, out)


@_compile.entry(_fallback.pointwise_conv2d)
@_replay.replayable(_scratch, _new_result)
def pointwise_conv2d(x, kernel, bias=None, *, data_format="channels_last", activation=None, out=None,
                     precision=None, output_dtype=None):
    """Pointwise (1x1) 2-D convolution.

    Parameters
    ----------
    x : array_like of shape (N, H, W, K) or, channels_first, (N, K, H, W)
    kernel : array_like of shape (1, 1, K, F) or (K, F)
        Or a :class:`~nbconv.packing.PackedPointwiseKernel` (:func:`~nbconv.pack_pointwise_kernel`), used packed
        with channels_last input.
    bias : array_like of shape (F,), optional
    data_format : {"channels_last", "channels_first"} or None (channels_last)
    activation : {None, "linear", "relu", "relu6"}
    out : ndarray, optional
        Where to write the result: C-contiguous, writeable, of the result's
        shape and dtype, sharing no memory with the inputs (for example a
        framework's output buffer).  Returned.
    precision : {None, "float32", "bfloat16"}
        The products' precision: None takes the inputs' (bfloat16 inputs
        multiply bfloat16 pairs, summed in float32); "bfloat16" rounds float32
        inputs to bfloat16 for them; "float32" computes bfloat16 inputs in float32.
    output_dtype : dtype, optional
        The result's dtype (float16, bfloat16, float32 or float64).

    Returns
    -------
    ndarray of shape (N, H, W, F) or (N, F, H, W)
    """
    POOL.wake()
    channels_last = _args.normalize_data_format(data_format)
    act = _args.normalize_activation(activation)
    x = _args.as_float_array(x, "x")
    given = kernel
    kernel = _args.as_float_array(kernel, "kernel")
    _args.check_ndim(x, "x", 4, "of shape " + ("(N, H, W, C)" if channels_last else "(N, C, H, W)"))
    k = x.shape[3] if channels_last else x.shape[1]
    wmat = _args.pointwise_matrix(kernel, k, "kernel")
    f = wmat.shape[1]
    bias = _args.check_bias(bias, "bias", f)
    dt = _args.dtypes_for(x, kernel, biases=(bias,), precision=precision, output_dtype=output_dtype)

    n = x.shape[0]
    h, w = (x.shape[1], x.shape[2]) if channels_last else (x.shape[2], x.shape[3])
    res = _result((n, h, w, f) if channels_last else (n, f, h, w), dt, out,
                  (("x", x), ("kernel", kernel), ("bias", bias)))
    if res.size == 0:
        return _finish(res, dt, out)
    xc = _x_operand(x, dt)
    bc = _pointwise_bias(bias, dt)  # bfloat16 products take the NHWC branch below, whose epilogue widens bits
    stream = _plan.stream(res.nbytes)
    if channels_last or dt.bf16:
        # bfloat16 products take NHWC pixels (pairs of channels side by side): NCHW goes through a transposed copy
        x2 = xc.reshape(-1, k) if channels_last else np.ascontiguousarray(np.moveaxis(xc, 1, 3)).reshape(-1, k)
        res2 = res.reshape(-1, f) if channels_last else np.empty((n * h * w, f), res.dtype)
        wc, packed_k = _pointwise_operand(given, wmat, dt, True)
        plan = _plan.pointwise(n, h * w, k, f, False, packing.packed_align(given, dt))
        (p_scr,) = _workspace(((plan.nchunks, _panel_scratch(dt, packed_k, k)), _dtypes.BITS))
        launch(pointwise_nhwc, plan.threads, x2, wc, bc, act, res2, plan.tile_p, plan.fb, plan.nchunks, stream,
               packed_k, p_scr)
        if not channels_last:
            res[...] = np.moveaxis(res2.reshape(n, h, w, f), 3, 1)
    else:
        wc = _dtypes.operand(wmat, dt.act)
        plan = _plan.pointwise(n, h * w, k, f, True, 16)
        launch(pointwise_nchw, plan.threads, xc.reshape(n, k, -1), wc, bc, act, res.reshape(n, f, -1), plan.tile_p,
               plan.fb, plan.nchunks, stream)
    return _finish(res, dt, out)


@_compile.entry(_fallback.separable_conv2d)
@_replay.replayable(_scratch, _new_result)
def separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias=None, *, strides=_args.DEFAULT, padding="valid",
                     dilation_rate=_args.DEFAULT, data_format="channels_last", activation=None, depthwise_bias=None,
                     depthwise_activation=None, out=None, precision=None, output_dtype=None, **aliases):
    """Fused depthwise-separable 2-D convolution (Keras's ``SeparableConv2D`` / ``ops.separable_conv``).

    A depthwise convolution (``depthwise_kernel``, strides, padding, dilation),
    then ``depthwise_bias`` and ``depthwise_activation`` if given, then a 1x1
    convolution (``pointwise_kernel``), ``bias`` and ``activation``.  The
    depthwise result is computed tile by tile in thread-private scratch and
    never materialised in full.

    Parameters
    ----------
    x : array_like of shape (N, H, W, C) or, channels_first, (N, C, H, W)
    depthwise_kernel : array_like of shape (kh, kw, C, depth_multiplier)
    pointwise_kernel : array_like of shape (1, 1, C*depth_multiplier, F) or (C*depth_multiplier, F)
        Or a :class:`~nbconv.packing.PackedPointwiseKernel` (:func:`~nbconv.pack_pointwise_kernel`): the same
        result, faster with 1024+ filters on small images when called many times with the same weights.
    bias : array_like of shape (F,), optional
    strides, padding, dilation_rate, data_format, activation
        As in :func:`depthwise_conv2d` (``stride=`` and ``dilation=`` accepted too).
    depthwise_bias : array_like of shape (C*depth_multiplier,), optional
    depthwise_activation : {None, "linear", "relu", "relu6"}
        Applied to the depthwise result before the pointwise product
        (MobileNet blocks with batch norm folded in); Keras's layer uses neither.
    out : ndarray, optional
        Where to write the result: C-contiguous, writeable, of the result's
        shape and dtype, sharing no memory with the inputs (for example a
        framework's output buffer).  Returned.
    precision : {None, "float32", "bfloat16"}
        The pointwise products' precision: None takes the inputs' (bfloat16
        inputs: the depthwise result is rounded to bfloat16 and multiplied in
        bfloat16 pairs, summed in float32); "bfloat16" does the same for
        float32 inputs (``x`` and the pointwise weights rounded to bfloat16;
        the depthwise part computes in float32 with its weights as given);
        "float32" computes bfloat16 inputs in float32 throughout.
    output_dtype : dtype, optional
        The result's dtype (float16, bfloat16, float32 or float64), for
        example float32 results of bfloat16 products.

    Returns
    -------
    ndarray of shape (N, OH, OW, F) or (N, F, OH, OW)
    """
    POOL.wake()
    strides, dilation_rate = _args.resolve_aliases("separable_conv2d", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    act = _args.normalize_activation(activation)
    dact = _args.normalize_activation(depthwise_activation, "depthwise_activation")
    x, dk, pk, g, wmat = _args.separable_operands(x, depthwise_kernel, pointwise_kernel, strides, padding,
                                                  dilation_rate, channels_last)
    cm, f = wmat.shape
    bias = _args.check_bias(bias, "bias", f)
    dbias = _args.check_bias(depthwise_bias, "depthwise_bias", cm)
    dt = _args.dtypes_for(x, dk, pk, biases=(bias, dbias), precision=precision, output_dtype=output_dtype)

    res = _result(g.out_shape(f), dt, out,
                  (("x", x), ("depthwise_kernel", dk), ("pointwise_kernel", pk), ("bias", bias),
                   ("depthwise_bias", dbias)))
    if res.size == 0:
        return _finish(res, dt, out)
    xc = _x_operand(x, dt)
    wt, bt = _dw_operands(g, dk, dbias, dt)
    # bits only beside bits depthwise operands: one more kernel signature, not three
    bc = _pointwise_bias(bias, dt, wt.dtype == _dtypes.BITS)
    plan = _plan.separable(g, f, dt.act.itemsize, packing.packed_align(pointwise_kernel, dt), dt.bf16)
    # fused mode with NCHW input reads the float weights as the GEMM's A operand, unpacked
    wc, packed_k = _pointwise_operand(pointwise_kernel, wmat, dt, channels_last or plan.shared or dt.bf16)
    xs, d, tt, p_scr = _workspace((plan.xs_shape, _packed_dtype(xc, dt)),
                                  (plan.d_shape, _dtypes.BITS if dt.bf16 else dt.act), (plan.t_shape, dt.act),
                                  ((plan.nchunks, _panel_scratch(dt, packed_k, cm)), _dtypes.BITS))
    launch(separable, plan.threads, xc, channels_last, wt, bt, dact, wc, bc, act, res.reshape(-1), g.dm, g.sh, g.sw,
           g.dh, g.dw, g.pt, g.pl, g.kh, g.kw, g.oh, g.ow, _plan.packed_width(g), plan.th, plan.cg, plan.shared,
           plan.gn, plan.tile_p, plan.fb, plan.nchunks1, plan.nchunks, xs, d, tt, _plan.stream(res.nbytes), packed_k,
           p_scr)
    return _finish(res, dt, out)
