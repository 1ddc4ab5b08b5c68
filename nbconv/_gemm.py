"""Register-blocked matrix product for the pointwise part: ``C = A @ B``, row-major, no packing.

Why not BLAS: OpenBLAS packs both operands on every call, which costs as
much as the product itself when the pixels are few (7x7 or 10x10 images of
1024+ channels), and the fused kernel calls it once per small tile.  Here the operands are read where
they lie: ``B`` (the pointwise weights, ``K x F`` row-major) in rows of
``NV`` vectors, ``A`` (the depthwise tile) one scalar per row and ``k``.

The micro-kernel is emitted as LLVM vector IR (:func:`_microkernel`, see
:mod:`nbconv._simd` for why): the ``MR x NV`` accumulators live in registers
(24 of the 32 zmm registers of AVX-512 for 6 x 4), each ``k`` step loads
``NV`` vectors of ``B`` and broadcasts ``MR`` scalars of ``A``.

Blocking (:func:`gemm_nn`): columns in panels of ``NV`` vectors, ``k`` in
blocks of :data:`KC` (the ``KC x NR`` panel of ``B`` stays in L2 while every
row block of ``A`` passes over it), rows in blocks of ``MR``.  The last
columns (fewer than one vector) use masked loads and stores, and row blocks of
6, 3 and 1 rows cover every row count exactly, so no load or store ever leaves the arrays.

Outputs too large to stay in cache (``_plan.Tunables.stream_bytes``) can be stored
non-temporally (``stream``): the lines are not read before being written, and
the operands keep the caches.

bfloat16 products (:func:`gemm_bf16`) take ``A`` and ``B`` as bfloat16 bits
(``uint16``) and accumulate in float32 registers: each ``k`` step is a pair of
``k`` (one 32-bit broadcast of ``A``, ``B`` as pairs of rows interleaved,
:meth:`nbconv._simd.VectorBuilder.dot_pairs`), twice the multiply-adds of a
float32 FMA per instruction.  :func:`product` picks the float or the bfloat16
product from the weights' type, at compile time.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._elementwise import bias_act_inplace, vec_bias_act_inplace
from ._jit import jit
from ._simd import AVX512, I16, I32, VECTOR_BYTES, VectorBuilder, copy_scalar, store_fence, transpose_block

#: rows of C per micro-kernel call
MR = 6
#: vectors of C per row in the micro-kernel: 6 x 4 holds 24 accumulators (of 32 registers), 6 x 2 holds 12 (of 16)
NV = 4 if AVX512 else 2
#: k-block: the KC x NR panel of B (64 KiB in float32 with AVX-512) is reused from L2 by every row block
KC = 256


def _microkernel(rows, nv, masked):
    """An intrinsic ``mk(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode,
    act, stream)``.

    Computes ``C[r, j] (+)= sum_k A[aoff + r*ars + k*aks] * B[boff + k*ldb + j]``
    for ``r < mr <= rows`` and ``j < ncols`` (flat arrays, offsets in
    elements), storing into ``C[coff + r*ldc + j]``, adding to it if
    ``accumulate``.  ``ncols`` is ``nv * lanes``, or with ``masked`` (then
    ``nv == 1``) anything from 1 to ``lanes``: loads and stores of the
    missing lanes are masked off and never touch memory.  Rows past ``mr``
    are computed from row ``mr - 1`` and not stored (never read past the
    operands).  Before the store, an epilogue: ``bmode`` 1 adds
    ``bias[bioff + j]`` to column ``j``, ``bmode`` 2 adds ``bias[bioff + r]``
    to row ``r``, 0 adds none; then activation ``act`` (0 for none).  With
    ``stream`` (and not ``masked``), the aligned vectors of ``C`` are stored
    non-temporally (:meth:`nbconv._simd.VectorBuilder.store_stream`).  The
    caller guarantees that every index it names is inside its array.
    """

    @intrinsic
    def mk(typingctx, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act,
           stream):
        sig = types.void(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode,
                         act, stream)

        def codegen(context, builder, signature, args):
            vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
            lanes = vb.lanes
            aptr = vb.at(vb.data(0), vb.int64(1))
            bptr = vb.at(vb.data(4), vb.int64(5))
            cptr = vb.at(vb.data(7), vb.int64(8))
            ars, aks, ldb, ldc, mr, k = vb.int64(2), vb.int64(3), vb.int64(6), vb.int64(9), vb.int64(12), vb.int64(10)
            mask = vb.mask(vb.int64(13)) if masked else None
            accs = [vb.accumulators(nv) for _ in range(rows)]
            last = builder.sub(mr, vb.const(1))
            arow = []
            for r in range(rows):
                row = builder.select(builder.icmp_signed("<", vb.const(r), mr), vb.const(r), last)
                arow.append(vb.at(aptr, builder.mul(row, ars)))
            with cgutils.for_range(builder, k) as loop:
                kk = loop.index
                brow = vb.at(bptr, builder.mul(kk, ldb))
                bv = [vb.load(vb.at(brow, lanes * j), mask) for j in range(nv)]
                ka = builder.mul(kk, aks)
                for r in range(rows):
                    av = vb.splat(vb.at(arow[r], ka))
                    for j in range(nv):
                        builder.store(vb.fma(av, bv[j], builder.load(accs[r][j])), accs[r][j])
            add = builder.icmp_unsigned("!=", args[11], ir.Constant(args[11].type, 0))
            bmode, act = vb.int64(16), vb.int64(17)
            bptr_ = vb.at(vb.data(14), vb.int64(15))
            is_col = builder.icmp_signed("==", bmode, vb.const(1))
            is_row = builder.icmp_signed("==", bmode, vb.const(2))
            streaming = builder.icmp_unsigned("!=", args[18], ir.Constant(args[18].type, 0))
            epilogue = builder.or_(builder.icmp_signed("!=", bmode, vb.const(0)),
                                   builder.icmp_signed("!=", act, vb.const(0)))
            for r in range(rows):
                with builder.if_then(builder.icmp_signed("<", vb.const(r), mr)):
                    crow = vb.at(cptr, builder.mul(vb.const(r), ldc))
                    for j in range(nv):
                        p = vb.at(crow, lanes * j)
                        val = builder.load(accs[r][j])
                        with builder.if_then(add):
                            builder.store(builder.fadd(vb.load(p, mask), val), accs[r][j])
                        with builder.if_then(epilogue):
                            val = builder.load(accs[r][j])
                            with builder.if_then(is_col):
                                builder.store(builder.fadd(val, vb.load(vb.at(bptr_, lanes * j), mask)), accs[r][j])
                            with builder.if_then(is_row):
                                builder.store(builder.fadd(val, vb.splat(vb.at(bptr_, r))), accs[r][j])
                            builder.store(vb.activation(builder.load(accs[r][j]), act), accs[r][j])
                        if masked:
                            vb.store(builder.load(accs[r][j]), p, mask, result=True)
                        else:
                            with builder.if_else(streaming) as (then, otherwise):
                                with then:
                                    vb.store_stream(builder.load(accs[r][j]), p)
                                with otherwise:
                                    vb.store(builder.load(accs[r][j]), p, result=True)
            return context.get_dummy_value()

        return sig, codegen

    return mk


# Row blocks of MR = 6, and of 3 and 1 for the remainder (so no row is computed twice); 1 to NV vectors of
# columns, or one masked vector for the last columns.
_mk6_1, _mk6_2, _mk6_3, _mk6_4 = (_microkernel(6, v, False) for v in range(1, 5))
_mk3_1, _mk3_2, _mk3_3, _mk3_4 = (_microkernel(3, v, False) for v in range(1, 5))
_mk1_1, _mk1_2, _mk1_3, _mk1_4 = (_microkernel(1, v, False) for v in range(1, 5))
_mk6_m, _mk3_m, _mk1_m = (_microkernel(r, 1, True) for r in (6, 3, 1))


@jit
def _rows6(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act,
           stream):
    if nv == 0:
        _mk6_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 1:
        _mk6_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 2:
        _mk6_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 3:
        _mk6_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    else:
        _mk6_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)


@jit
def _rows3(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act,
           stream):
    if nv == 0:
        _mk3_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 1:
        _mk3_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 2:
        _mk3_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 3:
        _mk3_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    else:
        _mk3_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)


@jit
def _rows1(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act,
           stream):
    if nv == 0:
        _mk1_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 1:
        _mk1_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 2:
        _mk1_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    elif nv == 3:
        _mk1_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)
    else:
        _mk1_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols, bias, bioff, bmode, act, stream)


@jit
def _column_panel(nv, ncols, m, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, bias, bioff, bmode,
                  act, stream):
    """All ``m`` rows of one panel of ``nv`` vectors of columns (``nv == 0``: one masked vector of ``ncols``)."""
    i0 = 0
    while i0 < m:
        left = m - i0
        ai = aoff + i0 * ars
        ci = coff + i0 * ldc
        bi = bioff + i0 if bmode == 2 else bioff
        if left >= MR:
            _rows6(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, MR, ncols, bias, bi, bmode, act,
                   stream)
            i0 += MR
        elif left >= 3:
            _rows3(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, 3, ncols, bias, bi, bmode, act, stream)
            i0 += 3
        else:
            _rows1(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, 1, ncols, bias, bi, bmode, act, stream)
            i0 += 1


def panel_width(dtype):
    """Columns of ``B`` per column panel of :func:`gemm_nn` (``NV`` vectors), the unit of :func:`pack_b`."""
    return NV * (VECTOR_BYTES // dtype.itemsize)


def pack_b(matrix, dtype):
    """``matrix`` (``K x F``) as :func:`gemm_nn` reads a packed ``B`` (``packed_k = K``): flat, ``dtype``.

    Column panel ``p`` (columns ``p*nr`` to ``p*nr + w``, ``nr`` =
    :func:`panel_width`, ``w`` = ``nr`` but for the last panel) is stored
    row-major, ``K x w``, from element ``p*nr*K`` on: a ``k`` step of the
    micro-kernel reads ``w`` consecutive elements, and a ``KC``-row block of a
    panel is one contiguous run.  Unpacked, those rows lie ``F`` elements
    apart, and at ``F = 1024`` or more (a 4 KiB or larger stride in float32)
    every row of the block falls on the same few cache sets.
    """
    kdim, f = matrix.shape
    nr = panel_width(dtype)
    out = np.empty(kdim * f, dtype)
    for col0 in range(0, f, nr):
        w = min(nr, f - col0)
        out[col0 * kdim:(col0 + w) * kdim] = matrix[:, col0:col0 + w].reshape(-1)
    return out


@jit
def gemm_nn(m, n, k, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, accumulate, bias, bioff, bmode, act, stream=False,
            packed_k=0):
    """``C[i, j] (+)= sum_k A[i, k] * B[k, j]`` for ``i < m``, ``j < n`` on flat arrays (serial), with an epilogue.

    Parameters
    ----------
    a : ndarray, flat
        ``A[i, k]`` is ``a[aoff + i*ars + k*aks]`` (row-major ``ars=K, aks=1``;
        a transposed operand ``ars=1, aks=lda``).
    b : ndarray, flat
        ``B[k, j]`` is ``b[boff + k*ldb + j]``; or, with ``packed_k > 0``,
        ``B`` is columns ``boff`` to ``boff + n`` of a ``packed_k x ldb``
        matrix packed by :func:`pack_b`.  ``boff`` is then a multiple of
        :func:`panel_width`, and ``n`` is too unless the block ends at column ``ldb``.
    c : ndarray, flat
        ``C[i, j]`` is ``c[coff + i*ldc + j]``; overwritten, or added to if ``accumulate``.
    bias, bioff, bmode : ndarray, int, int
        ``bmode`` 1: ``bias[bioff + j]`` added to column ``j`` (NHWC output);
        2: ``bias[bioff + i]`` added to row ``i`` (NCHW output); 0: no bias.
    act : int
        Activation code (:mod:`nbconv._elementwise`) applied last.
    packed_k : int
        ``K`` of a packed ``B`` (see ``b``), 0 for a plain one.
    stream : bool
        Store ``C`` non-temporally (bypassing the caches, see
        :meth:`nbconv._simd.VectorBuilder.store_stream`) when ``k`` fits one
        block (no partial sums are read back) and not ``accumulate``; for
        outputs too large to stay in cache, then fenced (:func:`nbconv._simd.store_fence`).

    Notes
    -----
    The epilogue runs as the last ``k`` block is stored, while the result
    is still in registers.  Serial and re-entrant (no scratch): the parallel
    kernels call it once per task.
    """
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        zero = c.dtype.type(0)
        for i in range(m):
            row = c[coff + i * ldc:coff + i * ldc + n]
            if not accumulate:
                for j in range(n):
                    row[j] = zero
            if bmode == 1:
                vec_bias_act_inplace(row, bias[bioff:bioff + n], True, act)
            else:
                bias_act_inplace(row, bias[bioff + i] if bmode == 2 else zero, act)
        return
    lanes = VECTOR_BYTES // c.itemsize
    nfull = n // lanes * lanes
    nr = NV * lanes
    nt = stream and k <= KC and not accumulate
    for j0 in range(0, n, nr):
        nv = min(NV, (nfull - j0) // lanes)
        bcol = bioff + j0 if bmode == 1 else bioff
        if packed_k > 0:
            # this panel's rows are w = (its width) elements apart, from element col0 * K on
            col0 = boff + j0
            lb = min(nr, ldb - col0)
            bp = col0 * packed_k
        else:
            lb = ldb
            bp = boff + j0
        for k0 in range(0, k, KC):
            kl = min(KC, k - k0)
            ai = aoff + k0 * aks
            bi = bp + k0 * lb
            add = accumulate or k0 > 0
            last = k0 + KC >= k
            em = bmode if last else 0
            ea = act if last else 0
            if nv > 0:
                _column_panel(nv, nv * lanes, m, a, ai, ars, aks, b, bi, lb, c, coff + j0, ldc, kl, add, bias, bcol, em,
                              ea, nt)
            if j0 + nr > nfull and n > nfull:
                # the last n - nfull < lanes columns, in a masked vector
                t = nv * lanes
                _column_panel(0, n - nfull, m, a, ai, ars, aks, b, bi + t, lb, c, coff + j0 + t, ldc, kl, add, bias,
                              bcol + t if bmode == 1 else bcol, em, ea, False)
    if nt:
        store_fence()


@jit
def transpose_tile(src, soff, lds, rows, cols, dst, doff, ldd):
    """``dst[doff + j*ldd + i] = src[soff + i*lds + j]`` for ``i < rows``, ``j < cols`` (flat arrays, serial).

    Whole ``lanes x lanes`` blocks are transposed in registers
    (:func:`nbconv._simd.transpose_block`); the last ``rows % lanes`` rows
    element by element, since a register block would store whole vectors
    past them.  Nothing outside the ``cols x rows`` block of ``dst`` is written.
    """
    lanes = VECTOR_BYTES // src.itemsize
    for ib in range(0, rows, lanes):
        for jb in range(0, cols, lanes):
            nc = min(lanes, cols - jb)
            if ib + lanes <= rows:
                transpose_block(src, soff + ib * lds + jb, lds, lanes, nc, dst, doff + jb * ldd + ib, ldd)
            else:
                for j in range(jb, jb + nc):
                    for i in range(rows - ib):
                        copy_scalar(src, soff + (ib + i) * lds + j, dst, doff + j * ldd + ib + i)


# --- bfloat16 products ------------------------------------------------------------------------------------------


def _microkernel_bf16(rows, nv, masked, packed):
    """An intrinsic ``mk(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act,
    stream, accumulate)``: :func:`_microkernel` for bfloat16 ``A`` and ``B`` (``uint16`` bits), float32 sums
    (added to a float32 ``C`` if ``accumulate``).

    ``A[r, k]`` is ``a[aoff + r*ars + k]``; ``k`` runs over ``2*kp + kodd``
    (an odd last ``k`` reads one element of ``A``, never its neighbour).
    ``B`` with ``packed``: pair ``q`` of rows is ``b[boff + q*ldb ...]``,
    ``ncols`` columns of two interleaved elements each (:func:`pack_pairs`),
    zero-padded to whole vectors, so only the store is masked; else ``B[k,
    j]`` is ``b[boff + k*ldb + j]`` and the two rows of a pair are
    interleaved in registers (masked loads for a partial vector).  ``C`` is
    float32, or bfloat16 bits rounded to nearest even (``uint16``).
    """

    @intrinsic
    def mk(typingctx, a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
           accumulate):
        sig = types.void(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                         accumulate)

        def codegen(context, builder, signature, args):
            vb = VectorBuilder(context, builder, signature, args, types.float32)
            lanes = vb.lanes
            pairs = ir.VectorType(I16, 2 * lanes)
            wide = ir.VectorType(I32, lanes)
            aptr = vb.at(vb.data(0), vb.int64(1))
            bptr = vb.at(vb.data(3), vb.int64(4))
            cptr = vb.at(vb.data(6), vb.int64(7))
            ars, ldb, ldc, kp, mr = vb.int64(2), vb.int64(5), vb.int64(8), vb.int64(9), vb.int64(11)
            kodd = builder.icmp_signed("!=", vb.int64(10), vb.const(0))
            mask = vb.mask(vb.int64(12)) if masked else None
            accs = [vb.accumulators(nv) for _ in range(rows)]
            last = builder.sub(mr, vb.const(1))
            arow = []
            for r in range(rows):
                row = builder.select(builder.icmp_signed("<", vb.const(r), mr), vb.const(r), last)
                arow.append(vb.at(aptr, builder.mul(row, ars)))
            zero_half = ir.Constant(vb.hvty, [0] * lanes)
            order = ir.Constant(ir.VectorType(I32, 2 * lanes), [i // 2 + (i % 2) * lanes for i in range(2 * lanes)])

            def b_pairs(q, odd_tail):
                """The ``nv`` vectors of pair ``q`` of ``B`` (its second row zero for an odd last ``k``)."""
                if packed:
                    prow = vb.at(bptr, builder.mul(q, ldb))
                    return [builder.load(builder.bitcast(vb.at(prow, 2 * lanes * j), pairs.as_pointer()), align=2)
                            for j in range(nv)]
                r0 = vb.at(bptr, builder.mul(builder.mul(q, vb.const(2)), ldb))
                r1 = vb.at(r0, ldb)
                out = []
                for j in range(nv):
                    lo = vb.load_bits(vb.at(r0, lanes * j), mask)
                    hi = zero_half if odd_tail else vb.load_bits(vb.at(r1, lanes * j), mask)
                    out.append(builder.shuffle_vector(lo, hi, order))
                return out

            def a_pair(r, q, odd_tail):
                p = vb.at(arow[r], builder.mul(q, vb.const(2)))
                if odd_tail:
                    word = builder.zext(builder.load(p, align=2), I32)
                else:
                    word = builder.load(builder.bitcast(p, I32.as_pointer()), align=2)
                splat = builder.insert_element(ir.Constant(wide, ir.Undefined), word, ir.Constant(I32, 0))
                splat = builder.shuffle_vector(splat, ir.Constant(wide, ir.Undefined), vb._splat)
                return builder.bitcast(splat, pairs)

            def step(q, odd_tail):
                bv = b_pairs(q, odd_tail)
                for r in range(rows):
                    av = a_pair(r, q, odd_tail)
                    for j in range(nv):
                        builder.store(vb.dot_pairs(builder.load(accs[r][j]), av, bv[j]), accs[r][j])

            with cgutils.for_range(builder, kp) as loop:
                step(loop.index, False)
            with builder.if_then(kodd):
                step(kp, True)
            bmode, act = vb.int64(15), vb.int64(16)
            bptr_ = vb.at(vb.data(13), vb.int64(14))
            is_col = builder.icmp_signed("==", bmode, vb.const(1))
            is_row = builder.icmp_signed("==", bmode, vb.const(2))
            streaming = builder.icmp_unsigned("!=", args[17], ir.Constant(args[17].type, 0))
            add = builder.icmp_unsigned("!=", args[18], ir.Constant(args[18].type, 0))
            for r in range(rows):
                with builder.if_then(builder.icmp_signed("<", vb.const(r), mr)):
                    crow = vb.at(cptr, builder.mul(vb.const(r), ldc))
                    for j in range(nv):
                        p = vb.at(crow, lanes * j)
                        with builder.if_then(add):
                            builder.store(builder.fadd(vb.load(p, mask), builder.load(accs[r][j])), accs[r][j])
                        val = builder.load(accs[r][j])
                        with builder.if_then(is_col):
                            builder.store(builder.fadd(val, vb.load(vb.at(bptr_, lanes * j), mask)), accs[r][j])
                        with builder.if_then(is_row):
                            builder.store(builder.fadd(val, vb.splat(vb.at(bptr_, r))), accs[r][j])
                        val = vb.activation(builder.load(accs[r][j]), act)
                        if masked:
                            vb.store(val, p, mask, result=True)
                        else:
                            with builder.if_else(streaming) as (then, otherwise):
                                with then:
                                    vb.store_stream(val, p)
                                with otherwise:
                                    vb.store(val, p, result=True)
            return context.get_dummy_value()

        return sig, codegen

    return mk


# (rows, vectors) as for float32; "p" reads packed pairs of B, "r" interleaves two rows of a plain B
_bp6_1, _bp6_2, _bp6_3, _bp6_4 = (_microkernel_bf16(6, v, False, True) for v in range(1, 5))
_bp3_1, _bp3_2, _bp3_3, _bp3_4 = (_microkernel_bf16(3, v, False, True) for v in range(1, 5))
_bp1_1, _bp1_2, _bp1_3, _bp1_4 = (_microkernel_bf16(1, v, False, True) for v in range(1, 5))
_bp6_m, _bp3_m, _bp1_m = (_microkernel_bf16(r, 1, True, True) for r in (6, 3, 1))
_br6_1, _br6_2, _br6_3, _br6_4 = (_microkernel_bf16(6, v, False, False) for v in range(1, 5))
_br3_1, _br3_2, _br3_3, _br3_4 = (_microkernel_bf16(3, v, False, False) for v in range(1, 5))
_br1_1, _br1_2, _br1_3, _br1_4 = (_microkernel_bf16(1, v, False, False) for v in range(1, 5))
_br6_m, _br3_m, _br1_m = (_microkernel_bf16(r, 1, True, False) for r in (6, 3, 1))


# one branch per compile-time variant: Numba cannot index a tuple of intrinsics at run time
@jit
def _bf16_rows6(nv, packed, a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act,
                stream, accumulate):
    if packed:
        if nv == 0:
            _bp6_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 1:
            _bp6_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 2:
            _bp6_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 3:
            _bp6_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        else:
            _bp6_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
    elif nv == 0:
        _br6_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 1:
        _br6_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 2:
        _br6_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 3:
        _br6_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    else:
        _br6_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)


@jit
def _bf16_rows3(nv, packed, a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act,
                stream, accumulate):
    if packed:
        if nv == 0:
            _bp3_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 1:
            _bp3_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 2:
            _bp3_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 3:
            _bp3_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        else:
            _bp3_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
    elif nv == 0:
        _br3_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 1:
        _br3_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 2:
        _br3_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 3:
        _br3_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    else:
        _br3_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)


@jit
def _bf16_rows1(nv, packed, a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act,
                stream, accumulate):
    if packed:
        if nv == 0:
            _bp1_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 1:
            _bp1_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 2:
            _bp1_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        elif nv == 3:
            _bp1_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
        else:
            _bp1_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
                   accumulate)
    elif nv == 0:
        _br1_m(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 1:
        _br1_1(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 2:
        _br1_2(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    elif nv == 3:
        _br1_3(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)
    else:
        _br1_4(a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, mr, ncols, bias, bioff, bmode, act, stream,
               accumulate)


@intrinsic
def _interleave_rows(typingctx, b, r0, r1, dst, doff, n):
    """``dst[doff + 2j] = b[r0 + j]``, ``dst[doff + 2j + 1] = b[r1 + j]`` for ``j < n <= lanes`` (``r1 < 0``: zeros),
    zeros up to ``2 * lanes`` elements: one vector of a packed pair panel (:func:`pack_pairs`) from two plain
    rows of bfloat16 bits, or of float32 rounded to bfloat16; masked, nothing past ``n`` is read."""
    sig = types.void(b, r0, r1, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, types.float32)
        lanes = vb.lanes
        mask = vb.mask(vb.int64(5))
        base = vb.data(0)

        def row(ptr):
            return vb.load_bits(ptr, mask) if vb.is_bf16(ptr) else vb.round_bf16(vb.load(ptr, mask))

        lo = row(vb.at(base, vb.int64(1)))
        r1 = vb.int64(2)
        hi = cgutils.alloca_once_value(builder, ir.Constant(vb.hvty, [0] * lanes))
        with builder.if_then(builder.icmp_signed(">=", r1, vb.const(0))):
            builder.store(row(vb.at(base, r1)), hi)
        order = ir.Constant(ir.VectorType(I32, 2 * lanes), [i // 2 + (i % 2) * lanes for i in range(2 * lanes)])
        pairs = builder.shuffle_vector(lo, builder.load(hi), order)
        out = builder.bitcast(vb.at(vb.data(3), vb.int64(4)), pairs.type.as_pointer())
        builder.store(pairs, out, align=2)
        return context.get_dummy_value()

    return sig, codegen


@jit
def _pack_panel(b, boff, ldb, k, ncols, dst):
    """Columns ``boff`` to ``boff + ncols`` (at most one panel) of the plain ``k x ldb`` ``B`` (bfloat16 bits, or
    float32 rounded to bfloat16) into ``dst``, laid out as one panel of :func:`pack_pairs`: what the packed
    micro-kernels read."""
    lanes = VECTOR_BYTES // 4
    for q in range((k + 1) // 2):
        r0 = boff + 2 * q * ldb
        r1 = r0 + ldb if 2 * q + 1 < k else -1
        for j in range(NV):
            c0 = j * lanes
            _interleave_rows(b, r0 + c0, r1 + c0 if r1 >= 0 else -1, dst, (q * NV + j) * 2 * lanes,
                             max(0, min(lanes, ncols - c0)))


def panel_scratch(k):
    """Elements (``uint16``) of the scratch in which :func:`gemm_bf16` packs one panel of a plain ``B``."""
    return (k + k % 2) * pair_panel_width()


def pair_panel_width():
    """Columns of ``B`` per panel of :func:`gemm_bf16` (``NV`` float32 vectors), the unit of :func:`pack_pairs`."""
    return NV * (VECTOR_BYTES // 4)


def pack_pairs(matrix):
    """``matrix`` (``K x F`` bfloat16 bits, ``uint16``) as :func:`gemm_bf16` reads a packed ``B``.

    Panel ``p`` (columns ``p*nr`` on, ``nr`` = :func:`pair_panel_width`)
    starts at element ``p * nr * kk`` (``kk`` = ``K`` rounded up to even)
    and holds, per pair of rows ``q``, its ``nr`` columns as ``(B[2q, j],
    B[2q+1, j])`` pairs: one vector load per ``k`` pair and vector of
    filters.  Columns past ``F`` and the row after an odd last row are zeros.
    """
    kdim, f = matrix.shape
    nr = pair_panel_width()
    kk, fp = kdim + kdim % 2, -(-f // nr) * nr
    padded = np.zeros((kk, fp), np.uint16)
    padded[:kdim, :f] = matrix
    # 2-D (the kernels take one array type for plain and packed weights), flat in memory
    return np.ascontiguousarray(padded.reshape(kk // 2, 2, fp // nr, nr).transpose(2, 0, 3, 1)).reshape(kk, fp)


@jit
def _bf16_panel(nv, packed, ncols, m, a, aoff, ars, b, boff, ldb, c, coff, ldc, kp, kodd, bias, bioff, bmode, act,
                stream, accumulate):
    """All ``m`` rows of one panel (:func:`_column_panel` for the bfloat16 micro-kernels)."""
    i0 = 0
    while i0 < m:
        left = m - i0
        ai = aoff + i0 * ars
        ci = coff + i0 * ldc
        bi = bioff + i0 if bmode == 2 else bioff
        if left >= MR:
            _bf16_rows6(nv, packed, a, ai, ars, b, boff, ldb, c, ci, ldc, kp, kodd, MR, ncols, bias, bi, bmode, act,
                        stream, accumulate)
            i0 += MR
        elif left >= 3:
            _bf16_rows3(nv, packed, a, ai, ars, b, boff, ldb, c, ci, ldc, kp, kodd, 3, ncols, bias, bi, bmode, act,
                        stream, accumulate)
            i0 += 3
        else:
            _bf16_rows1(nv, packed, a, ai, ars, b, boff, ldb, c, ci, ldc, kp, kodd, 1, ncols, bias, bi, bmode, act,
                        stream, accumulate)
            i0 += 1


@jit
def _bf16_columns(nv, tail, packed, m, a, aoff, ars, b, bp, lb, toff, c, coff, ldc, kp, kodd, bias, bcol, bmode, act,
                  stream, accumulate):
    """One panel of :func:`gemm_bf16`: ``nv`` whole vectors of columns, then ``tail`` columns in a masked one
    (``toff`` elements into ``b`` from ``bp``)."""
    lanes = VECTOR_BYTES // 4
    if nv > 0:
        _bf16_panel(nv, packed, nv * lanes, m, a, aoff, ars, b, bp, lb, c, coff, ldc, kp, kodd, bias, bcol, bmode,
                    act, stream, accumulate)
    if tail > 0:
        t = nv * lanes
        _bf16_panel(0, packed, tail, m, a, aoff, ars, b, bp + toff, lb, c, coff + t, ldc, kp, kodd, bias,
                    bcol + t if bmode == 1 else bcol, bmode, act, False, accumulate)


@jit
def gemm_bf16(m, n, k, a, aoff, ars, b, boff, ldb, packed, c, coff, ldc, bias, bioff, bmode, act, stream, scratch,
              accumulate=False):
    """``C[i, j] = act(sum_k A[i, k] * B[k, j] + bias)`` for bfloat16 ``A``, ``B`` (``uint16`` bits), float32 sums.

    Parameters
    ----------
    a : ndarray of uint16, flat
        ``A[i, k]`` is ``a[aoff + i*ars + k]`` (pixel-major rows).
    b : ndarray of uint16 or float32, flat
        ``B[k, j]`` is ``b[boff + k*ldb + j]``, or with ``packed`` columns
        ``boff`` to ``boff + n`` of the ``k x ldb`` matrix packed by
        :func:`pack_pairs` (``boff`` a multiple of :func:`pair_panel_width`).
        A float32 ``B`` is rounded to bfloat16 as each panel is packed
        (``scratch`` is then required).
    c : ndarray of float32 or uint16 (bfloat16 bits), flat
        ``C[i, j]`` is ``c[coff + i*ldc + j]``, overwritten, or (float32 only) added to if ``accumulate``.
    bias, bioff, bmode, act, stream
        As in :func:`gemm_nn`.
    scratch : ndarray of uint16, flat
        Where each panel of a plain ``B`` is packed first (:func:`panel_scratch`
        elements, else it is read as it lies) when more than one block of
        rows reads it: the two rows of a pair lie ``ldb`` apart, and at 1024+
        filters a panel's rows crowd a few cache sets.

    Notes
    -----
    ``k`` is not blocked: a panel of ``B`` (``k x 64`` bfloat16 pairs, 128
    KiB at ``k = 1024``) stays in L2 while the row blocks pass over it, and
    the sums never leave the registers before the epilogue.  Serial and
    re-entrant.
    """
    if m <= 0 or n <= 0:
        return
    lanes = VECTOR_BYTES // 4
    nfull = n // lanes * lanes
    nr = NV * lanes
    kp = k // 2
    kodd = k - 2 * kp
    nt = stream
    # float32 weights are always repacked (rounded on the way): the plain-row micro-kernels read bfloat16 bits
    repack = not packed and (m > MR or b.itemsize != 2) and scratch.shape[0] >= (k + kodd) * nr
    for j0 in range(0, n, nr):
        nv = min(NV, (nfull - j0) // lanes)
        bcol = bioff + j0 if bmode == 1 else bioff
        tail = n - nfull if j0 + nr > nfull and n > nfull else 0
        if repack:
            _pack_panel(b, boff + j0, ldb, k, min(nr, n - j0), scratch)
            _bf16_columns(nv, tail, True, m, a, aoff, ars, scratch, 0, 2 * nr, 2 * lanes * nv, c, coff + j0, ldc, kp,
                          kodd, bias, bcol, bmode, act, nt, accumulate)
        elif packed:
            _bf16_columns(nv, tail, True, m, a, aoff, ars, b, (boff + j0) * (k + kodd), 2 * nr, 2 * lanes * nv, c,
                          coff + j0, ldc, kp, kodd, bias, bcol, bmode, act, nt, accumulate)
        else:
            _bf16_columns(nv, tail, False, m, a, aoff, ars, b, boff + j0, ldb, lanes * nv, c, coff + j0, ldc, kp, kodd,
                          bias, bcol, bmode, act, nt, accumulate)
    if nt:
        store_fence()


def product(m, n, k, a, aoff, ars, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream, packed_k, scratch):
    """``C = act(A @ B + bias)`` with ``A`` row-major (``aks = 1``): :func:`gemm_nn`, or :func:`gemm_bf16` when
    ``a`` holds bfloat16 bits (chosen at compile time; ``packed_k > 0`` means a packed ``B``, ``scratch`` is
    :func:`gemm_bf16`'s)."""
    raise NotImplementedError("compiled callers only")


@overload(product)
def _product(m, n, k, a, aoff, ars, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream, packed_k, scratch):
    if a.dtype == types.uint16:
        def bf16(m, n, k, a, aoff, ars, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream, packed_k,
                 scratch):
            gemm_bf16(m, n, k, a, aoff, ars, b, boff, ldb, packed_k > 0, c, coff, ldc, bias, bioff, bmode, act, stream,
                      scratch)
        return bf16

    def fp(m, n, k, a, aoff, ars, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream, packed_k, scratch):
        gemm_nn(m, n, k, a, aoff, ars, 1, b, boff, ldb, c, coff, ldc, False, bias, bioff, bmode, act, stream, packed_k)
    return fp


def product_t(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream):
    """``C = act(A.T @ B + bias)`` (``A`` read down its columns, ``lda`` apart): :func:`gemm_nn`; float only
    (bfloat16 callers never take this path and get a no-op, so that they compile)."""
    raise NotImplementedError("compiled callers only")


@overload(product_t)
def _product_t(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream):
    if a.dtype == types.uint16:
        def none(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream):
            pass
        return none

    def fp(m, n, k, a, aoff, lda, b, boff, ldb, c, coff, ldc, bias, bioff, bmode, act, stream):
        gemm_nn(m, n, k, a, aoff, 1, lda, b, boff, ldb, c, coff, ldc, False, bias, bioff, bmode, act, stream)
    return fp
