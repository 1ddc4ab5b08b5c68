"""Thread control: how many threads nbconv's kernels use, and the helper threads of the forward kernels."""
import contextlib
import numbers
import os
import threading

import numba
import numpy as np

from . import _compile
from ._sync import (AFTER_JOB, BUSY, GEN, JOINING, LEAD, LEAD_BUMPED, MBOX, NATIVE_SLEEP, NONCE_SLOT, SIG_SLOTS,
                    SLEEPERS, SOLO, SPIN, SPIN_NATIVE, cycles_per_ms, helper_lead, helper_wait, new_sched, now, ring,
                    try_lock, unlock)

__all__ = ["get_num_threads", "set_num_threads", "num_threads", "planning_threads", "POOL", "SPIN_ENV", "launch"]


def get_num_threads():
    """Return the number of threads the kernels use in the calling thread."""
    return numba.get_num_threads()


def set_num_threads(n):
    """Set the number of threads the kernels use (in the calling Python thread).

    Parameters
    ----------
    n : int
        Between 1 and ``numba.config.NUMBA_NUM_THREADS`` (the size of the pool,
        by default the number of cores).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= limit:
        raise ValueError(
            f"Expected `n` to be an int between 1 and {limit} (the size of Numba's thread pool). "
            f"Received: n={n!r}"
        )
    numba.set_num_threads(int(n))


@contextlib.contextmanager
def num_threads(n):
    """Context manager running the enclosed calls on ``n`` threads.

    The previous setting is restored on exit, also when the block raises.

    Examples
    --------
    >>> with nbconv.num_threads(1):
    ...     y = nbconv.separable_conv2d(x, dk, pk)
    """
    previous = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def planning_threads():
    """Thread count that work is split for: the size of Numba's pool, not the current setting.

    Tiling from the pool size keeps every result bit-identical whatever
    ``set_num_threads`` says (BLAS sums each tile in an order fixed by its
    shape); a smaller setting just runs the same tasks on fewer threads.
    """
    return numba.config.NUMBA_NUM_THREADS


# --- the helper threads of the kernels --------------------------------------------------------------------

#: environment variable: milliseconds a helper keeps spinning for the next call before it sleeps
SPIN_ENV = "NBCONV_SPIN_MS"
#: default of :data:`SPIN_ENV`: longer than the gaps between a model's layers or a server's requests (5-20 ms),
#: short enough that an idle process stops using the cores
DEFAULT_SPIN_MS = 25.0


def _spin_ms():
    value = os.environ.get(SPIN_ENV)
    if value in (None, ""):
        return DEFAULT_SPIN_MS
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0 <= ms <= 1000:
        raise ValueError(f"Expected the environment variable {SPIN_ENV} to be a number of milliseconds from 0 to "
                         f"1000. Received: {value!r}")
    return ms


#: :data:`SPIN_ENV`, read (and checked) at import
SPIN_MS = _spin_ms()
#: the spin window after a native job (nbconv._native: called by XLA or TensorFlow, whose own ops, on their own
#: threads, come next; a helper spinning beside them for SPIN_MS slowed converted models by 5-20 %): long enough
#: for the framework's next call of ours in a row
NATIVE_SPIN_MS = 0.05


class _Pool:
    """Threads that share the kernels' chunks with the calling thread, and keep spinning between calls.

    Numba's TBB layer makes a task arena per parallel launch, and after a
    few milliseconds without work its worker sleeps: it then joined a call
    50-300 us late, or not at all (two threads ran like one after 5 ms or
    more idle).  These helpers instead spin for :data:`SPIN_ENV` ms after
    each call (yielding the core to any other thread that wants it), then
    sleep until a call wakes them (:func:`nbconv._sync.helper_wait`: on Linux
    in a futex that any leader rings, also one that calls from outside
    Python, :mod:`nbconv._native`).  A call publishes its kernel and arguments
    and runs them itself as the leader; every participant claims chunks of
    the work from the call's own counters (:mod:`nbconv._sync`), so a helper
    that is late or absent leaves its share to the others.  One call at a
    time uses the helpers: a concurrent call from another Python thread runs
    on its own thread alone.  Nothing survives ``fork()``: a child starts its
    own helpers on its first call.  Measurements: docs/tuning.md, "Helper
    threads".
    """

    #: int64 slots of the mailbox where a native job's arguments go (:mod:`nbconv._native`)
    MAILBOX_SLOTS = 1024

    def __init__(self):
        # one sig and mailbox for the process's lifetime: compiled native calls hold their addresses
        self.sig = np.zeros(SIG_SLOTS, np.int64)  # [0]: the generation of the last published call
        self.mailbox = np.zeros(self.MAILBOX_SLOTS, np.int64)
        self._reset()

    def _reset(self):
        # also the child's state after fork(): the helpers did not survive it, and a lock may have been held
        self._cv = threading.Condition()
        nonce = int(self.sig[NONCE_SLOT])  # the process's templates (nbconv._native) stay valid after fork()
        self.sig[:] = 0
        self.sig[MBOX] = self.mailbox.ctypes.data
        self.sig[NONCE_SLOT] = nonce
        self._job = None
        self._threads = []
        self._ready = False  # the pool's own compiled functions are loaded (nbconv._compile.companions_ready)
        self._sleepers = 0
        self._wakes = 0
        self._pid = None

    def _start(self, helpers):
        self._pid = os.getpid()
        self._threads = []
        for i in range(helpers):
            t = threading.Thread(target=self._helper, args=(i,), name=f"nbconv-helper-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def _helper(self, index):
        pid = self._pid
        per_ms = cycles_per_ms()  # measured here, not in the call that started the helpers
        spin = int(SPIN_MS * per_ms)
        self.sig[SPIN] = spin
        self.sig[SPIN_NATIVE] = self.sig[AFTER_JOB] = min(spin, int(NATIVE_SPIN_MS * per_ms))
        seen = int(self.sig[0])
        spun = False  # the spin window after the last job has passed (inside its kernel)
        while pid == os.getpid():
            gen = helper_wait(self.sig, seen, spun, index + 1)
            spun = False
            if gen < 0:  # no futex here: sleep on the condition
                with self._cv:
                    self._sleepers += 1
                    wakes = self._wakes
                    while self._wakes == wakes and not (int(self.sig[0]) != seen
                                                        and index + 1 < int(self.sig[JOINING])):
                        self._cv.wait()
                    self._sleepers -= 1
                continue  # spin for the call on its way (or run the one that woke it)
            seen = gen
            job = self._job
            if job is None or job[0] != gen or index >= job[1]:
                continue
            try:
                # returns once the next call is published or the spin window has passed (_sync.leave)
                job[2](*job[3], helper_lead(index + 1))
            except Exception:  # noqa: BLE001  (the leader runs the same call and raises it)
                pass
            job = None
            spun = True

    def wake(self):
        """Wake sleeping helpers as a call begins, so they spin by the time its kernel starts (a wake-up
        takes 10-40 us, about what the call's argument checks take)."""
        if NATIVE_SLEEP:
            if self.sig[SLEEPERS] and not self.sig[BUSY]:
                ring(self.sig)
        elif self._sleepers and not self.sig[BUSY]:
            with self._cv:
                self._wakes += 1
                self._cv.notify_all()

    def ensure_started(self):
        """Start the helpers now if they are not running in this process (a native caller cannot start them)."""
        if self._pid != os.getpid() or len(self._threads) < planning_threads() - 1:
            self._start(planning_threads() - 1)

    def run(self, kernel, args, threads):
        """``kernel(*args, sched, sig, lead)`` on ``threads`` threads at most: the calling one and helpers."""
        if threads > 1:
            threads = min(threads, get_num_threads())
            if not self._ready:
                self._ready = _compile.companions_ready(submit=False)
        if threads <= 1 or not self._ready or not try_lock(self.sig):
            kernel(*args, new_sched(1), self.sig, SOLO)
            if threads > 1 and not self._ready:
                # (after the kernel: had it missed, its background compile took the pool's functions along)
                self._ready = _compile.companions_ready(submit=True)
            return
        try:
            self.ensure_started()
            gen = int(self.sig[0]) + 1
            sched = new_sched(threads)
            sched[GEN] = gen
            self._job = (gen, threads - 1, kernel, args + (sched, self.sig))
            self.sig[JOINING] = threads  # before the generation: a spinning helper reads it after
            if not NATIVE_SLEEP and self._sleepers:
                with self._cv:
                    self.sig[0] = gen
                    self._cv.notify_all()
                kernel(*args, sched, self.sig, LEAD_BUMPED)
            else:
                kernel(*args, sched, self.sig, LEAD)
        finally:
            self._job = None  # a helper that wakes late finds nothing to do (and keeps no array alive)
            unlock(self.sig)


POOL = _Pool()
# what Python calls of nbconv._sync: compiled by the background child, never in a caller's first calls
_compile.companions((try_lock, (POOL.sig,)), (unlock, (POOL.sig,)), (ring, (POOL.sig,)), (now, ()),
                    (helper_wait, (POOL.sig, 0, False, 1)))
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL._reset)


class _Capture(threading.local):
    calls = None  # a list while this thread's call is captured (nbconv._native.capture)


CAPTURE = _Capture()

#: the counters of a call run in record mode (its kernel does not run)
_NO_SCHED = new_sched(1)


def launch(kernel, threads, *args):
    """Run the pool kernel ``kernel(*args, sched, sig, lead)`` on at most ``threads`` threads (:data:`POOL`); while
    :func:`nbconv._compile.record_calls` records, only note its signature; while :func:`nbconv._native.capture`
    captures, only note the launch."""
    if CAPTURE.calls is not None:
        CAPTURE.calls.append((kernel, threads, args + (_NO_SCHED, POOL.sig, SOLO)))
        return
    fn = _compile.k(kernel)
    if fn is not kernel:
        fn(*args, _NO_SCHED, POOL.sig, SOLO)
    else:
        POOL.run(kernel, args, threads)
