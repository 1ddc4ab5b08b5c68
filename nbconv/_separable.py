"""Fused depthwise-separable convolution kernels (forward), NHWC and NCHW.

Each task computes the depthwise result of one tile of output pixels, for all
``C*dm`` channels, into thread-private scratch, and multiplies that tile
straight into the output (BLAS, single-threaded per task).  The full
depthwise intermediate is never materialised.

Scratch bound
    ``nchunks * tile_p * C*dm`` elements of the compute dtype (``scratch``
    is allocated by the caller with that shape); the public layer picks
    ``tile_p`` so one tile is at most about 512 KiB and ``nchunks`` is at
    most 4 per thread.
"""
from numba import prange

from ._depthwise import dw_nchw_tile, dw_nhwc_pixels
from ._jit import pjit
from ._pointwise import epilogue_cols, epilogue_rows, gemm_rm


@pjit
def separable_nhwc(x, dk, dbias, dact, wmat, bias, act, out2, sh, sw, dh, dw, pt, pl, ow_size,
                   tile_p, fb, nchunks, scratch, ibuf, consts, chars):
    """Parallel fused separable convolution, NHWC.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C)
    dk : ndarray of shape (KH, KW, C*dm)
    dbias, dact : depthwise bias ``(C*dm,)`` or ``(0,)`` and activation code
    wmat : ndarray of shape (C*dm, F)
    bias, act : pointwise bias ``(F,)`` or ``(0,)`` and activation code
    out2 : ndarray of shape (N*OH*OW, F)
    scratch : ndarray of shape (nchunks, tile_p, C*dm)
    ibuf : ndarray of shape (nchunks, 8), int32

    Notes
    -----
    Parallel over tasks ``(n, pixel tile, filter block)`` (filter blocks
    innermost, so a chunk reuses its depthwise tile across them), grouped
    into ``nchunks`` chunks, each owning ``scratch[chunk]``.
    """
    n_img = x.shape[0]
    c = x.shape[3]
    cm = dk.shape[2]
    dm = cm // c
    f = wmat.shape[1]
    ohw = out2.shape[0] // n_img if n_img > 0 else 0
    ptiles = (ohw + tile_p - 1) // tile_p
    fblocks = (f + fb - 1) // fb
    ntasks = n_img * ptiles * fblocks
    w1 = wmat.reshape(-1)
    o1 = out2.reshape(-1)
    for chunk in prange(nchunks):
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        d = scratch[chunk]
        d1 = d.reshape(-1)
        ib = ibuf[chunk]
        have = -1
        for t in range(t0, t1):
            tile = t // fblocks
            f0 = (t - tile * fblocks) * fb
            nf = min(fb, f - f0)
            n = tile // ptiles
            p0 = (tile - n * ptiles) * tile_p
            npx = min(tile_p, ohw - p0)
            if tile != have:
                dw_nhwc_pixels(x[n], dk, dbias, dact, dm, p0, p0 + npx, ow_size, sh, sw, dh, dw, pt, pl, d)
                have = tile
            coff = (n * ohw + p0) * f + f0
            gemm_rm(0, 0, npx, nf, cm, d1, 0, cm, w1, f0, f, False, o1, coff, f, ib, consts, chars)
            epilogue_rows(o1, coff, npx, nf, f, bias, f0, act)


@pjit
def separable_nchw(x, dk, dbias, dact, wmat, bias, act, out3, sh, sw, dh, dw, pt, pl, ow_size,
                   tile_p, fb, nchunks, scratch, ibuf, consts, chars):
    """Parallel fused separable convolution, NCHW.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W)
    dk : ndarray of shape (C*dm, KH, KW)
    wmat : ndarray of shape (C*dm, F)
    out3 : ndarray of shape (N, F, OH*OW)
    scratch : ndarray of shape (nchunks, C*dm, tile_p)

    Notes
    -----
    As :func:`separable_nhwc`, with the tile held channel-major
    (``C*dm x tile_p``) so that ``out[n, f0:f0+fb, p0:p0+tile_p] =
    wmat[:, f0:f0+fb].T @ tile`` is written in place by BLAS.
    """
    n_img, c = x.shape[0], x.shape[1]
    cm = dk.shape[0]
    dm = cm // c
    f = wmat.shape[1]
    ohw = out3.shape[2]
    ptiles = (ohw + tile_p - 1) // tile_p
    fblocks = (f + fb - 1) // fb
    ntasks = n_img * ptiles * fblocks
    w1 = wmat.reshape(-1)
    o1 = out3.reshape(-1)
    for chunk in prange(nchunks):
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        d = scratch[chunk]
        d1 = d.reshape(-1)
        ib = ibuf[chunk]
        have = -1
        for t in range(t0, t1):
            tile = t // fblocks
            f0 = (t - tile * fblocks) * fb
            nf = min(fb, f - f0)
            n = tile // ptiles
            p0 = (tile - n * ptiles) * tile_p
            npx = min(tile_p, ohw - p0)
            if tile != have:
                dw_nchw_tile(x[n], dk, dbias, dact, dm, 0, c, p0, p0 + npx, ow_size, sh, sw, dh, dw, pt, pl, d)
                have = tile
            coff = n * f * ohw + f0 * ohw + p0
            gemm_rm(1, 0, nf, npx, cm, w1, f0, f, d1, 0, tile_p, False, o1, coff, ohw, ib, consts, chars)
            epilogue_cols(o1, coff, nf, npx, ohw, bias, f0, act)
