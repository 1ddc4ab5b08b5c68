"""Process-level set-up done once at import: the threading layer and the BLAS entry points.

Threading layer
    nbconv's kernels run on its own threads (:mod:`nbconv._threads`), not on
    Numba's parallel launches, but the thread count that
    :func:`nbconv.set_num_threads` sets is Numba's, which starts Numba's
    threading layer, and a user's own ``prange`` code in the process shares
    it.  Numba's default ``omp`` layer (GNU OpenMP) kills a child made with
    ``fork()`` after the parent ran a parallel function, and ``workqueue``
    aborts when two Python threads launch at once.  TBB survives both, so we
    select it.  PyPI's ``tbb`` wheel puts ``libtbb.so.12`` in
    ``<prefix>/lib``, which Numba's loader does not search, so we preload it
    with ``ctypes``.  A user's explicit ``NUMBA_THREADING_LAYER`` always wins;
    without TBB we fall back to ``workqueue``.

System calls
    ``sched_yield`` is bound to an LLVM symbol for the helper threads'
    spin-waits, and on Linux ``syscall`` for their futex sleeps
    (:mod:`nbconv._sync`).

BLAS
    The channels_first backward's weight-gradient products (``x @ G.T`` per
    image) call SciPy's BLAS ``sgemm``/``dgemm`` directly from the kernels
    (leading dimensions and ``beta`` let tiles write straight into strided
    outputs; every other product uses :mod:`nbconv._gemm`).  The function addresses are bound to LLVM symbols here,
    so kernels that call them can still be cached on disk.

Warm-up
    The first kernel a process loads from the disk cache waits about 0.1 s
    for Numba to fill its target context (its registries of typing and
    lowering functions), and a Keras bridge's first trace for its native
    entry point: :func:`warm_up` starts that work on a thread at import where
    the cache holds kernels (on a cold one NumPy answers the first calls, and
    the thread would only contend with them), so it overlaps with what the
    caller does before its first call (loading data, building a model).  A
    ``fork()`` and the interpreter's exit wait for it.
"""
import ctypes
import os
import platform
import sys
import threading

import llvmlite.binding as _llvm
import numba
from numba import types
from numba.core.extending import get_cython_function_address

__all__ = ["THREADING_LAYER", "BLAS_THREADS", "sgemm", "dgemm", "sched_yield", "syscall", "SYS_FUTEX", "warm_up",
           "join_warm_up", "fill_target_context"]


def _preload_tbb():
    """Make ``libtbb.so.12`` loadable for Numba; return True on success."""
    names = {"linux": ["libtbb.so.12"], "darwin": ["libtbb.12.dylib"], "win32": ["tbb12.dll"]}
    candidates = []
    for name in names.get(sys.platform, []):
        for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, sys.exec_prefix)):
            candidates.append(os.path.join(prefix, "Library", "bin" if sys.platform == "win32" else "lib", name))
            candidates.append(os.path.join(prefix, "lib", name))
        candidates.append(name)  # the system loader's own search path
    for path in candidates:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def _choose_threading_layer():
    from numba.np.ufunc import parallel

    if os.environ.get("NUMBA_THREADING_LAYER") or parallel._is_initialized:
        # the user chose, or a parallel function already ran: leave it as it is
        return numba.config.THREADING_LAYER
    if _preload_tbb():
        try:
            from numba.np.ufunc import tbbpool  # noqa: F401  (checks the TBB version too)
        except Exception:
            pass
        else:
            numba.config.THREADING_LAYER = "tbb"
            return "tbb"
    numba.config.THREADING_LAYER = "workqueue"
    return "workqueue"


THREADING_LAYER = _choose_threading_layer()


# --- BLAS -----------------------------------------------------------------
for _name in ("sgemm", "dgemm"):
    _llvm.add_symbol("nbconv_" + _name, get_cython_function_address("scipy.linalg.cython_blas", _name))

# Fortran BLAS: every argument, even the chars and ints, is passed by pointer.
_gemm_sig = types.void(*([types.voidptr] * 13))
sgemm = types.ExternalFunction("nbconv_sgemm", _gemm_sig)
dgemm = types.ExternalFunction("nbconv_dgemm", _gemm_sig)

# sched_yield, for the helpers' spin-waits (nbconv._sync): bound to a symbol, as BLAS is, so the kernels that
# call it stay cacheable (a ctypes pointer would be baked into the machine code)
_llvm.add_symbol("nbconv_sched_yield", ctypes.cast(ctypes.CDLL(None).sched_yield, ctypes.c_void_p).value
                 if sys.platform != "win32" else 0)
sched_yield = types.ExternalFunction("nbconv_sched_yield", types.int32())

#: Linux's futex system call number on this machine, or 0 where the helpers sleep on a Python condition instead
SYS_FUTEX = {"x86_64": 202, "amd64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine().lower(), 0) \
    if sys.platform.startswith("linux") else 0
# libc's syscall(), bound like sched_yield; called as syscall(nr, a1, a2, a3, a4) with integer arguments only
# (the variadic prototype passes them in the same registers)
_llvm.add_symbol("nbconv_syscall", ctypes.cast(ctypes.CDLL(None).syscall, ctypes.c_void_p).value if SYS_FUTEX else 0)
syscall = types.ExternalFunction("nbconv_syscall", types.int64(types.int64, types.int64, types.int64, types.int64,
                                                               types.int64))


class _BlasThreads:
    """Keeps SciPy's BLAS single-threaded while any nbconv kernel runs (``with BLAS_THREADS:``).

    The kernels call BLAS on nbconv's threads (:mod:`nbconv._threads`); BLAS
    threads of its own there would oversubscribe the cores and stall every call.  Nested and
    concurrent users are counted so the last one out restores the user's
    setting.  The library's get/set entry points are looked up once (through
    threadpoolctl) and then called directly: a call costs well under a
    microsecond.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None
        self._get = self._set = None
        self._found = False

    def _find(self):
        self._found = True
        try:
            import scipy
            from threadpoolctl import ThreadpoolController
        except ImportError:
            return
        scipy_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__))), "scipy")
        for ctl in ThreadpoolController().lib_controllers:
            if ctl.user_api != "blas" or not os.path.abspath(ctl.filepath).startswith(scipy_dir):
                continue
            try:
                if ctl.internal_api == "openblas":
                    self._get = ctl._get_symbol("openblas_get_num_threads")
                    self._set = ctl._get_symbol("openblas_set_num_threads")
                else:  # other BLAS: threadpoolctl's own (slower) calls
                    self._get, self._set = ctl.get_num_threads, ctl.set_num_threads
            except Exception:
                self._get = self._set = None
            if self._get is not None and self._set is not None:
                return
        self._get = self._set = None

    def __enter__(self):
        with self._lock:
            if not self._found:
                self._find()
            if self._set is not None and self._depth == 0:
                self._saved = self._get()
                if self._saved != 1:
                    self._set(1)
            self._depth += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._set is not None and self._depth == 0 and self._saved not in (None, 1):
                self._set(self._saved)
        return False


BLAS_THREADS = _BlasThreads()


# --- warm-up ----------------------------------------------------------------
_WARMING = []
_WARMING_LOCK = threading.Lock()


def warm_up(task):
    """Run ``task()`` on a thread of its own (set-up the first call would otherwise wait for; see the module
    docstring), unless ``NBCONV_WARM_UP=0``.  Its errors are dropped: the first call does the same work and
    reports them."""
    if os.environ.get("NBCONV_WARM_UP", "1") == "0":
        return

    def run():
        try:
            task()
        except Exception:  # noqa: BLE001  (a head start only)
            pass

    # not a daemon: the interpreter's exit must not tear down Numba's objects under LLVM work in progress
    thread = threading.Thread(target=run, name="nbconv-warm-up")
    with _WARMING_LOCK:
        _WARMING.append(thread)
    thread.start()


def join_warm_up():
    """Wait for the warm-up threads (before a ``fork()``: a child must not inherit Numba's compile lock held)."""
    with _WARMING_LOCK:
        threads, _WARMING[:] = list(_WARMING), []
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


def fill_target_context():
    """What Numba does before it loads its first cached function in a process (its target context's registries)."""
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target

    with global_compiler_lock:
        cpu_target.target_context.refresh()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=join_warm_up)
