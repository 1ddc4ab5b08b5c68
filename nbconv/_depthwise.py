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

NHWC tiles go through a channel-blocked copy of their input rows
(:func:`pack_rows`, one vector of channels per block) and vector
micro-kernels emitted as LLVM IR (:func:`_dw_microkernel`, see
:mod:`nbconv._simd`): accumulators for 8 pixels in registers, the nine 3x3
weight vectors held for a whole strip, and the columns neighbouring pixels
share loaded once (2.6x a flat loop over the NHWC rows: docs/tuning.md).
Wide NHWC rows of bfloat16 input skip the copy where the taps stay inside
the input: the same micro-kernels read the input in place
(:func:`dw_tile`).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit
from ._simd import VECTOR_BYTES, VectorBuilder, copy_scalar, copy_vector, gather_vector, transpose_block
from ._sync import PHASE2, claim, enter, leave

#: output pixels of one NHWC depthwise micro-kernel call (each tap: one weight vector, DW_PIXELS input vectors)
DW_PIXELS = 8
#: pixel strides (bytes) of a power of two from this one are stored one output row per micro-kernel call
ALIASING_STRIDE = 2048
#: output pixels per row from which NHWC bfloat16 tiles read the input in place (narrower rows: packed)
DIRECT_MIN_WIDTH = 32


def _dw_microkernel(masked, steps, channel_major=False):
    """An intrinsic ``mk(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)``.

    One vector of channels of ``nrows`` output rows of ``ow_n`` pixels::

        d[doff + r*drs + p*dps + j] = act(bt[boff + j] + sum_{kh, kw} xs[xoff + r*xrs + kh*rs + kw*cs + p*ps + j]
                                                                       * wt[woff + (kh*kw_n + kw)*wstr + j])

    for ``j < nch`` (``nch`` is the full vector unless ``masked``; masked-off
    lanes touch no memory).  Pixels go in blocks of :data:`DW_PIXELS` whose
    accumulators stay in registers across the taps.  ``steps=None`` is the
    general kernel: run-time tap loops, one weight vector load per tap and
    block.  ``steps=(a, b)`` is a 3x3 kernel with ``ps = a*u`` and ``cs =
    b*u``: the nine weight vectors stay in registers for the whole call, the
    taps are unrolled, and the input columns that neighbouring pixels share
    (a sliding window) are loaded once per kernel row:
    ``(DW_PIXELS - 1)*a + 2*b + 1`` loads instead of ``3*DW_PIXELS``.  In the
    last block of a row, pixels and columns past the last valid ones repeat
    it and are not stored, so nothing is read outside the caller's arrays
    (which the caller guarantees for the valid pixels).
    """

    @intrinsic
    def mk(typingctx, xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
           ow_n, nch, act):
        sig = types.void(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                         ow_n, nch, act)

        def codegen(context, builder, signature, args):
            vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
            xptr = vb.at(vb.data(0), vb.int64(1))
            wptr = vb.at(vb.data(6), vb.int64(7))
            dptr = vb.at(vb.data(13), vb.int64(14))
            xrs, rs, cs, ps, wstr = vb.int64(2), vb.int64(3), vb.int64(4), vb.int64(5), vb.int64(8)
            khn, kwn, drs, dps, nrows_, own, nch_, act_ = (vb.int64(i) for i in (9, 10, 15, 16, 17, 18, 19, 20))
            mask = vb.mask(vb.int64(19)) if masked else None
            bias = vb.load(vb.at(vb.data(11), vb.int64(12)), mask)
            accs = vb.accumulators(DW_PIXELS)
            const = vb.const
            if steps is not None:
                w9 = [vb.load(vb.at(wptr, builder.mul(const(t), wstr)), mask) for t in range(9)]

            def clamp(i, last):
                return builder.select(builder.icmp_signed("<", const(i), last), const(i), last)

            def block(x0, d0, npix):
                """Pixels ``x0 + p*ps`` -> ``d0 + p*dps`` for ``p < DW_PIXELS`` (``npix`` valid, or all if None)."""
                acc = [bias] * DW_PIXELS
                if steps is None:
                    if npix is None:
                        pix = [builder.mul(const(p), ps) for p in range(DW_PIXELS)]
                    else:
                        last = builder.sub(npix, const(1))
                        pix = [builder.mul(clamp(p, last), ps) for p in range(DW_PIXELS)]
                    for p in range(DW_PIXELS):
                        builder.store(bias, accs[p])
                    with cgutils.for_range(builder, khn) as row:
                        xrow = vb.at(x0, builder.mul(row.index, rs))
                        wrow = vb.at(wptr, builder.mul(builder.mul(row.index, kwn), wstr))
                        with cgutils.for_range(builder, kwn) as col:
                            w = vb.load(vb.at(wrow, builder.mul(col.index, wstr)), mask)
                            xtap = vb.at(xrow, builder.mul(col.index, cs))
                            for p in range(DW_PIXELS):
                                x = vb.load(vb.at(xtap, pix[p]), mask)
                                builder.store(vb.fma(x, w, builder.load(accs[p])), accs[p])
                    acc = [builder.load(slot) for slot in accs]
                else:
                    a, b = steps
                    unit = cs if b == 1 else ps
                    ncols = (DW_PIXELS - 1) * a + 2 * b + 1
                    if npix is None:
                        cols = [builder.mul(const(i), unit) for i in range(ncols)]
                    else:
                        # the last column the valid pixels read: (npix - 1)*a + 2*b
                        last = builder.add(builder.mul(builder.sub(npix, const(1)), const(a)), const(2 * b))
                        cols = [builder.mul(clamp(i, last), unit) for i in range(ncols)]
                    for kh in range(3):
                        xrow = vb.at(x0, builder.mul(const(kh), rs))
                        # each column loaded where first used: fewer vectors live at once, no spills
                        x = {}
                        for p in range(DW_PIXELS):
                            for kw in range(3):
                                i = p * a + kw * b
                                if i not in x:
                                    x[i] = vb.load(vb.at(xrow, cols[i]), mask)
                                acc[p] = vb.fma(x[i], w9[kh * 3 + kw], acc[p])
                outs = [vb.activation(acc[p], act_) for p in range(DW_PIXELS)]
                if channel_major:
                    # lane j of the DW_PIXELS vectors -> one vector of pixels for channel j
                    pty = ir.VectorType(vb.fty, DW_PIXELS)
                    i32 = ir.IntType(32)
                    pmask = None
                    if npix is not None:
                        i64v = ir.VectorType(ir.IntType(64), DW_PIXELS)
                        nvec = builder.insert_element(ir.Constant(i64v, ir.Undefined), npix, ir.Constant(i32, 0))
                        nvec = builder.shuffle_vector(nvec, ir.Constant(i64v, ir.Undefined),
                                                      ir.Constant(ir.VectorType(i32, DW_PIXELS), [0] * DW_PIXELS))
                        pmask = builder.icmp_signed("<", ir.Constant(i64v, list(range(DW_PIXELS))), nvec)
                    for j in range(vb.lanes):
                        col = ir.Constant(pty, ir.Undefined)
                        for p in range(DW_PIXELS):
                            col = builder.insert_element(col, builder.extract_element(outs[p], ir.Constant(i32, j)),
                                                         ir.Constant(i32, p))
                        dp = vb.at(d0, builder.mul(const(j), dps))
                        if masked:
                            with builder.if_then(builder.icmp_signed("<", const(j), nch_)):
                                vb.store_narrow(col, dp, pmask)
                        else:
                            vb.store_narrow(col, dp, pmask)
                else:
                    for p in range(DW_PIXELS):
                        dp = vb.at(d0, builder.mul(const(p), dps))
                        if npix is None:
                            vb.store(outs[p], dp, mask, result=True)
                        else:
                            with builder.if_then(builder.icmp_signed("<", const(p), npix)):
                                vb.store(outs[p], dp, mask, result=True)

            nfull = builder.sdiv(own, const(DW_PIXELS))
            rest = builder.sub(own, builder.mul(nfull, const(DW_PIXELS)))
            with cgutils.for_range(builder, nrows_) as row:
                xr = vb.at(xptr, builder.mul(row.index, xrs))
                dr = vb.at(dptr, builder.mul(row.index, drs))
                dq = const(1) if channel_major else dps
                with cgutils.for_range(builder, nfull) as blk:
                    q = builder.mul(blk.index, const(DW_PIXELS))
                    block(vb.at(xr, builder.mul(q, ps)), vb.at(dr, builder.mul(q, dq)), None)
                with builder.if_then(builder.icmp_signed(">", rest, const(0))):
                    q = builder.mul(nfull, const(DW_PIXELS))
                    block(vb.at(xr, builder.mul(q, ps)), vb.at(dr, builder.mul(q, dq)), rest)
            return context.get_dummy_value()

        return sig, codegen

    return mk


# general and 3x3 kernels (sliding windows for stride 1, stride 2, dilation 2), full and masked channel vectors
_dw_any, _dw_any_m = _dw_microkernel(False, None), _dw_microkernel(True, None)
_dw_s1, _dw_s1_m = _dw_microkernel(False, (1, 1)), _dw_microkernel(True, (1, 1))
_dw_s2, _dw_s2_m = _dw_microkernel(False, (2, 1)), _dw_microkernel(True, (2, 1))
_dw_d2, _dw_d2_m = _dw_microkernel(False, (1, 2)), _dw_microkernel(True, (1, 2))
# the same, storing channel-major (NCHW tiles)
_cm_any, _cm_any_m = _dw_microkernel(False, None, True), _dw_microkernel(True, None, True)
_cm_s1, _cm_s1_m = _dw_microkernel(False, (1, 1), True), _dw_microkernel(True, (1, 1), True)
_cm_s2, _cm_s2_m = _dw_microkernel(False, (2, 1), True), _dw_microkernel(True, (2, 1), True)
_cm_d2, _cm_d2_m = _dw_microkernel(False, (1, 2), True), _dw_microkernel(True, (1, 2), True)


@jit
def _dw_call(kind, masked, xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
             ow_n, nch, act):
    """Dispatch to a depthwise micro-kernel: ``kind`` 1, 2, 3 for the 3x3 sliding windows (s1, s2, d2), 0 general;
    plus 4 for the channel-major (NCHW) store."""
    if kind == 0:
        if masked:
            _dw_any_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _dw_any(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 1:
        if masked:
            _dw_s1_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _dw_s1(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 2:
        if masked:
            _dw_s2_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _dw_s2(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 3:
        if masked:
            _dw_d2_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _dw_d2(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 4:
        if masked:
            _cm_any_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _cm_any(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 5:
        if masked:
            _cm_s1_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _cm_s1(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 6:
        if masked:
            _cm_s2_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _cm_s2(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
    elif kind == 7:
        if masked:
            _cm_d2_m(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)
        else:
            _cm_d2(xs, xoff, xrs, rs, cs, ps, wt, woff, wstr, kh_n, kw_n, bt, boff, d, doff, drs, dps, nrows,
                       ow_n, nch, act)


def _dk_microkernel(masked):
    """An intrinsic ``mk(xs, xoff, xrs, rs, cs, ps, g, goff, grs, gps, dk, dkoff, dkstr, nrows, ow_n, nch)``.

    Kernel gradient of a 3x3 depthwise convolution, one vector of channels,
    ``nrows`` output rows of ``ow_n`` pixels::

        dk[dkoff + (kh*3 + kw)*dkstr + j] += sum_{r, p} xs[xoff + r*xrs + kh*rs + kw*cs + p*ps + j]
                                                        * g[goff + r*grs + p*gps + j]

    for ``j < nch``.  The nine tap sums stay in registers for the whole
    call: per pixel one gradient vector and nine input vectors are loaded
    and nothing is stored (a tap-sized accumulator in memory is loaded and
    stored per pixel and tap).
    """

    @intrinsic
    def mk(typingctx, xs, xoff, xrs, rs, cs, ps, g, goff, grs, gps, dk, dkoff, dkstr, nrows, ow_n, nch):
        sig = types.void(xs, xoff, xrs, rs, cs, ps, g, goff, grs, gps, dk, dkoff, dkstr, nrows, ow_n, nch)

        def codegen(context, builder, signature, args):
            vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
            xptr = vb.at(vb.data(0), vb.int64(1))
            gptr = vb.at(vb.data(6), vb.int64(7))
            xrs, rs, cs, ps, grs, gps = (vb.int64(i) for i in (2, 3, 4, 5, 8, 9))
            dkstr, nrows_, own = vb.int64(12), vb.int64(13), vb.int64(14)
            mask = vb.mask(vb.int64(15)) if masked else None
            accs = vb.accumulators(9)
            taps = [builder.add(builder.mul(vb.const(kh), rs), builder.mul(vb.const(kw), cs))
                    for kh in range(3) for kw in range(3)]
            with cgutils.for_range(builder, nrows_) as row:
                xr = vb.at(xptr, builder.mul(row.index, xrs))
                gr = vb.at(gptr, builder.mul(row.index, grs))
                with cgutils.for_range(builder, own) as pix:
                    gv = vb.load(vb.at(gr, builder.mul(pix.index, gps)), mask)
                    xp = vb.at(xr, builder.mul(pix.index, ps))
                    for t in range(9):
                        xv = vb.load(vb.at(xp, taps[t]), mask)
                        builder.store(vb.fma(xv, gv, builder.load(accs[t])), accs[t])
            dptr = vb.at(vb.data(10), vb.int64(11))
            for t in range(9):
                dp = vb.at(dptr, builder.mul(vb.const(t), dkstr))
                vb.store(builder.fadd(vb.load(dp, mask), builder.load(accs[t])), dp, mask)
            return context.get_dummy_value()

        return sig, codegen

    return mk


_dk3, _dk3_m = _dk_microkernel(False), _dk_microkernel(True)


@jit
def dk3_packed_rows(xs, nin, wp, g, goff, nrows, ow_n, sh, sw, dh, dw, cm, dk, dkoff):
    """Add the 3x3 kernel gradient of ``nrows`` output rows to ``dk[dkoff + tap*cm + j]``, from packed rows.

    ``xs`` holds the tile's input rows as :func:`pack_rows` leaves them
    (``nin`` rows of ``wp`` columns per block of channels); ``g`` the
    gradient of the depthwise output, pixel-major from ``goff`` (``cm`` per
    pixel, ``ow_n`` pixels per row).
    """
    lanes = VECTOR_BYTES // xs.itemsize
    for c0 in range(0, cm, lanes):
        nch = min(lanes, cm - c0)
        if nch < lanes:
            _dk3_m(xs, c0 * nin * wp, sh * wp * lanes, dh * wp * lanes, dw * lanes, sw * lanes, g, goff + c0, ow_n * cm,
                   cm, dk, dkoff + c0, cm, nrows, ow_n, nch)
        else:
            _dk3(xs, c0 * nin * wp, sh * wp * lanes, dh * wp * lanes, dw * lanes, sw * lanes, g, goff + c0, ow_n * cm,
                 cm, dk, dkoff + c0, cm, nrows, ow_n, nch)


@jit
def _first_valid(offset, step, limit, lo, hi):
    """Sub-range ``[a, b)`` of ``[lo, hi)`` where ``0 <= o*step + offset < limit``."""
    a = lo
    if offset < 0:
        a = max(lo, (-offset + step - 1) // step)
    b = min(hi, (limit - 1 - offset) // step + 1) if limit - 1 - offset >= 0 else lo
    return a, max(a, b)


@jit
def pack_rows(xn, dm, pr0, nrows, pt, pl, wp, lanes, xs):
    """:func:`pack_rows_blocks` of every block of channels."""
    pack_rows_blocks(xn, dm, pr0, nrows, pt, pl, wp, lanes, xs, 0, (xn.shape[2] * dm + lanes - 1) // lanes)


@jit
def pack_rows_blocks(xn, dm, pr0, nrows, pt, pl, wp, lanes, xs, b0, b1):
    """Zero-padded, channel-blocked copy of padded-input rows ``pr0 .. pr0+nrows-1`` of one NHWC image, blocks
    ``b0 .. b1-1`` of ``lanes`` channels (the others are left as they are).

    Parameters
    ----------
    xn : ndarray of shape (H, W, C)
    dm : int
        Channels repeated ``dm`` times: packed channel ``c*dm + m`` is input channel ``c``.
    pr0 : int
        First row in padded coordinates (input row ``pr0 - pt``).
    wp : int
        Columns to write, in padded coordinates (input column ``col - pl``; ``pl`` may be negative).
    lanes : int
        Channels per block (one vector register).
    xs : ndarray of shape (>= ceil(C*dm / lanes) * nrows * wp * lanes,), flat
        Receives ``xs[((b*nrows + r)*wp + col)*lanes + j] = x[pr0 + r - pt, col - pl, (b*lanes + j) // dm]``,
        zero outside the input and past the last channel.

    Notes
    -----
    The blocks make each vector of channels a contiguous strip for the
    micro-kernels (NHWC rows of 128+ channels put every pixel of a strip on
    its own cache line: 3x slower).  Padding reads real zeros, so ``0 * w``
    terms match the reference exactly, NaN/Inf included.
    """
    h, w, c = xn.shape
    cm = c * dm
    zero = xs.dtype.type(0)
    # pl < 0: the packed columns start inside the input (a strip at the right edge, :func:`_dw_strip`)
    col0 = min(max(pl, 0), wp)
    col1 = max(col0, min(pl + w, wp))
    # packed channel -> input channel, for one gather per vector: a scalar loop per element (with its division)
    # cost 8x the whole dm=1 call
    src_of = np.arange(cm if dm > 1 else 0) // dm
    for r in range(nrows):
        ih = pr0 + r - pt
        inside = 0 <= ih < h and col0 < col1
        for b in range(b0, b1):
            row = xs[(b * nrows + r) * wp * lanes:(b * nrows + r + 1) * wp * lanes]
            if not inside:
                for i in range(wp * lanes):
                    row[i] = zero
                continue
            for i in range(col0 * lanes):
                row[i] = zero
            for i in range(col1 * lanes, wp * lanes):
                row[i] = zero
        if not inside:
            continue
        if dm == 1:
            # pixel by pixel: read each pixel's channels once, contiguously, one vector per block
            src = xn[ih].reshape(-1)
            for col in range(col0, col1):
                s0 = (col - pl) * c
                for b in range(b0, b1):
                    copy_vector(src, s0 + b * lanes, xs, ((b * nrows + r) * wp + col) * lanes,
                                min(lanes, cm - b * lanes))
            continue
        src = xn[ih].reshape(-1)
        for col in range(col0, col1):
            s0 = (col - pl) * c
            for b in range(b0, b1):
                gather_vector(src, s0, src_of, b * lanes, xs, ((b * nrows + r) * wp + col) * lanes,
                              min(lanes, cm - b * lanes))


@jit
def pack_rows_spread(t, sh, sw, pr0, nrows, pl, wp, lanes, xs):
    """:func:`pack_rows` (``dm == 1``, no top padding) of ``t`` spread out by ``(sh, sw)``: padded row ``u`` is
    row ``u // sh`` of ``t`` where ``sh`` divides it and zeros elsewhere, column ``col - pl`` likewise by ``sw``
    (the zero-inserted image a strided convolution's input gradient is a plain convolution of).  Packed rows
    ``pr0 .. pr0+nrows-1``, laid out as :func:`pack_rows` lays them."""
    h, w, c = t.shape
    nb = (c + lanes - 1) // lanes
    zero = xs.dtype.type(0)
    for r in range(nrows):
        u = pr0 + r
        ih = u // sh
        inside = u % sh == 0 and ih < h
        for b in range(nb):
            row = xs[(b * nrows + r) * wp * lanes:(b * nrows + r + 1) * wp * lanes]
            for i in range(wp * lanes):
                row[i] = zero
        if not inside:
            continue
        src = t[ih].reshape(-1)
        col0 = pl if pl >= 0 else pl + (-pl + sw - 1) // sw * sw
        for col in range(col0, min(wp, pl + w * sw), sw):
            s0 = (col - pl) // sw * c
            for b in range(nb):
                copy_vector(src, s0 + b * lanes, xs, ((b * nrows + r) * wp + col) * lanes, min(lanes, c - b * lanes))


@jit
def dw_packed_rows(xs, nin, wp, wt, bt, act, nrows, ow_n, sh, sw, dh, dw, kh_n, kw_n, cm, dst, channel_major, ldd):
    """:func:`dw_packed_rows_blocks` of every block of channels."""
    dw_packed_rows_blocks(xs, nin, wp, wt, bt, act, nrows, ow_n, sh, sw, dh, dw, kh_n, kw_n, cm, dst, channel_major,
                          ldd, 0, cm)


@jit
def dw_packed_rows_blocks(xs, nin, wp, wt, bt, act, nrows, ow_n, sh, sw, dh, dw, kh_n, kw_n, cm, dst, channel_major,
                          ldd, ca, cb):
    """Depthwise output rows from channel-blocked packed rows (:func:`pack_rows`), by vector micro-kernels.

    Parameters
    ----------
    xs : ndarray, flat
        Packed input: per block of ``lanes`` channels, ``nin`` rows (row ``r*sh + kh*dh`` for output
        row ``r``) of ``wp`` columns.
    wt : ndarray of shape (KH*KW, cm)
        Weights per tap.
    bt : ndarray of shape (cm,)
        Bias (zeros for no bias); ``act`` the activation code.
    dst : ndarray, flat
        Receives ``nrows*ow_n`` pixels of ``cm`` channels, row-major, or with
        ``channel_major`` pixel ``q`` of channel ``j`` at ``dst[j*ldd + q]``.
    ca, cb : int
        The channels computed, ``ca .. cb-1`` (``ca`` a multiple of the vector width); others are not written.

    Notes
    -----
    One micro-kernel call per vector of channels (the last one masked) covers all the rows, or one row
    where the pixel stride is a power of two of :data:`ALIASING_STRIDE` bytes or more.
    ``dst`` may hold bfloat16 bits (``uint16``): the float32 sums are rounded as they are stored.
    """
    lanes = VECTOR_BYTES // max(xs.itemsize, 4)
    rs = dh * wp * lanes
    cs = dw * lanes
    ps = sw * lanes
    kind = _kind(kh_n, kw_n, sw, dw)
    xrs = sh * wp * lanes
    # a pixel stride of a power of two from 2 KiB puts every pixel a call stores on one or two L1 sets: one call
    # per output row stores a handful there before the next vector of channels moves to the next set
    rows = max(1, nrows) if channel_major else _rows_per_call(cm, dst.itemsize, nrows)
    for r0 in range(0, nrows, rows):
        for c0 in range(ca, cb, lanes):
            nch = min(lanes, cb - c0)
            if channel_major:
                _dw_call(kind + 4, nch < lanes, xs, c0 * nin * wp, xrs, rs, cs, ps, wt, c0, cm, kh_n, kw_n, bt,
                         c0, dst, c0 * ldd, ow_n, ldd, nrows, ow_n, nch, act)
            else:
                _dw_call(kind, nch < lanes, xs, c0 * nin * wp + r0 * xrs, xrs, rs, cs, ps, wt, c0, cm, kh_n, kw_n,
                         bt, c0, dst, r0 * ow_n * cm + c0, ow_n * cm, cm, rows, ow_n, nch, act)


@jit
def pack_rows_nchw(xn, dm, pr0, nrows, pt, pl, wp, lanes, xs, b0, b1):
    """:func:`pack_rows_blocks` for one NCHW image ``xn`` of shape (C, H, W): the same channel-blocked layout.

    The transpose happens here, once per input row, so NCHW tiles run the
    same micro-kernels as NHWC ones.
    """
    c, h, w = xn.shape
    cm = c * dm
    zero = xs.dtype.type(0)
    col0 = min(pl, wp)
    col1 = min(pl + w, wp)
    for b in range(b0, b1):
        j1 = min(lanes, cm - b * lanes)
        for r in range(nrows):
            row = xs[(b * nrows + r) * wp * lanes:(b * nrows + r + 1) * wp * lanes]
            ih = pr0 + r - pt
            if ih < 0 or ih >= h or col1 <= col0:
                for i in range(wp * lanes):
                    row[i] = zero
                continue
            for i in range(col0 * lanes):
                row[i] = zero
            for i in range(col1 * lanes, wp * lanes):
                row[i] = zero
            if dm == 1:
                # (lanes x lanes) blocks of channel rows transposed in registers: element by element put the NCHW
                # depthwise at twice the NHWC time
                src = xn.reshape(-1)
                s0 = b * lanes * h * w + ih * w - pl
                d0 = (b * nrows + r) * wp * lanes
                for col in range(col0, col1, lanes):
                    transpose_block(src, s0 + col, h * w, j1, min(lanes, col1 - col), xs, d0 + col * lanes, lanes)
                continue
            for j in range(j1, lanes):
                for col in range(col0, col1):
                    row[col * lanes + j] = zero
            for j in range(j1):
                src = xn[(b * lanes + j) // dm, ih]
                for col in range(col0, col1):
                    copy_scalar(src, col - pl, row, col * lanes + j)


@jit
def _kind(kh_n, kw_n, sw, dw):
    """The micro-kernel for a kernel size and column steps: 1, 2, 3 for the 3x3 sliding windows, 0 general."""
    if kh_n == 3 and kw_n == 3:
        if sw == dw:
            return 1
        if sw == 2 * dw:
            return 2
        if dw == 2 * sw:
            return 3
    return 0


@jit
def _rows_per_call(cm, itemsize, nrows):
    """Output rows per micro-kernel call: one where the pixel stride is a power of two from
    :data:`ALIASING_STRIDE` bytes (see :func:`dw_packed_rows`), else all."""
    pstride = cm * itemsize
    return 1 if pstride >= ALIASING_STRIDE and (pstride & (pstride - 1)) == 0 else max(1, nrows)


@jit
def _dw_strip(xn, wt, bt, act, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, o0, o1, xs, dst, doff, ca, cb):
    """Output columns ``o0 .. o1-1`` of rows ``r0 .. r0+nr-1`` of one NHWC image (``dm == 1``), from a strip of
    packed columns: the edges of :func:`_dw_rows_direct`, whose taps reach into the padding.  ``dst``, ``ca``
    and ``cb`` as there."""
    if o1 <= o0:
        return
    c = xn.shape[2]
    lanes = VECTOR_BYTES // max(xs.itemsize, 4)
    start = o0 * sw
    wq = (o1 - 1 - o0) * sw + (kw_n - 1) * dw + 1
    nin = (nr - 1) * sh + (kh_n - 1) * dh + 1
    pack_rows_blocks(xn, 1, r0 * sh, nin, pt, pl - start, wq, lanes, xs, ca // lanes, (cb + lanes - 1) // lanes)
    kind = _kind(kh_n, kw_n, sw, dw)
    for c0 in range(ca, cb, lanes):
        nch = min(lanes, cb - c0)
        _dw_call(kind, nch < lanes, xs, c0 * nin * wq, sh * wq * lanes, dh * wq * lanes, dw * lanes, sw * lanes, wt,
                 c0, c, kh_n, kw_n, bt, c0, dst, doff + o0 * c + c0, ow_n * c, c, nr, o1 - o0, nch, act)


@jit
def _dw_rows_direct(xn, wt, bt, act, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, qa, qb, xs, dst, doff, ca,
                    cb):
    """Output rows ``r0 .. r0+nr-1`` of one NHWC image (``dm == 1``) whose taps all fall inside the input rows,
    channels ``ca .. cb-1``.

    Columns ``qa .. qb-1`` (taps inside the input columns too) read ``xn``
    in place, one vector of channels at a time; the columns either side
    go through :func:`_dw_strip`.  Pixel ``q`` of row ``r`` is stored at
    ``dst[doff + ((r - r0)*ow_n + q)*C + j]``.
    """
    h, w, c = xn.shape
    lanes = VECTOR_BYTES // max(xn.itemsize, 4)
    kind = _kind(kh_n, kw_n, sw, dw)
    x1 = xn.reshape(-1)
    rows = _rows_per_call(c, dst.itemsize, nr)
    for q0 in range(0, nr, rows):
        nq = min(rows, nr - q0)
        base = ((r0 + q0) * sh - pt) * w * c + (qa * sw - pl) * c
        for c0 in range(ca, cb, lanes):
            nch = min(lanes, cb - c0)
            _dw_call(kind, nch < lanes, x1, base + c0, sh * w * c, dh * w * c, dw * c, sw * c, wt, c0, c, kh_n, kw_n,
                     bt, c0, dst, doff + (q0 * ow_n + qa) * c + c0, ow_n * c, c, nq, qb - qa, nch, act)
    _dw_strip(xn, wt, bt, act, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, 0, qa, xs, dst, doff, ca, cb)
    _dw_strip(xn, wt, bt, act, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, qb, ow_n, xs, dst, doff, ca, cb)


@jit
def dw_rows_packed(x, n, channels_last, channel_major, wt, bt, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n,
                   ow_n, wp, xs, dst, doff, ldd, ca=0, cb=-1):
    """:func:`dw_tile` through packed rows: every input row the tile reads copied channel-blocked into ``xs``
    (which then holds them for a caller that reads them again, as the separable backward does)."""
    cm = wt.shape[1]
    cb = cm if cb < 0 else cb
    lanes = VECTOR_BYTES // max(xs.itemsize, 4)
    nin = (nr - 1) * sh + (kh_n - 1) * dh + 1
    b0, b1 = ca // lanes, (cb + lanes - 1) // lanes
    if channels_last:
        pack_rows_blocks(x[n], dm, r0 * sh, nin, pt, pl, wp, lanes, xs, b0, b1)
    else:
        pack_rows_nchw(x[n], dm, r0 * sh, nin, pt, pl, wp, lanes, xs, b0, b1)
    dw_packed_rows_blocks(xs, nin, wp, wt, bt, act, nr, ow_n, sh, sw, dh, dw, kh_n, kw_n, cm, dst[doff:],
                          channel_major, ldd, ca, cb)


@jit
def dw_tile(x, n, channels_last, channel_major, wt, bt, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, wp,
            xs, dst, doff, ldd, ca=0, cb=-1):
    """Depthwise output rows ``r0 .. r0+nr-1`` of image ``n``, output channels ``ca .. cb-1`` (all by default;
    ``ca`` a multiple of the vector width): a task of a call split by channels as well as rows.

    ``x`` is NHWC if ``channels_last``, else NCHW.  The tile is stored
    pixel-major, ``dst[doff + q*C*dm + j]``, or if ``channel_major``
    ``dst[doff + j*ldd + q]``, for pixel ``q`` of the tile (row-major) and
    output channel ``j``.

    NHWC bfloat16 input (bits) with ``dm == 1`` and rows of
    :data:`DIRECT_MIN_WIDTH`+ output pixels is read in place where the taps
    stay inside the input (:func:`_dw_rows_direct`); rows that reach into
    the top or bottom padding, and every other tile, go through packed rows
    in ``xs``.  In place, each input vector is loaded from L2 once per output
    row that reads it, where packed rows serve them from L1 after one copy:
    cheaper for 2-byte elements (half a line per pixel and channel vector,
    and the copy would widen them), dearer for float32 (docs/tuning.md).
    """
    cb = wt.shape[1] if cb < 0 else cb
    if channels_last and not channel_major and dm == 1 and x.itemsize == 2 and ow_n >= DIRECT_MIN_WIDTH:
        xn = x[n]
        a, b = _first_valid(-pt, sh, xn.shape[0] - (kh_n - 1) * dh, r0, r0 + nr)
        qa, qb = _first_valid(-pl, sw, xn.shape[1] - (kw_n - 1) * dw, 0, ow_n)
        if b > a and 2 * (qb - qa) >= ow_n:
            row = ow_n * xn.shape[2]
            if a > r0:
                dw_rows_packed(x, n, True, False, wt, bt, act, 1, r0, a - r0, sh, sw, dh, dw, pt, pl, kh_n, kw_n,
                               ow_n, wp, xs, dst, doff, ldd, ca, cb)
            _dw_rows_direct(xn, wt, bt, act, a, b - a, sh, sw, dh, dw, pt, pl, kh_n, kw_n, ow_n, qa, qb, xs, dst,
                            doff + (a - r0) * row, ca, cb)
            if r0 + nr > b:
                dw_rows_packed(x, n, True, False, wt, bt, act, 1, b, r0 + nr - b, sh, sw, dh, dw, pt, pl, kh_n,
                               kw_n, ow_n, wp, xs, dst, doff + (b - r0) * row, ldd, ca, cb)
            return
    dw_rows_packed(x, n, channels_last, channel_major, wt, bt, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n, kw_n,
                   ow_n, wp, xs, dst, doff, ldd, ca, cb)


@jit
def depthwise_packed(x, channels_last, wt, bt, act, out1, dm, sh, sw, dh, dw, pt, pl, kh_n, kw_n, oh_n, ow_n, wp, th,
                     cg, nchunks, xs_scr, sched, sig, lead):
    """Depthwise convolution from packed rows, NHWC or NCHW, run by the calling thread and the pool's helpers.

    Parameters
    ----------
    x : ndarray of shape (N, H, W, C) if ``channels_last`` else (N, C, H, W)
    wt, bt : NHWC weights per tap ``(KH*KW, C*dm)`` and bias, see :func:`dw_packed_rows`
    out1 : ndarray, flat
        The output, ``(N, OH, OW, C*dm)`` or ``(N, C*dm, OH, OW)`` (same layout as ``x``) in C order.
    xs_scr : ndarray of shape (nchunks, packed rows * wp * C*dm)
    sched, sig, lead
        The call's chunk counters, the pool's generation counter and this
        participant's role (:mod:`nbconv._sync`).

    Notes
    -----
    Tasks ``(n, tile of th output rows, group of cg channels)`` in
    ``nchunks`` chunks that the participants claim; each task packs its
    channels of its input rows into its chunk's scratch and writes its own
    part of the output (NCHW: its own pixel range of its channel planes).
    """
    enter(sched, sig, lead)
    n_img = x.shape[0]
    cm = wt.shape[1]
    ohw = oh_n * ow_n
    rtiles = (oh_n + th - 1) // th
    groups = (cm + cg - 1) // cg
    ntasks = n_img * rtiles * groups
    while True:
        chunk = claim(sched, PHASE2, nchunks, lead)
        if chunk < 0:
            break
        t0 = chunk * ntasks // nchunks
        t1 = (chunk + 1) * ntasks // nchunks
        xs = xs_scr[chunk]
        for t in range(t0, t1):
            tile = t // groups
            ca = (t - tile * groups) * cg
            n = tile // rtiles
            r0 = (tile - n * rtiles) * th
            nr = min(th, oh_n - r0)
            doff = (n * oh_n + r0) * ow_n * cm if channels_last else n * cm * ohw + r0 * ow_n
            dw_tile(x, n, channels_last, not channels_last, wt, bt, act, dm, r0, nr, sh, sw, dh, dw, pt, pl, kh_n,
                    kw_n, ow_n, wp, xs, out1, doff, ohw, ca, min(cm, ca + cg))
    leave(sched, sig, lead)
