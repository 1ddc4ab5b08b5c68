"""Backward kernels: gradients of depthwise, pointwise and fused separable convolution, NHWC and NCHW.

Work split
    Every parallel kernel splits the rows of the *output* (``N*OH`` of them,
    all images one after the other) into ``nchunks`` contiguous chunks, which
    the calling thread and the pool's helpers claim one at a time
    (:mod:`nbconv._sync`; the kernels' ``sched, sig, lead`` arguments).  A chunk walks its rows in tiles of ``tile_p``
    pixels (a tile never crosses an image).

Input gradient (row ownership + halo)
    The input gradient is a transposed depthwise convolution, computed by
    scattering each output pixel's gradient through the taps that read it.
    Output rows ``[a, b)`` of image ``n`` read input rows from ``a*sh - pt``
    downwards, so a chunk *owns* input rows ``[start(a), start(b))`` with
    ``start(o) = clip(o*sh - pt, 0, H)`` (``start(0) = 0``, ``start(OH) = H``):
    the owned rows of all chunks partition ``dx``.  A chunk zeroes its own
    rows first, so rows no tap reaches (strides that skip rows, 'valid'
    borders) get a zero gradient.  The taps of a chunk's last output rows can
    reach below its last owned row, into the next chunk's rows; those
    contributions go to the chunk's private ``halo`` buffer of
    ``max(1, (KH-1)*dh - sh + 1)`` rows, added to ``dx`` after the chunks, in
    chunk order (:func:`add_halos`).  No two chunks ever write the
    same element, and the result does not depend on thread scheduling.

    The NHWC separable kernel with ``dm == 1`` gathers instead
    (:func:`dx_gather_rows`): a tile also holds ``dD`` of the
    ``ceil((KH-1)*dh / sh)`` output rows before it, so it computes its
    owned ``dx`` rows complete and stores each once; no zeroing, no halo.

Weight and bias gradients
    Reduced over batch and space into per-chunk partial sums
    (``(nchunks, ...)`` buffers, zero-initialised by the caller), then summed
    in chunk order by :func:`reduce_chunks`: the same thread count gives the
    same bits.

Separable backward (recomputation)
    For each pixel tile the kernel recomputes the depthwise tile
    ``D = depthwise(x)`` into scratch, accumulates ``dPW += D^T G``, forms
    ``dD = G PW^T`` into a second scratch tile, then runs the depthwise
    backward of that tile (``dDK`` partial sums, by the 3x3 vector
    micro-kernel of :mod:`nbconv._depthwise` where it applies, and the
    ``dx`` scatter).  The ``N*OH*OW*C*dm`` intermediate is never stored.

    Scratch bound: ``2 * nchunks * tile_p * C*dm`` elements for the two
    tiles, plus ``nchunks * (C*dm*F + KH*KW*C*dm + F)`` partial sums and
    ``nchunks * HR * W * C`` halo rows, all in the compute dtype.

Weights arrive repacked as for the forward kernels: NHWC kernels take the
depthwise kernel as ``(KH, KW, C*dm)``, NCHW kernels as ``(C*dm, KH, KW)``;
output channel ``c*dm + m`` comes from input channel ``c``.  ``want_*``
flags skip the work of gradients nobody asked for; arrays of a gradient not
wanted may be 1-element dummies of the right rank.
"""
import numpy as np
from numba import types
from numba.extending import overload

from ._depthwise import (_first_valid, dk3_packed_rows, dw_packed_rows, dw_rows_packed, dw_tile, pack_rows,
                         pack_rows_spread)
from ._jit import jit
from ._gemm import KC, gemm_bf16, gemm_nn, transpose_tile
from ._pointwise import gemm_rm
from ._simd import VECTOR_BYTES, convert_vector
from ._sync import PHASE2, claim, enter, leave


@jit
def row_start(o, oh_size, h, sh, pt):
    """First input row owned by output row ``o`` (see the module notes)."""
    if o <= 0:
        return 0
    if o >= oh_size:
        return h
    return min(max(o * sh - pt, 0), h)


@jit
def _chunk_rows(chunk, nchunks, rows):
    return chunk * rows // nchunks, (chunk + 1) * rows // nchunks


@jit
def _zero_owned_nhwc(dx, r0, r1, oh_size, sh, pt):
    """Zero the ``dx`` rows owned by output rows ``[r0, r1)``.

    Returns ``(n, first row not owned)`` of the image whose rows the chunk's
    last taps can spill past, or ``(-1, 0)`` when the chunk ends an image.
    """
    h = dx.shape[1]
    zero = dx.dtype.type(0)
    for n in range(r0 // oh_size, (r1 - 1) // oh_size + 1):
        a = max(r0, n * oh_size) - n * oh_size
        b = min(r1, (n + 1) * oh_size) - n * oh_size
        ia = row_start(a, oh_size, h, sh, pt)
        ib = row_start(b, oh_size, h, sh, pt)
        dxn = dx[n]
        for ih in range(ia, ib):
            r = dxn[ih].reshape(-1)
            for i in range(r.shape[0]):
                r[i] = zero
    if r1 % oh_size != 0:
        n = (r1 - 1) // oh_size
        return n, row_start(r1 - n * oh_size, oh_size, h, sh, pt)
    return -1, 0


@jit
def _zero_owned_nchw(dx, r0, r1, oh_size, sh, pt):
    """As :func:`_zero_owned_nhwc` for ``dx`` of shape ``(N, C, H, W)``."""
    c, h = dx.shape[1], dx.shape[2]
    zero = dx.dtype.type(0)
    for n in range(r0 // oh_size, (r1 - 1) // oh_size + 1):
        a = max(r0, n * oh_size) - n * oh_size
        b = min(r1, (n + 1) * oh_size) - n * oh_size
        ia = row_start(a, oh_size, h, sh, pt)
        ib = row_start(b, oh_size, h, sh, pt)
        for ci in range(c):
            plane = dx[n, ci]
            for ih in range(ia, ib):
                r = plane[ih]
                for i in range(r.shape[0]):
                    r[i] = zero
    if r1 % oh_size != 0:
        n = (r1 - 1) // oh_size
        return n, row_start(r1 - n * oh_size, oh_size, h, sh, pt)
    return -1, 0


@jit
def _zero(a):
    a1 = a.reshape(-1)
    zero = a.dtype.type(0)
    for i in range(a1.shape[0]):
        a1[i] = zero


@jit
def dwb_nhwc_pixels(xn, w, src, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                    want_dk, dkacc, want_dx, dxn, own_end, halo):
    """Depthwise backward of output pixels ``p0 .. p1-1`` of one NHWC image, given their gradient ``src``.

    Parameters
    ----------
    xn : ndarray of shape (H, W, C)
    w : ndarray of shape (KH, KW, C*dm)
    src : ndarray of shape (>= p1 - p0, C*dm)
        Row ``p - p0``: gradient of the depthwise output at pixel ``p``.
    dkacc : ndarray of shape (KH, KW, C*dm)
        Kernel-gradient accumulator (added to).
    dxn : ndarray of shape (H, W, C)
        Input gradient of the image (added to), for rows ``< own_end``.
    halo : ndarray of shape (HR, W, C)
        Receives (added to) the rows ``own_end .. own_end+HR-1``.

    Notes
    -----
    Serial.  Channel loops are innermost and contiguous (they vectorise).
    """
    h, wd, c = xn.shape
    kh_n, kw_n, cm = w.shape
    if dm == 1 and want_dx and not want_dk and p0 % ow_size == 0 and p1 % ow_size == 0:
        _dx_rows_nhwc(w, src, p0 // ow_size, p1 // ow_size, ow_size, sh, sw, dh, dw, pt, pl, dxn, own_end, halo)
        return
    for p in range(p0, p1):
        oh = p // ow_size
        ow = p - oh * ow_size
        g = src[p - p0]
        for kh in range(kh_n):
            ih = oh * sh - pt + kh * dh
            if ih < 0 or ih >= h:
                continue
            if want_dx:
                dxr = dxn[ih] if ih < own_end else halo[ih - own_end]
            for kw in range(kw_n):
                iw = ow * sw - pl + kw * dw
                if iw < 0 or iw >= wd:
                    continue
                if dm == 1 and want_dk and want_dx:
                    # both gradients in one sweep: the gradient row is loaded once per tap
                    xr = xn[ih, iw]
                    acc = dkacc[kh, kw]
                    wr = w[kh, kw]
                    d = dxr[iw]
                    for j in range(cm):
                        gj = g[j]
                        acc[j] += gj * xr[j]
                        d[j] += gj * wr[j]
                    continue
                if want_dk:
                    xr = xn[ih, iw]
                    acc = dkacc[kh, kw]
                    if dm == 1:
                        for j in range(cm):
                            acc[j] += g[j] * xr[j]
                    else:
                        for ci in range(c):
                            xv = xr[ci]
                            for m in range(dm):
                                acc[ci * dm + m] += g[ci * dm + m] * xv
                if want_dx:
                    wr = w[kh, kw]
                    d = dxr[iw]
                    if dm == 1:
                        for j in range(cm):
                            d[j] += g[j] * wr[j]
                    else:
                        for ci in range(c):
                            s = d[ci]
                            for m in range(dm):
                                s += g[ci * dm + m] * wr[ci * dm + m]
                            d[ci] = s


@jit
def _dx_rows_nhwc(w, src, o0, o1, ow_size, sh, sw, dh, dw, pt, pl, dxn, own_end, halo):
    """Input gradient (``dm == 1``) of output rows ``o0 .. o1-1``: :func:`dwb_nhwc_pixels` without the per-pixel
    bounds tests and array views.

    Each tap walks the range of output columns whose input column exists
    (:func:`nbconv._depthwise._first_valid`) over flat rows, so the channel
    loop is all that runs per pixel (docs/tuning.md, "Kernel design figures").
    """
    h, wd, c = dxn.shape
    kh_n, kw_n, cm = w.shape
    w1 = w.reshape(-1)
    g1 = src.reshape(-1)
    for oh in range(o0, o1):
        grow = (oh - o0) * ow_size * cm
        for kh in range(kh_n):
            ih = oh * sh - pt + kh * dh
            if ih < 0 or ih >= h:
                continue
            drow = dxn[ih].reshape(-1) if ih < own_end else halo[ih - own_end].reshape(-1)
            for kw in range(kw_n):
                a, b = _first_valid(kw * dw - pl, sw, wd, 0, ow_size)
                wv = w1[(kh * kw_n + kw) * cm:(kh * kw_n + kw + 1) * cm]
                for ow in range(a, b):
                    d0 = (ow * sw - pl + kw * dw) * c
                    g0 = grow + ow * cm
                    # slices indexed by the loop counter: a computed index may be negative as far as Numba
                    # knows, and its wraparound test keeps the loop scalar
                    dseg = drow[d0:d0 + cm]
                    gseg = g1[g0:g0 + cm]
                    for j in range(cm):
                        dseg[j] += gseg[j] * wv[j]


@jit
def dx_gather_rows(ddb, a, nrt, cr, oh_size, ow_size, wf, bt, sh, sw, dh, dw, pt, pl2, kh_n, kw_n, wp2, xs2, dxn):
    """Input gradient (``dm == 1``) of the rows of one NHWC image that output rows ``a .. a+nrt-1`` own
    (``a*sh - pt`` on, to the end of the image after its last output row), complete, stored once.

    ``ddb`` holds ``dD`` of output rows ``a - cr .. a+nrt-1`` (``cr = ceil((KH-1)*dh / sh)``; rows before
    the image are zeros), row-major: every tap of those ``dx`` rows.  Each row is the forward's stride-1
    depthwise convolution, with the flipped kernel ``wf`` (per tap, ``(KH*KW, C)``), of ``ddb`` spread out by
    the strides (zeros between, :func:`nbconv._depthwise.pack_rows_spread`): a gather whose sums stay in
    registers until the one store, in ``dxn``'s dtype (bfloat16 bits rounded once), where a scatter reads and
    writes each ``dx`` vector once per tap.  ``pl2 = (KW-1)*dw - pl``; ``xs2`` takes
    :func:`nbconv._plan.dx_gather` rows of ``wp2`` columns.
    """
    h, wd, c = dxn.shape
    p = (kh_n - 1) * dh
    o0 = max(0, pt - a * sh)
    o1 = h - a * sh + pt  # the image's last output rows own the rest of the image
    if a + nrt < oh_size:
        o1 = min(o1, nrt * sh)
    if o1 <= o0:
        return
    lanes = VECTOR_BYTES // max(xs2.itemsize, 4)
    t = ddb[:(cr + nrt) * ow_size * c].reshape((cr + nrt, ow_size, c))
    if sh == 1 and sw == 1:
        pack_rows(t, 1, cr - p + o0, o1 - o0 + p, 0, pl2, wp2, lanes, xs2)
    else:
        pack_rows_spread(t, sh, sw, cr * sh - p + o0, o1 - o0 + p, pl2, wp2, lanes, xs2)
    dw_packed_rows(xs2, o1 - o0 + p, wp2, wf, bt, 0, o1 - o0, wd, 1, 1, dh, dw, kh_n, kw_n, c,
                   dxn.reshape(-1)[(a * sh - pt + o0) * wd * c:], False, 0)


@jit
def _valid_range(off, sw, wd, ow0, ow1):
    """Sub-range of output columns ``[ow0, ow1)`` whose tap column ``ow*sw + off`` lies in ``[0, wd)``.

    Unit stride needs no division (this runs once per channel, row and tap).
    """
    if sw == 1:
        a = max(ow0, -off)
        b = min(ow1, wd - off)
        return a, max(a, b)
    return _first_valid(off, sw, wd, ow0, ow1)


@jit
def dw_nchw_recompute(xn, w, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl, dst):
    """Depthwise output (no bias) of all channels at pixels ``p0 .. p1-1`` of one NCHW image.

    Channel-major (``dst[j, p - p0]``), vectorised along output columns,
    with the division-free column ranges of :func:`_valid_range`.
    """
    c, h, wd = xn.shape
    _, kh_n, kw_n = w.shape
    zero = dst.dtype.type(0)
    for ci in range(c):
        xc = xn[ci]
        for m in range(dm):
            j = ci * dm + m
            drow = dst[j]
            p = p0
            while p < p1:
                oh = p // ow_size
                ow0 = p - oh * ow_size
                ow1 = min(ow_size, ow0 + (p1 - p))
                q0 = p - p0 - ow0
                for ow in range(ow0, ow1):
                    drow[q0 + ow] = zero
                for kh in range(kh_n):
                    ih = oh * sh - pt + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for kw in range(kw_n):
                        off = kw * dw - pl
                        a, bnd = _valid_range(off, sw, wd, ow0, ow1)
                        wv = w[j, kh, kw]
                        # slices keep the loop index provably non-negative (no wraparound checks: it vectorises)
                        dseg = drow[q0 + a:q0 + bnd]
                        if sw == 1:
                            xseg = xr[a + off:bnd + off]
                            for i in range(bnd - a):
                                dseg[i] += wv * xseg[i]
                        else:
                            xseg = xr[a * sw + off:]
                            for i in range(bnd - a):
                                dseg[i] += wv * xseg[i * sw]
                p += ow1 - ow0


@jit
def dwb_nchw_tile(xn, w, src1, soff, ld, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                  want_dk, dkacc, want_dx, dxn, own_end, halo):
    """Depthwise backward of output pixels ``p0 .. p1-1`` (all channels) of one NCHW image.

    Parameters
    ----------
    xn : ndarray of shape (C, H, W)
    w : ndarray of shape (C*dm, KH, KW)
    src1 : 1-D ndarray
        Gradient of the depthwise output: channel ``j`` at pixel ``p`` is
        ``src1[soff + j*ld + p - p0]``.
    dkacc : ndarray of shape (C*dm, KH, KW)
        Kernel-gradient accumulator (added to).
    dxn : ndarray of shape (C, H, W)
        Input gradient of the image (added to), for rows ``< own_end``.
    halo : ndarray of shape (C, HR, W)
        Receives (added to) the rows ``own_end .. own_end+HR-1``.

    Notes
    -----
    Serial.  Vectorised along output columns; the valid column range of
    each tap is computed once, so the inner loops have no bounds checks.
    """
    c, h, wd = xn.shape
    _, kh_n, kw_n = w.shape
    zero = src1.dtype.type(0)
    for ci in range(c):
        xc = xn[ci]
        for m in range(dm):
            j = ci * dm + m
            base = soff + j * ld
            p = p0
            while p < p1:
                oh = p // ow_size
                ow0 = p - oh * ow_size
                ow1 = min(ow_size, ow0 + (p1 - p))
                q0 = base + (p - p0) - ow0  # src1[q0 + ow] is pixel (oh, ow)
                for kh in range(kh_n):
                    ih = oh * sh - pt + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    if want_dx:
                        dxr = dxn[ci, ih] if ih < own_end else halo[ci, ih - own_end]
                    for kw in range(kw_n):
                        off = kw * dw - pl
                        a, bnd = _valid_range(off, sw, wd, ow0, ow1)
                        if want_dk and want_dx and sw == 1:
                            # both gradients in one sweep over the gradient row
                            wv = w[j, kh, kw]
                            s = zero
                            gseg = src1[q0 + a:q0 + bnd]
                            xseg = xr[a + off:bnd + off]
                            dseg = dxr[a + off:bnd + off]
                            for i in range(bnd - a):
                                gv = gseg[i]
                                s += gv * xseg[i]
                                dseg[i] += wv * gv
                            dkacc[j, kh, kw] += s
                            continue
                        if want_dk:
                            s = zero
                            gseg = src1[q0 + a:q0 + bnd]
                            xseg = xr[a * sw + off:]
                            if sw == 1:
                                for i in range(bnd - a):
                                    s += gseg[i] * xseg[i]
                            else:
                                for i in range(bnd - a):
                                    s += gseg[i] * xseg[i * sw]
                            dkacc[j, kh, kw] += s
                        if want_dx:
                            wv = w[j, kh, kw]
                            gseg = src1[q0 + a:q0 + bnd]
                            dseg = dxr[a * sw + off:]
                            if sw == 1:
                                for i in range(bnd - a):
                                    dseg[i] += wv * gseg[i]
                            else:
                                for i in range(bnd - a):
                                    dseg[i * sw] += wv * gseg[i]
                p += ow1 - ow0


def g_rows(g1, off, count, gs):
    """``count`` elements of the flat output gradient ``g1`` from ``off``, as float: ``(g1, off)`` for a float
    ``g1``; bfloat16 bits are widened into ``gs`` (exact), giving ``(gs, 0)`` (chosen at compile time)."""
    raise NotImplementedError("compiled callers only")


@overload(g_rows)
def _g_rows(g1, off, count, gs):
    if g1.dtype == types.uint16:
        def widened(g1, off, count, gs):
            lanes = VECTOR_BYTES // 4
            for i in range(0, count, lanes):
                convert_vector(g1, off + i, gs, i, min(lanes, count - i))
            return gs, 0
        return widened

    def as_is(g1, off, count, gs):
        return g1, off
    return as_is


def dpw_tile(d1, cm, f, npx, g1, goff, dpw1, coff, dtb, pscr):
    """``dPW += D^T G`` of one tile: ``D`` float ``(npx, cm)`` in ``d1``, ``G`` rows of flat ``g1`` from
    ``goff``.  Float ``g1``: float products.  bfloat16 bits: ``D`` is rounded and transposed into ``dtb`` and
    the products multiply bfloat16 pairs of pixels (:func:`nbconv._gemm.gemm_bf16`, panels of ``G`` packed in
    ``pscr``).  Chosen at compile time."""
    raise NotImplementedError("compiled callers only")


@overload(dpw_tile)
def _dpw_tile(d1, cm, f, npx, g1, goff, dpw1, coff, dtb, pscr):
    if g1.dtype == types.uint16:
        def pairs(d1, cm, f, npx, g1, goff, dpw1, coff, dtb, pscr):
            transpose_tile(d1, 0, cm, npx, cm, dtb, 0, npx)
            gemm_bf16(cm, f, npx, dtb, 0, npx, g1, goff, f, False, dpw1, coff, f, d1[:0], 0, 0, 0, False, pscr, True)
        return pairs

    def floats(d1, cm, f, npx, g1, goff, dpw1, coff, dtb, pscr):
        gemm_nn(cm, f, npx, d1, 0, 1, cm, g1, goff, f, dpw1, coff, f, True, d1[:0], 0, 0, 0)
    return floats


def dd_tile(npx, cm, f, g1, goff, wt1, wpk, dd1, doff):
    """``dD = G PW^T`` of one tile into ``dd1`` from ``doff`` (``npx x cm``): float products from ``wt1``
    (``PW^T`` rows), or for bfloat16 bits ``g1`` products of pairs with ``wpk``, ``PW^T`` packed by
    :func:`nbconv._gemm.pack_pairs`.  Chosen at compile time."""
    raise NotImplementedError("compiled callers only")


@overload(dd_tile)
def _dd_tile(npx, cm, f, g1, goff, wt1, wpk, dd1, doff):
    if g1.dtype == types.uint16:
        def pairs(npx, cm, f, g1, goff, wt1, wpk, dd1, doff):
            gemm_bf16(npx, cm, f, g1, goff, f, wpk, 0, cm, True, dd1, doff, cm, dd1[:0], 0, 0, 0, False, wpk, False)
        return pairs

    def floats(npx, cm, f, g1, goff, wt1, wpk, dd1, doff):
        gemm_nn(npx, cm, f, g1, goff, f, 1, wt1, 0, cm, dd1, doff, cm, False, dd1[:0], 0, 0, 0)
    return floats


@jit
def _colsum_rows(g1, off, rows, cols, ld, acc):
    """``acc[:cols] += sum of rows`` of a ``rows x cols`` block of flat ``g1`` (row stride ``ld``)."""
    for r in range(rows):
        row = g1[off + r * ld:off + r * ld + cols]  # indexed by the loop counter only: vectorised
        for j in range(cols):
            acc[j] += row[j]


@jit
def _rowsum_rows(g1, off, rows, cols, ld, acc):
    """``acc[r] += sum of row r`` of a ``rows x cols`` block of flat ``g1``."""
    zero = g1.dtype.type(0)
    for r in range(rows):
        row = g1[off + r * ld:off + r * ld + cols]
        t = zero
        for j in range(cols):
            t += row[j]
        acc[r] += t


@jit
def dwsep_backward_nhwc(x, dk, wmat, wmat_t, g2, want_dx, dx, want_dk, dkp, want_pw, dpwp, want_b, dbp,
                        halo, halo_pos, sh, sw, dh, dw, pt, pl, oh_size, ow_size, tile_p, nchunks,
                        dscr, ddscr, ibuf, consts, chars, wt, bt, xs_scr, wp, gscr, gather, wf, wp2, xs2, wpk,
                        dtb, pscr, sched, sig, lead):
    """Parallel backward of depthwise (``wmat`` empty) or fused separable convolution, NHWC.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C)
    dk : ndarray of shape (KH, KW, C*dm)
    wmat : ndarray of shape (C*dm, F), or (0, 0) for a plain depthwise backward
    wmat_t : ndarray of shape (F, C*dm)
        ``wmat`` transposed, C-contiguous (``dD = G @ wmat.T`` reads its rows).
    g2 : ndarray of shape (N*OH*OW, G)
        Gradient of the output, ``G = F`` (separable) or ``C*dm`` (depthwise).
    dx : ndarray of shape (N, H, W, C)
        Written completely when ``want_dx``.
    dkp : ndarray of shape (nchunks, KH, KW, C*dm), zeros
    dpwp : ndarray of shape (nchunks, C*dm, F), zeros
    dbp : ndarray of shape (nchunks, G), zeros
        Per-chunk partial sums of the kernel, pointwise-kernel and bias gradients.
    halo : ndarray of shape (nchunks, HR, W, C)
    halo_pos : ndarray of shape (nchunks, 2), int64
        Receives ``(n, first row)`` of ``dx`` that ``halo[chunk]`` belongs to, or ``(-1, 0)``.
    dscr, ddscr : ndarray of shape (nchunks, tile_p, C*dm)
        Thread-private tiles of ``D`` and ``dD`` (separable only).
    ibuf : ndarray of shape (nchunks, 8), int32
    wt, bt, xs_scr, wp : operands of :func:`nbconv._depthwise.dw_tile` for the recompute of ``D``
        (``(KH*KW, C*dm)`` weights, zero bias, per-chunk packed-row scratch, packed row width);
        ``tile_p`` is then a multiple of ``OW``.
    gscr : ndarray of shape (nchunks, tile_p * G)
        Where a tile of ``g2`` given as bfloat16 bits (``uint16``) is widened (:func:`g_rows`); ``x`` may be
        bits too where only the packed rows read it: a separable kernel gradient then needs a 3x3 kernel (its
        vector path), and the scatter kernel of the plain depthwise backward may compute ``dx`` only.
    gather : bool
        Separable, ``dm == 1``: each tile's own ``dx`` rows by :func:`dx_gather_rows`, with the flipped weights
        ``wf`` ``(KH*KW, C)``, packed width ``wp2`` and per-chunk scratch ``xs2``; ``ddscr`` then holds
        ``ceil((KH-1)*dh / sh)`` rows of ``dD`` more, before the tile (those of the previous tile, or recomputed
        at a chunk's first tile in an image), no halo is used and ``dx`` may be bfloat16 bits.
    wpk, dtb, pscr : ndarray of uint16
        With ``g2`` in bfloat16 bits, the two products multiply bfloat16 pairs (:func:`dd_tile`,
        :func:`dpw_tile`): ``wmat_t`` packed in pairs, per-chunk ``(C*dm * tile_p)`` and panel scratch.

    Notes
    -----
    Parallel over ``nchunks`` chunks of output rows (module notes); a
    chunk writes only its own ``dx`` rows and its own slices of the
    partial-sum, halo and scratch buffers.
    """
    n_img, h, wd, c = x.shape
    cm = dk.shape[2]
    dm = cm // c
    sep = wmat.shape[0] > 0
    f = wmat.shape[1]
    gw = g2.shape[1]
    ohw = oh_size * ow_size
    rows = n_img * oh_size
    g1 = g2.reshape(-1)
    wt1 = wmat_t.reshape(-1)
    dpw1 = dpwp.reshape(-1)
    # 3x3 kernel gradients of separable tiles (whole output rows) in the vector micro-kernel
    fast_dk = sep and want_dk and dk.shape[0] == 3 and dk.shape[1] == 3
    pr = ((dk.shape[0] - 1) * dh + sh - 1) // sh  # rows of dD before a tile that the gather of its dx rows reads
    cp = pr * ow_size if gather else 0
    wpk1 = wpk.reshape(-1)
    last = 0
    enter(sched, sig, lead)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        r0, r1 = _chunk_rows(chunk, nchunks, rows)
        hal = halo[chunk]
        hn = -1
        hrow = 0
        if want_dx and r1 > r0 and not gather:
            # (the gather stores every owned row, complete)
            hn, hrow = _zero_owned_nhwc(dx, r0, r1, oh_size, sh, pt)
            _zero(hal)
        halo_pos[chunk, 0] = hn
        halo_pos[chunk, 1] = hrow
        d = dscr[chunk]
        dd = ddscr[chunk][cp:]
        d1 = d.reshape(-1)
        dd1 = ddscr[chunk].reshape(-1)
        dka = dkp[chunk]
        dba = dbp[chunk]
        if r1 > r0:
            for n in range(r0 // oh_size, (r1 - 1) // oh_size + 1):
                a = max(r0, n * oh_size) - n * oh_size
                b = min(r1, (n + 1) * oh_size) - n * oh_size
                own_end = hrow if n == hn else h
                xn = x[n]
                dxn = dx[n] if want_dx else dx[0]
                p0 = a * ow_size
                while p0 < b * ow_size:
                    p1 = min(p0 + tile_p, b * ow_size)
                    npx = p1 - p0
                    grow = n * ohw + p0
                    if want_b:
                        # bfloat16 bits are widened for the sum only: the products read them as they lie
                        gsrc, goff = g_rows(g1, grow * gw, npx * gw, gscr[chunk])
                        _colsum_rows(gsrc, goff, npx, gw, gw, dba)
                    if sep:
                        if want_pw:
                            if fast_dk and (want_dx or want_dk):
                                # through packed rows, which the kernel gradient below reads again
                                dw_rows_packed(x, n, True, False, wt, bt, 0, dm, p0 // ow_size, npx // ow_size, sh,
                                               sw, dh, dw, pt, pl, dk.shape[0], dk.shape[1], ow_size, wp,
                                               xs_scr[chunk], d1, 0, npx)
                            else:
                                dw_tile(x, n, True, False, wt, bt, 0, dm, p0 // ow_size, npx // ow_size, sh, sw, dh,
                                        dw, pt, pl, dk.shape[0], dk.shape[1], ow_size, wp, xs_scr[chunk], d1, 0, npx)
                            dpw_tile(d1, cm, f, npx, g1, grow * gw, dpw1, chunk * cm * f, dtb[chunk], pscr[chunk])
                        if want_dx or want_dk:
                            if gather and p0 == a * ow_size:
                                # the chunk's first tile in this image: dD of the pr rows before it (zeros above
                                # the image), which another chunk computes too
                                z = min(pr, max(0, pr - a))
                                _zero(dd1[:z * ow_size * cm])
                                dd_tile((pr - z) * ow_size, cm, f, g1, (grow - (pr - z) * ow_size) * gw, wt1, wpk1,
                                        dd1, z * ow_size * cm)
                            elif gather:
                                # the previous tile's last pr rows move to the front
                                for i in range(cp * cm):
                                    dd1[i] = dd1[last * cm + i]
                            dd_tile(npx, cm, f, g1, grow * gw, wt1, wpk1, dd1, cp * cm)
                            if fast_dk:
                                # the tile's packed input rows: already there from the recompute of D
                                r0t = p0 // ow_size
                                nrt = npx // ow_size
                                nin = (nrt - 1) * sh + 2 * dh + 1
                                if not want_pw:
                                    pack_rows(xn, dm, r0t * sh, nin, pt, pl, wp, VECTOR_BYTES // xs_scr.itemsize,
                                              xs_scr[chunk])
                                dk3_packed_rows(xs_scr[chunk], nin, wp, dd1, cp * cm, nrt, ow_size, sh, sw, dh, dw, cm,
                                                dka.reshape(-1), 0)
                            if gather:
                                dx_gather_rows(dd1, p0 // ow_size, npx // ow_size, pr, oh_size, ow_size, wf, bt, sh,
                                               sw, dh, dw, pt, (dk.shape[1] - 1) * dw - pl, dk.shape[0],
                                               dk.shape[1], wp2, xs2[chunk], dxn)
                            if (want_dx and not gather) or (want_dk and not fast_dk):
                                dwb_nhwc_pixels(xn, dk, dd, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                                                want_dk and not fast_dk, dka, want_dx and not gather, dxn, own_end,
                                                hal)
                    elif want_dx or want_dk:
                        gsrc, goff = g_rows(g1, grow * gw, npx * gw, gscr[chunk])
                        dwb_nhwc_pixels(xn, dk, gsrc[goff:goff + npx * gw].reshape((npx, gw)), dm, p0, p1, ow_size,
                                        sh, sw, dh, dw, pt, pl, want_dk, dka, want_dx, dxn, own_end, hal)
                    last = npx
                    p0 = p1
    leave(sched, sig, lead)


@jit
def dwsep_backward_nchw(x, dk, wmat, g3, want_dx, dx, want_dk, dkp, want_pw, dpwp, want_b, dbp,
                        halo, halo_pos, sh, sw, dh, dw, pt, pl, oh_size, ow_size, tile_p, nchunks,
                        dscr, ddscr, ibuf, consts, chars, sched, sig, lead):
    """Parallel backward of depthwise (``wmat`` empty) or fused separable convolution, NCHW.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    dk : ndarray of shape (C*dm, KH, KW)
    wmat : ndarray of shape (C*dm, F), or (0, 0) for a plain depthwise backward
    g3 : ndarray of shape (N, G, OH*OW)
        Gradient of the output, ``G = F`` (separable) or ``C*dm`` (depthwise).
    dx : ndarray of shape (N, C, H, W)
    dkp : ndarray of shape (nchunks, C*dm, KH, KW), zeros
    dpwp : ndarray of shape (nchunks, C*dm, F), zeros
    dbp : ndarray of shape (nchunks, G), zeros
    halo : ndarray of shape (nchunks, C, HR, W)
    halo_pos : ndarray of shape (nchunks, 2), int64
    dscr, ddscr : ndarray of shape (nchunks, C*dm, tile_p)
        Thread-private channel-major tiles of ``D`` and ``dD`` (separable only).

    Notes
    -----
    As :func:`dwsep_backward_nhwc`; the input is read tile-wise in place
    (no transposed copy).  BLAS reads the strided ``G`` tile directly.
    """
    n_img, c, h, wd = x.shape
    cm = dk.shape[0]
    dm = cm // c
    sep = wmat.shape[0] > 0
    f = wmat.shape[1]
    gw = g3.shape[1]
    ohw = oh_size * ow_size
    rows = n_img * oh_size
    g1 = g3.reshape(-1)
    w1 = wmat.reshape(-1)
    dpw1 = dpwp.reshape(-1)
    enter(sched, sig, lead)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        r0, r1 = _chunk_rows(chunk, nchunks, rows)
        hal = halo[chunk]
        hn = -1
        hrow = 0
        if want_dx and r1 > r0:
            hn, hrow = _zero_owned_nchw(dx, r0, r1, oh_size, sh, pt)
            _zero(hal)
        halo_pos[chunk, 0] = hn
        halo_pos[chunk, 1] = hrow
        ib = ibuf[chunk]
        d = dscr[chunk]
        dd = ddscr[chunk]
        d1 = d.reshape(-1)
        dd1 = dd.reshape(-1)
        tp = tile_p  # leading dimension of both scratch tiles (a tile not wanted is a dummy)
        dka = dkp[chunk]
        dba = dbp[chunk]
        if r1 > r0:
            for n in range(r0 // oh_size, (r1 - 1) // oh_size + 1):
                a = max(r0, n * oh_size) - n * oh_size
                b = min(r1, (n + 1) * oh_size) - n * oh_size
                own_end = hrow if n == hn else h
                xn = x[n]
                dxn = dx[n] if want_dx else dx[0]
                p0 = a * ow_size
                while p0 < b * ow_size:
                    p1 = min(p0 + tile_p, b * ow_size)
                    npx = p1 - p0
                    goff = n * gw * ohw + p0
                    if want_b:
                        _rowsum_rows(g1, goff, gw, npx, ohw, dba)
                    if sep:
                        if want_pw:
                            dw_nchw_recompute(xn, dk, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl, d)
                            gemm_rm(0, 1, cm, f, npx, d1, 0, tp, g1, goff, ohw, True, dpw1, chunk * cm * f, f,
                                    ib, consts, chars)
                        if want_dx or want_dk:
                            gemm_nn(cm, npx, f, w1, 0, f, 1, g1, goff, ohw, dd1, 0, tp, False, w1[:0], 0, 0, 0)
                            dwb_nchw_tile(xn, dk, dd1, 0, tp, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                                          want_dk, dka, want_dx, dxn, own_end, hal)
                    elif want_dx or want_dk:
                        dwb_nchw_tile(xn, dk, g1, goff, ohw, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                                      want_dk, dka, want_dx, dxn, own_end, hal)
                    p0 = p1
    leave(sched, sig, lead)


@jit
def add_halos_nhwc(dx, halo, halo_pos):
    """Add each chunk's spilled rows into ``dx`` (N, H, W, C), in chunk order (serial, deterministic)."""
    h = dx.shape[1]
    hr = halo.shape[1]
    for chunk in range(halo.shape[0]):
        n = halo_pos[chunk, 0]
        if n < 0:
            continue
        r0 = halo_pos[chunk, 1]
        for i in range(min(hr, h - r0)):
            dst = dx[n, r0 + i].reshape(-1)
            src = halo[chunk, i].reshape(-1)
            for k in range(dst.shape[0]):
                dst[k] += src[k]


@jit
def add_halos_nchw(dx, halo, halo_pos):
    """Add each chunk's spilled rows into ``dx`` (N, C, H, W), in chunk order (serial, deterministic)."""
    c, h = dx.shape[1], dx.shape[2]
    hr = halo.shape[2]
    for chunk in range(halo.shape[0]):
        n = halo_pos[chunk, 0]
        if n < 0:
            continue
        r0 = halo_pos[chunk, 1]
        for ci in range(c):
            for i in range(min(hr, h - r0)):
                dst = dx[n, ci, r0 + i]
                src = halo[chunk, ci, i]
                for k in range(dst.shape[0]):
                    dst[k] += src[k]


@jit
def reduce_chunks(parts, out, block, sched, sig, lead):
    """``out[i] = parts[0, i] + parts[1, i] + ...`` in chunk order (deterministic).

    Parameters
    ----------
    parts : ndarray of shape (nchunks, L)
    out : ndarray of shape (L,)

    Notes
    -----
    Parallel over blocks of ``block`` elements of ``out``.
    """
    nch, length = parts.shape
    nblocks = (length + block - 1) // block
    enter(sched, sig, lead)
    while True:
        bi = claim(sched, PHASE2, nblocks, lead)
        if bi < 0:
            break
        i0 = bi * block
        i1 = min(i0 + block, length)
        # zero-based loops over views: indices known non-negative, so the loops vectorise
        ob = out[i0:i1]
        ob[:] = parts[0, i0:i1]
        for k in range(1, nch):
            pk = parts[k, i0:i1]
            for i in range(i1 - i0):
                ob[i] += pk[i]
    leave(sched, sig, lead)


@jit
def pointwise_backward_nhwc(x2, wmat, wmat_t, g2, want_dx, dx2, want_w, dwp, want_b, dbp, tile_p, nchunks,
                            ibuf, consts, chars, sched, sig, lead):
    """Parallel backward of a pointwise convolution, NHWC: ``dx2 = g2 @ wmat.T``, ``dW = x2.T @ g2``, ``db = sum g2``.

    Parameters
    ----------
    x2 : ndarray of shape (P, K)
    wmat : ndarray of shape (K, F)
    wmat_t : ndarray of shape (F, K)
        ``wmat`` transposed, C-contiguous.
    g2 : ndarray of shape (P, F)
    dx2 : ndarray of shape (P, K)
    dwp : ndarray of shape (nchunks, K, F), zeros
    dbp : ndarray of shape (nchunks, F), zeros

    Notes
    -----
    Parallel over ``nchunks`` chunks of pixel tiles; each chunk writes its
    own ``dx2`` rows and accumulates its own partial sums.
    """
    p_all, k = x2.shape
    f = wmat.shape[1]
    ntiles = (p_all + tile_p - 1) // tile_p
    x1 = x2.reshape(-1)
    wt1 = wmat_t.reshape(-1)
    nobias = wt1[:0]
    g1 = g2.reshape(-1)
    dx1 = dx2.reshape(-1)
    dw1 = dwp.reshape(-1)
    enter(sched, sig, lead)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0, t1 = _chunk_rows(chunk, nchunks, ntiles)
        for t in range(t0, t1):
            p0 = t * tile_p
            npx = min(tile_p, p_all - p0)
            if want_dx:
                gemm_nn(npx, k, f, g1, p0 * f, f, 1, wt1, 0, k, dx1, p0 * k, k, False, nobias, 0, 0, 0)
            if want_w:
                gemm_nn(k, f, npx, x1, p0 * k, 1, k, g1, p0 * f, f, dw1, chunk * k * f, f, True, nobias, 0, 0, 0)
            if want_b:
                _colsum_rows(g1, p0 * f, npx, f, f, dbp[chunk])
    leave(sched, sig, lead)


@jit
def pointwise_backward_nchw(x3, wmat, g3, want_dx, dx3, want_w, dwp, want_b, dbp, tile_p, nchunks,
                            ibuf, consts, chars, sched, sig, lead):
    """Parallel backward of a pointwise convolution, NCHW (per image ``dx = W @ G``, ``dW += x @ G.T``).

    Parameters
    ----------
    x3 : ndarray of shape (N, K, HW)
    wmat : ndarray of shape (K, F)
    g3 : ndarray of shape (N, F, HW)
    dx3 : ndarray of shape (N, K, HW)
    dwp : ndarray of shape (nchunks, K, F), zeros
    dbp : ndarray of shape (nchunks, F), zeros

    Notes
    -----
    Parallel over ``nchunks`` chunks of ``(n, pixel tile)`` tasks; BLAS reads
    and writes the strided tiles in place.
    """
    n_img, k, hw = x3.shape
    f = wmat.shape[1]
    ptiles = (hw + tile_p - 1) // tile_p
    ntasks = n_img * ptiles
    x1 = x3.reshape(-1)
    w1 = wmat.reshape(-1)
    g1 = g3.reshape(-1)
    dx1 = dx3.reshape(-1)
    dw1 = dwp.reshape(-1)
    enter(sched, sig, lead)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0, t1 = _chunk_rows(chunk, nchunks, ntasks)
        ib = ibuf[chunk]
        for t in range(t0, t1):
            n = t // ptiles
            p0 = (t - n * ptiles) * tile_p
            npx = min(tile_p, hw - p0)
            xoff = n * k * hw + p0
            goff = n * f * hw + p0
            if want_dx:
                gemm_nn(k, npx, f, w1, 0, f, 1, g1, goff, hw, dx1, xoff, hw, False, w1[:0], 0, 0, 0)
            if want_w:
                gemm_rm(0, 1, k, f, npx, x1, xoff, hw, g1, goff, hw, True, dw1, chunk * k * f, f, ib, consts, chars)
            if want_b:
                _rowsum_rows(g1, goff, f, npx, hw, dbp[chunk])
    leave(sched, sig, lead)


@jit
def _weight_grad_task(t, parts, mb, nb, p_all, k, f):
    """Task ``t`` of a weight-gradient launch: its ``part`` (pixels ``p0 .. p1``), the ``mk x nf`` block of
    ``dW`` at ``(k0, f0)``, and the block's offset ``coff`` in the parts' partial sums."""
    kb = (k + mb - 1) // mb
    fbk = (f + nb - 1) // nb
    part = t // (kb * fbk)
    rest = t - part * kb * fbk
    k0 = (rest // fbk) * mb
    f0 = (rest - (rest // fbk) * fbk) * nb
    p0 = part * p_all // parts
    p1 = (part + 1) * p_all // parts
    return part, p0, p1, k0, f0, min(mb, k - k0), min(nb, f - f0), part * k * f + k0 * f + f0


@jit
def weight_grad_nhwc(x2, g2, parts, mb, nb, dwp, want_b, dbp, sched, sig, lead):
    """Parallel ``dW = x2.T @ g2`` (and ``db = sum of g2's rows``) for NHWC pointwise products.

    Parameters
    ----------
    x2 : ndarray of shape (P, K)
    g2 : ndarray of shape (P, F)
    parts : int
        Contiguous pixel ranges summed separately (into ``dwp[part]``), for
        parallelism when ``K x F`` has too few blocks.
    mb, nb : int
        Block of ``dW`` per task: ``mb`` rows (of ``K``) by ``nb`` columns (of ``F``).
    dwp : ndarray of shape (parts, K, F)
        Written completely (not accumulated).
    dbp : ndarray of shape (parts, F)
        Written completely when ``want_b``.

    Notes
    -----
    Parallel over tasks ``(part, row block, column block)``, each writing
    its own block: one product over all the part's pixels, so each block of
    ``dW`` is stored once per ``k`` block of the micro-kernel instead of
    being read and written back once per pixel tile (the tiled path's
    ``K x F`` partial sums, 4 MiB per chunk for 1024 x 1024, streamed from
    memory every 63 pixels).
    """
    p_all, k = x2.shape
    f = g2.shape[1]
    kb = (k + mb - 1) // mb
    fbk = (f + nb - 1) // nb
    ntasks = parts * kb * fbk
    x1 = x2.reshape(-1)
    g1 = g2.reshape(-1)
    dw1 = dwp.reshape(-1)
    nobias = g1[:0]
    enter(sched, sig, lead)
    while True:
        t = claim(sched, PHASE2, ntasks, lead)
        if t < 0:
            break
        part, p0, p1, k0, f0, mk, nf, coff = _weight_grad_task(t, parts, mb, nb, p_all, k, f)
        if p1 <= p0:
            gemm_nn(mk, nf, 0, x1, 0, 1, k, g1, 0, f, dw1, coff, f, False, nobias, 0, 0, 0)
        # x's columns k0.. of KC pixels at a time, copied to rows of ldp (not a power of two): read in place,
        # every pixel's row is its own cache line at a stride of K floats, which for K = 512 puts them all in
        # two L1 sets
        ldp = mk + 16
        xp = np.empty(KC * ldp, x1.dtype)
        for q0 in range(p0, p1, KC):
            ql = min(KC, p1 - q0)
            for q in range(ql):
                src = x1[(q0 + q) * k + k0:(q0 + q) * k + k0 + mk]
                dst = xp[q * ldp:q * ldp + mk]
                for i in range(mk):
                    dst[i] = src[i]
            gemm_nn(mk, nf, ql, xp, 0, 1, ldp, g1, q0 * f + f0, f, dw1, coff, f, q0 > p0, nobias, 0, 0, 0)
        if want_b and k0 == 0:
            acc = dbp[part, f0:f0 + min(nb, f - f0)]
            acc[:] = 0
            _colsum_rows(g1, p0 * f + f0, p1 - p0, acc.shape[0], f, acc)
    leave(sched, sig, lead)


@jit
def transpose_into(a, out, sched, sig, lead):
    """``out[j, i] = a[i, j]``: the pointwise weights transposed for ``dD = G W^T`` (NHWC backward).

    Parameters
    ----------
    a : ndarray of shape (R, C), C-contiguous
    out : ndarray of shape (C, R), C-contiguous

    Notes
    -----
    Parallel over square tiles of four vectors; whole ``lanes x lanes``
    blocks are transposed in registers (:func:`nbconv._gemm.transpose_tile`),
    the last rows of a tile element by element (NumPy's strided copy,
    ``np.ascontiguousarray(a.T)``, was 14x slower).
    """
    r, c = a.shape
    tile = 4 * (VECTOR_BYTES // a.itemsize)
    a1 = a.reshape(-1)
    o1 = out.reshape(-1)
    ntr = (r + tile - 1) // tile
    ntc = (c + tile - 1) // tile
    enter(sched, sig, lead)
    ntiles = ntr * ntc
    while True:
        t = claim(sched, PHASE2, ntiles, lead)
        if t < 0:
            break
        i0 = (t // ntc) * tile
        j0 = (t - (t // ntc) * ntc) * tile
        transpose_tile(a1, i0 * c + j0, c, min(tile, r - i0), min(tile, c - j0), o1, j0 * r + i0, r)
    leave(sched, sig, lead)


@jit
def weight_grad_bf16(dt, g2b, g2, parts, mb, nb, qb, dwp, want_b, dbp, p_scr, sched, sig, lead):
    """Parallel ``dW = D @ G`` with bfloat16 products (float32 sums), and ``db = sum of G's rows``.

    Parameters
    ----------
    dt : ndarray of uint16, shape (K, P)
        The depthwise intermediate transposed, in bfloat16 bits (pairs of pixels side by side).
    g2b : ndarray of uint16, shape (P, F)
        The output gradient in bfloat16 bits.
    g2 : ndarray of shape (P, F)
        The same in float32, for the bias gradient (summed exactly as the float path does).
    parts, mb, nb, dwp, want_b, dbp
        As in :func:`weight_grad_nhwc`.
    qb : int
        Pixels per product, even: a panel of ``G`` (``qb x 64`` pairs) stays in L2 while the task's rows of
        ``D^T`` pass over it; the sums of the blocks accumulate in ``dwp``.
    p_scr : ndarray of uint16, shape (tasks, >= qb * 64)
        Per task, where :func:`nbconv._gemm.gemm_bf16` packs the panels of ``G``.
    """
    k, p_all = dt.shape
    f = g2b.shape[1]
    kb = (k + mb - 1) // mb
    fbk = (f + nb - 1) // nb
    ntasks = parts * kb * fbk
    d1 = dt.reshape(-1)
    gb1 = g2b.reshape(-1)
    g1 = g2.reshape(-1)
    dw1 = dwp.reshape(-1)
    nobias = g1[:0]
    enter(sched, sig, lead)
    while True:
        t = claim(sched, PHASE2, ntasks, lead)
        if t < 0:
            break
        part, p0, p1, k0, f0, mk, nf, coff = _weight_grad_task(t, parts, mb, nb, p_all, k, f)
        if p1 <= p0:
            gemm_nn(mk, nf, 0, g1, 0, 1, k, g1, 0, f, dw1, coff, f, False, nobias, 0, 0, 0)
        for q0 in range(p0, p1, qb):
            ql = min(qb, p1 - q0)
            gemm_bf16(mk, nf, ql, d1, k0 * p_all + q0, p_all, gb1, q0 * f + f0, f, False, dw1, coff, f, nobias, 0, 0,
                      0, False, p_scr[t], q0 > p0)
        if want_b and k0 == 0:
            acc = dbp[part, f0:f0 + nf]
            acc[:] = 0
            _colsum_rows(g1, p0 * f + f0, p1 - p0, nf, f, acc)
    leave(sched, sig, lead)


@jit
def dk3_nhwc(x, g2, dm, sh, sw, dh, dw, pt, pl, oh_n, ow_n, wp, th, nchunks, xs_scr, dkp, gscr, sched, sig, lead):
    """Parallel kernel gradient of a 3x3 depthwise convolution, NHWC, from the gradient of its output.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C)
    g2 : ndarray of shape (N*OH*OW, C*dm)
    th : int
        Output rows per task (the packed rows of a task fit ``xs_scr[chunk]``).
    xs_scr : ndarray of shape (nchunks, packed rows * wp * C*dm)
    dkp : ndarray of shape (nchunks, 9 * C*dm), zeros
        Per-chunk partial sums, tap-major (``(3, 3, C*dm)``), added to.
    gscr : ndarray of shape (nchunks, th * OW * C*dm)
        Where a task's rows of ``g2`` given as bfloat16 bits are widened (:func:`g_rows`); ``x`` may be bits too
        (read through the packed rows only).

    Notes
    -----
    Parallel over chunks of tasks ``(n, tile of th output rows)``: each task
    packs its input rows (channels repeated for ``dm > 1``, as the forward
    does) and runs :func:`nbconv._depthwise.dk3_packed_rows`; a chunk writes
    only its own scratch and partial sums.
    """
    n_img = x.shape[0]
    cm = g2.shape[1]
    rtiles = (oh_n + th - 1) // th
    ntasks = n_img * rtiles
    g1 = g2.reshape(-1)
    lanes = VECTOR_BYTES // xs_scr.itemsize
    enter(sched, sig, lead)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0, t1 = _chunk_rows(chunk, nchunks, ntasks)
        xs = xs_scr[chunk]
        dk1 = dkp[chunk]
        for t in range(t0, t1):
            n = t // rtiles
            r0 = (t - n * rtiles) * th
            nr = min(th, oh_n - r0)
            nin = (nr - 1) * sh + 2 * dh + 1
            pack_rows(x[n], dm, r0 * sh, nin, pt, pl, wp, lanes, xs)
            gsrc, goff = g_rows(g1, (n * oh_n + r0) * ow_n * cm, nr * ow_n * cm, gscr[chunk])
            dk3_packed_rows(xs, nin, wp, gsrc, goff, nr, ow_n, sh, sw, dh, dw, cm, dk1, 0)
    leave(sched, sig, lead)


#: rows per block of :func:`col_sums`: each block's sums are one partial, added in block order
COLSUM_ROWS = 1024
#: elements of bfloat16 bits :func:`col_sums` widens at a time (whole rows, at least one)
COLSUM_WIDEN = 4096


@jit
def col_sums(g2, parts, gscr, sched, sig, lead):
    """Parallel per-block column sums of ``g2`` (the bias gradient): ``parts[b] = sum of rows b*COLSUM_ROWS ..
    (b+1)*COLSUM_ROWS - 1``, for :func:`reduce_chunks` to add in block order.

    ``g2`` of shape (P, G) is float, or bfloat16 bits widened a few rows at a time into ``gscr[participant]``
    (``gscr`` of shape (participants, max(G, COLSUM_WIDEN)); any shape for float ``g2``).
    """
    rows, cols = g2.shape
    nblocks = parts.shape[0]
    g1 = g2.reshape(-1)
    step = max(1, COLSUM_WIDEN // cols)
    enter(sched, sig, lead)
    gs = gscr[min(lead >> 2, gscr.shape[0] - 1)]
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        acc = parts[b]
        for j in range(cols):
            acc[j] = 0
        end = min(rows, (b + 1) * COLSUM_ROWS)
        for r in range(b * COLSUM_ROWS, end, step):
            nr = min(step, end - r)
            src, off = g_rows(g1, r * cols, nr * cols, gs)
            _colsum_rows(src, off, nr, cols, cols, acc)
    leave(sched, sig, lead)


#: elements per task of :func:`activation_grad` (64 KiB of float32 per operand)
ACT_BLOCK = 16384


@jit
def activation_grad(g, y, out, ytop, sched, sig, lead):
    """``out = g * act'(y)`` over flat arrays: the fused activation's derivative read off its output ``y``.

    ``g`` passes where ``0 < y < ytop``: ``ytop`` is 6 for relu6 and
    infinity for relu (the derivative Keras's backends use; NaN in ``y``
    gives 0).  bfloat16 operands come as their bits viewed as ``int16``,
    with ``ytop`` the bits of 6 or of infinity: on those the order of the
    integers is that of the positive values, negative values and -0 are
    negative integers, and NaNs lie above infinity.  Parallel over blocks
    of :data:`ACT_BLOCK` elements; ``out`` must not overlap ``g`` or ``y``
    unless it is ``g``.
    """
    n = g.shape[0]
    zero = g.dtype.type(0)
    enter(sched, sig, lead)
    nblocks = (n + ACT_BLOCK - 1) // ACT_BLOCK
    while True:
        b = claim(sched, PHASE2, nblocks, lead)
        if b < 0:
            break
        i0 = b * ACT_BLOCK
        i1 = min(n, i0 + ACT_BLOCK)
        gs, ys, os = g[i0:i1], y[i0:i1], out[i0:i1]
        for i in range(i1 - i0):
            t = ys[i]
            os[i] = gs[i] if (t > 0 and t < ytop) else zero
    leave(sched, sig, lead)
