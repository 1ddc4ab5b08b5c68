"""Fused depthwise-separable convolution kernel (forward), NHWC and NCHW.

Each task takes a tile of ``th`` whole output rows of one image: it packs the
input rows the tile needs into zero-padded NHWC scratch (transposing NCHW
input and repeating channels for ``dm > 1`` on the way), computes the
depthwise result of the tile for all ``C*dm`` channels into thread-private
scratch, and multiplies that tile straight into the output
(:func:`nbconv._gemm.gemm_nn`, serial per task).  The full depthwise intermediate is never
materialised.

Small images (too few row tiles to keep every thread busy), and layers of
256+ channels whose row tiles would make GEMMs of few pixels, switch to a
*shared* mode: phase 1 computes the whole depthwise result, in parallel over
rows, into one buffer; phase 2 runs GEMM tasks over (pixel tile, filter
block).  Splitting filters then costs no depthwise recomputation.

Scratch bound
    Per chunk, ``((th-1)*sh + (kh-1)*dh + 1) * wp * C*dm`` packed-input
    elements, plus ``th * OW * C*dm`` depthwise elements per chunk (fused
    mode) or ``N * OH * OW * C*dm`` in all (shared mode, used only while that
    is at most ``forward.SHARED_BYTES``); ``nchunks <= 4 * threads``.  The
    public layer picks ``th`` so one depthwise tile is at most
    ``_plan.Tunables.fused_tile_bytes`` (one output row at least).
"""
from ._depthwise import dw_tile
from ._jit import jit
from ._sync import PHASE1, PHASE1_DONE, PHASE2, claim, done, enter, leave, wait_at_least
from ._gemm import product, product_t, transpose_tile


@jit
def _tile_product(channels_last, transposed, n, p0, npx, f0, nf, cm, f, ohw, d, doff, ldd, w1, bias, act, out1, tt,
                  stream, packed_k, p_scr):
    """One task's product: filters ``f0 .. f0+nf`` of pixels ``p0 .. p0+npx`` of image ``n`` from its depthwise
    tile (``d`` from ``doff``), written NHWC, NCHW through the transposed store of ``tt``, or NCHW with the weights
    as ``A`` of a channel-major tile (rows ``ldd`` apart)."""
    bmode = 1 if bias.shape[0] > 0 else 0
    if channels_last:
        product(npx, nf, cm, d, doff, cm, w1, f0, f, out1, (n * ohw + p0) * f + f0, f, bias, f0, bmode, act, stream,
                packed_k, p_scr)
    elif transposed:
        product(npx, nf, cm, d, doff, cm, w1, f0, f, tt, 0, nf, bias, f0, bmode, act, False, packed_k, p_scr)
        transpose_tile(tt, 0, nf, npx, nf, out1, (n * f + f0) * ohw + p0, ohw)
    else:
        product_t(nf, npx, cm, w1, f0, f, d, doff, ldd, out1, (n * f + f0) * ohw + p0, ohw, bias, f0, 2 * bmode, act,
                  stream)


@jit
def separable(x, channels_last, wt, bt, dact, wmat, bias, act, out1, dm, sh, sw, dh, dw, pt, pl, kh_n, kw_n, oh_n, ow_n,
              wp, th, cg, shared, gn, tile_p, fb, nchunks1, nchunks, xs_scr, d_scr, t_scr, stream, packed_k, p_scr,
              sched, sig, lead):
    """Fused separable convolution, run by the calling thread and the pool's helpers at once.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C) if ``channels_last`` else (N, C, H, W)
    wt : ndarray of shape (KH*KW, C*dm)
        Depthwise weights per tap (see :func:`nbconv._depthwise.dw_packed_rows`).
    bt : ndarray of shape (C*dm,)
        Depthwise bias (zeros for none); ``dact`` its activation code.
    wmat : ndarray of shape (C*dm, F), or packed
        Row-major, or with ``packed_k`` (= ``C*dm``) its elements packed by
        :func:`nbconv._gemm.pack_b` (then ``fb`` is a multiple of the panel
        width, and NCHW input runs in shared mode: the weights are always ``B``).
        bfloat16 bits (``uint16``, packed by :func:`nbconv._gemm.pack_pairs`
        with ``packed_k``): bfloat16 products of the depthwise tiles, which
        ``d_scr`` then holds in bfloat16 too.
    bias, act : pointwise bias ``(F,)`` or ``(0,)`` and activation code
    out1 : ndarray, flat
        The output, ``(N, OH, OW, F)`` or ``(N, F, OH, OW)`` in C order.
    th : int
        Output rows per depthwise tile.
    cg : int
        Shared mode: channels per phase-1 task (phase 1 runs over row tiles and groups of ``cg`` channels).
    shared : bool
        Shared mode (see the module notes); ``tile_p`` is then the GEMM tile
        in pixels, and ``nchunks1`` the chunk count of phase 1.
    gn : int
        Shared mode: number of separate GEMMs in phase 2, ``N`` for NCHW
        input, 1 for NHWC (the pixels of all images are contiguous rows).
    xs_scr : ndarray of shape (nchunks1 or nchunks, packed rows * wp * C*dm)
    d_scr : ndarray of shape (nchunks, th * OW * C*dm), or (1, N * OH * OW * C*dm) if shared
        Depthwise tiles: channel-major in fused mode with NCHW input,
        pixel-major otherwise.
    t_scr : ndarray of shape (nchunks, tile_p * fb), or (nchunks, 0)
        Each GEMM task's ``pixels x filters`` block before its transposed
        store: NCHW input then runs pixel-major tiles (always in shared mode,
        and in fused mode with bfloat16 products); without it fused NCHW
        tiles are channel-major and the weights are the product's ``A``.
    stream : bool
        Write the output with non-temporal stores (see :func:`nbconv._gemm.gemm_nn`).
    p_scr : ndarray of uint16, shape (nchunks, panel scratch) or (nchunks, 0)
        Per chunk, where bfloat16 products pack a panel of plain weights (:func:`nbconv._gemm.gemm_bf16`).
    sched, sig, lead
        The call's chunk counters, the pool's generation counter and this
        participant's role (:mod:`nbconv._sync`).

    Notes
    -----
    Fused mode: tasks ``(n, tile of th output rows, block of fb filters)``
    (filter blocks innermost, so a chunk reuses its depthwise tile across
    them), grouped into ``nchunks`` contiguous chunks, each owning its
    scratch rows; every participant claims chunks until none is left.
    Shared mode: phase 1 over ``(n, tile of th rows, group of cg channels)``, then, once all its
    chunks are done, phase 2 over ``(GEMM, tile of tile_p pixels, block of
    fb filters)``.  Tasks write disjoint parts of the output (and of the
    shared buffer).

    NCHW output with the filters as GEMM rows puts the pixels in the vector
    lanes: a 7x7 image is 49 columns (a masked fourth vector), and the
    weights are read down columns, one cache line per filter block and
    channel.  In shared mode the GEMM therefore runs as for NHWC (weight
    rows in the lanes) and each block is transposed into the output in
    registers (1.7x the NHWC time before, 1.1x after).  Fused mode (large
    images) keeps the channel-major tiles, faster there than pixel-major
    plus the transpose (figures: docs/tuning.md).
    """
    enter(sched, sig, lead)
    n_img = x.shape[0]
    cm = wt.shape[1]
    ohw = oh_n * ow_n
    f = out1.shape[0] // (n_img * ohw)
    transposed = not channels_last and t_scr.shape[1] > 0
    rtiles = (oh_n + th - 1) // th
    fblocks = (f + fb - 1) // fb
    w1 = wmat.reshape(-1)
    ldd = th * ow_n  # the row stride of a channel-major fused tile
    if shared:
        groups = (cm + cg - 1) // cg
        ntasks1 = n_img * rtiles * groups
        dall = d_scr[0]
        while True:
            chunk = claim(sched, PHASE1, nchunks1, lead)
            if chunk < 0:
                break
            xs = xs_scr[chunk]
            for t in range(chunk * ntasks1 // nchunks1, (chunk + 1) * ntasks1 // nchunks1):
                tile = t // groups
                ca = (t - tile * groups) * cg
                n = tile // rtiles
                r0 = (tile - n * rtiles) * th
                nr = min(th, oh_n - r0)
                dw_tile(x, n, channels_last, False, wt, bt, dact, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n,
                        wp, xs, dall, (n * oh_n + r0) * ow_n * cm, 0, ca, min(cm, ca + cg))
            done(sched, PHASE1_DONE)
        # phase 2 reads every row of phase 1, whoever computed it
        wait_at_least(sched, PHASE1_DONE, nchunks1)
        gp = n_img * ohw // gn
        ptiles = (gp + tile_p - 1) // tile_p
        ntasks = gn * ptiles * fblocks
    else:
        gp = ohw
        ptiles = rtiles
        ntasks = n_img * ptiles * fblocks
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        have = -1
        for t in range(t0, t1):
            tile = t // fblocks
            f0 = (t - tile * fblocks) * fb
            nf = min(fb, f - f0)
            n = tile // ptiles
            if shared:
                p0 = (tile - n * ptiles) * tile_p
                npx = min(tile_p, gp - p0)
                d = d_scr[0]
                doff = (n * ohw + p0) * cm
            else:
                r0 = (tile - n * ptiles) * th
                nr = min(th, oh_n - r0)
                npx = nr * ow_n
                p0 = r0 * ow_n
                d = d_scr[chunk]
                doff = 0
                if tile != have:
                    dw_tile(x, n, channels_last, not (channels_last or transposed), wt, bt, dact, dm, r0, nr, sh, sw,
                            dh, dw, pt, pl, kh_n, kw_n, ow_n, wp, xs_scr[chunk], d, 0, ldd)
                    have = tile
            _tile_product(channels_last, transposed, n, p0, npx, f0, nf, cm, f, ohw, d, doff, ldd, w1, bias, act,
                          out1, t_scr[chunk], stream, packed_k, p_scr[chunk])
    leave(sched, sig, lead)
