"""Explicit vector code for the micro-kernels: LLVM IR emitted through Numba intrinsics.

Numba's loop vectoriser cannot keep a block of results in registers across
an inner loop, because it cannot prove that the stores to the output do not
alias the loads of the operands.  The micro-kernels (:mod:`nbconv._gemm`,
:mod:`nbconv._depthwise`) are therefore written as LLVM IR with explicit
``<lanes x float>`` values; LLVM compiles them for the host CPU.  This module
holds what they share: the vector width of the host, and a small builder of
vector operations (loads and stores, masked for partial vectors, FMA, splat,
the fused activations).

bfloat16 is a storage format here: arrays of it reach the kernels as
``uint16`` (its bits), vectors are widened to float32 as they are loaded and
rounded back (to nearest, ties to even) as they are stored, so every
micro-kernel computes in float32 whatever it reads or writes.  Only the
pointwise product multiplies bfloat16 pairs (:meth:`VectorBuilder.dot_pairs`:
AVX512_BF16's ``VDPBF16PS``, or the same sums by FMAs elsewhere).
"""
import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._elementwise import RELU, RELU6


def _has(feature):
    try:
        return f"+{feature}" in llvm.get_host_cpu_features().flatten().split(",")
    except RuntimeError:  # a CPU LLVM does not know: assume the smaller registers
        return False


#: the host is x86 (:func:`store_fence` emits ``sfence`` there, a full fence elsewhere)
_X86 = llvm.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686")
#: AVX-512 (32 vector registers) on the host
AVX512 = _has("avx512f")
#: bytes of one vector register: AVX-512 or AVX2
VECTOR_BYTES = 64 if AVX512 else 32
#: ``NBCONV_BF16=emulate`` computes the bfloat16 products by FMAs on a CPU that has VDPBF16PS (the tests of the
#: other path); it changes the machine code, so :mod:`nbconv._cache` keys the cache on it (``CODEGEN_ENV``)
BF16_ENV = "NBCONV_BF16"
_BF16_MODES = ("auto", "emulate")
_bf16_mode = os.environ.get(BF16_ENV) or "auto"
if _bf16_mode not in _BF16_MODES:
    raise ValueError(f"Expected the environment variable {BF16_ENV} to be one of {_BF16_MODES}. "
                     f"Received: {_bf16_mode!r}")
#: bfloat16 pair products by AVX512_BF16's VDPBF16PS (else by FMAs on the widened halves: the same sums,
#: except that VDPBF16PS reads denormal inputs as zero and flushes denormal results), and bfloat16 results
#: rounded by VCVTNEPS2BF16 (which flushes denormal results too)
NATIVE_BF16 = AVX512 and _has("avx512bf16") and _bf16_mode == "auto"


def lanes_of(dtype):
    """Elements of ``dtype`` (a NumPy or Numba float type) in one vector register."""
    bits = getattr(dtype, "bitwidth", None) or np.dtype(dtype).itemsize * 8
    return VECTOR_BYTES * 8 // bits


I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)


class _BFloat(ir.types._BaseFloatType):
    """LLVM's ``bfloat`` type, which llvmlite lacks; only ever the target of a bitcast (VDPBF16PS's operands)."""

    null = "0.0"
    intrinsic_name = "bf16"

    def __str__(self):
        return "bfloat"

    def format_constant(self, value):
        raise NotImplementedError("bfloat constants are never emitted")


_BFloat._create_instance()
BFLOAT = _BFloat()


def compute_type(dtype):
    """The Numba type a micro-kernel computes in for arrays of ``dtype``: float32 for bfloat16 bits (uint16)."""
    return types.float32 if dtype == types.uint16 else dtype


class VectorBuilder:
    """Vector operations on one intrinsic's arguments (``context``, ``builder``, ``signature``, ``args``)."""

    def __init__(self, context, builder, signature, args, dtype):
        self.context, self.builder, self.signature, self.args = context, builder, signature, args
        dtype = compute_type(dtype)
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
        self.hvty = ir.VectorType(I16, self.lanes)

    # --- bfloat16 storage -----------------------------------------------------------------------------------

    @staticmethod
    def is_bf16(ptr):
        """Whether element pointer ``ptr`` points into a bfloat16 array (``uint16`` bits)."""
        return getattr(ptr.type, "pointee", None) == I16

    def widen(self, h):
        """float32 vector (or scalar) of the bfloat16 bits ``h`` (i16 elements): exact."""
        b = self.builder
        wide = ir.VectorType(I32, h.type.count) if isinstance(h.type, ir.VectorType) else I32
        fty = ir.VectorType(ir.FloatType(), h.type.count) if isinstance(h.type, ir.VectorType) else ir.FloatType()
        return b.bitcast(b.shl(b.zext(h, wide), self._i32s(wide, 16)), fty)

    def round_bf16(self, v):
        """bfloat16 bits (i16 elements) of float32 ``v``: round to nearest, ties to even; NaN stays a (quiet) NaN.

        Integer arithmetic, so every CPU rounds operands alike (AVX512_BF16's
        ``VCVTNEPS2BF16`` would also flush denormals; :meth:`round_result` uses it for results).
        """
        b = self.builder
        vector = isinstance(v.type, ir.VectorType)
        wide = ir.VectorType(I32, v.type.count) if vector else I32
        narrow = ir.VectorType(I16, v.type.count) if vector else I16
        bits = b.bitcast(v, wide)
        odd = b.and_(b.lshr(bits, self._i32s(wide, 16)), self._i32s(wide, 1))
        rounded = b.add(bits, b.add(odd, self._i32s(wide, 0x7FFF)))
        nan = b.icmp_unsigned(">", b.and_(bits, self._i32s(wide, 0x7FFFFFFF)), self._i32s(wide, 0x7F800000))
        quiet = b.or_(bits, self._i32s(wide, 0x400000))
        return b.trunc(b.lshr(b.select(nan, quiet, rounded), self._i32s(wide, 16)), narrow)

    def round_result(self, v):
        """bfloat16 bits (i16 elements) of a computed float32 result ``v``: ``VCVTNEPS2BF16`` where
        :data:`NATIVE_BF16` (one instruction where :meth:`round_bf16` takes eight; it also flushes results below
        2^-126 to zero, as VDPBF16PS does its products' inputs), else :meth:`round_bf16`.

        For what the kernels compute (their stored results); casts and copies of operands round with
        :meth:`round_bf16`, so the values a call computes on match NumPy's casts on every CPU.
        """
        count = v.type.count if isinstance(v.type, ir.VectorType) else 0
        if not NATIVE_BF16 or count not in (8, 16):
            return self.round_bf16(v)
        b = self.builder
        fn = cgutils.get_or_insert_function(b.module, ir.FunctionType(ir.VectorType(BFLOAT, count), [v.type]),
                                            f"llvm.x86.avx512bf16.cvtneps2bf16.{32 * count}")
        return b.bitcast(b.call(fn, [v]), ir.VectorType(I16, count))

    @staticmethod
    def _i32s(ty, value):
        return ir.Constant(ty, [value] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, value)

    def _masked_half(self, name, count):
        ty = ir.VectorType(I16, count)
        i1v = ir.VectorType(ir.IntType(1), count)
        if name == "load":
            fnty = ir.FunctionType(ty, [ty.as_pointer(), I32, i1v, ty])
        else:
            fnty = ir.FunctionType(ir.VoidType(), [ty, ty.as_pointer(), I32, i1v])
        return cgutils.get_or_insert_function(self.builder.module, fnty, f"llvm.masked.{name}.v{count}i16.p0")

    def load_bits(self, ptr, mask=None):
        """The ``lanes`` bfloat16 bit patterns at ``ptr`` (i16 vector; masked-off lanes read 0, touch no memory)."""
        vp = self.builder.bitcast(ptr, self.hvty.as_pointer())
        if mask is None:
            return self.builder.load(vp, align=2)
        return self.builder.call(self._masked_half("load", self.lanes),
                                 [vp, ir.Constant(I32, 2), mask, ir.Constant(self.hvty, [0] * self.lanes)])

    def _store_bits(self, h, ptr, mask=None):
        vp = self.builder.bitcast(ptr, h.type.as_pointer())
        if mask is None:
            self.builder.store(h, vp, align=2)
        else:
            self.builder.call(self._masked_half("store", h.type.count), [h, vp, ir.Constant(I32, 2), mask])

    def dot_pairs(self, acc, a, b):
        """``acc[i] + a[2i]*b[2i] + a[2i+1]*b[2i+1]`` for float32 ``acc`` and bfloat16 pairs ``a``, ``b`` (i16 vectors
        of twice ``acc``'s lanes): ``VDPBF16PS`` (:data:`NATIVE_BF16`), or two FMAs on the widened halves."""
        bld = self.builder
        if NATIVE_BF16:
            pty = ir.VectorType(BFLOAT, 2 * self.lanes)
            fn = cgutils.get_or_insert_function(bld.module, ir.FunctionType(self.vty, [self.vty, pty, pty]),
                                                f"llvm.x86.avx512bf16.dpbf16ps.{32 * self.lanes}")
            return bld.call(fn, [acc, bld.bitcast(a, pty), bld.bitcast(b, pty)])
        wide = ir.VectorType(I32, self.lanes)
        high = self._i32s(wide, -65536)

        def halves(v):
            w = bld.bitcast(v, wide)
            return bld.bitcast(bld.shl(w, self._i32s(wide, 16)), self.vty), bld.bitcast(bld.and_(w, high), self.vty)

        (a0, a1), (b0, b1) = halves(a), halves(b)
        return self.fma(a0, b0, self.fma(a1, b1, acc))

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
        """Vector at element pointer ``ptr``; with a mask, masked-off lanes read as 0 and touch no memory.

        bfloat16 elements (``uint16``) are widened to float32."""
        if self.is_bf16(ptr):
            return self.widen(self.load_bits(ptr, mask))
        vp = self.builder.bitcast(ptr, self.vptr)
        if mask is None:
            return self.builder.load(vp, align=self._align.constant)
        return self.builder.call(self._mload, [vp, self._align, mask, self.zero])

    def store(self, value, ptr, mask=None, result=False):
        """Store vector ``value`` at element pointer ``ptr`` (rounded to bfloat16 for ``uint16`` elements: by
        :meth:`round_result` if ``value`` is a kernel's ``result``, else by :meth:`round_bf16`)."""
        if self.is_bf16(ptr):
            self._store_bits(self.round_result(value) if result else self.round_bf16(value), ptr, mask)
            return
        vp = self.builder.bitcast(ptr, self.vptr)
        if mask is None:
            self.builder.store(value, vp, align=self._align.constant)
        else:
            self.builder.call(self._mstore, [value, vp, self._align, mask])

    def store_stream(self, value, ptr):
        """Store a whole vector at element pointer ``ptr``, non-temporally where ``ptr`` is aligned to the vector
        (a kernel's result: bfloat16 elements rounded by :meth:`round_result`).

        A non-temporal store bypasses the caches and skips reading the line
        first; only an aligned vector can be stored so (x86 ``vmovntps``), an
        unaligned one is stored normally.  See :func:`store_fence`.
        """
        b = self.builder
        if self.is_bf16(ptr):
            value = self.round_result(value)
        size = value.type.count * (2 if self.is_bf16(ptr) else self._align.constant)
        vp = b.bitcast(ptr, value.type.as_pointer())
        aligned = b.icmp_unsigned("==", b.and_(b.ptrtoint(ptr, I64), self.const(size - 1)), self.const(0))
        with b.if_else(aligned) as (then, otherwise):
            with then:
                st = b.store(value, vp, align=size)
                st.set_metadata("nontemporal", b.module.add_metadata([ir.Constant(I32, 1)]))
            with otherwise:
                b.store(value, vp, align=2 if self.is_bf16(ptr) else self._align.constant)

    def store_narrow(self, value, ptr, mask=None):
        """Store a kernel's result, a vector of any width (``value``'s own), at element pointer ``ptr``, lanes off in
        ``mask`` untouched (bfloat16 elements rounded by :meth:`round_result`)."""
        if self.is_bf16(ptr):
            self._store_bits(self.round_result(value), ptr, mask)
            return
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
        """Scalar at element pointer ``ptr`` broadcast to every lane (a bfloat16 one widened)."""
        s = self.builder.load(ptr)
        if self.is_bf16(ptr):
            s = self.widen(s)
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
    """``dst[doff : doff+lanes] = src[soff : soff+n]`` then zeros (``n <= lanes``; masked, reads only ``n``);
    bfloat16 bits (``uint16``) to bits are copied as they are, to or from float32 widened or rounded."""
    sig = types.void(src, soff, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        sp, dp, mask = vb.at(vb.data(0), vb.int64(1)), vb.at(vb.data(2), vb.int64(3)), vb.mask(vb.int64(4))
        if vb.is_bf16(sp) and vb.is_bf16(dp):
            vb._store_bits(vb.load_bits(sp, mask), dp)
        else:
            vb.store(vb.load(sp, mask), dp)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_result_vector(typingctx, src, soff, dst, doff, n):
    """:func:`convert_vector` for a kernel's float32 result: bfloat16 bits rounded by
    :meth:`VectorBuilder.round_result` (one instruction where the CPU has AVX512_BF16)."""
    sig = types.void(src, soff, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        mask = vb.mask(vb.int64(4))
        vb.store(vb.load(vb.at(vb.data(0), vb.int64(1)), mask), vb.at(vb.data(2), vb.int64(3)), mask, result=True)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def convert_vector(typingctx, src, soff, dst, doff, n):
    """``dst[doff + j] = src[soff + j]`` for ``j < n <= lanes``, converting between float32 and bfloat16 bits
    (``uint16``, rounded to nearest even); masked, nothing past ``n`` is read or written."""
    sig = types.void(src, soff, dst, doff, n)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[0].dtype)
        mask = vb.mask(vb.int64(4))
        vb.store(vb.load(vb.at(vb.data(0), vb.int64(1)), mask), vb.at(vb.data(2), vb.int64(3)), mask)
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
        sptr = vb.at(vb.data(0), vb.int64(1))
        base = builder.ptrtoint(sptr, I64)
        bvec = builder.shuffle_vector(
            builder.insert_element(ir.Constant(i64v, ir.Undefined), base, ir.Constant(I32, 0)),
            ir.Constant(i64v, ir.Undefined), vb._splat)
        ety = sptr.type.pointee
        size = ir.Constant(i64v, [signature.args[0].dtype.bitwidth // 8] * lanes)
        pty = ir.VectorType(ety.as_pointer(), lanes)
        vty = ir.VectorType(ety, lanes)
        ptrs = builder.inttoptr(builder.add(bvec, builder.mul(ivec, size)), pty)
        suffix = f"v{lanes}{ety.intrinsic_name}"
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vty, [pty, I32, mask.type, vty]), f"llvm.masked.gather.{suffix}.v{lanes}p0")
        value = builder.call(gather, [ptrs, ir.Constant(I32, signature.args[0].dtype.bitwidth // 8), mask,
                                      ir.Constant(vty, [0] * lanes) if ety == I16 else vb.zero])
        dp = vb.at(vb.data(4), vb.int64(5))
        if ety == I16 and vb.is_bf16(dp):
            vb._store_bits(value, dp)
        else:
            vb.store(vb.widen(value) if ety == I16 else value, dp)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def copy_scalar(typingctx, src, soff, dst, doff):
    """``dst[doff] = src[soff]``, widening or rounding bfloat16 (``uint16``) elements as either side needs."""
    sig = types.void(src, soff, dst, doff)

    def codegen(context, builder, signature, args):
        vb = VectorBuilder(context, builder, signature, args, signature.args[2].dtype)
        sp, dp = vb.at(vb.data(0), vb.int64(1)), vb.at(vb.data(2), vb.int64(3))
        value = builder.load(sp)
        if vb.is_bf16(sp) and not vb.is_bf16(dp):
            value = vb.widen(value)
        elif vb.is_bf16(dp) and not vb.is_bf16(sp):
            value = vb.round_bf16(value)
        builder.store(value, dp)
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
