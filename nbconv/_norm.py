"""Training-mode batch normalisation kernels over the channels of ``(P, C)`` rows (a channels-last activation).

Four pool kernels, each a pass over rows in blocks of :data:`ROWS` that the
participants claim (:mod:`nbconv._sync`): the per-channel sums of a block
(:func:`bn_stats`, :func:`bn_grad_stats`, added in block order by the
caller), and the element-wise passes (:func:`bn_apply`,
:func:`bn_grad_apply`).  Rows are float32, or bfloat16 bits (``uint16``)
widened a row at a time into the participant's scratch and rounded back as
they are stored; the arithmetic is float32.
"""
from numba import types
from numba.extending import overload

from ._backward import g_rows
from ._elementwise import LINEAR, RELU
from ._jit import jit
from ._simd import VECTOR_BYTES, store_result_vector
from ._sync import PHASE2, claim, enter, leave

#: rows per task: a block's float32 partial sums add at most this many terms
ROWS = 256
#: elements of bfloat16 bits widened (or rounded) at a time: whole rows, at least one
WIDEN = 4096


def out_row(y1, off, ws):
    """Where the rows of ``y1`` from ``off`` are computed: ``(y1, off)`` for a float ``y1``; ``(ws, 0)`` for
    bfloat16 bits, then stored by :func:`flush_row` (a separate scratch: computing in the widened input rows
    defeats the vectoriser, which cannot prove the two views the same)."""
    raise NotImplementedError("compiled callers only")


@overload(out_row)
def _out_row(y1, off, ws):
    if y1.dtype == types.uint16:
        def scratch(y1, off, ws):
            return ws, 0
        return scratch

    def in_place(y1, off, ws):
        return y1, off
    return in_place


def flush_row(ws, woff, y1, off, n):
    """Store ``n`` elements computed in ``ws`` from ``woff`` into bfloat16 bits ``y1`` from ``off`` (a result:
    rounded to nearest even, by one instruction where the CPU has AVX512_BF16); nothing for a float ``y1``
    (computed in place)."""
    raise NotImplementedError("compiled callers only")


@overload(flush_row)
def _flush_row(ws, woff, y1, off, n):
    if y1.dtype == types.uint16:
        def rounded(ws, woff, y1, off, n):
            lanes = VECTOR_BYTES // 4
            for i in range(0, n, lanes):
                store_result_vector(ws, woff + i, y1, off + i, min(lanes, n - i))
        return rounded

    def nothing(ws, woff, y1, off, n):
        return None
    return nothing


@jit
def _keep(y, act):
    """Whether the activation passes the gradient at output ``y`` (NaN: no, as for the conv kernels)."""
    if act == LINEAR:
        return True
    if act == RELU:
        return y > 0
    return 0 < y < 6


@jit
def bn_stats(x2, shift, parts, xscr, sched, sig, lead):
    """Per-block shifted sums: ``parts[b, 0, j]`` the sum of ``x[r, j] - shift[j]`` over the rows ``r`` of
    block ``b``, ``parts[b, 1, j]`` the sum of their squares.

    Parameters
    ----------
    x2 : ndarray of shape (P, C), float32 or bfloat16 bits
    shift : ndarray of shape (C,), float32
        Subtracted before summing (a row of ``x``): the variance is then a
        difference of moments about a point near the mean.
    parts : ndarray of shape (ceil(P / ROWS), 2, C), float32
    xscr : ndarray of shape (participants, max(C, WIDEN)), float32
        Where bfloat16 rows are widened.
    """
    rows, c = x2.shape
    nblocks = parts.shape[0]
    x1 = x2.reshape(-1)
    step = max(1, WIDEN // c)
    enter(sched, sig, lead)
    xs = xscr[min(lead >> 2, xscr.shape[0] - 1)]
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        s = parts[b, 0]
        q = parts[b, 1]
        for j in range(c):
            s[j] = 0
            q[j] = 0
        end = min(rows, (b + 1) * ROWS)
        for r in range(b * ROWS, end, step):
            nr = min(step, end - r)
            src, off = g_rows(x1, r * c, nr * c, xs)
            for i in range(nr):
                row = src[off + i * c:off + i * c + c]
                for j in range(c):
                    d = row[j] - shift[j]
                    s[j] += d
                    q[j] += d * d
    leave(sched, sig, lead)


@jit
def bn_apply(x2, mean, scale, beta, act, y2, xscr, yscr, sched, sig, lead):
    """``y[r, j] = act((x[r, j] - mean[j]) * scale[j] + beta[j])``; ``y2`` float32 or bfloat16 bits, of the shape
    of ``x2``; ``xscr``, ``yscr`` of shape (participants, max(C, WIDEN)) float32: where bfloat16 rows are
    widened, and computed before they are rounded into ``y2``."""
    rows, c = x2.shape
    nblocks = (rows + ROWS - 1) // ROWS
    x1 = x2.reshape(-1)
    y1 = y2.reshape(-1)
    zero = mean.dtype.type(0)
    six = mean.dtype.type(6)
    step = max(1, WIDEN // c)
    enter(sched, sig, lead)
    me = min(lead >> 2, xscr.shape[0] - 1)
    xs = xscr[me]
    ys = yscr[me]
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        end = min(rows, (b + 1) * ROWS)
        for r in range(b * ROWS, end, step):
            nr = min(step, end - r)
            src, off = g_rows(x1, r * c, nr * c, xs)
            dst, doff = out_row(y1, r * c, ys)
            for i in range(nr):
                row = src[off + i * c:off + i * c + c]
                o = dst[doff + i * c:doff + i * c + c]
                if act == LINEAR:
                    for j in range(c):
                        o[j] = (row[j] - mean[j]) * scale[j] + beta[j]
                elif act == RELU:
                    for j in range(c):
                        t = (row[j] - mean[j]) * scale[j] + beta[j]
                        o[j] = zero if t < zero else t
                else:
                    for j in range(c):
                        t = (row[j] - mean[j]) * scale[j] + beta[j]
                        o[j] = zero if t < zero else (six if t > six else t)
            flush_row(dst, doff, y1, r * c, nr * c)
    leave(sched, sig, lead)


@jit
def bn_grad_stats(g2, y2, x2, mean, act, parts, gscr, yscr, xscr, sched, sig, lead):
    """Per-block sums of the backward: ``parts[b, 0, j]`` the sum of ``g`` and ``parts[b, 1, j]`` of
    ``g * (x - mean)`` over the rows of block ``b``, where ``g`` is ``grad_output`` where the activation passes
    it (read off the output ``y2``; not read for a linear one), else 0.  ``g2``, ``y2``, ``x2`` of shape (P, C),
    float32 or bfloat16 bits each; scratch as :func:`bn_apply`'s."""
    rows, c = x2.shape
    nblocks = parts.shape[0]
    g1 = g2.reshape(-1)
    y1 = y2.reshape(-1)
    x1 = x2.reshape(-1)
    zero = mean.dtype.type(0)
    step = max(1, WIDEN // c)
    enter(sched, sig, lead)
    me = min(lead >> 2, xscr.shape[0] - 1)
    gs = gscr[me]
    ys = yscr[me]
    xs = xscr[me]
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        s = parts[b, 0]
        q = parts[b, 1]
        for j in range(c):
            s[j] = 0
            q[j] = 0
        end = min(rows, (b + 1) * ROWS)
        for r in range(b * ROWS, end, step):
            nr = min(step, end - r)
            gsrc, goff = g_rows(g1, r * c, nr * c, gs)
            xsrc, xoff = g_rows(x1, r * c, nr * c, xs)
            ysrc, yoff = g_rows(y1, r * c, nr * c if act != LINEAR else 0, ys)
            for i in range(nr):
                grow = gsrc[goff + i * c:goff + i * c + c]
                xrow = xsrc[xoff + i * c:xoff + i * c + c]
                if act == LINEAR:
                    for j in range(c):
                        s[j] += grow[j]
                        q[j] += grow[j] * (xrow[j] - mean[j])
                else:
                    yrow = ysrc[yoff + i * c:yoff + i * c + c]
                    for j in range(c):
                        t = grow[j] if _keep(yrow[j], act) else zero
                        s[j] += t
                        q[j] += t * (xrow[j] - mean[j])
    leave(sched, sig, lead)


@jit
def bn_grad_apply(g2, y2, x2, mean, k1, k2, k3, act, dx2, gscr, yscr, xscr, dscr, sched, sig, lead):
    """``dx[r, j] = k1[j] * g[r, j] + k2[j] * (x[r, j] - mean[j]) + k3[j]``, ``g`` as in :func:`bn_grad_stats`;
    ``dx2`` float32 or bfloat16 bits of the shape of ``x2`` (computed in ``dscr`` first)."""
    rows, c = x2.shape
    nblocks = (rows + ROWS - 1) // ROWS
    g1 = g2.reshape(-1)
    y1 = y2.reshape(-1)
    x1 = x2.reshape(-1)
    d1 = dx2.reshape(-1)
    zero = mean.dtype.type(0)
    step = max(1, WIDEN // c)
    enter(sched, sig, lead)
    me = min(lead >> 2, xscr.shape[0] - 1)
    gs = gscr[me]
    ys = yscr[me]
    xs = xscr[me]
    ds = dscr[me]
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        end = min(rows, (b + 1) * ROWS)
        for r in range(b * ROWS, end, step):
            nr = min(step, end - r)
            gsrc, goff = g_rows(g1, r * c, nr * c, gs)
            xsrc, xoff = g_rows(x1, r * c, nr * c, xs)
            ysrc, yoff = g_rows(y1, r * c, nr * c if act != LINEAR else 0, ys)
            dst, doff = out_row(d1, r * c, ds)
            for i in range(nr):
                grow = gsrc[goff + i * c:goff + i * c + c]
                xrow = xsrc[xoff + i * c:xoff + i * c + c]
                o = dst[doff + i * c:doff + i * c + c]
                if act == LINEAR:
                    for j in range(c):
                        o[j] = k1[j] * grow[j] + k2[j] * (xrow[j] - mean[j]) + k3[j]
                else:
                    yrow = ysrc[yoff + i * c:yoff + i * c + c]
                    for j in range(c):
                        t = grow[j] if _keep(yrow[j], act) else zero
                        o[j] = k1[j] * t + k2[j] * (xrow[j] - mean[j]) + k3[j]
            flush_row(dst, doff, d1, r * c, nr * c)
    leave(sched, sig, lead)
