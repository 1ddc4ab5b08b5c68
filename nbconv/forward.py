"""Public forward functions: depthwise, pointwise and fused separable 2-D convolution on NumPy arrays.

Each function normalises and validates its arguments (:mod:`nbconv._args`),
picks the kernel and its tiling, allocates the output and calls the kernel.
Nothing here loops over data.
"""
import contextlib
import functools
import math
import threading

import numpy as np

from . import _args, _compile, _dtypes, _fallback, packing
from ._depthwise import depthwise_packed
from ._gemm import panel_scratch
from ._jit import serial_twin
from ._pointwise import pointwise_nchw, pointwise_nhwc
from ._runtime import LAUNCH_LOCK
from ._separable import separable
from ._threads import planning_threads

__all__ = ["depthwise_conv2d", "pointwise_conv2d", "separable_conv2d"]

#: bytes of one thread-private depthwise tile (and of its packed input rows) in the fused kernel: half the
#: 1 MiB L2 of the target machines (256 KiB tiles of 700+ channels made GEMMs of under 100 pixels, 30% slower)
TILE_BYTES = 512 * 1024
#: largest whole depthwise intermediate held at once (shared mode of the fused kernel), used for small images
#: (fewer row tiles than two per thread) ...
SHARED_BYTES = 8 * 1024 * 1024
#: ... and for many channels: tiles of 512 KiB are GEMMs of under 150 pixels there, each streaming all the
#: weights (measured, Xception's 37x37x728->728: 4.61 ms shared against 5.25 fused, medians of 40
#: alternating calls; 74x74x256 and 28x28x256 at batch 8 equal within noise)
SHARED_MIN_CM = 256
#: ... unless the pointwise weights are this small: each tile's GEMM then finds them in L2 beside the tile, and
#: the fused mode saves the intermediate's round trip through L3 (measured, alternating blocks in one process:
#: 8x28x28x256->256 7.26 -> 6.23 ms and 74x74x256->256 6.06 -> 5.56 ms fused; with weights of 512 KiB or more,
#: 8x28x28x256->512 s2, 37x37x256->728 and 8x7x7x1024, shared stayed 3-25% faster)
FUSED_B_BYTES = 256 * 1024
#: fewest pixels per thread worth splitting a GEMM's pixels for (below that, its filters are split)
MIN_SPLIT_P = 128
#: most pixels in one GEMM task
MAX_TILE_P = 4096
#: fewest filters per filter block
MIN_FB = 64
#: filters per block when a GEMM's filters are split (measured, 100x1536 pixels x channels, one thread:
#: 190 GFLOP/s on blocks of 256-512 filters, 145-155 on 1024-2048)
FB_TARGET = 512
#: tasks per thread from which an uneven share no longer matters
EVEN_TASKS = 8
#: multiply-adds below which a call runs as one task: waking a second thread costs more than it saves
TINY_MACS = 1 << 19
#: outputs of at least this many bytes are written with non-temporal stores, which skip reading each line
#: before writing it and leave the caches to the inputs and the depthwise tiles.  Measured (separable, medians
#: of alternating blocks of calls): 147x147x64->128 1.72-1.95 -> 1.34-1.36 ms, 8x56x56x128->128 4.2-4.4 ->
#: 3.0-3.7 ms; outputs of 3-6 MiB were as fast or slower (they stay in the 32 MiB L3 for the next layer)
STREAM_BYTES = 8 * 1024 * 1024


_WORKSPACE = threading.local()

#: kernel -> its serial twin, for calls planned for one thread (no parallel launch, no launch lock)
_SERIAL = {k: serial_twin(k) for k in (depthwise_packed, pointwise_nhwc, pointwise_nchw, separable)}
_compile.register(*_SERIAL, *_SERIAL.values(), twins=_SERIAL.items())
_NO_LOCK = contextlib.nullcontext()


def _launch(kernel, threads):
    """``(kernel, lock)`` to run a call planned for ``threads`` threads: the serial twin for one."""
    if threads == 1:
        return _compile.k(_SERIAL.get(kernel, kernel)), _NO_LOCK
    return _compile.k(kernel), LAUNCH_LOCK


def _workspace(*specs):
    """Scratch arrays ``(shape, dtype)`` carved from one grow-only buffer private to the calling Python thread.

    Scratch is megabytes for large images: a fresh ``np.empty`` per call is
    returned to the OS when freed and page-faults back in on the next call
    (about 0.5 ms for 4 MB).  Each array starts 64-byte aligned.  A thread's
    next call reuses the buffer, so a call's scratch must not outlive it.
    The views of a repeated set of shapes are cached (a layer calls with the
    same shapes every time: a few microseconds of a tiny call).
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


def _even_parts(n_img, size, most, threads, fewest=1):
    """Part size for cutting ``size`` (per image) into parts of at most ``most``, at least ``fewest`` in all.

    When the ``n_img * parts`` tasks are few (under :data:`EVEN_TASKS` per
    thread), their count is raised to a multiple of ``threads``: with 4 tasks
    of 256, 256, 256 and 16 pixels on 2 threads, one thread does three
    quarters of the work (measured: 0.51 ms against 0.29 ms for two equal
    halves).
    """
    first = max(-(-size // max(1, most)), -(-fewest // n_img))
    for parts in range(first, size + 1):
        part = -(-size // parts)
        tasks = n_img * -(-size // part)
        if tasks >= EVEN_TASKS * threads or tasks % threads == 0:
            return part
    return -(-size // first)


def _filter_blocks(n_img, filters, threads, align=16):
    """Filter block size near :data:`FB_TARGET` making ``n_img * blocks`` a multiple of ``threads``; blocks
    start on multiples of ``align`` (a panel of packed weights, :mod:`nbconv.packing`)."""
    step = threads // math.gcd(n_img, threads)
    blocks = _round_up(max(1, -(-filters // FB_TARGET)), step)
    blocks = max(1, min(blocks, filters // MIN_FB))
    return _round_up(-(-filters // blocks), align) if blocks > 1 else filters


def _plan(n_img, pixels, filters, threads, align=16):
    """Tiling ``(tile_p, fb, ntasks)`` of ``n_img`` GEMMs of ``pixels x K @ K x filters`` (tiles never cross images).

    OpenBLAS packs both operands on every call, so it runs nearest its peak
    on a few large calls: one task per thread where possible.  The pixels are
    split while each thread still gets :data:`MIN_SPLIT_P` of them; below
    that (7x7 or 14x14 images, many channels) the filters are split
    instead (measured: 49x1024 @ 1024x1024 at 281 GFLOP/s over two filter
    halves, 210 over two pixel halves).
    """
    if n_img * pixels >= threads * MIN_SPLIT_P or filters < 2 * MIN_FB:
        tile_p, fb = _even_parts(n_img, pixels, MAX_TILE_P, threads, threads), filters
    else:
        tile_p, fb = pixels, _filter_blocks(n_img, filters, threads, align)
    return tile_p, fb, n_img * -(-pixels // tile_p) * -(-filters // fb)


def _threads_for(macs):
    """Threads to plan a call of ``macs`` multiply-adds for: the pool's size (see
    :func:`nbconv._threads.planning_threads`), or 1 for tiny calls (:data:`TINY_MACS`)."""
    return 1 if macs < TINY_MACS else planning_threads()


def _nchunks(ntasks, threads):
    return max(1, min(ntasks, 4 * threads))


def _packed_width(g):
    """Columns of one packed input row (:func:`nbconv._depthwise.pack_rows`): the padded columns the taps
    read, rounded up to an odd count.

    Each block of channels of a packed tile is ``rows * width`` vectors long;
    at an even width such as 16 (14x14 images) a power of two of them puts
    every block's pixel on the same cache sets, and packing one pixel's 32
    blocks missed the L1 on every store (14x14x512 depthwise: pack 66 us
    against 11 us for 7x7x1024).  The extra column is zeroed, never read.
    """
    return ((g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1) | 1


def _row_tiles(g, cm, itemsize, threads, min_tiles):
    """Output rows per depthwise tile.

    As many as keep both the tile's depthwise result and its packed input
    rows within :data:`TILE_BYTES` (at stride 2 the packed rows are about 4x
    the result), with at least ``min_tiles`` tiles in all, and a count that
    shares evenly between threads (:func:`_even_parts`); one row at least.
    A call planned for one thread ignores ``min_tiles``: more tiles only
    repack the input rows they share (7x7x1024 depthwise, serial: 38 us in
    one tile against 56 us in four, alternating blocks in one process).
    """
    if threads == 1:
        min_tiles = 1
    wp = _packed_width(g)
    by_result = TILE_BYTES // max(1, g.ow * cm * itemsize)
    by_input = (TILE_BYTES // max(1, wp * cm * itemsize) - (g.kh - 1) * g.dh - 1) // g.sh + 1
    th = max(1, min(g.oh, by_result, by_input))
    return _even_parts(g.n, g.oh, th, threads, min_tiles)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


_NO_TAPS_LEN = 4096
_NO_TAPS = {np.dtype(t).char: np.empty((_NO_TAPS_LEN, 0), t) for t in (np.float32, np.float64)}


def _dw_operands(g, kernel, bias, dt):
    """Depthwise operands: ``(wt, bt, wc, bc, wp)``.

    Weights per tap ``(KH*KW, C*dm)`` and the bias (zeros for none) for
    :func:`nbconv._depthwise.dw_packed_rows`; ``wc`` is an empty ``(C*dm, 0)``
    array (the kernels read only its row count) and ``bc`` the bias or an
    empty array.  ``wp`` is the packed row width.  The depthwise part
    computes in ``dt.act`` (float32 for bfloat16 products), the weights as given.
    """
    cm = g.c * g.dm
    act_dtype = dt.act
    wp = _packed_width(g)
    wt = _dtypes.operand(kernel.reshape(g.kh * g.kw, cm), act_dtype)
    bc = _bias_array(bias, act_dtype)
    bt = bc if bias is not None else np.zeros(cm, act_dtype)
    wc = _NO_TAPS[act_dtype.char][:cm] if cm <= _NO_TAPS_LEN else np.empty((cm, 0), act_dtype)
    return wt, bt, wc, bc, wp


def _packed_size(g, th, wp):
    """Elements of one chunk's packed-row scratch: the packed rows, channels padded to whole vectors (16
    lanes covers every vector width, see :func:`nbconv._depthwise.pack_rows`)."""
    return ((th - 1) * g.sh + (g.kh - 1) * g.dh + 1) * wp * _round_up(g.c * g.dm, 16)


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
    if dt.bf16 and wmat.dtype != _dtypes.BFLOAT16:
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
    """The array the kernel writes: the caller's ``out`` (validated) if the kernel can write it, else a new one.

    A new array of :data:`STREAM_BYTES` or more starts on a 64-byte boundary,
    so that its rows can take non-temporal vector stores (see :func:`_stream`).
    """
    _args.check_out(out, shape, dt.result, inputs)
    store = dt.store
    if out is not None and out.dtype == store:
        return out
    if out is not None and store == _dtypes.BITS:
        return out.view(store)
    nbytes = math.prod(shape) * store.itemsize
    if nbytes < STREAM_BYTES:
        return np.empty(shape, store)
    buf = np.empty(nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    return buf[start:start + nbytes].view(store).reshape(shape)


def _stream(res):
    """Whether the kernel writes ``res`` with non-temporal stores: when it is too large to stay in cache for
    whoever reads it next (:data:`STREAM_BYTES`).  Only whole, aligned vectors are stored so."""
    return res.nbytes >= STREAM_BYTES


def _memo_plan(plan):
    """Memoise a planning function of plain ints (and :class:`~nbconv._args.Geometry`).

    A layer calls with the same shapes every time, and planning costs a few
    microseconds of a tiny call.  The key includes this module's tunables,
    so a changed tunable (tests set them) plans afresh.
    """
    cache = {}

    @functools.wraps(plan)
    def memoised(*args):
        key = (args, TILE_BYTES, SHARED_BYTES, SHARED_MIN_CM, FUSED_B_BYTES, MIN_SPLIT_P, MAX_TILE_P, MIN_FB,
               FB_TARGET, EVEN_TASKS)
        value = cache.get(key)
        if value is None:
            value = plan(*args)
            if len(cache) >= 256:
                cache.clear()
            cache[key] = value
        return value

    return memoised


@_memo_plan
def _separable_plan(g, cm, f, itemsize, threads, align, bf16=False):
    """Work plan of the fused kernel: ``(th, shared, gn, tile_p, fb, nchunks1, nchunks, xs_shape, d_shape, t_shape)``.

    See :func:`nbconv._separable.separable` for the parameters and the two
    modes; the ``*_shape`` are the scratch shapes.  ``itemsize`` is the
    depthwise arithmetic's; with ``bf16`` (bfloat16 products) NCHW input runs
    pixel-major tiles in both modes (the transposed store's ``t_shape``).
    """
    th = _row_tiles(g, cm, itemsize, threads, 1)
    many_channels = cm >= SHARED_MIN_CM and cm * f * itemsize > FUSED_B_BYTES
    shared = ((g.n * -(-g.oh // th) < 2 * threads or many_channels)
              and g.n * g.oh * g.ow * cm * itemsize <= SHARED_BYTES)
    if shared:
        # small images: depthwise for all rows first (parallel over rows), then GEMM tiles x filter blocks;
        # NHWC pixels of all images are one GEMM
        th = _row_tiles(g, cm, itemsize, threads, 4 * threads)
        nchunks1 = _nchunks(g.n * -(-g.oh // th), threads)
        gn = 1 if g.channels_last else g.n
        tile_p, fb, ntasks = _plan(gn, g.n * g.oh * g.ow // gn, f, threads, align)
    else:
        th = _row_tiles(g, cm, itemsize, threads, threads)
        tiles = g.n * -(-g.oh // th)
        # fewer output rows than threads: split the filters too (tiles recomputed per block)
        fb = f if tiles >= threads else _filter_blocks(tiles, f, threads, align)
        tile_p, ntasks = th * g.ow, tiles * -(-f // fb)
        nchunks1, gn = 0, g.n
    nchunks = _nchunks(ntasks, threads)
    wp = _packed_width(g)
    d_shape = (1, g.n * g.oh * g.ow * cm) if shared else (nchunks, th * g.ow * cm)
    t_shape = (nchunks, tile_p * fb if (shared or bf16) and not g.channels_last else 0)
    return (th, shared, gn, tile_p, fb, nchunks1, nchunks, (max(nchunks, nchunks1), _packed_size(g, th, wp)),
            d_shape, t_shape)


@_compile.entry(_fallback.depthwise_conv2d)
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
    threads = _threads_for(g.n * g.oh * g.ow * cm * g.kh * g.kw)
    wt, bt, wc, bc, wp = _dw_operands(g, kernel, bias, dt)
    th = _row_tiles(g, cm, dt.act.itemsize, threads, 4 * threads)
    nchunks = _nchunks(g.n * -(-g.oh // th), threads)
    (xs,) = _workspace(((nchunks, _packed_size(g, th, wp)), dt.act))
    kernel_fn, lock = _launch(depthwise_packed, threads)
    with lock:
        kernel_fn(xc, channels_last, wt, bt, wc, bc, act, res.reshape(-1), g.dm, g.sh, g.sw, g.dh, g.dw,
                  g.pt, g.pl, g.kh, g.kw, g.oh, g.ow, wp, th, nchunks, xs)
    return _finish(res, dt, out)


@_compile.entry(_fallback.pointwise_conv2d)
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
    bc = _bias_array(bias, dt.act)
    threads = _threads_for(n * h * w * k * f)
    if channels_last or dt.bf16:
        # bfloat16 products take NHWC pixels (pairs of channels side by side): NCHW goes through a transposed copy
        x2 = xc.reshape(-1, k) if channels_last else np.ascontiguousarray(np.moveaxis(xc, 1, 3)).reshape(-1, k)
        res2 = res.reshape(-1, f) if channels_last else np.empty((n * h * w, f), res.dtype)
        wc, packed_k = _pointwise_operand(given, wmat, dt, True)
        tile_p, fb, ntasks = _plan(1, n * h * w, f, threads, packing.packed_align(given, dt))
        nchunks = _nchunks(ntasks, threads)
        (p_scr,) = _workspace(((nchunks, _panel_scratch(dt, packed_k, k)), _dtypes.BITS))
        kernel_fn, lock = _launch(pointwise_nhwc, threads)
        with lock:
            kernel_fn(x2, wc, bc, act, res2, tile_p, fb, nchunks, _stream(res), packed_k, p_scr)
        if not channels_last:
            res[...] = np.moveaxis(res2.reshape(n, h, w, f), 3, 1)
    else:
        wc = _dtypes.operand(wmat, dt.act)
        tile_p, fb, ntasks = _plan(n, h * w, f, threads)
        nchunks = _nchunks(ntasks, threads)
        kernel_fn, lock = _launch(pointwise_nchw, threads)
        with lock:
            kernel_fn(xc.reshape(n, k, -1), wc, bc, act, res.reshape(n, f, -1), tile_p, fb, nchunks, _stream(res))
    return _finish(res, dt, out)


@_compile.entry(_fallback.separable_conv2d)
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
    bc = _bias_array(bias, dt.act)
    threads = _threads_for(g.n * g.oh * g.ow * cm * (g.kh * g.kw + f))
    wt, bt, wc_dw, bc_dw, wp = _dw_operands(g, dk, dbias, dt)
    th, shared, gn, tile_p, fb, nchunks1, nchunks, xs_shape, d_shape, t_shape = _separable_plan(
        g, cm, f, dt.act.itemsize, threads, packing.packed_align(pointwise_kernel, dt), dt.bf16)
    # fused mode with NCHW input reads the float weights as the GEMM's A operand, unpacked
    wc, packed_k = _pointwise_operand(pointwise_kernel, wmat, dt, channels_last or shared or dt.bf16)
    xs, d, tt, p_scr = _workspace((xs_shape, dt.act), (d_shape, _dtypes.BITS if dt.bf16 else dt.act),
                                  (t_shape, dt.act), ((nchunks, _panel_scratch(dt, packed_k, cm)), _dtypes.BITS))
    kernel_fn, lock = _launch(separable, threads)
    with lock:
        kernel_fn(xc, channels_last, wt, bt, wc_dw, bc_dw, dact, wc, bc, act, res.reshape(-1), g.dm, g.sh, g.sw, g.dh,
                  g.dw, g.pt, g.pl, g.kh, g.kw, g.oh, g.ow, wp, th, shared, gn, tile_p, fb, nchunks1, nchunks, xs, d,
                  tt, _stream(res), packed_k, p_scr)
    return _finish(res, dt, out)
