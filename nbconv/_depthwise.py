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


@pjit
def depthwise_nhwc(x, w, bias, act, out2, sh, sw, dh, dw, pt, pl, ow_size, tile_p, nchunks):
    """Parallel depthwise convolution, NHWC.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C)
    w : ndarray of shape (KH, KW, C*dm)
    out2 : ndarray of shape (N*OH*OW, C*dm)
        The output, written completely.

    Notes
    -----
    Parallel over tasks ``(n, pixel tile of tile_p pixels)``, grouped into
    ``nchunks`` contiguous chunks; tasks write disjoint rows of ``out2``.
    """
    n_img = x.shape[0]
    c = x.shape[3]
    dm = w.shape[2] // c
    ohw = out2.shape[0] // n_img if n_img > 0 else 0
    tiles = (ohw + tile_p - 1) // tile_p
    ntasks = n_img * tiles
    for chunk in prange(nchunks):
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        for t in range(t0, t1):
            n = t // tiles
            p0 = (t - n * tiles) * tile_p
            p1 = min(p0 + tile_p, ohw)
            base = n * ohw
            dw_nhwc_pixels(x[n], w, bias, act, dm, p0, p1, ow_size, sh, sw, dh, dw, pt, pl,
                           out2[base + p0:base + p1])


@pjit
def depthwise_nchw(x, w, bias, act, out3, sh, sw, dh, dw, pt, pl, ow_size, cblock, nchunks):
    """Parallel depthwise convolution, NCHW.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    w : ndarray of shape (C*dm, KH, KW)
    out3 : ndarray of shape (N, C*dm, OH*OW)

    Notes
    -----
    Parallel over tasks ``(n, block of cblock input channels)``; each task
    writes whole output planes, disjoint from every other task's.
    """
    n_img, c = x.shape[0], x.shape[1]
    dm = w.shape[0] // c
    ohw = out3.shape[2]
    blocks = (c + cblock - 1) // cblock
    ntasks = n_img * blocks
    for chunk in prange(nchunks):
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        for t in range(t0, t1):
            n = t // blocks
            c0 = (t - n * blocks) * cblock
            c1 = min(c0 + cblock, c)
            dw_nchw_tile(x[n], w, bias, act, dm, c0, c1, 0, ohw, ow_size, sh, sw, dh, dw, pt, pl,
                         out3[n, c0 * dm:c1 * dm])
