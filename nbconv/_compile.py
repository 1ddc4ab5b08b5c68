"""When and where kernels compile: on demand in a background process (default), or in the calling one.

Numba needs seconds to a minute to compile one of our kernels for a new
argument type.  In the default mode, ``background`` (environment variable
``NBCONV_COMPILE``), a public call that needs a kernel with no machine code in
this process nor in the disk cache (:mod:`nbconv._cache`) is answered by the
NumPy version of the function (:mod:`nbconv._fallback`), and a child process
compiles the kernels that call needs into the disk cache at low priority.  The
first call after the child exits loads them (milliseconds) and runs at full
speed.  Children of different processes take turns on a lock file, so the
second finds the first's work in the cache.  ``sync`` compiles in the calling
process, as Numba does (the tests, ``python -m nbconv warmup``, benchmarks).

How a miss is seen: each kernel called from Python is :func:`register`-ed,
which replaces its dispatcher's ``_compile_for_args`` (what Numba runs only
when called from Python with argument types it has no machine code for) with
:func:`_on_new_types`.  A public function wrapped by :func:`entry` catches the
:class:`NotCompiled` it raises, replays the call once in record mode (call
sites fetch kernels through :func:`k`, which then hands out stubs that note the
signature and do nothing) and submits the signatures.
"""
import contextlib
import functools
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: children may compile the same kernel twice)
    fcntl = None

import numpy as np
from numba.core.compiler_lock import global_compiler_lock

from . import _cache

__all__ = ["NotCompiled", "MODES", "get_mode", "set_mode", "compile_mode", "register", "k", "entry", "typed", "operand",
           "companions", "companions_ready", "submit", "pending", "wait", "record_calls", "compile_all",
           "write_todo", "child_main"]

MODES = ("background", "sync")
_ENV = "NBCONV_COMPILE"


class NotCompiled(Exception):
    """Raised inside a public call when a kernel it needs has no machine code yet (``background`` mode)."""

    def __init__(self, key):
        super().__init__(key[0])
        self.key = key


def _check_mode(mode, source):
    if mode not in MODES:
        raise ValueError(f"Expected {source} to be one of {MODES}. Received: {mode!r}")
    return mode


_MODE = [_check_mode(os.environ.get(_ENV) or "background", f"the environment variable {_ENV}")]


def get_mode():
    """The compile mode: ``"background"`` or ``"sync"``."""
    return _MODE[0]


def set_mode(mode):
    """Set the compile mode for the whole process (see the module docstring)."""
    _MODE[0] = _check_mode(mode, "`mode`")


@contextlib.contextmanager
def compile_mode(mode):
    """Context manager: run the enclosed code in ``mode``, then restore the previous mode."""
    old = get_mode()
    set_mode(mode)
    try:
        yield
    finally:
        _MODE[0] = old


# --- the kernels called from Python -------------------------------------------------------------------------

#: name -> dispatcher of every kernel called from Python
_REGISTRY = {}


def _name(dispatcher):
    return f"{dispatcher.py_func.__module__}.{dispatcher.py_func.__qualname__}"


def register(*dispatchers):
    """Route the misses of these dispatchers (called from Python) through this module."""
    for d in dispatchers:
        name = _name(d)
        _REGISTRY[name] = d
        d._compile_for_args = functools.partial(_on_new_types, name, d)


def _signature(d, args):
    return tuple(d.typeof_pyval(a) for a in args)


#: (name, signature) of the helpers that Python calls around the kernels (the pool's lock and wait); every
#: background child compiles those this process has not loaded, so that no call compiles them here
_COMPANIONS = []


def companions(*calls):
    """Declare ``(dispatcher, example_args)`` pairs as companions (see :data:`_COMPANIONS`)."""
    for d, args in calls:
        name = _name(d)
        _REGISTRY.setdefault(name, d)
        _COMPANIONS.append((name, _signature(d, args)))


def _missing_companions():
    return [(name, sig) for name, sig in _COMPANIONS
            if sig not in _REGISTRY[name].overloads and _load_cached(_REGISTRY[name], sig) is None]


def companions_ready(submit):
    """Whether the companions have machine code in this process (loading them from the disk cache).

    In ``sync`` mode always (a call compiles them).  Otherwise, if ``submit``,
    the missing ones go to the background compiler (where the kernels were in
    the cache but these were not).
    """
    if _MODE[0] == "sync":
        return True
    missing = _missing_companions()
    if not missing or any(_SCHEDULER.gave_up_on(key) for key in missing):
        return True  # (a child failed on them: they compile on their first call, as in sync mode)
    if submit:
        _SCHEDULER.submit(missing)
    return False


def _in_index(d, sig):
    """Whether the disk cache's index lists ``sig`` of ``d`` (True when that cannot be told)."""
    try:
        cache = d._cache
        return cache._index_key(sig, d.targetctx.codegen()) in cache._cache_file._load_index()
    except Exception:  # noqa: BLE001  (another Numba's internals: let load_overload decide)
        return True


def _load_cached(d, sig):
    """Load ``sig`` of ``d`` from the disk cache if it is there (what Numba's ``compile`` does first)."""
    with global_compiler_lock:
        cres = d.overloads.get(sig)
        if cres is None:
            # Numba's load_overload first initialises its target context (~0.3 s of imports, once per
            # process): not worth it on a miss, which the NumPy fallback answers in milliseconds
            if not _in_index(d, sig):
                return None
            cres = d._cache.load_overload(sig, d.targetctx)
            if cres is None:
                return None
            d.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            d.add_overload(cres)
        return cres.entry_point


def _on_new_types(name, d, *args, **kws):
    """``d._compile_for_args``: returns the function that Numba's dispatcher then calls with ``args``."""
    if _MODE[0] == "sync":
        return type(d)._compile_for_args(d, *args, **kws)
    sig = _signature(d, args)
    key = (name, sig)
    if not _SCHEDULER.busy_with(key):
        entry_point = _load_cached(d, sig)
        if entry_point is not None:
            return entry_point
        if _SCHEDULER.gave_up_on(key):
            return type(d)._compile_for_args(d, *args, **kws)
    raise NotCompiled(key)


class _Local(threading.local):
    record = None  # list of (name, signature) while this thread replays a call in record mode


_LOCAL = _Local()


def _stub(name, d, *args):
    _LOCAL.record.append((name, _signature(d, args)))


def recording():
    """Whether this thread replays a call in record mode (:func:`record_calls`)."""
    return _LOCAL.record is not None


def k(dispatcher):
    """The callable to launch ``dispatcher`` with: itself, or while recording a stub that notes the signature."""
    if _LOCAL.record is None:
        return dispatcher
    return functools.partial(_stub, _name(dispatcher), dispatcher)


class _Buffer:
    """The memory of a read-only array, offered to NumPy as writeable (see :func:`typed`)."""

    __slots__ = ("__array_interface__", "base")

    def __init__(self, a):
        iface = dict(a.__array_interface__)
        iface["data"] = (iface["data"][0], False)
        self.__array_interface__, self.base = iface, a


def typed(a):
    """``a`` as every kernel is compiled for it: a writeable array (the same memory; the kernels only read it).

    Numba specialises on the writeable flag (and its dispatcher takes a slower
    path for read-only arrays); jax and TensorFlow hand over read-only
    buffers: without this each mix would compile, and cache, another copy.
    """
    if a.flags.writeable:
        return a
    if a.size == 0:
        return np.empty(a.shape, a.dtype)
    return np.asarray(_Buffer(a))


def operand(a, dtype=None):
    """``a`` as a C-contiguous writeable array of ``dtype`` (a copy only where ``np.ascontiguousarray`` makes one)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    return a if a.flags.writeable else typed(a)


def record_calls(fn, args, kwargs, strict=False):
    """``(name, signature)`` of each registered kernel launch of ``fn(*args, **kwargs)``, in order.

    No kernel runs: each returns at once, leaving its outputs unwritten (the
    rest of the call computes on garbage, warnings silenced).  An exception
    ends the recording, and is raised if ``strict``.
    """
    outer = _LOCAL.record
    _LOCAL.record = found = []
    try:
        with np.errstate(all="ignore"):
            fn(*args, **kwargs)
    except Exception:  # noqa: BLE001  (a kernel's unwritten output reached a check: keep what was found)
        if strict:
            raise
    finally:
        _LOCAL.record = outer
    return found


def entry(fallback):
    """Decorate a public function: in ``background`` mode, answer with ``fallback`` while its kernels compile."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except NotCompiled as exc:
                missed = exc.key
            if _LOCAL.record is not None:  # an outer call is recording: note this one's kernel only
                _LOCAL.record.append(missed)
                return None
            _SCHEDULER.submit([missed] + record_calls(fn, args, kwargs))
            return fallback(*args, **kwargs)

        call.fallback = fallback
        return call

    return decorate


# --- the background compiler --------------------------------------------------------------------------------

class _Scheduler:
    """One child compiling at a time for this process; keys queue for the next."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc = None
        self._running = set()
        self._queue = []
        self._finished = set()
        self._warned = False

    def _poll(self):
        if self._proc is not None and self._proc.poll() is not None:
            if self._proc.returncode and not self._warned:
                self._warned = True
                warnings.warn(f"nbconv: the background compile failed (exit status {self._proc.returncode}, "
                              f"log in {_log_path()}); the kernels it missed compile in this process",
                              RuntimeWarning, stacklevel=4)
            self._finished |= self._running
            self._running, self._proc = set(), None
        if self._proc is None and self._queue:
            self._start()

    def busy_with(self, key):
        with self._lock:
            self._poll()
            return key in self._running or key in self._queue

    def gave_up_on(self, key):
        """Whether a child was given ``key`` and exited without leaving it in the cache."""
        with self._lock:
            self._poll()
            return key in self._finished

    def submit(self, keys):
        with self._lock:
            for key in keys:
                if key[1] in _REGISTRY[key[0]].overloads:
                    continue
                if key not in self._running and key not in self._queue and key not in self._finished:
                    self._queue.append(key)
            self._poll()

    def pending(self):
        with self._lock:
            self._poll()
            return len(self._running) + len(self._queue)

    def wait(self, timeout=None):
        while True:
            with self._lock:
                self._poll()
                proc = self._proc
            if proc is None:
                return True
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False

    def _start(self):
        items, self._queue = self._queue, []
        # the companions first (a second's work); the child loads those already in the disk cache
        items = [(n, sig) for n, sig in _COMPANIONS
                 if sig not in _REGISTRY[n].overloads and (n, sig) not in items] + items
        try:
            self._proc = _spawn([write_todo(items)])
            self._running = set(items)
        except Exception as exc:  # noqa: BLE001  (no child possible: compile in this process instead)
            warnings.warn(f"nbconv: cannot start the background compile ({exc!r}); kernels compile in this "
                          f"process", RuntimeWarning, stacklevel=5)
            self._finished |= set(items)


_SCHEDULER = _Scheduler()


def submit(keys):
    """Hand ``(name, signature)`` keys to the background compiler (a miss answered outside :func:`entry`)."""
    _SCHEDULER.submit(keys)


def pending():
    """How many kernels this process has handed to the background compiler that it has not loaded yet."""
    return _SCHEDULER.pending()


def wait(timeout=None):
    """Block until this process's background compile is done; False if ``timeout`` seconds passed first."""
    return _SCHEDULER.wait(timeout)


def _log_path():
    return os.path.join(_cache.cache_dir(), "compile.log")


def _spawn(argv, code=None, **popen):
    """Start a compiling child (:func:`child_main`, or the Python ``code``) on this very package, in its own
    session."""
    parent = os.path.dirname(_cache.PACKAGE_DIR)
    env = dict(os.environ, **{_ENV: "sync"})
    env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log = open(_log_path(), "ab")
    try:
        opts = dict(stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
        opts.update(popen)
        return subprocess.Popen([sys.executable, "-c", code or _CHILD, *argv], **opts)
    finally:
        log.close()


_CHILD = "import sys; from nbconv import _compile; sys.exit(_compile.child_main(sys.argv[1:]))"


def write_todo(items):
    """Pickle ``(name, signature)`` items to a new file in the cache directory (read and removed by a child)."""
    fd, path = tempfile.mkstemp(prefix="todo-", suffix=".pkl", dir=_cache.cache_dir())
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(list(items), fh)
    return path


@contextlib.contextmanager
def _turn():
    """Hold the cache directory's compile lock (one background compiler per cache at a time)."""
    if fcntl is None:
        yield
        return
    with open(os.path.join(_cache.cache_dir(), "compile.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def compile_all(items, out=None):
    """Compile (or load from the disk cache) each ``(name, signature)``; return the number that failed."""
    import nbconv  # noqa: F401  (registers every kernel)

    failed = 0
    for name, sig in items:
        try:
            _REGISTRY[name].compile(sig)
        except Exception:  # noqa: BLE001  (report, go on with the others)
            failed += 1
            print(f"nbconv: compiling {name}{sig} failed:\n{traceback.format_exc()}", file=out or sys.stderr)
    return failed


def child_main(argv):
    """A compiling child (``[--no-lock] FILE...``): compile the pickled ``(name, signature)`` lists."""
    set_mode("sync")
    lock = "--no-lock" not in argv
    if lock:
        try:
            os.nice(10)
        except OSError:
            pass
    items = []
    for path in (a for a in argv if a != "--no-lock"):
        with open(path, "rb") as fh:
            items += pickle.load(fh)
        os.remove(path)
    with _turn() if lock else contextlib.nullcontext():
        return 1 if compile_all(items) else 0
