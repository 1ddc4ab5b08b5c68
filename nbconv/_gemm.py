"""Register-blocked matrix product for the pointwise part: ``C = A @ B``, row-major, no packing.

Why not BLAS: OpenBLAS packs both operands on every call, which costs as
much as the product itself when the pixels are few (7x7 or 10x10 images of
1024+ channels: 130-160 GFLOP/s on one thread, against 210+ here), and the
fused kernel calls it once per small tile.  Here the operands are read where
they lie: ``B`` (the pointwise weights, ``K x F`` row-major) in rows of
``NV`` vectors, ``A`` (the depthwise tile) one scalar per row and ``k``.

The micro-kernel is emitted as LLVM vector IR (:func:`_microkernel`): Numba's
loop vectoriser cannot keep a block of ``C`` in registers across the ``k``
loop, because it cannot prove that the stores to ``C`` do not alias the
loads of ``A`` and ``B``.  Written with explicit ``<lanes x float>`` values,
the ``MR x NV`` accumulators live in registers (24 of the 32 zmm registers
of AVX-512 for 6 x 4), each ``k`` step loads ``NV`` vectors of ``B`` and
broadcasts ``MR`` scalars of ``A``.  LLVM compiles it for the host CPU, so
the same IR gives AVX2 or AVX-512 code.

Blocking (:func:`gemm_nn`): columns in panels of ``NV * lanes``, ``k`` in
blocks of :data:`KC` (the ``KC x NR`` panel of ``B`` stays in L2 while every
row block of ``A`` passes over it), rows in blocks of ``MR``.  The last
columns (fewer than one vector) use masked loads and stores, and a last row
block of fewer than ``MR`` rows re-reads its last row instead of reading
past it, so no load or store ever leaves the arrays.
"""
import numpy as np
import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit

def _has_avx512():
    try:
        return "+avx512f" in llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # a CPU LLVM does not know: assume the smaller registers
        return False


_AVX512 = _has_avx512()
#: bytes of one vector register: AVX-512 (32 registers) or AVX2 (16)
VECTOR_BYTES = 64 if _AVX512 else 32
#: rows of C per micro-kernel call
MR = 6
#: vectors of C per row in the micro-kernel: 6 x 4 holds 24 accumulators (of 32 registers), 6 x 2 holds 12 (of 16)
NV = 4 if _AVX512 else 2
#: k-block: the KC x NR panel of B (64 KiB in float32 with AVX-512) is reused from L2 by every row block
KC = 256


def _lanes(dtype):
    bits = getattr(dtype, "bitwidth", None) or np.dtype(dtype).itemsize * 8
    return VECTOR_BYTES * 8 // bits


def _microkernel(rows, nv, masked):
    """An intrinsic ``mk(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)``.

    Computes ``C[r, j] (+)= sum_k A[aoff + r*ars + k*aks] * B[boff + k*ldb + j]``
    for ``r < mr <= rows`` and ``j < ncols`` (flat arrays, offsets in
    elements), storing into ``C[coff + r*ldc + j]``, adding to it if
    ``accumulate``.  ``ncols`` is ``nv * lanes``, or with ``masked`` (then
    ``nv == 1``) anything from 1 to ``lanes``: loads and stores of the
    missing lanes are masked off and never touch memory.  Rows past ``mr``
    are computed from row ``mr - 1`` and not stored (never read past the
    operands).  The caller guarantees that every index it names is inside
    its array.
    """

    @intrinsic
    def mk(typingctx, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols):
        sig = types.void(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)

        def codegen(context, builder, signature, args):
            a_, aoff_, ars_, aks_, b_, boff_, ldb_, c_, coff_, ldc_, k_, acc_, mr_, ncols_ = args
            dtype = signature.args[0].dtype
            fty = context.get_value_type(dtype)
            lanes = _lanes(dtype)
            vty = ir.VectorType(fty, lanes)
            vptr = vty.as_pointer()
            i32 = ir.IntType(32)
            i64 = ir.IntType(64)

            def int64(i):
                return context.cast(builder, args[i], signature.args[i], types.int64)

            def data(i):
                return context.make_array(signature.args[i])(context, builder, args[i]).data

            def const(v):
                return ir.Constant(i64, v)

            aptr = builder.gep(data(0), [int64(1)])
            bptr = builder.gep(data(4), [int64(5)])
            cptr = builder.gep(data(7), [int64(8)])
            ars64, aks64, ldb64, ldc64, mr64 = int64(2), int64(3), int64(6), int64(9), int64(12)
            suffix = f"v{lanes}{'f32' if dtype.bitwidth == 32 else 'f64'}"
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                                 f"llvm.fma.{suffix}")
            zero = ir.Constant(vty, [0.0] * lanes)
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
            mask = None
            if masked:
                i1v = ir.VectorType(ir.IntType(1), lanes)
                mload = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vty, [vptr, i32, i1v, vty]), f"llvm.masked.load.{suffix}.p0")
                mstore = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [vty, vptr, i32, i1v]),
                    f"llvm.masked.store.{suffix}.p0")
                i64v = ir.VectorType(i64, lanes)
                nvec = builder.insert_element(ir.Constant(i64v, ir.Undefined), int64(13), ir.Constant(i32, 0))
                nvec = builder.shuffle_vector(nvec, ir.Constant(i64v, ir.Undefined), splat)
                mask = builder.icmp_signed("<", ir.Constant(i64v, list(range(lanes))), nvec)

            def load(ptr):
                if masked:
                    return builder.call(mload, [ptr, ir.Constant(i32, 4), mask, zero])
                return builder.load(ptr, align=4)

            def store(val, ptr):
                if masked:
                    builder.call(mstore, [val, ptr, ir.Constant(i32, 4), mask])
                else:
                    builder.store(val, ptr, align=4)

            # allocas of vector values: LLVM's mem2reg turns them into registers carried around the k loop
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(rows)]
            last = builder.sub(mr64, const(1))
            arow = []
            for r in range(rows):
                row = builder.select(builder.icmp_signed("<", const(r), mr64), const(r), last)
                arow.append(builder.gep(aptr, [builder.mul(row, ars64)]))
            with cgutils.for_range(builder, int64(10)) as loop:
                kk = loop.index
                brow = builder.gep(bptr, [builder.mul(kk, ldb64)])
                bv = [load(builder.bitcast(builder.gep(brow, [const(lanes * j)]), vptr)) for j in range(nv)]
                ka = builder.mul(kk, aks64)
                for r in range(rows):
                    s = builder.load(builder.gep(arow[r], [ka]))
                    v = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, splat)
                    for j in range(nv):
                        builder.store(builder.call(fma, [v, bv[j], builder.load(accs[r][j])]), accs[r][j])
            add = builder.icmp_unsigned("!=", acc_, ir.Constant(acc_.type, 0))
            for r in range(rows):
                with builder.if_then(builder.icmp_signed("<", const(r), mr64)):
                    crow = builder.gep(cptr, [builder.mul(const(r), ldc64)])
                    for j in range(nv):
                        p = builder.bitcast(builder.gep(crow, [const(lanes * j)]), vptr)
                        val = builder.load(accs[r][j])
                        with builder.if_else(add) as (then, otherwise):
                            with then:
                                store(builder.fadd(load(p), val), p)
                            with otherwise:
                                store(val, p)
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
def _rows6(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols):
    if nv == 0:
        _mk6_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 1:
        _mk6_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 2:
        _mk6_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 3:
        _mk6_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    else:
        _mk6_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)


@jit
def _rows3(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols):
    if nv == 0:
        _mk3_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 1:
        _mk3_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 2:
        _mk3_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 3:
        _mk3_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    else:
        _mk3_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)


@jit
def _rows1(nv, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols):
    if nv == 0:
        _mk1_m(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 1:
        _mk1_1(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 2:
        _mk1_2(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    elif nv == 3:
        _mk1_3(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)
    else:
        _mk1_4(a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate, mr, ncols)


@jit
def _column_panel(nv, ncols, m, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc, k, accumulate):
    """All ``m`` rows of one panel of ``nv`` vectors of columns (``nv == 0``: one masked vector of ``ncols``)."""
    i0 = 0
    while i0 < m:
        left = m - i0
        ai = aoff + i0 * ars
        ci = coff + i0 * ldc
        if left >= MR:
            _rows6(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, MR, ncols)
            i0 += MR
        elif left >= 3:
            _rows3(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, 3, ncols)
            i0 += 3
        else:
            _rows1(nv, a, ai, ars, aks, b, boff, ldb, c, ci, ldc, k, accumulate, 1, ncols)
            i0 += 1


@jit
def gemm_nn(m, n, k, a, aoff, ars, aks, b, boff, ldb, c, coff, ldc):
    """``C[i, j] = sum_k A[i, k] * B[k, j]`` for ``i < m``, ``j < n`` on flat arrays (serial).

    Parameters
    ----------
    a : ndarray, flat
        ``A[i, k]`` is ``a[aoff + i*ars + k*aks]`` (row-major ``ars=K, aks=1``;
        a transposed operand ``ars=1, aks=lda``).
    b : ndarray, flat
        ``B[k, j]`` is ``b[boff + k*ldb + j]``.
    c : ndarray, flat
        ``C[i, j]`` is ``c[coff + i*ldc + j]``; overwritten.

    Notes
    -----
    Serial and re-entrant (no scratch): the parallel kernels call it once per task.
    """
    if m <= 0 or n <= 0:
        return
    if k <= 0:
        zero = c.dtype.type(0)
        for i in range(m):
            for j in range(n):
                c[coff + i * ldc + j] = zero
        return
    lanes = VECTOR_BYTES // c.itemsize
    nfull = n // lanes * lanes
    nr = NV * lanes
    for j0 in range(0, n, nr):
        nv = min(NV, (nfull - j0) // lanes)
        for k0 in range(0, k, KC):
            kl = min(KC, k - k0)
            ai = aoff + k0 * aks
            bi = boff + k0 * ldb + j0
            if nv > 0:
                _column_panel(nv, nv * lanes, m, a, ai, ars, aks, b, bi, ldb, c, coff + j0, ldc, kl, k0 > 0)
            if j0 + nr > nfull and n > nfull:
                # the last n - nfull < lanes columns, in a masked vector
                t = nv * lanes
                _column_panel(0, n - nfull, m, a, ai, ars, aks, b, bi + t, ldb, c, coff + j0 + t, ldc, kl, k0 > 0)
