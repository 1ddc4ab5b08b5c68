"""Depthwise convolution kernels (forward), NHWC and NCHW.

Layout conventions shared with the other kernel families:

* weights arrive repacked by the public layer: NHWC kernels take ``w`` of
  shape ``(KH, KW, C*dm)`` (Keras's ``(KH, KW, C, dm)`` reshaped, output
  channel ``c*dm + m``), NCHW kernels take ``(C*dm, KH, KW)``;
* a bias of length 0 means "no bias";
* ``act`` is an activation code from :mod:`nbconv._elementwise`;
* padding is zero padding given as ``pt`` (top) and ``pl`` (left); rows and
  columns outside the input are skipped, never read.

The serial helpers (``dw_*``) compute one tile into a destination the caller
owns; the parallel kernels split a call into tasks over a flat index and
share nothing writable between tasks, so they are thread-safe for concurrent
calls with distinct outputs.
"""
import numpy as np
from numba import prange

from ._elementwise import bias_act_inplace, vec_bias_act_inplace
from ._jit import jit, pjit


@jit
def _first_valid(offset, step, limit, lo, hi):
    """Sub-range ``[a, b)`` of ``[lo, hi)`` where ``0 <= o*step + offset < limit``."""
    a = lo
    if offset < 0:
        a = max(lo, (-offset + step - 1) // step)
    b = min(hi, (limit - 1 - offset) // step + 1) if limit - 1 - offset >= 0 else lo
    return a, max(a, b)


@jit
def dw_nhwc_pixels(xn, w, bias, act, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl, dst):
    """Depthwise output pixels ``p0 .. p1-1`` (row-major over ``(OH, OW)``) of one NHWC image.

    Parameters
    ----------
    xn : ndarray of shape (H, W, C)
    w : ndarray of shape (KH, KW, C*dm)
    bias : ndarray of shape (C*dm,) or (0,)
    dst : ndarray of shape (>= p1 - p0, C*dm), C-contiguous
        Row ``p - p0`` receives pixel ``p``, all ``C*dm`` channels.

    Notes
    -----
    The channel loop is innermost and contiguous, so it vectorises; each
    output row of ``dst`` stays in L1 while its ``KH*KW`` taps accumulate.
    """
    h, wd, c = xn.shape
    kh_n, kw_n, cm = w.shape
    has_bias = bias.shape[0] > 0
    zero = dst.dtype.type(0)
    for p in range(p0, p1):
        oh = p // ow_size
        ow = p - oh * ow_size
        row = dst[p - p0]
        if has_bias:
            for j in range(cm):
                row[j] = bias[j]
        else:
            for j in range(cm):
                row[j] = zero
        for kh in range(kh_n):
            ih = oh * sh - pt + kh * dh
            if ih < 0 or ih >= h:
                continue
            for kw in range(kw_n):
                iw = ow * sw - pl + kw * dw
                if iw < 0 or iw >= wd:
                    continue
                xr = xn[ih, iw]
                wr = w[kh, kw]
                if dm == 1:
                    for j in range(cm):
                        row[j] += xr[j] * wr[j]
                else:
                    for ci in range(c):
                        xv = xr[ci]
                        for m in range(dm):
                            row[ci * dm + m] += xv * wr[ci * dm + m]
        if act != 0:
            vec_bias_act_inplace(row, bias, False, act)


@jit
def dw_nchw_tile(xn, w, bias, act, dm, c0, c1, p0, p1, ow_size, sh, sw, dh, dw, pt, pl, dst):
    """Depthwise output of input channels ``c0 .. c1-1`` at pixels ``p0 .. p1-1`` of one NCHW image.

    Parameters
    ----------
    xn : ndarray of shape (C, H, W)
    w : ndarray of shape (C*dm, KH, KW)
    bias : ndarray of shape (C*dm,) or (0,)
    dst : ndarray of shape (>= (c1 - c0)*dm, >= p1 - p0), C-contiguous
        ``dst[j - c0*dm, p - p0]`` receives output channel ``j`` at pixel ``p``.

    Notes
    -----
    Vectorised along output columns (unit stride when ``sw == 1``); the
    valid column range of each tap is computed once, so the inner loop has
    no bounds checks.
    """
    _, h, wd = xn.shape
    _, kh_n, kw_n = w.shape
    has_bias = bias.shape[0] > 0
    zero = dst.dtype.type(0)
    for ci in range(c0, c1):
        xc = xn[ci]
        for m in range(dm):
            j = ci * dm + m
            drow = dst[j - c0 * dm]
            b = bias[j] if has_bias else zero
            p = p0
            while p < p1:
                oh = p // ow_size
                ow0 = p - oh * ow_size
                ow1 = min(ow_size, ow0 + (p1 - p))
                q0 = p - p0 - ow0  # drow[q0 + ow] is pixel (oh, ow)
                for ow in range(ow0, ow1):
                    drow[q0 + ow] = zero
                for kh in range(kh_n):
                    ih = oh * sh - pt + kh * dh
                    if ih < 0 or ih >= h:
                        continue
                    xr = xc[ih]
                    for kw in range(kw_n):
                        off = kw * dw - pl
                        a, bnd = _first_valid(off, sw, wd, ow0, ow1)
                        wv = w[j, kh, kw]
                        if sw == 1:
                            for ow in range(a, bnd):
                                drow[q0 + ow] += wv * xr[ow + off]
                        else:
                            for ow in range(a, bnd):
                                drow[q0 + ow] += wv * xr[ow * sw + off]
                if b != zero or act != 0:
                    bias_act_inplace(drow[q0 + ow0:q0 + ow1], b, act)
                p += ow1 - ow0


@jit
def pack_rows(xn, dm, pr0, nrows, pt, pl, wp, xs):
    """Zero-padded copy of padded-input rows ``pr0 .. pr0+nrows-1`` of one NHWC image, channels repeated ``dm`` times.

    Parameters
    ----------
    xn : ndarray of shape (H, W, C)
    pr0 : int
        First row in padded coordinates (input row ``pr0 - pt``).
    wp : int
        Columns to write, in padded coordinates (input column ``col - pl``).
    xs : ndarray of shape (>= nrows*wp*C*dm,), flat
        Receives ``xs[(r*wp + col)*C*dm + c*dm + m] = x[pr0 + r - pt, col - pl, c]``,
        zero outside the input.

    Notes
    -----
    Packing once per tile leaves the depthwise loops no bounds checks and
    folds ``dm`` into the channels; padding reads real zeros, so ``0 * w``
    terms match the reference exactly, NaN/Inf included.
    """
    h, w, c = xn.shape
    cm = c * dm
    zero = xs.dtype.type(0)
    col0 = min(pl, wp)
    col1 = min(pl + w, wp)
    for r in range(nrows):
        row = xs[r * wp * cm:(r + 1) * wp * cm]
        ih = pr0 + r - pt
        if ih < 0 or ih >= h:
            for i in range(wp * cm):
                row[i] = zero
            continue
        for i in range(col0 * cm):
            row[i] = zero
        for i in range(col1 * cm, wp * cm):
            row[i] = zero
        if col1 <= col0:
            continue
        src = xn[ih].reshape(-1)
        if dm == 1:
            dst = row[col0 * cm:col1 * cm]
            for i in range((col1 - col0) * c):
                dst[i] = src[i]
        elif dm == 2:
            # both copies in one statement: an interleaved store LLVM vectorises
            seg = src[(col0 - pl) * c:]
            dst = row[col0 * cm:]
            for i in range((col1 - col0) * c):
                v = seg[i]
                dst[2 * i] = v
                dst[2 * i + 1] = v
        else:
            seg = src[(col0 - pl) * c:]
            dst = row[col0 * cm:]
            for i in range((col1 - col0) * c):
                v = seg[i]
                for m in range(dm):
                    dst[i * dm + m] = v


@jit
def dw_packed_rows(xs, wp, wt, bt, act, nrows, ow_n, sh, sw, dh, dw, kh_n, kw_n, cm, nw, dst):
    """Depthwise output rows from packed input rows (:func:`pack_rows`), ``nw`` pixels per inner loop.

    Parameters
    ----------
    xs : ndarray, flat
        Packed input: row ``r*sh + kh*dh`` for output row ``r``, ``wp`` columns.
    wt : ndarray of shape (KH*KW, nw*cm)
        Weights per tap, tiled ``nw`` times (``nw > 1`` only with ``sw == 1``,
        where ``nw`` neighbouring pixels are contiguous in ``xs`` and ``dst``).
    bt : ndarray of shape (nw*cm,)
        Bias tiled ``nw`` times (zeros for no bias).
    dst : ndarray, flat
        Receives ``nrows*ow_n`` pixels of ``cm`` channels, row-major.

    Notes
    -----
    3x3 kernels sum all nine taps in one expression (accumulator in
    registers); other sizes accumulate tap by tap into ``dst`` (in L1).
    """
    nblocks = (ow_n + nw - 1) // nw
    rs = dh * wp * cm
    cs = dw * cm
    # the nine 3x3 tap rows, hoisted out of the loops (row 0 nine times for other kernel sizes)
    t = 1 if kh_n == 3 and kw_n == 3 else 0
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = wt[0], wt[t], wt[2 * t], wt[3 * t], wt[4 * t], wt[5 * t], wt[6 * t], \
        wt[7 * t], wt[8 * t]
    for r in range(nrows):
        for b in range(nblocks):
            ow = b * nw
            ln = min(nw, ow_n - ow) * cm
            d = dst[(r * ow_n + ow) * cm:]
            x0 = xs[((r * sh) * wp + ow * sw) * cm:]
            if kh_n == 3 and kw_n == 3:
                x1 = x0[cs:]
                x2 = x0[2 * cs:]
                x3 = x0[rs:]
                x4 = x3[cs:]
                x5 = x3[2 * cs:]
                x6 = x0[2 * rs:]
                x7 = x6[cs:]
                x8 = x6[2 * cs:]
                for i in range(ln):
                    d[i] = (bt[i] + x0[i] * w0[i] + x1[i] * w1[i] + x2[i] * w2[i] + x3[i] * w3[i] + x4[i] * w4[i]
                            + x5[i] * w5[i] + x6[i] * w6[i] + x7[i] * w7[i] + x8[i] * w8[i])
            else:
                for i in range(ln):
                    d[i] = bt[i]
                for kh in range(kh_n):
                    for kw in range(kw_n):
                        xt = x0[kh * rs + kw * cs:]
                        wv = wt[kh * kw_n + kw]
                        for i in range(ln):
                            d[i] += xt[i] * wv[i]
            if act != 0:
                vec_bias_act_inplace(d[:ln], bt, False, act)


@jit
def pack_rows_nchw(xn, pr0, nrows, pt, pl, wp, xs):
    """Zero-padded copy of padded-input rows ``pr0 .. pr0+nrows-1`` of one NCHW image, kept channel-major.

    Parameters
    ----------
    xn : ndarray of shape (C, H, W)
    xs : ndarray of shape (>= C*nrows*wp,), flat
        Receives ``xs[(c*nrows + r)*wp + col] = x[c, pr0 + r - pt, col - pl]``, zero outside the input.
    """
    c, h, w = xn.shape
    zero = xs.dtype.type(0)
    col0 = min(pl, wp)
    col1 = min(pl + w, wp)
    for ci in range(c):
        for r in range(nrows):
            row = xs[(ci * nrows + r) * wp:(ci * nrows + r + 1) * wp]
            ih = pr0 + r - pt
            if ih < 0 or ih >= h or col1 <= col0:
                for i in range(wp):
                    row[i] = zero
                continue
            for i in range(col0):
                row[i] = zero
            for i in range(col1, wp):
                row[i] = zero
            seg = xn[ci, ih, col0 - pl:col1 - pl]
            dst = row[col0:col1]
            for i in range(col1 - col0):
                dst[i] = seg[i]


@jit
def dw_rows_nchw(xs, nrows_in, wp, wc, bias, act, dm, nr, ow_n, sh, sw, dh, dw, kh_n, kw_n, dst, doff, ldd, vbuf):
    """Depthwise output rows from channel-major packed rows (:func:`pack_rows_nchw`), vectorised along W.

    Parameters
    ----------
    xs : ndarray, flat
        Packed input, ``nrows_in`` rows of ``wp`` columns per input channel.
    wc : ndarray of shape (C*dm, KH*KW)
    bias : ndarray of shape (C*dm,) or (0,)
    dst : ndarray, flat
        ``dst[doff + j*ldd + r*ow_n + ow]`` receives output channel ``j`` at tile row ``r``, column ``ow``.
    vbuf : ndarray, flat
        Scratch of at least ``nr * wp`` elements for the stride-1 path.

    Notes
    -----
    With unit strides, all rows of a channel are computed in one loop over a
    "virtual" row of ``wp`` columns (the columns past ``ow_n`` are discarded
    when copying to ``dst``), so short rows cost no per-row overhead.
    """
    cm = wc.shape[0]
    has_bias = bias.shape[0] > 0
    zero = dst.dtype.type(0)
    flat = sh == 1 and sw == 1
    if flat:
        nrun, step, rows = (nr - 1) * wp + ow_n, 1, 1
    else:
        nrun, step, rows = ow_n, sw, nr
    rs = dh * wp
    for j in range(cm):
        cbase = (j // dm) * nrows_in * wp
        wj = wc[j]
        b = bias[j] if has_bias else zero
        for r in range(rows):
            d = vbuf if flat else dst[doff + j * ldd + r * ow_n:doff + j * ldd + (r + 1) * ow_n]
            x0 = xs[cbase + r * sh * wp:]
            if kh_n == 3 and kw_n == 3:
                w0, w1, w2, w3, w4, w5, w6, w7, w8 = wj[0], wj[1], wj[2], wj[3], wj[4], wj[5], wj[6], wj[7], wj[8]
                x1 = x0[dw:]
                x2 = x0[2 * dw:]
                x3 = x0[rs:]
                x4 = x3[dw:]
                x5 = x3[2 * dw:]
                x6 = x0[2 * rs:]
                x7 = x6[dw:]
                x8 = x6[2 * dw:]
                if step == 1:
                    for i in range(nrun):
                        d[i] = (b + x0[i] * w0 + x1[i] * w1 + x2[i] * w2 + x3[i] * w3 + x4[i] * w4 + x5[i] * w5
                                + x6[i] * w6 + x7[i] * w7 + x8[i] * w8)
                else:
                    for i in range(nrun):
                        k = i * step
                        d[i] = (b + x0[k] * w0 + x1[k] * w1 + x2[k] * w2 + x3[k] * w3 + x4[k] * w4 + x5[k] * w5
                                + x6[k] * w6 + x7[k] * w7 + x8[k] * w8)
            else:
                for i in range(nrun):
                    d[i] = b
                for kh in range(kh_n):
                    for kw in range(kw_n):
                        xt = x0[kh * rs + kw * dw:]
                        wv = wj[kh * kw_n + kw]
                        if step == 1:
                            for i in range(nrun):
                                d[i] += xt[i] * wv
                        else:
                            for i in range(nrun):
                                d[i] += xt[i * step] * wv
            if flat:
                for rr in range(nr):
                    out = dst[doff + j * ldd + rr * ow_n:doff + j * ldd + (rr + 1) * ow_n]
                    v = vbuf[rr * wp:rr * wp + ow_n]
                    for i in range(ow_n):
                        out[i] = v[i]
                    if act != 0:
                        bias_act_inplace(out, zero, act)
            elif act != 0:
                bias_act_inplace(d, zero, act)


@jit
def dw_tile(x, n, channels_last, wt, bt, wc, bc, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, wp, nw, xs,
            dst, doff, ldd):
    """Depthwise output rows ``r0 .. r0+nr-1`` of image ``n``, all channels, via packed rows in ``xs``.

    NHWC: ``dst[doff + q*C*dm + j]``; NCHW: ``dst[doff + j*ldd + q]``, for
    pixel ``q`` of the tile (row-major) and output channel ``j``.
    """
    nin = (nr - 1) * sh + (kh_n - 1) * dh + 1
    if channels_last:
        pack_rows(x[n], dm, r0 * sh, nin, pt, pl, wp, xs)
        dw_packed_rows(xs, wp, wt, bt, act, nr, ow_n, sh, sw, dh, dw, kh_n, kw_n, wc.shape[0], nw, dst[doff:])
    else:
        pack_rows_nchw(x[n], r0 * sh, nin, pt, pl, wp, xs)
        # the virtual-row scratch of dw_rows_nchw lives after the packed rows
        dw_rows_nchw(xs, nin, wp, wc, bc, act, dm, nr, ow_n, sh, sw, dh, dw, kh_n, kw_n, dst, doff, ldd,
                     xs[wc.shape[0] // dm * nin * wp:])


@pjit
def depthwise_packed(x, channels_last, wt, bt, wc, bc, act, out1, dm, sh, sw, dh, dw, pt, pl, kh_n, kw_n, oh_n, ow_n, wp,
                     th, nw, nchunks, xs_scr):
    """Parallel depthwise convolution from packed rows, NHWC or NCHW.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C) if ``channels_last`` else (N, C, H, W)
    wt, bt : NHWC weights and bias, tiled, see :func:`dw_packed_rows`
    wc, bc : NCHW weights ``(C*dm, KH*KW)`` and bias ``(C*dm,)`` or ``(0,)``, see :func:`dw_rows_nchw`
    out1 : ndarray, flat
        The output, ``(N, OH, OW, C*dm)`` or ``(N, C*dm, OH, OW)`` (same layout as ``x``) in C order.
    xs_scr : ndarray of shape (nchunks, packed rows * wp * C*dm)

    Notes
    -----
    Parallel over tasks ``(n, tile of th output rows)``; each task packs its
    input rows into its chunk's scratch and writes its own output rows (NCHW:
    its own pixel range of every channel plane).
    """
    n_img = x.shape[0]
    cm = wc.shape[0]
    ohw = oh_n * ow_n
    rtiles = (oh_n + th - 1) // th
    ntasks = n_img * rtiles
    for chunk in prange(nchunks):
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        xs = xs_scr[chunk]
        for t in range(t0, t1):
            n = t // rtiles
            r0 = (t - n * rtiles) * th
            nr = min(th, oh_n - r0)
            doff = (n * oh_n + r0) * ow_n * cm if channels_last else n * cm * ohw + r0 * ow_n
            dw_tile(x, n, channels_last, wt, bt, wc, bc, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, wp,
                    nw, xs, out1, doff, ohw)
