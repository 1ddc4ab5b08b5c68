"""Atomics and spin-waits for the kernels that share their chunks with nbconv's helper threads.

A parallel kernel runs on the calling thread and on :mod:`nbconv._threads`'
helpers at once: each participant claims chunks of work from a per-call
counter array (``sched``) until none is left (:func:`claim`).  Participant
``p`` of ``P`` owns the ``p``-th contiguous ``1/P`` of the chunks (as a
static split would give it: neighbouring chunks share input rows and
prefetch streams) and, once through them, takes what is left of the others'
shares, so a helper that joins late leaves its share to the others.  Kernels with two phases
(the fused kernel's shared mode) wait for every chunk of the first before
starting the second (:func:`wait_at_least`).  The calling thread leads:
entering its kernel it bumps the pool's generation counter (``sig[0]``),
which spinning helpers watch, and leaving it waits until every participant
has left (:func:`leave`), so no helper still writes once the call returns.
A helper leaving a kernel spins there, without the GIL, until the next
call's generation or its spin deadline: back in Python at once, it would
take the GIL just as the leader returns, and a thread blocked on the GIL
wakes 10-40 us later.

Past its spin window a helper sleeps, on Linux in a futex on ``sig[BELL]``
(:func:`helper_wait`, :func:`ring`): a leader that finds sleepers rings it
as it enters its kernel, with no Python involved, so a call from a thread
that does not hold the GIL (an XLA custom call, :mod:`nbconv._native`) wakes
them as well.  Such a call publishes a *native job*: the address of a
compiled ``void run(int64 *mailbox, int64 lead)`` and its arguments in the
pool's mailbox (``sig[MBOX]``), marked by ``sig[NATIVE]`` holding the call's
generation; the helpers run it without returning to Python.

``sched`` slots: ``[ACTIVE]`` participants inside the kernel, ``[GEN]`` the
call's generation, ``[PARTS]`` the participants ``P``, ``[PHASE1_DONE]``
chunks of phase 1 completed, then per phase (``PHASE1``, ``PHASE2``: the
only phase of a one-phase kernel) ``P`` counters, one per share.  ``sig``
slots: ``[0]`` the generation of the last call, ``[SPIN]`` how long helpers
spin, in cycle-counter ticks, ``[JOINING]`` the participants of the last
call (a helper of a higher index keeps spinning without the GIL),
``[SPIN_NATIVE]`` the (shorter) spin window after a framework's native job,
``[AFTER_JOB]`` the window after the last native job (``[SPIN]`` for a call
replayed from Python, :mod:`nbconv._replay`; else ``[SPIN_NATIVE]``),
``[SLEEPERS]`` helpers in the futex, ``[BELL]`` the futex word,
``[BUSY]`` 1 while a call uses the helpers, ``[NATIVE]`` the generation of
the last native job (-1 while a leader rewrites the mailbox), ``[MBOX]`` the
mailbox's address, ``[JOBFN]`` the native job's function, ``[INJOB]``
helpers inside (or about to enter) a native job: the mailbox, and the
``sched`` inside it, are rewritten only once none is; ``[NONCE_SLOT]`` the
process's nonce.  A helper runs a
native job as ``SOLO`` (with its index), so it neither waits for the others
nor spins inside it.  A kernel's ``lead`` argument is its
participant's role (the low two bits: ``HELPER``, ``LEAD``, ``LEAD_BUMPED``,
``SOLO``) and index (the bits above: 0 for the calling thread).
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._jit import jit
from ._runtime import SYS_FUTEX, sched_yield, syscall
from ._simd import _X86

__all__ = ["ACTIVE", "GEN", "PARTS", "PHASE1_DONE", "PHASE1", "PHASE2", "SPIN", "HELPER", "LEAD", "LEAD_BUMPED",
           "SOLO", "helper_lead", "new_sched", "atomic_add", "atomic_load", "pause", "cycles", "now", "cycles_per_ms",
           "enter", "claim", "done", "wait_at_least", "leave", "wait_change", "JOINING", "SLEEPERS", "BELL", "BUSY",
           "NATIVE", "MBOX", "JOBFN", "INJOB", "SPIN_NATIVE", "AFTER_JOB", "SIG_SLOTS", "NONCE_SLOT", "atomic_store",
           "NATIVE_SLEEP", "atomic_cas", "call_job", "ring", "try_lock", "unlock", "helper_wait"]

ACTIVE, GEN, PARTS, PHASE1_DONE = 0, 1, 2, 3
_COUNTERS = 4
#: the phases of :func:`claim`
PHASE1, PHASE2 = 0, 1
SPIN, JOINING, SLEEPERS, BELL, BUSY, NATIVE, MBOX, JOBFN, INJOB, SPIN_NATIVE = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
AFTER_JOB = 11
#: the length of the pool's ``sig`` array
SIG_SLOTS = 16
#: the process's nonce (nbconv._native: templates of another process are refused)
NONCE_SLOT = SIG_SLOTS - 1
#: whether helpers sleep in a futex (Linux), woken by any leader; elsewhere on a Python condition
NATIVE_SLEEP = SYS_FUTEX != 0
_FUTEX_WAIT_PRIVATE, _FUTEX_WAKE_PRIVATE = 128, 129
#: roles (``lead & 3``): a helper, the calling thread (``LEAD``: it wakes the spinning helpers as it enters),
#: the calling thread once the pool has woken them itself (``LEAD_BUMPED``), or a call that runs alone (``SOLO``)
HELPER, LEAD, LEAD_BUMPED, SOLO = 0, 1, 2, 3


def helper_lead(index):
    """The ``lead`` argument of participant ``index`` (1, 2, ...: the helpers)."""
    return HELPER | (index << 2)


def new_sched(parts):
    """A fresh per-call ``sched`` array for ``parts`` participants."""
    sched = np.zeros(_COUNTERS + 2 * parts, np.int64)
    sched[PARTS] = parts
    return sched


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
def atomic_cas(typingctx, arr, idx, expected, new):
    """``arr[idx] = new`` if it holds ``expected`` (atomically, sequentially consistent); returns the old value."""
    sig = types.int64(arr, idx, expected, new)

    def codegen(context, builder, signature, args):
        pair = builder.cmpxchg(_slot(context, builder, signature, args), args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return sig, codegen


@intrinsic
def call_job(typingctx, fn, mailbox, lead):
    """Call the native job ``void fn(int64 *mailbox, int64 lead)`` (addresses as int64)."""
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i64.as_pointer(), i64])
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), [builder.inttoptr(args[1], i64.as_pointer()),
                                                                     args[2]])
        return context.get_dummy_value()

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
def atomic_store(arr, idx, val):
    """``arr[idx] = val``, sequentially consistent (the stores before it are seen first)."""
    while True:
        old = atomic_load(arr, idx)
        if atomic_cas(arr, idx, old, val) == old:
            return


@jit
def _futex(sig, slot, op, val):
    if NATIVE_SLEEP:
        syscall(SYS_FUTEX, np.int64(sig.ctypes.data) + 8 * slot, op, val, 0)


@jit
def ring(sig):
    """Wake the helpers asleep in the futex (they spin for the call on its way)."""
    atomic_add(sig, BELL, 1)
    _futex(sig, BELL, _FUTEX_WAKE_PRIVATE, 0x7FFFFFFF)


@jit
def try_lock(sig):
    """Take the helpers for one call (``sig[BUSY]``); False if another call has them."""
    return atomic_cas(sig, BUSY, 0, 1) == 0


@jit
def unlock(sig):
    atomic_cas(sig, BUSY, 1, 0)


@jit
def enter(sched, sig, lead):
    """A participant enters a kernel; the leader (``LEAD``) first wakes the spinning helpers (``sig[0] += 1``)
    and rings for the sleeping ones."""
    if (lead & 3) == LEAD:
        atomic_add(sig, 0, 1)
        if atomic_load(sig, SLEEPERS) > 0:
            ring(sig)
    atomic_add(sched, ACTIVE, 1)


@jit
def claim(sched, phase, n, lead):
    """The next unclaimed chunk of the ``n`` of ``phase``: from this participant's own share first, then from
    the others' (module notes); -1 when all are taken."""
    parts = sched[PARTS]
    base = _COUNTERS + phase * parts
    for k in range(parts):
        r = ((lead >> 2) + k) % parts
        lo = r * n // parts
        c = lo + atomic_add(sched, base + r, 1)
        if c < (r + 1) * n // parts:
            return c
    return -1


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
def leave(sched, sig, lead):
    """A participant leaves.  The leader waits until every other one has left (their results are written); a
    helper spins for the next call (or its spin deadline) before it returns to Python (the module notes)."""
    atomic_add(sched, ACTIVE, -1)
    role = lead & 3
    if role == LEAD or role == LEAD_BUMPED:
        while atomic_load(sched, ACTIVE) != 0:
            pause()
    elif role == HELPER:
        wait_change(sig, sched[GEN], cycles() + sig[SPIN], lead >> 2)


@jit
def wait_change(sig, seen, deadline, index):
    """Spin until a call other than ``seen`` that participant ``index`` joins is published (``sig[0] != seen``
    and ``index < sig[JOINING]``), or the cycle counter passes ``deadline``; returns ``sig[0]``.

    The spin yields the core every few microseconds (``sched_yield``), so a
    thread of the framework around nbconv that wants it gets it at once.
    """
    k = 0
    while True:
        v = atomic_load(sig, 0)
        if v != seen and index < atomic_load(sig, JOINING):
            return v
        pause()
        k += 1
        if (k & 255) == 0:
            if cycles() > deadline:
                return v
            sched_yield()


@jit
def helper_wait(sig, seen, spun, index):
    """Helper ``index``'s wait for its next Python call after the call ``seen``: spins for the spin window (not
    again if ``spun``: the last kernel's :func:`leave` did), sleeps in the futex, runs native jobs on the way.

    After a native job it spins ``sig[AFTER_JOB]`` cycles: after a framework's
    only ``sig[SPIN_NATIVE]`` (for the framework's next call of ours in a
    row), since the framework that called it (XLA, TensorFlow) runs its own
    ops next, on its own threads, and a helper spinning beside them for the
    whole window slowed converted models by 5-20 %; after a call replayed
    from Python the whole window, as after any Python call.

    Returns the generation of a call for this helper that is not a native
    job (its kernel and arguments are in Python), or -1 where helpers sleep
    on a Python condition (no futex) and the spin window has passed.
    """
    window = sig[SPIN]
    while True:
        if spun:
            gen = atomic_load(sig, 0)
        else:
            gen = wait_change(sig, seen, cycles() + window, index)
        spun = False
        window = sig[SPIN]
        if gen != seen and index < atomic_load(sig, JOINING):
            seen = gen
            if atomic_load(sig, NATIVE) != gen:
                return gen
            # counted first, then checked again: a leader that marks the mailbox stale (NATIVE = -1) before
            # waiting for INJOB == 0 either sees this helper or is seen by it
            atomic_add(sig, INJOB, 1)
            if atomic_load(sig, NATIVE) == gen and atomic_load(sig, 0) == gen:
                call_job(atomic_load(sig, JOBFN), atomic_load(sig, MBOX), SOLO | (index << 2))
            atomic_add(sig, INJOB, -1)
            window = sig[AFTER_JOB]
            continue
        if not NATIVE_SLEEP:
            return -1
        bell = atomic_load(sig, BELL)
        atomic_add(sig, SLEEPERS, 1)
        # a leader publishes its call and then counts sleepers; this helper counted itself before looking
        gen = atomic_load(sig, 0)
        if not (gen != seen and index < atomic_load(sig, JOINING)):
            _futex(sig, BELL, _FUTEX_WAIT_PRIVATE, bell & 0xFFFFFFFF)
        atomic_add(sig, SLEEPERS, -1)


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
