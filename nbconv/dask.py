"""Depthwise, pointwise and separable 2-D convolution on Dask arrays: one lazy graph, any cluster.

The functions take a :class:`dask.array.Array` chunked over the batch and/or
the spatial axes and return a lazy Dask array equal to what the in-memory
functions of :mod:`nbconv` return for the whole array.  Every task calls the
in-memory function on one block, so the same code runs on the threaded
scheduler, a ``LocalCluster`` or a multi-machine ``distributed`` cluster.

This module is imported only explicitly (``import nbconv.dask``); ``import
nbconv`` never imports Dask.  Install the extra with ``pip install nbconv[dask]``.

How the graph is built
----------------------
* Channels must be one chunk (the depthwise output channel ``c*dm + m`` and the
  pointwise product need every channel of a pixel).  An array chunked over
  channels is rechunked with a :class:`PerformanceWarning`; pass
  ``rechunk=False`` to get a ``ValueError`` instead (e.g. when such a
  rechunk would not fit in a worker's memory and you would rather choose
  the chunks yourself).
* Chunks over the batch only (or any chunks for ``pointwise_conv2d``): a plain
  :func:`dask.array.map_blocks`, one task per input block, which fuses with
  the tasks that produce the input.
* Chunks over H and/or W: the output is split at the output rows/columns whose
  receptive field starts at an input chunk boundary, so the output chunks are
  the input chunks divided by the stride, aligned to it.  Each output tile
  reads its input window ``[o0*s - p, (o1-1)*s + (k-1)*d + 1 - p)`` (any
  padding form: zeros outside the image are passed to the kernel as explicit
  padding, never materialised) from the input blocks it overlaps; only the
  halo slices of neighbouring blocks travel between workers.  The result is
  exactly the in-memory one, whatever the chunk sizes (also smaller than the
  kernel's reach), strides, dilation and padding.
* The weights enter the graph once, as one key every task depends on: a worker
  receives them once, not once per task.
* Inside each task the kernels run on ``num_threads`` Numba threads (1 by
  default): Dask's worker threads give the parallelism, and Numba's own pool
  would only oversubscribe the cores.  Use ``num_threads=None`` to keep the
  worker's setting, e.g. with one single-threaded Dask worker per machine.
"""
import bisect
import math
import numbers
import operator
import warnings
from functools import partial

import dask
import dask.array as da
import numba
import numpy as np
from dask.array.core import PerformanceWarning
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import _args, forward
from ._threads import num_threads as _num_threads

__all__ = ["depthwise_conv2d", "pointwise_conv2d", "separable_conv2d"]


class _Weights:
    """The weights of one call, one object in the graph: ``fn(x, *args, **kwargs)``."""

    def __init__(self, args, kwargs):
        self.args = args
        self.kwargs = kwargs

    def __dask_tokenize__(self):
        return (type(self).__name__, self.args, sorted(self.kwargs.items()))


def _run(fn, static, threads, x, weights, **extra):
    """Call the in-memory ``fn`` on one block, with ``threads`` Numba threads (None: leave as is)."""
    if threads is None:
        return fn(x, *weights.args, **weights.kwargs, **static, **extra)
    with _num_threads(min(threads, numba.config.NUMBA_NUM_THREADS)):
        return fn(x, *weights.args, **weights.kwargs, **static, **extra)


def _tile(run, padding, hax, wax, zeros_shape, dtype, pieces, weights):
    """Assemble one tile's input window from ``pieces`` (rows of blocks) and convolve it.

    ``zeros_shape`` is set when the window lies entirely in the zero padding.
    """
    if zeros_shape is not None:
        x = np.zeros(zeros_shape, dtype)
    elif len(pieces) == 1 and len(pieces[0]) == 1:
        x = pieces[0][0]
    else:  # one copy into the window (np.block would copy twice)
        heights = [row[0].shape[hax] for row in pieces]
        widths = [p.shape[wax] for p in pieces[0]]
        shape = list(pieces[0][0].shape)
        shape[hax], shape[wax] = sum(heights), sum(widths)
        x = np.empty(shape, pieces[0][0].dtype)
        index = [slice(None)] * 4
        r0 = 0
        for row, hh in zip(pieces, heights):
            c0 = 0
            for p, ww in zip(row, widths):
                index[hax], index[wax] = slice(r0, r0 + hh), slice(c0, c0 + ww)
                x[tuple(index)] = p
                c0 += ww
            r0 += hh
    return run(x, weights, padding=padding)


def _getitem(index, block):
    return operator.getitem(block, index)


def _check_threads(num_threads):
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 1
    ):
        raise ValueError(
            f"Expected `num_threads` to be None or a positive int. Received: num_threads={num_threads!r}"
        )
    return None if num_threads is None else int(num_threads)


def _check_x(x, channels_last):
    """Checks of ``x`` that need no weights: type, ndim, dtype, known chunks."""
    if not isinstance(x, da.Array):
        raise TypeError(
            "Expected `x` to be a dask.array.Array (nbconv's top-level functions take NumPy arrays; "
            "dask.array.from_array(x, chunks=...) makes one). "
            f"Received: x of type {type(x).__module__}.{type(x).__qualname__}"
        )
    layout = "(N, H, W, C)" if channels_last else "(N, C, H, W)"
    _args.check_ndim(x, "x", 4, f"of shape {layout}")
    _args.as_float_array(np.empty((0,) * 4, x.dtype), "x")
    if any(math.isnan(c) for axis in x.chunks for c in axis):
        raise ValueError(
            "Expected `x` to have known chunk sizes (call x.compute_chunk_sizes() first). "
            f"Received: x with chunks {x.chunks}"
        )


def _one_channel_chunk(x, cax, rechunk):
    if not isinstance(rechunk, (bool, np.bool_)):
        raise ValueError(f"Expected `rechunk` to be True or False. Received: rechunk={rechunk!r}")
    if len(x.chunks[cax]) == 1:
        return x
    if not rechunk:
        raise ValueError(
            f"Expected `x` to have its channel axis (axis {cax}) in one chunk: every output pixel needs all "
            f"the channels of its input pixels. Received: x with chunks {x.chunks[cax]} along axis {cax} and "
            f"rechunk=False. Pass rechunk=True or call x.rechunk({{{cax}: -1}}) yourself."
        )
    warnings.warn(
        f"nbconv.dask: `x` is chunked over its channel axis (axis {cax}, chunks {x.chunks[cax]}); "
        f"rechunking it to one chunk along that axis. Chunk over batch and space only to avoid this.",
        PerformanceWarning,
        stacklevel=3,
    )
    return x.rechunk({cax: -1})


def _axis_plan(in_chunks, size, k, s, d, before, out):
    """Output chunks along one spatial axis and, for each, the input window it reads.

    Output ``o`` reads inputs ``[o*s - before, o*s - before + (k-1)*d + 1)``.
    Output chunk boundaries are put at the first output whose window starts
    in the next input chunk, so output chunks are input chunks over the stride.

    Returns ``(out_chunks, plans)``, ``plans[j] = (pad_before, pad_after,
    window, pieces)`` with ``pieces`` a list of ``(input_chunk, start, stop,
    chunk_length)`` in the chunk's local coordinates.
    """
    starts = [0]
    for c in in_chunks:
        starts.append(starts[-1] + int(c))
    bounds = [0]
    for b in sorted(set(starts[1:-1]) - {0, size}):  # the inner boundaries (zero-size chunks add none)
        o = min(max(-(-(b + before) // s), 0), out)
        if o > bounds[-1]:
            bounds.append(o)
    if bounds[-1] < out:
        bounds.append(out)
    reach = (k - 1) * d + 1
    plans = []
    for o0, o1 in zip(bounds[:-1], bounds[1:]):
        a = o0 * s - before
        b = (o1 - 1) * s + reach - before
        lo, hi = max(a, 0), min(b, size)
        pieces = []
        i = bisect.bisect_right(starts, lo) - 1  # the input chunk holding row `lo`
        while 0 <= i < len(in_chunks) and starts[i] < hi:
            u0, u1 = max(lo, starts[i]), min(hi, starts[i + 1])
            if u0 < u1:
                pieces.append((i, u0 - starts[i], u1 - starts[i], starts[i + 1] - starts[i]))
            i += 1
        plans.append((max(0, -a), max(0, b - size), b - a, pieces))
    out_chunks = tuple(o1 - o0 for o0, o1 in zip(bounds[:-1], bounds[1:]))
    return out_chunks, plans


def _spatial_graph(x, g, run, weights, out_channels, dtype, name):
    """The tiled graph for an ``x`` chunked over H and/or W (see the module docstring)."""
    cl = g.channels_last
    hax, wax = (1, 2) if cl else (2, 3)
    hchunks, hplans = _axis_plan(x.chunks[hax], g.h, g.kh, g.sh, g.dh, g.pt, g.oh)
    wchunks, wplans = _axis_plan(x.chunks[wax], g.w, g.kw, g.sw, g.dw, g.pl, g.ow)
    piece_name = "nbconv-halo-" + name.split("-", 1)[1]
    dsk = {}
    piece_keys = {}

    def piece(bi, hpiece, wpiece):
        hi, h0, h1, hlen = hpiece
        wi, w0, w1, wlen = wpiece
        key = (x.name, bi, hi, wi, 0) if cl else (x.name, bi, 0, hi, wi)
        if (h0, h1, w0, w1) == (0, hlen, 0, wlen):
            return key
        spec = (key, h0, h1, w0, w1)
        if spec not in piece_keys:
            index = (slice(None), slice(h0, h1), slice(w0, w1)) if cl else (
                slice(None), slice(None), slice(h0, h1), slice(w0, w1))
            pkey = (piece_name, len(piece_keys))
            piece_keys[spec] = pkey
            dsk[pkey] = (partial(_getitem, index), key)
        return piece_keys[spec]

    for bi, nb in enumerate(x.chunks[0]):
        for i, (ht, hb, hwin, hpieces) in enumerate(hplans):
            for j, (wl, wr, wwin, wpieces) in enumerate(wplans):
                if hpieces and wpieces:
                    pieces = [[piece(bi, hp, wp) for wp in wpieces] for hp in hpieces]
                    padding, zeros_shape = ((ht, hb), (wl, wr)), None
                else:  # the whole window is zero padding
                    pieces, padding = [], ((0, 0), (0, 0))
                    zeros_shape = (nb, hwin, wwin, g.c) if cl else (nb, g.c, hwin, wwin)
                key = (name, bi, i, j, 0) if cl else (name, bi, 0, i, j)
                dsk[key] = (partial(_tile, run, padding, hax, wax, zeros_shape, x.dtype), pieces, weights.key)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x, weights])
    chunks = (x.chunks[0], hchunks, wchunks, (out_channels,)) if cl else (
        x.chunks[0], (out_channels,), hchunks, wchunks)
    return da.Array(graph, name, chunks, meta=np.empty((0,) * 4, dtype))


def _build(op, x, g, fn, weight_args, weight_kwargs, static, out_channels, result, threads, spatial):
    """Graph for one call: ``map_blocks`` when no halo is needed, else the tiled graph."""
    cl = g.channels_last
    weights = dask.delayed(_Weights(weight_args, weight_kwargs), pure=True)
    run = partial(_run, fn, static, threads)
    name = f"nbconv-{op}-" + tokenize(x.name, weights.key, static, threads, tuple(g))
    out_shape = g.out_shape(out_channels)
    if 0 in out_shape:
        return da.empty(out_shape, dtype=result)
    hax, wax, cax = (1, 2, 3) if cl else (2, 3, 1)
    if spatial and (len(x.chunks[hax]) > 1 or len(x.chunks[wax]) > 1):
        return _spatial_graph(x, g, run, weights, out_channels, result, name)
    chunks = list(x.chunks)
    chunks[cax] = (out_channels,)
    if spatial:
        chunks[hax], chunks[wax] = (g.oh,), (g.ow,)
        run = partial(run, padding=((g.pt, g.pb), (g.pl, g.pr)))
    return da.map_blocks(run, x, weights, chunks=tuple(chunks), dtype=result,
                         meta=np.empty((0,) * 4, result), name=name)


def _conv_common(func_name, x, strides, dilation_rate, aliases, data_format, activation, num_threads):
    strides, dilation_rate = _args.resolve_aliases(func_name, strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    _args.normalize_activation(activation)
    threads = _check_threads(num_threads)
    _check_x(x, channels_last)
    return strides, dilation_rate, channels_last, threads


def separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias=None, *, strides=_args.DEFAULT, padding="valid",
                     dilation_rate=_args.DEFAULT, data_format="channels_last", activation=None, depthwise_bias=None,
                     depthwise_activation=None, num_threads=1, rechunk=True, **aliases):
    """Fused depthwise-separable 2-D convolution of a Dask array (lazy).

    Same arguments and result as :func:`nbconv.separable_conv2d`, plus:

    Parameters
    ----------
    x : dask.array.Array of shape (N, H, W, C) or, channels_first, (N, C, H, W)
        Chunked over N, H and/or W as you like; C should be one chunk.
    num_threads : int or None, default 1
        Numba threads per task (capped at the worker's pool size). None leaves
        the worker's setting.
    rechunk : bool, default True
        Rechunk an ``x`` chunked over channels into one channel chunk (with a
        ``PerformanceWarning``); False raises ``ValueError`` instead.

    Returns
    -------
    dask.array.Array of shape (N, OH, OW, F) or (N, F, OH, OW)
        Batch chunks as ``x``'s; spatial chunks ``x``'s divided by the stride;
        the filters in one chunk.
    """
    strides, dilation_rate, cl, threads = _conv_common(
        "separable_conv2d", x, strides, dilation_rate, aliases, data_format, activation, num_threads)
    _args.normalize_activation(depthwise_activation, "depthwise_activation")
    dk = _args.as_float_array(depthwise_kernel, "depthwise_kernel")
    pk = _args.as_float_array(pointwise_kernel, "pointwise_kernel")
    g = _args.depthwise_geometry(x, dk, strides, padding, dilation_rate, cl, "depthwise_kernel")
    cm = g.c * g.dm
    f = _args.pointwise_matrix(pk, cm).shape[1]
    bias = _args.check_bias(bias, "bias", f)
    dbias = _args.check_bias(depthwise_bias, "depthwise_bias", cm)
    _, result = _args.dtypes_for(x, dk, pk, biases=(bias, dbias))
    x = _one_channel_chunk(x, 3 if cl else 1, rechunk)
    static = dict(strides=(g.sh, g.sw), dilation_rate=(g.dh, g.dw), data_format=data_format, activation=activation,
                  depthwise_activation=depthwise_activation)
    return _build("separable_conv2d", x, g, forward.separable_conv2d, (dk, pk, bias), {"depthwise_bias": dbias},
                  static, f, result, threads, spatial=True)


def depthwise_conv2d(x, kernel, bias=None, *, strides=_args.DEFAULT, padding="valid", dilation_rate=_args.DEFAULT,
                     data_format="channels_last", activation=None, num_threads=1, rechunk=True, **aliases):
    """Depthwise 2-D convolution of a Dask array (lazy).

    Same arguments and result as :func:`nbconv.depthwise_conv2d`, plus
    ``num_threads`` and ``rechunk`` as in :func:`separable_conv2d`.

    Parameters
    ----------
    x : dask.array.Array of shape (N, H, W, C) or, channels_first, (N, C, H, W)

    Returns
    -------
    dask.array.Array of shape (N, OH, OW, C*dm) or (N, C*dm, OH, OW)
    """
    strides, dilation_rate, cl, threads = _conv_common(
        "depthwise_conv2d", x, strides, dilation_rate, aliases, data_format, activation, num_threads)
    kernel = _args.as_float_array(kernel, "kernel")
    g = _args.depthwise_geometry(x, kernel, strides, padding, dilation_rate, cl)
    cm = g.c * g.dm
    bias = _args.check_bias(bias, "bias", cm)
    _, result = _args.dtypes_for(x, kernel, biases=(bias,))
    x = _one_channel_chunk(x, 3 if cl else 1, rechunk)
    static = dict(strides=(g.sh, g.sw), dilation_rate=(g.dh, g.dw), data_format=data_format, activation=activation)
    return _build("depthwise_conv2d", x, g, forward.depthwise_conv2d, (kernel, bias), {}, static, cm, result,
                  threads, spatial=True)


def pointwise_conv2d(x, kernel, bias=None, *, data_format="channels_last", activation=None, num_threads=1,
                     rechunk=True):
    """Pointwise (1x1) 2-D convolution of a Dask array (lazy): one task per block, any N/H/W chunks.

    Same arguments and result as :func:`nbconv.pointwise_conv2d`, plus
    ``num_threads`` and ``rechunk`` as in :func:`separable_conv2d`.

    Parameters
    ----------
    x : dask.array.Array of shape (N, H, W, K) or, channels_first, (N, K, H, W)

    Returns
    -------
    dask.array.Array of shape (N, H, W, F) or (N, F, H, W)
    """
    _, _, cl, threads = _conv_common("pointwise_conv2d", x, _args.DEFAULT, _args.DEFAULT, {}, data_format,
                                     activation, num_threads)
    kernel = _args.as_float_array(kernel, "kernel")
    k = x.shape[3] if cl else x.shape[1]
    f = _args.pointwise_matrix(kernel, k, "kernel").shape[1]
    bias = _args.check_bias(bias, "bias", f)
    _, result = _args.dtypes_for(x, kernel, biases=(bias,))
    x = _one_channel_chunk(x, 3 if cl else 1, rechunk)
    n, h, w = (x.shape[0], x.shape[1], x.shape[2]) if cl else (x.shape[0], x.shape[2], x.shape[3])
    g = _args.Geometry(n, h, w, k, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, h, w, cl)
    static = dict(data_format=data_format, activation=activation)
    return _build("pointwise_conv2d", x, g, forward.pointwise_conv2d, (kernel, bias), {}, static, f, result,
                  threads, spatial=False)
