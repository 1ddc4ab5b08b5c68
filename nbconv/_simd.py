"""Explicit vector code for the micro-kernels: LLVM IR emitted through Numba intrinsics.

Numba's loop vectoriser cannot keep a block of results in registers across
an inner loop, because it cannot prove that the stores to the output do not
alias the loads of the operands.  The micro-kernels (:mod:`nbconv._gemm`,
:mod:`nbconv._depthwise`) are therefore written as LLVM IR with explicit
``<lanes x float>`` values; LLVM compiles them for the host CPU.  This module
holds what they share: the vector width of the host, and a small builder of
vector operations (loads and stores, masked for partial vectors, FMA, splat,
the fused activations).
"""
import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._elementwise import RELU, RELU6


def _has_avx512():
    try:
        return "+avx512f" in llvm.get_host_cpu_features().flatten()
    except RuntimeError:  # a CPU LLVM does not know: assume the smaller registers
        return False


#: the host is x86 (:func:`store_fence` emits ``sfence`` there, a full fence elsewhere)
_X86 = llvm.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686")
#: AVX-512 (32 vector registers) on the host
AVX512 = _has_avx512()
#: bytes of one vector register: AVX-512 or AVX2
VECTOR_BYTES = 64 if AVX512 else 32


def lanes_of(dtype):
    """Elements of ``dtype`` (a NumPy or Numba float type) in one vector register."""
    bits = getattr(dtype, "bitwidth", None) or np.dtype(dtype).itemsize * 8
    return VECTOR_BYTES * 8 // bits


I32 = ir.IntType(32)
I64 = ir.IntType(64)


class VectorBuilder:
    """Vector operations on one intrinsic's arguments (``context``, ``builder``, ``signature``, ``args``)."""

    def __init__(self, context, builder, signature, args, dtype):
        self.context, self.builder, self.signature, self.args = context, builder, signature, args
        self.lanes = lanes_of(dtype)
        self.fty = context.get_value_type(dtype)
        self.vty = ir.VectorType(self.fty, self.lanes)
        self.vptr = self.vty.as_pointer()
        suffix = f"v{self.lanes}{'f32' if dtype.bitwidth == 32 else 'f64'}"
        self.zero = ir.Constant(self.vty, [0.0] * self.lanes)
        self._undef = ir.Constant(self.vty, ir.Undefined)
        self._splat = ir.Constant(ir.VectorType(I32, self.lanes), [0] * self.lanes)
        module = builder.module
        self._fma = cgutils.get_or_insert_function(module, ir.FunctionType(self.vty, [self.vty] * 3),
                                                   f"llvm.fma.{suffix}")
        i1v = ir.VectorType(ir.IntType(1), self.lanes)
        self._mload = cgutils.get_or_insert_function(
            module, ir.FunctionType(self.vty, [self.vptr, I32, i1v, self.vty]), f"llvm.masked.load.{suffix}.p0")
        self._mstore = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [self.vty, self.vptr, I32, i1v]), f"llvm.masked.store.{suffix}.p0")
        self._align = ir.Constant(I32, dtype.bitwidth // 8)

    def int64(self, i):
        """Argument ``i`` (an integer) as an i64 value."""
        return self.context.cast(self.builder, self.args[i], self.signature.args[i], types.int64)

    def data(self, i):
        """Data pointer (element type) of array argument ``i``."""
        return self.context.make_array(self.signature.args[i])(self.context, self.builder, self.args[i]).data

    def const(self, value):
        return ir.Constant(I64, value)

    def at(self, ptr, *offsets):
        """Element pointer ``ptr + sum(offsets)`` (offsets are i64 values or ints)."""
        for off in offsets:
            ptr = self.builder.gep(ptr, [off if isinstance(off, ir.Value) else self.const(off)])
        return ptr

    def mask(self, n):
        """Lane mask ``lane < n`` for an i64 value ``n``."""
        i64v = ir.VectorType(I64, self.lanes)
        nv = self.builder.insert_element(ir.Constant(i64v, ir.Undefined), n, ir.Constant(I32, 0))
        nv = self.builder.shuffle_vector(nv, ir.Constant(i64v, ir.Undefined), self._splat)
        return self.builder.icmp_signed("<", ir.Constant(i64v, list(range(self.lanes))), nv)

    def load(self, ptr, mask=None):
        """Vector at element pointer ``ptr``; with a mask, masked-off lanes read as 0 and touch no memory."""
        vp = self.builder.bitcast(ptr, self.vptr)
        if mask is None:
            return self.builder.load(vp, align=self._align.constant)
        return self.builder.call(self._mload, [vp, self._align, mask, self.zero])

    def store(self, value, ptr, mask=None):
        vp = self.builder.bitcast(ptr, self.vptr)
        if mask is None:
            self.builder.store(value, vp, align=self._align.constant)
        else:
            self.builder.call(self._mstore, [value, vp, self._align, mask])

    def store_stream(self, value, ptr):
        """Store a whole vector at element pointer ``ptr``, non-temporally where ``ptr`` is aligned to the vector.

        A non-temporal store bypasses the caches and skips reading the line
        first; only an aligned vector can be stored so (x86 ``vmovntps``), an
        unaligned one is stored normally.  See :func:`store_fence`.
        """
        b = self.builder
        vp = b.bitcast(ptr, self.vptr)
        aligned = b.icmp_unsigned("==", b.and_(b.ptrtoint(ptr, I64), self.const(VECTOR_BYTES - 1)), self.const(0))
        with b.if_else(aligned) as (then, otherwise):
            with then:
                st = b.store(value, vp, align=VECTOR_BYTES)
                st.set_metadata("nontemporal", b.module.add_metadata([ir.Constant(I32, 1)]))
            with otherwise:
                b.store(value, vp, align=self._align.constant)

    def store_narrow(self, value, ptr, mask=None):
        """Store a vector of any width (``value``'s own) at element pointer ``ptr``, lanes off in ``mask`` untouched."""
        vty = value.type
        vp = self.builder.bitcast(ptr, vty.as_pointer())
        if mask is None:
            self.builder.store(value, vp, align=self._align.constant)
            return
        name = f"llvm.masked.store.v{vty.count}{'f32' if self.fty == ir.FloatType() else 'f64'}.p0"
        fn = cgutils.get_or_insert_function(
            self.builder.module,
            ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), I32, ir.VectorType(ir.IntType(1), vty.count)]), name)
        self.builder.call(fn, [value, vp, self._align, mask])

    def splat(self, ptr):
        """Scalar at element pointer ``ptr`` broadcast to every lane."""
        s = self.builder.load(ptr)
        return self.builder.shuffle_vector(self.builder.insert_element(self._undef, s, ir.Constant(I32, 0)),
                                           self._undef, self._splat)

    def fma(self, a, b, c):
        """``a * b + c``, fused."""
        return self.builder.call(self._fma, [a, b, c])

    def activation(self, v, act):
        """``v`` through the activation with code ``act`` (an i64 value): ReLU / ReLU6 keep NaN, like the reference."""
        b = self.builder
        zero = self.zero
        six = ir.Constant(self.vty, [6.0] * self.lanes)
        relu = b.select(b.fcmp_ordered("<", v, zero), zero, v)
        relu6 = b.select(b.fcmp_ordered(">", relu, six), six, relu)
        out = b.select(b.icmp_signed("==", act, self.const(RELU)), relu, v)
        return b.select(b.icmp_signed("==", act, self.const(RELU6)), relu6, out)

    def accumulators(self, count):
        """``count`` zeroed vector slots; LLVM's mem2reg keeps them in registers across loops."""
        return [cgutils.alloca_once_value(self.builder, self.zero) for _ in range(count)]


@intrinsic
def store_fence(typingctx):
    """Order the non-temporal stores made so far before any later store (x86 ``sfence``).

    Non-temporal stores are weakly ordered: a task fences after its last
    one, so whoever is told the task is done sees its results.
    """
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse.sfence"), [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_vector(typingctx, src, soff, dst, doff, n):
    """``dst[doff : doff+lanes] = src[soff : soff+n]`` then zeros (``n <= lanes``; masked, reads only ``n``)."""
    sig = types.void(src, soff, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        value = vb.load(vb.at(vb.data(0), vb.int64(1)), vb.mask(vb.int64(4)))
        vb.store(value, vb.at(vb.data(2), vb.int64(3)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def gather_vector(typingctx, src, soff, idx, ioff, dst, doff, n):
    """``dst[doff + j] = src[soff + idx[ioff + j]]`` for ``j < n``, then zeros up to a whole vector (``n <= lanes``).

    One masked gather (``idx`` holds int64 indices): channels repeated for a
    depth multiplier, without a scalar loop per element.
    """
    sig = types.void(src, soff, idx, ioff, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        lanes = vb.lanes
        i64v = ir.VectorType(I64, lanes)
        ivp = builder.bitcast(vb.at(vb.data(2), vb.int64(3)), i64v.as_pointer())
        mask = vb.mask(vb.int64(6))
        # masked-off lanes of the index vector are never used as addresses, but must not be read either
        iload = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64v, [i64v.as_pointer(), I32, mask.type, i64v]),
            f"llvm.masked.load.v{lanes}i64.p0")
        ivec = builder.call(iload, [ivp, ir.Constant(I32, 8), mask, ir.Constant(i64v, [0] * lanes)])
        base = builder.ptrtoint(vb.at(vb.data(0), vb.int64(1)), I64)
        bvec = builder.shuffle_vector(
            builder.insert_element(ir.Constant(i64v, ir.Undefined), base, ir.Constant(I32, 0)),
            ir.Constant(i64v, ir.Undefined), vb._splat)
        size = ir.Constant(i64v, [signature.args[0].dtype.bitwidth // 8] * lanes)
        pty = ir.VectorType(vb.fty.as_pointer(), lanes)
        ptrs = builder.inttoptr(builder.add(bvec, builder.mul(ivec, size)), pty)
        suffix = f"v{lanes}{'f32' if signature.args[0].dtype.bitwidth == 32 else 'f64'}"
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vb.vty, [pty, I32, mask.type, vb.vty]),
            f"llvm.masked.gather.{suffix}.v{lanes}p0")
        value = builder.call(gather, [ptrs, vb._align, mask, vb.zero])
        vb.store(value, vb.at(vb.data(4), vb.int64(5)))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def transpose_block(typingctx, src, soff, srs, nrows, ncols, dst, doff, dcs):
    """A ``lanes x lanes`` transpose: ``dst[doff + q*dcs + j] = src[soff + j*srs + q]`` for ``q < ncols``.

    Lanes ``j >= nrows`` of each stored vector are zeros and those rows of
    ``src`` are not read; columns ``q >= ncols`` are neither read nor stored
    (``nrows, ncols <= lanes``).  The transpose swaps one bit of the row
    index with the same bit of the lane index per stage: log2(lanes) stages
    of two-source shuffles, where element-wise inserts cost a scalar move each
    (NCHW rows packed channel-blocked for the depthwise micro-kernels).
    """
    sig = types.void(src, soff, srs, nrows, ncols, dst, doff, dcs)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        lanes = vb.lanes
        base = vb.at(vb.data(0), vb.int64(1))
        srs_, nrows_, ncols_, dcs_ = vb.int64(2), vb.int64(3), vb.int64(4), vb.int64(7)
        mask = vb.mask(ncols_)
        rows = []
        for j in range(lanes):
            slot = cgutils.alloca_once_value(builder, vb.zero)
            with builder.if_then(builder.icmp_signed("<", vb.const(j), nrows_)):
                builder.store(vb.load(vb.at(base, builder.mul(vb.const(j), srs_)), mask), slot)
            rows.append(builder.load(slot))
        h = 1
        while h < lanes:
            lo = [i if not i & h else lanes + i - h for i in range(lanes)]
            hi = [i + h if not i & h else lanes + i for i in range(lanes)]
            for r in range(lanes):
                if r & h:
                    continue
                a, b = rows[r], rows[r + h]
                rows[r] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, lanes), lo))
                rows[r + h] = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, lanes), hi))
            h *= 2
        out = vb.at(vb.data(5), vb.int64(6))
        for q in range(lanes):
            with builder.if_then(builder.icmp_signed("<", vb.const(q), ncols_)):
                vb.store(rows[q], vb.at(out, builder.mul(vb.const(q), dcs_)))
        return context.get_dummy_value()

    return sig, codegen
