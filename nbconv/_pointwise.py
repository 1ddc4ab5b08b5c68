"""Pointwise (1x1) convolution kernels and the BLAS tile helper of the backward kernels.

The forward products run in :func:`nbconv._gemm.gemm_nn` one tile per task,
reading every operand in place through offsets and leading dimensions (NHWC
and NCHW alike, no packing or transposing copies).  :func:`gemm_rm` calls
SciPy's BLAS ``sgemm``/``dgemm`` straight from a kernel (see
:mod:`nbconv._runtime`) for the backward products, whose transposed operands
the micro-kernel does not read.
"""
import numpy as np

from ._gemm import gemm_nn, product
from ._jit import jit
from ._sync import PHASE2, claim, enter, leave
from ._runtime import dgemm, sgemm

#: ``chars`` argument of the GEMM helpers: Fortran 'N' and 'T'
GEMM_CHARS = np.array([ord("N"), ord("T")], np.uint8)


@jit
def gemm_rm(ta, tb, m, n, k, a, aoff, lda, b, boff, ldb, beta, c, coff, ldc, ibuf, consts, chars):
    """Row-major ``C = op(A) @ op(B) + beta*C`` on flat offsets into ``a``, ``b``, ``c``.

    ``op(A)`` is ``m x k``, ``op(B)`` is ``k x n``; ``ta``/``tb`` select the
    transpose.  ``consts`` holds ``[1, 0, 1]`` in the compute dtype (alpha,
    beta=0, beta=1), ``ibuf`` is a private int32 scratch of length >= 6 (BLAS
    takes every argument by pointer), ``chars`` is :data:`GEMM_CHARS`.
    Implemented as the column-major product ``C^T = op(B)^T op(A)^T``.
    """
    ibuf[0] = n
    ibuf[1] = m
    ibuf[2] = k
    ibuf[3] = ldb
    ibuf[4] = lda
    ibuf[5] = ldc
    isz = c.itemsize
    pa = a.ctypes.data + aoff * isz
    pb = b.ctypes.data + boff * isz
    pc = c.ctypes.data + coff * isz
    pib = ibuf.ctypes.data
    pchars = chars.ctypes.data
    pconst = consts.ctypes.data
    pbeta = pconst + (2 if beta else 1) * isz
    if isz == 4:
        sgemm(pchars + tb, pchars + ta, pib, pib + 4, pib + 8, pconst, pb, pib + 12, pa, pib + 16, pbeta, pc, pib + 20)
    else:
        dgemm(pchars + tb, pchars + ta, pib, pib + 4, pib + 8, pconst, pb, pib + 12, pa, pib + 16, pbeta, pc, pib + 20)


@jit
def pointwise_nhwc(x2, wmat, bias, act, out2, tile_p, fb, nchunks, stream, packed_k, p_scr, sched, sig, lead):
    """Pointwise convolution, NHWC: ``out2 = act(x2 @ wmat + bias)``, run by the calling thread and the pool's
    helpers (``sched``, ``sig``, ``lead``: :mod:`nbconv._sync`).

    Parameters
    ----------
    x2 : ndarray of shape (P, K)
        All pixels of all images, C-contiguous.
    wmat : ndarray of shape (K, F), or packed
        Row-major, or with ``packed_k`` (= ``K``) its elements packed by
        :func:`nbconv._gemm.pack_b` (then ``fb`` is a multiple of the panel width).
        bfloat16 bits (``uint16``, packed by :func:`nbconv._gemm.pack_pairs`
        with ``packed_k``) with ``x2`` in bfloat16 too: bfloat16 products.
    out2 : ndarray of shape (P, F)
        float32/float64, or bfloat16 bits (``uint16``, rounded from float32 sums).
    stream : bool
        Write ``out2`` with non-temporal stores (see :func:`nbconv._gemm.gemm_nn`).
    p_scr : ndarray of uint16, shape (nchunks, panel scratch) or (nchunks, 0)
        Per chunk, where bfloat16 products pack a panel of plain weights (:func:`nbconv._gemm.gemm_bf16`).

    Notes
    -----
    Tasks ``(tile of tile_p pixels, block of fb filters)``, in ``nchunks`` chunks the participants claim.
    """
    enter(sched, sig, lead)
    p_all, k = x2.shape
    f = out2.shape[1]
    ptiles = (p_all + tile_p - 1) // tile_p
    fblocks = (f + fb - 1) // fb
    ntasks = ptiles * fblocks
    x1 = x2.reshape(-1)
    w1 = wmat.reshape(-1)
    o1 = out2.reshape(-1)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        for t in range(t0, t1):
            pt = t // fblocks
            f0 = (t - pt * fblocks) * fb
            nf = min(fb, f - f0)
            p0 = pt * tile_p
            npx = min(tile_p, p_all - p0)
            product(npx, nf, k, x1, p0 * k, k, w1, f0, f, o1, p0 * f + f0, f, bias, f0,
                    1 if bias.shape[0] > 0 else 0, act, stream, packed_k, p_scr[chunk])
    leave(sched, sig, lead)


@jit
def pointwise_nchw(x3, wmat, bias, act, out3, tile_p, fb, nchunks, stream, sched, sig, lead):
    """Pointwise convolution, NCHW: ``out3[n] = act(wmat.T @ x3[n] + bias[:, None])``, run by the calling thread
    and the pool's helpers (``sched``, ``sig``, ``lead``: :mod:`nbconv._sync`).

    Parameters
    ----------
    x3 : ndarray of shape (N, K, HW)
    wmat : ndarray of shape (K, F)
    out3 : ndarray of shape (N, F, HW)
    stream : bool
        Write ``out3`` with non-temporal stores (see :func:`nbconv._gemm.gemm_nn`).

    Notes
    -----
    Tasks ``(n, tile of tile_p pixels, block of fb filters)`` in ``nchunks``
    chunks the participants claim; the product reads the strided pixel tile
    and writes the strided output tile in place.
    """
    enter(sched, sig, lead)
    n_img, k, hw = x3.shape
    f = wmat.shape[1]
    ptiles = (hw + tile_p - 1) // tile_p
    fblocks = (f + fb - 1) // fb
    ntasks = n_img * ptiles * fblocks
    x1 = x3.reshape(-1)
    w1 = wmat.reshape(-1)
    o1 = out3.reshape(-1)
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        for t in range(t0, t1):
            n = t // (ptiles * fblocks)
            r = t - n * ptiles * fblocks
            pt = r // fblocks
            f0 = (r - pt * fblocks) * fb
            nf = min(fb, f - f0)
            p0 = pt * tile_p
            npx = min(tile_p, hw - p0)
            coff = n * f * hw + f0 * hw + p0
            # out[f, p] = sum_k wmat[k, f] x[k, p]: wmat read transposed (row stride 1, k stride F)
            gemm_nn(nf, npx, k, w1, f0, 1, f, x1, n * k * hw + p0, hw, o1, coff, hw, False, bias, f0,
                    2 if bias.shape[0] > 0 else 0, act, stream)
    leave(sched, sig, lead)
