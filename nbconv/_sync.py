"""Atomics and spin-waits for the kernels that share their chunks with nbconv's helper threads.

A forward kernel runs on the calling thread and on :mod:`nbconv._threads`'
helpers at once: each participant claims chunks of work from a per-call
counter array (``sched``) until none is left, so a helper that joins late
leaves its share to the others (:func:`claim`).  Kernels with two phases
(the fused kernel's shared mode) wait for every chunk of the first before
starting the second (:func:`wait_at_least`).  The calling thread leads:
entering its kernel it bumps the pool's generation counter (``sig[0]``),
which spinning helpers watch, and leaving it waits until every participant
has left (:func:`leave`), so no helper still writes once the call returns.

``sched`` slots: ``[PHASE1]`` next chunk of phase 1, ``[PHASE1_DONE]`` its
chunks completed, ``[PHASE2]``/``[PHASE2_DONE]`` the same for phase 2 (or
the only phase), ``[ACTIVE]`` participants inside the kernel.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import jit
from ._runtime import sched_yield
from ._simd import _X86

__all__ = ["PHASE1", "PHASE1_DONE", "PHASE2", "PHASE2_DONE", "ACTIVE", "SCHED_SIZE", "HELPER", "LEAD", "LEAD_BUMPED",
           "new_sched", "atomic_add", "atomic_load", "pause", "cycles", "now", "cycles_per_ms", "enter", "claim",
           "done", "wait_at_least", "leave", "wait_change"]

PHASE1, PHASE1_DONE, PHASE2, PHASE2_DONE, ACTIVE = 0, 1, 2, 3, 4
SCHED_SIZE = 8
#: the ``lead`` argument of the kernels: a helper (0), the calling thread (``LEAD``: it wakes the spinning
#: helpers as it enters), or the calling thread once the pool has woken them itself (``LEAD_BUMPED``)
HELPER, LEAD, LEAD_BUMPED = 0, 1, 2


def new_sched():
    """A fresh per-call ``sched`` array (int64 zeros)."""
    return np.zeros(SCHED_SIZE, np.int64)


def _slot(context, builder, signature, args):
    arr = context.make_array(signature.args[0])(context, builder, args[0])
    return builder.gep(arr.data, [args[1]])


@intrinsic
def atomic_add(typingctx, arr, idx, val):
    """``arr[idx] += val`` atomically (sequentially consistent); returns the old value.  ``arr`` is int64."""
    sig = types.int64(arr, idx, val)

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", _slot(context, builder, signature, args), args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]``, read atomically (sequentially consistent): what another thread stored last."""
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(context, builder, signature, args), "seq_cst", 8)

    return sig, codegen


@intrinsic
def pause(typingctx):
    """A spin-wait hint (x86 ``pause``; nothing elsewhere): the core idles a few cycles, its sibling runs."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle counter (``rdtsc`` on x86): a clock for spin deadlines, without a system call."""
    sig = types.int64()

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.readcyclecounter", fnty=ir.FunctionType(ir.IntType(64), []))
        return builder.call(fn, [])

    return sig, codegen


@jit
def enter(sched, sig, lead):
    """A participant enters a kernel; the leader (``LEAD``) first wakes the spinning helpers (``sig[0] += 1``)."""
    if lead == 1:
        atomic_add(sig, 0, 1)
    atomic_add(sched, ACTIVE, 1)


@jit
def claim(sched, slot, n):
    """The next unclaimed chunk of ``n`` counted in ``sched[slot]``, or -1 when all are taken."""
    c = atomic_add(sched, slot, 1)
    return c if c < n else -1


@jit
def done(sched, slot):
    """Count one completed chunk in ``sched[slot]``."""
    atomic_add(sched, slot, 1)


@jit
def wait_at_least(sched, slot, target):
    """Spin until ``sched[slot] >= target`` (every chunk of a phase is done, whoever ran it)."""
    while atomic_load(sched, slot) < target:
        pause()


@jit
def leave(sched, lead):
    """A participant leaves; the leader waits until every other one has left (their results are written)."""
    atomic_add(sched, ACTIVE, -1)
    if lead:
        while atomic_load(sched, ACTIVE) != 0:
            pause()


@jit
def wait_change(sig, seen, deadline):
    """Spin until ``sig[0] != seen`` or the cycle counter passes ``deadline``; returns ``sig[0]``.

    The spin yields the core every few microseconds (``sched_yield``), so a
    thread of the framework around nbconv that wants it gets it at once.
    """
    k = 0
    while True:
        v = atomic_load(sig, 0)
        if v != seen:
            return v
        pause()
        k += 1
        if (k & 255) == 0:
            if cycles() > deadline:
                return v
            sched_yield()


@jit
def now():
    """:func:`cycles`, callable from Python."""
    return cycles()


def cycles_per_ms():
    """Cycle-counter ticks per millisecond, measured once against the wall clock (about 5 ms)."""
    import time

    now()  # loaded (or compiled) before the clock starts
    t0, c0 = time.perf_counter(), now()
    time.sleep(0.005)
    t1, c1 = time.perf_counter(), now()
    return max(1.0, (c1 - c0) / ((t1 - t0) * 1e3))
