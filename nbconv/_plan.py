"""How each call is cut into tasks: tiles, chunks and scratch shapes, for the forward and the backward kernels.

Everything that shapes a launch is decided here, from plain ints and the call's
:class:`~nbconv._args.Geometry`, under one frozen set of tunables
(:class:`Tunables`; what each trades and how it was measured: docs/tuning.md).

Thread policy, one for every function: work is split for the size of Numba's
pool (:func:`nbconv._threads.planning_threads`), never for the current
``set_num_threads`` setting, so a result does not depend on it (each task sums
in an order fixed by its shape; a smaller setting runs the same tasks on fewer
threads).  Forward calls of fewer than ``tiny_macs`` multiply-adds are planned
for one thread and run on the calling thread alone.

Plans are named tuples, memoised on (arguments, tunables): a layer calls with
the same shapes every time, and planning costs microseconds of a tiny call.
Tests change tunables with :func:`override`.
"""
import contextlib
import dataclasses
import functools
import math
from typing import NamedTuple

from ._threads import planning_threads

__all__ = ["Tunables", "tunables", "override", "pool_threads", "DepthwisePlan", "PointwisePlan", "SeparablePlan",
           "DwsepBackwardPlan", "PointwiseBackwardPlan", "depthwise", "pointwise", "separable", "stream",
           "packed_width", "packed_size", "row_tiles", "nchunks", "dwsep_backward", "pointwise_backward",
           "weight_grad_parts", "whole_intermediate", "dk3", "dx_gather"]


@dataclasses.dataclass(frozen=True)
class Tunables:
    """Every tuning constant of the planner, by name (see docs/tuning.md)."""

    #: forward, fused mode: bytes of one thread-private depthwise tile (and of its packed input rows)
    fused_tile_bytes: int = 512 * 1024
    #: forward: largest whole depthwise intermediate the fused kernel holds at once (its shared mode)
    shared_bytes: int = 8 * 1024 * 1024
    #: forward: channels from which the fused kernel prefers the shared mode (row tiles would be GEMMs of few
    #: pixels) ...
    shared_min_channels: int = 256
    #: ... unless the pointwise weights take at most this many bytes (they then stay in L2 beside a tile)
    fused_weight_bytes: int = 256 * 1024
    #: forward: fewest pixels per thread worth splitting a GEMM's pixels for (below that, its filters are split)
    min_split_pixels: int = 128
    #: forward: most pixels in one GEMM task
    max_tile_pixels: int = 4096
    #: forward: fewest filters per filter block
    min_filter_block: int = 64
    #: forward: filters per block when a GEMM's filters are split
    filter_block: int = 512
    #: tasks per thread from which an uneven share no longer matters
    even_tasks: int = 8
    #: forward: fewest depthwise tasks per thread (a thread that joins late still finds work), made of channel
    #: groups before thinner row tiles (which repack the input rows they share)
    depthwise_tiles_per_thread: int = 4
    #: forward: channels per depthwise channel group are a multiple of this (whole vectors, and whole cache lines
    #: of a bfloat16 result)
    channel_group: int = 32
    #: forward: a depthwise multiply-add costs about this many of a GEMM's, for the one-thread threshold
    #: (``tiny_macs``): packing its input rows and loading its taps, against a GEMM's register reuse
    depthwise_mac_cost: int = 4
    #: forward: multiply-adds below which a call runs as one task, on the calling thread
    tiny_macs: int = 1 << 19
    #: forward: outputs of at least this many bytes are written with non-temporal stores
    stream_bytes: int = 8 * 1024 * 1024
    #: backward: bytes of one thread-private tile (the separable backward holds two: D and dD)
    backward_tile_bytes: int = 256 * 1024
    #: backward: bytes of one pointwise GEMM operand tile
    backward_pointwise_tile_bytes: int = 512 * 1024
    #: backward: budget of the per-chunk partial sums of a pointwise kernel gradient (beyond it, fewer chunks)
    partials_bytes: int = 16 * 1024 * 1024
    #: backward: elements per block of the parallel chunk reduction
    reduce_block: int = 4096
    #: backward, NHWC separable: largest depthwise intermediate held whole (three products over all pixels) ...
    whole_bytes: int = 16 * 1024 * 1024
    #: ... when the pointwise weights take more than this many bytes (in the arithmetic's float type)
    whole_weight_bytes: int = 256 * 1024
    #: backward: (rows, columns) of a weight-gradient block per task
    weight_grad_block: tuple = (256, 512)
    #: backward, bfloat16 products: pixels per product of a weight-gradient block (even)
    weight_grad_pixels: int = 1024
    #: threads work is split for; None: the size of Numba's pool (tests set it)
    threads: object = None


_CURRENT = [Tunables()]


def tunables():
    """The tunables in force."""
    return _CURRENT[0]


@contextlib.contextmanager
def override(**changes):
    """Run the enclosed calls with some tunables changed (tests: small tiles, other thread counts); restored on
    exit.  Plans are memoised per set of tunables, so nothing planned under one set leaks into another."""
    old = _CURRENT[0]
    _CURRENT[0] = dataclasses.replace(old, **changes)
    try:
        yield _CURRENT[0]
    finally:
        _CURRENT[0] = old


def pool_threads(t=None):
    """Threads work is split for (see the module notes)."""
    t = t or _CURRENT[0]
    return t.threads or planning_threads()


def _threads_for(macs, t):
    return 1 if macs < t.tiny_macs else pool_threads(t)


def _round_up(value, multiple):
    return -(-value // multiple) * multiple


# --- shared pieces -----------------------------------------------------------------------------------------

def nchunks(ntasks, threads):
    """Chunks (contiguous runs of tasks, each with its own scratch) of a parallel launch: up to 4 per thread."""
    return max(1, min(ntasks, 4 * threads))


def packed_width(g):
    """Columns of one packed input row (:func:`nbconv._depthwise.pack_rows`): the padded columns the taps
    read, rounded up to an odd count.

    Each block of channels of a packed tile is ``rows * width`` vectors long;
    at an even width (16 for 14x14 images) a power of two of them puts every
    block's pixel on the same cache sets.  The extra column is zeroed, never read.
    """
    return ((g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1) | 1


def packed_size(g, th, wp):
    """Elements of one chunk's packed-row scratch for tiles of ``th`` output rows: the packed rows, channels
    padded to whole vectors (16 lanes covers every vector width)."""
    return ((th - 1) * g.sh + (g.kh - 1) * g.dh + 1) * wp * _round_up(g.c * g.dm, 16)


def dx_gather(g, th):
    """``(wp2, xs2 elements)`` of :func:`nbconv._backward.dx_gather_rows` for tiles of ``th`` output rows: the
    packed width of the full convolution with the flipped kernel, and its packed rows (the ``dx`` rows a tile
    owns, at most ``(th + 1) * sh`` for the last one of an image, plus ``(KH-1)*dh``)."""
    p = (g.kh - 1) * g.dh
    wp2 = (g.w + (g.kw - 1) * g.dw) | 1
    rows = max((th + 1) * g.sh, g.h - (g.oh - th) * g.sh + g.pt) + p
    return wp2, rows * wp2 * _round_up(g.c, 16)


def _even_parts(n_img, size, most, threads, fewest, t):
    """Part size for cutting ``size`` (per image) into parts of at most ``most``, at least ``fewest`` in all;
    when the ``n_img * parts`` tasks are few (under ``even_tasks`` per thread) their count is raised to a
    multiple of ``threads`` (4 tasks of 256, 256, 256 and 16 pixels leave one of 2 threads 3/4 of the work)."""
    first = max(-(-size // max(1, most)), -(-fewest // n_img))
    for parts in range(first, size + 1):
        part = -(-size // parts)
        tasks = n_img * -(-size // part)
        if tasks >= t.even_tasks * threads or tasks % threads == 0:
            return part
    return -(-size // first)


def _filter_blocks(n_img, filters, threads, align, t):
    """Filter block size near ``filter_block`` making ``n_img * blocks`` a multiple of ``threads``; blocks start
    on multiples of ``align`` (a panel of packed weights)."""
    step = threads // math.gcd(n_img, threads)
    blocks = _round_up(max(1, -(-filters // t.filter_block)), step)
    blocks = max(1, min(blocks, filters // t.min_filter_block))
    return _round_up(-(-filters // blocks), align) if blocks > 1 else filters


def _gemm(n_img, pixels, filters, threads, align, t):
    """``(tile_p, fb, ntasks)`` of ``n_img`` GEMMs of ``pixels x K @ K x filters`` (tiles never cross images).

    The pixels are split while each thread still gets ``min_split_pixels`` of
    them; below that (small images with many channels) the filters are split.
    """
    if n_img * pixels >= threads * t.min_split_pixels or filters < 2 * t.min_filter_block:
        tile_p, fb = _even_parts(n_img, pixels, t.max_tile_pixels, threads, threads, t), filters
    else:
        tile_p, fb = pixels, _filter_blocks(n_img, filters, threads, align, t)
    return tile_p, fb, n_img * -(-pixels // tile_p) * -(-filters // fb)


def _row_tiles(g, cm, itemsize, threads, min_tiles, budget, t):
    """Output rows per depthwise tile: as many as keep both the tile's depthwise result and its packed input
    rows within ``budget`` bytes, with at least ``min_tiles`` tiles, a count that shares evenly between threads,
    and one row at least.  A call planned for one thread ignores ``min_tiles`` (more tiles only repack the
    input rows they share)."""
    if threads == 1:
        min_tiles = 1
    wp = packed_width(g)
    by_result = budget // max(1, g.ow * cm * itemsize)
    by_input = (budget // max(1, wp * cm * itemsize) - (g.kh - 1) * g.dh - 1) // g.sh + 1
    th = max(1, min(g.oh, by_result, by_input))
    return _even_parts(g.n, g.oh, th, threads, min_tiles, t)


def _dw_tasks(g, cm, itemsize, threads, t):
    """``(th, cg)`` of a depthwise phase: tiles of ``th`` output rows (as many as the cache budget allows) and
    groups of ``cg`` channels (a multiple of ``channel_group``), at least ``depthwise_tiles_per_thread`` tasks
    per thread where the channels allow it, thinner row tiles beyond that.  Channel groups split the work
    without repacking the input rows that neighbouring row tiles share: a 7x7 image cut into 1-row tiles packs
    each input row three times."""
    fewest = t.depthwise_tiles_per_thread * threads if threads > 1 else 1
    th = _row_tiles(g, cm, itemsize, threads, 1, t.fused_tile_bytes, t)
    tiles = g.n * -(-g.oh // th)
    units = -(-cm // t.channel_group)
    groups = 1
    if tiles < fewest and units > 1:
        groups = min(units, -(-fewest // tiles))
        # an even share between threads where the group count allows it
        while groups < units and (tiles * groups) % threads:
            groups += 1
    cg = -(-units // groups) * t.channel_group
    groups = -(-cm // cg)
    if tiles * groups < fewest:
        th = _row_tiles(g, cm, itemsize, threads, -(-fewest // groups), t.fused_tile_bytes, t)
    return th, cg


def row_tiles(g, cm, itemsize, threads, min_tiles):
    """:func:`_row_tiles` with the forward's tile budget."""
    t = _CURRENT[0]
    return _row_tiles(g, cm, itemsize, threads, min_tiles, t.fused_tile_bytes, t)


def stream(nbytes):
    """Whether an output of ``nbytes`` is written with non-temporal stores (too large to stay in cache for
    whoever reads it next)."""
    return nbytes >= _CURRENT[0].stream_bytes


# --- forward -----------------------------------------------------------------------------------------------

class DepthwisePlan(NamedTuple):
    """:func:`nbconv._depthwise.depthwise_packed`'s launch: tasks of ``th`` output rows and ``cg`` channels, in
    ``nchunks`` chunks with ``xs_shape`` of packed-row scratch."""

    threads: int
    th: int
    cg: int
    nchunks: int
    xs_shape: tuple


class PointwisePlan(NamedTuple):
    """The pointwise kernels' launch: tasks of ``tile_p`` pixels x ``fb`` filters in ``nchunks`` chunks."""

    threads: int
    tile_p: int
    fb: int
    nchunks: int


class SeparablePlan(NamedTuple):
    """:func:`nbconv._separable.separable`'s launch (see its parameters and its two modes); ``*_shape`` are
    the scratch shapes."""

    threads: int
    th: int
    cg: int
    shared: bool
    gn: int
    tile_p: int
    fb: int
    nchunks1: int
    nchunks: int
    xs_shape: tuple
    d_shape: tuple
    t_shape: tuple


def depthwise(g, itemsize):
    """Plan of a depthwise call of geometry ``g`` computing in elements of ``itemsize`` bytes."""
    return _depthwise(g, itemsize, _CURRENT[0])


@functools.lru_cache(maxsize=256)
def _depthwise(g, itemsize, t):
    cm = g.c * g.dm
    threads = _threads_for(g.n * g.oh * g.ow * cm * g.kh * g.kw * t.depthwise_mac_cost, t)
    th, cg = _dw_tasks(g, cm, itemsize, threads, t)
    chunks = nchunks(g.n * -(-g.oh // th) * -(-cm // cg), threads)
    return DepthwisePlan(threads, th, cg, chunks, (chunks, packed_size(g, th, packed_width(g))))


def pointwise(n, hw, k, f, by_image, align):
    """Plan of a pointwise call: ``n`` images of ``hw`` pixels, ``k`` -> ``f`` channels; ``by_image``: one GEMM
    per image (NCHW), else one over all pixels; filter blocks start on multiples of ``align``."""
    return _pointwise(n, hw, k, f, by_image, align, _CURRENT[0])


@functools.lru_cache(maxsize=256)
def _pointwise(n, hw, k, f, by_image, align, t):
    threads = _threads_for(n * hw * k * f, t)
    tile_p, fb, ntasks = _gemm(n, hw, f, threads, align, t) if by_image else _gemm(1, n * hw, f, threads, align, t)
    return PointwisePlan(threads, tile_p, fb, nchunks(ntasks, threads))


def separable(g, f, itemsize, align, bf16=False):
    """Plan of a fused separable call of geometry ``g`` with ``f`` filters; ``itemsize``: the depthwise
    arithmetic's; ``bf16``: bfloat16 products (NCHW input then runs pixel-major tiles in both modes, with the
    transposed store's ``t_shape``)."""
    return _separable(g, f, itemsize, align, bf16, _CURRENT[0])


@functools.lru_cache(maxsize=256)
def _separable(g, f, itemsize, align, bf16, t):
    cm = g.c * g.dm
    threads = _threads_for(g.n * g.oh * g.ow * cm * (g.kh * g.kw + f), t)
    th = _row_tiles(g, cm, itemsize, threads, 1, t.fused_tile_bytes, t)
    many_channels = cm >= t.shared_min_channels and cm * f * itemsize > t.fused_weight_bytes
    shared = ((g.n * -(-g.oh // th) < 2 * threads or many_channels)
              and g.n * g.oh * g.ow * cm * itemsize <= t.shared_bytes)
    if shared:
        # small images: depthwise for all rows first (parallel over rows), then GEMM tiles x filter blocks;
        # NHWC pixels of all images are one GEMM
        th, cg = _dw_tasks(g, cm, itemsize, threads, t)
        chunks1 = nchunks(g.n * -(-g.oh // th) * -(-cm // cg), threads)
        gn = 1 if g.channels_last else g.n
        tile_p, fb, ntasks = _gemm(gn, g.n * g.oh * g.ow // gn, f, threads, align, t)
    else:
        th = _row_tiles(g, cm, itemsize, threads, threads, t.fused_tile_bytes, t)
        tiles = g.n * -(-g.oh // th)
        # fewer output rows than threads: split the filters too (tiles recomputed per block)
        fb = f if tiles >= threads else _filter_blocks(tiles, f, threads, align, t)
        tile_p, ntasks = th * g.ow, tiles * -(-f // fb)
        chunks1, gn, cg = 0, g.n, cm
    chunks = nchunks(ntasks, threads)
    d_shape = (1, g.n * g.oh * g.ow * cm) if shared else (chunks, th * g.ow * cm)
    t_shape = (chunks, tile_p * fb if (shared or bf16) and not g.channels_last else 0)
    xs_shape = (max(chunks, chunks1), packed_size(g, th, packed_width(g)))
    return SeparablePlan(threads, th, cg, shared, gn, tile_p, fb, chunks1, chunks, xs_shape, d_shape, t_shape)


# --- backward ----------------------------------------------------------------------------------------------

class DwsepBackwardPlan(NamedTuple):
    """The depthwise / separable backward kernels' launch: ``nchunks`` chunks of output rows, pointwise tiles
    of ``tile_p`` pixels (NHWC: ``th`` whole output rows), ``xs_size`` elements of packed rows per chunk."""

    nchunks: int
    tile_p: int
    th: int
    xs_size: int


class PointwiseBackwardPlan(NamedTuple):
    """The pointwise backward kernels' launch: tiles of ``tile_p`` pixels in ``nchunks`` chunks."""

    tile_p: int
    nchunks: int


def dwsep_backward(g, f, sep, want_pw, want_dk, itemsize):
    """Plan of :func:`nbconv._backward.dwsep_backward_nhwc` / ``_nchw`` (``sep``: with a pointwise part of
    ``f`` filters; ``want_pw``/``want_dk``: which weight gradients it computes)."""
    return _dwsep_backward(g, f, sep, want_pw, want_dk, itemsize, _CURRENT[0])


@functools.lru_cache(maxsize=256)
def _dwsep_backward(g, f, sep, want_pw, want_dk, itemsize, t):
    threads = pool_threads(t)
    cm = g.c * g.dm
    ohw = g.oh * g.ow
    # few chunks when the pointwise partial sums are large (each chunk holds a C*dm x F block)
    limit = 4 * threads
    if sep and want_pw:
        limit = max(threads, min(limit, t.partials_bytes // max(1, cm * f * itemsize)))
    chunks = max(1, min(g.n * g.oh, limit))
    if sep:
        tile_p = max(16, min(ohw, t.backward_tile_bytes // max(1, cm * itemsize)))
        if g.channels_last:
            # whole output rows: the NHWC recompute of D runs the forward's row-tile micro-kernels
            tile_p = max(1, tile_p // g.ow) * g.ow
    else:
        tile_p = ohw  # no scratch: a chunk walks its rows in one go
    th = tile_p // g.ow if sep and g.channels_last else 1
    recompute = sep and (want_pw or want_dk) and g.channels_last
    xs_size = packed_size(g, th, packed_width(g)) if recompute else 1
    return DwsepBackwardPlan(chunks, tile_p, th, xs_size)


def pointwise_backward(n, hw, k, f, channels_last, want_w, itemsize):
    """Plan of :func:`nbconv._backward.pointwise_backward_nhwc` / ``_nchw``."""
    return _pointwise_backward(n, hw, k, f, channels_last, want_w, itemsize, _CURRENT[0])


@functools.lru_cache(maxsize=256)
def _pointwise_backward(n, hw, k, f, channels_last, want_w, itemsize, t):
    threads = pool_threads(t)
    pixels = n * hw if channels_last else hw
    tile_p = max(16, min(pixels, t.backward_pointwise_tile_bytes // (max(k, f) * itemsize)))
    ntasks = -(-n * hw // tile_p) if channels_last else n * -(-hw // tile_p)
    limit = 4 * threads
    if want_w:
        limit = max(threads, min(limit, t.partials_bytes // max(1, k * f * itemsize)))
    return PointwiseBackwardPlan(tile_p, max(1, min(ntasks, limit)))


def weight_grad_parts(k, f):
    """``(rows, columns, parts)`` of :func:`nbconv._backward.weight_grad_nhwc`: blocks of the ``k x f`` gradient
    per task, and the pixel parts whose partial sums are added afterwards (when the blocks are too few to share
    evenly)."""
    t = _CURRENT[0]
    threads = pool_threads(t)
    mb, nb = min(k, t.weight_grad_block[0]), min(f, t.weight_grad_block[1])
    blocks = -(-k // mb) * -(-f // nb)
    parts = 1 if blocks % threads == 0 or blocks >= 4 * threads else threads // math.gcd(blocks, threads)
    return mb, nb, parts


def whole_intermediate(g, f, itemsize):
    """Whether the NHWC separable backward holds the depthwise intermediate whole (see
    :func:`nbconv.backward._sep_backward_whole`) rather than recomputing it per tile (``itemsize``: the
    arithmetic's float type; bfloat16 inputs multiply bfloat16 pairs on both paths)."""
    t = _CURRENT[0]
    cm = g.c * g.dm
    return (g.channels_last and g.n * g.oh * g.ow * cm * itemsize <= t.whole_bytes
            and cm * f * itemsize > t.whole_weight_bytes)


def dk3(g, itemsize):
    """``(th, nchunks, xs_shape)`` of the 3x3 kernel-gradient kernel (:func:`nbconv._backward.dk3_nhwc`)."""
    t = _CURRENT[0]
    threads = pool_threads(t)
    cm = g.c * g.dm
    th = _row_tiles(g, cm, itemsize, threads, 4 * threads, t.fused_tile_bytes, t)
    chunks = nchunks(g.n * -(-g.oh // th), threads)
    return th, chunks, (chunks, packed_size(g, th, packed_width(g)))
