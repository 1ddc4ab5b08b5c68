"""Forward calls replayed without Python: a compiled job, a template of its arguments, and the entry points that
XLA's FFI and TensorFlow's C kernel API call.

A framework that calls a C function for an op (XLA's typed FFI, TensorFlow's
kernel API) can run nbconv's kernel without the interpreter: no GIL, no
argument checks, no allocation.  :func:`capture` runs a forward function once in Python (on
arrays of the shapes and dtypes the op will see) with :func:`nbconv._threads.launch`
diverted, and records the one kernel launch it makes: which argument is a
view of which input, of the output or of the scratch workspace, and at what
byte offset; which are constants (the same in a second capture on other
input values: a bias of zeros, an empty array); and the scalars.  It refuses
(:class:`Unsupported`) a call that launches more or less than one kernel,
works on the data in Python (a cast copy of an input differs between the two
captures) or needs a kernel with no machine code yet.

The result, a :class:`NativeCall`, holds

- a *job*: a generated ``@cfunc void run(int64 *mailbox, int64 lead)`` that
  rebuilds the kernel's arrays from the pointers and sizes in a mailbox and
  calls it with the pool's ``sched``/``sig`` protocol (:mod:`nbconv._sync`).
  Its source is written to the cache directory so that Numba caches it;
- a *template* (int64): the mailbox image with the buffers' pointers left
  out, where each goes (slot, buffer, byte offset), and the dtype and shape
  each buffer must have.

:func:`run_template` fills the pool's mailbox from the template and the
buffers' addresses and runs the job as the pool's leader (the helpers run it
from the mailbox, :func:`nbconv._sync.helper_wait`), or alone when another
call has the pool.  :func:`ffi_handler` wraps it in XLA's typed FFI calling
convention (``XLA_FFI_Error *handler(XLA_FFI_CallFrame *)``, the layouts
below, checked against jaxlib's header by the tests), with the template as
the call's one ``int64`` array attribute; :func:`tf_compute` in TensorFlow's
``void compute(void *kernel, TF_OpKernelContext *ctx)``, with the template as
the op's last input.  Scratch is the call's last result (a byte buffer that
the framework allocates), aligned here to 64 bytes.
"""
import functools
import hashlib
import importlib.util
import os
import sys
import threading

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types
from numba.extending import intrinsic

from . import _cache, _compile, _dtypes
from ._jit import jit
from ._threads import CAPTURE, POOL, get_num_threads
from ._sync import (AFTER_JOB, GEN, INJOB, JOBFN, JOINING, LEAD, MBOX, NATIVE, NATIVE_SLEEP, NONCE_SLOT, PARTS,
                    SIG_SLOTS, SOLO, SPIN, SPIN_NATIVE, atomic_load, atomic_store, call_job, pause, try_lock, unlock)

__all__ = ["Unsupported", "NotReady", "NativeCall", "capture", "run_template", "ffi_handler", "tf_compute",
           "tf_library", "available", "entry_built", "build_in_background", "NONCE"]

#: a random value in ``sig`` and in every template: a template made by another process is refused
NONCE = int.from_bytes(os.urandom(7), "little")

# --- the template (int64) ----------------------------------------------------------------------------------
T_NONCE, T_SIG, T_FN, T_THREADS, T_NBUF, T_NARGS, T_PAYLOAD, T_PAYLOAD_LEN, T_PATCH, T_NPATCH, T_CHECK = range(11)
_T_HEADER = 12
#: mailbox slots: the job, sig, sched's address and length, sched itself, then the kernel's arguments
M_FN, M_SIG, M_SCHED, M_SCHED_LEN = 0, 1, 2, 3
M_SCHED_AT = 8
_MAX_PARTS = 64
M_ARGS_AT = M_SCHED_AT + 4 + 2 * _MAX_PARTS
#: error codes of :func:`run_template`
OK, E_NONCE, E_BUFFERS, E_DTYPE, E_SHAPE = 0, 1, 2, 3, 4

#: XLA FFI data types of the buffers nbconv's ops take and return (and bfloat16's, :func:`xla_dtype`)
XLA_DTYPES = {np.dtype(np.float32): 11, np.dtype(np.float64): 12, np.dtype(np.uint8): 6, np.dtype(np.uint16): 7}
XLA_BF16 = 16


def xla_dtype(dtype):
    """XLA FFI's code of ``dtype``, 0 for one nbconv's ops do not take."""
    return XLA_BF16 if _dtypes.is_bf16(dtype) else XLA_DTYPES.get(np.dtype(dtype), 0)


class Unsupported(Exception):
    """The call cannot run natively (the message says why); the caller keeps its Python path."""


class NotReady(Unsupported):
    """The call could run natively once code compiling in the background is ready."""


@intrinsic
def as_ptr(typingctx, addr):
    """An int64 address as a ``void *`` (for :func:`numba.carray`)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return sig, codegen


@jit
def _words(addr, n):
    return carray(as_ptr(addr), (n,), np.int64)


@jit
def run_template(t, ptrs, from_python):
    """Run the captured job of template ``t`` on the buffers whose data addresses are ``ptrs`` (arguments, then
    results, scratch last); returns :data:`OK` or an error code.  Types and shapes were checked by the caller.

    After the job the helpers spin for the pool's whole window if ``from_python`` (a replayed call,
    :mod:`nbconv._replay`: the caller's next call may come after a gap), else for the short window after a
    framework's op (:func:`nbconv._sync.helper_wait`)."""
    sig = _words(t[T_SIG], SIG_SLOTS)
    if sig[NONCE_SLOT] != t[T_NONCE]:
        return E_NONCE
    threads = t[T_THREADS]
    n = t[T_PAYLOAD_LEN]
    led = threads > 1 and try_lock(sig)
    if led:
        atomic_store(sig, NATIVE, -1)
        while atomic_load(sig, INJOB) != 0:  # a late helper may still read the last job's mailbox
            pause()
        box = _words(sig[MBOX], n)
    else:
        box = np.empty(n, np.int64)
        threads = 1
    p0 = t[T_PAYLOAD]
    for i in range(n):
        box[i] = t[p0 + i]
    q = t[T_PATCH]
    for k in range(t[T_NPATCH]):
        slot, buf, off = t[q + 3 * k], t[q + 3 * k + 1], t[q + 3 * k + 2]
        base = ptrs[buf]
        if buf == t[T_NBUF] - 1:  # scratch: from its first 64-byte boundary
            base += -base % 64
        box[slot] = base + off
    addr = np.int64(box.ctypes.data)
    box[M_SCHED] = addr + 8 * M_SCHED_AT
    parts = M_SCHED_AT + 4 + 2 * threads
    for i in range(M_SCHED_AT, parts):
        box[i] = 0
    box[M_SCHED_LEN] = 4 + 2 * threads
    box[M_SCHED_AT + PARTS] = threads
    if led:
        gen = atomic_load(sig, 0) + 1
        box[M_SCHED_AT + GEN] = gen
        sig[JOINING] = threads
        sig[JOBFN] = t[T_FN]
        sig[AFTER_JOB] = sig[SPIN] if from_python else sig[SPIN_NATIVE]
        atomic_store(sig, NATIVE, gen)  # the job's enter() publishes the generation: helpers then find it
        call_job(t[T_FN], addr, LEAD)
        # a helper that entered late still runs the kernel's preamble (its own scratch rows): the buffers must
        # outlive it, so no helper may be inside once the caller gets them back
        atomic_store(sig, NATIVE, -1)
        while atomic_load(sig, INJOB) != 0:
            pause()
        unlock(sig)
    else:
        call_job(t[T_FN], addr, SOLO)
    # read after the call: Numba frees an array after its last use, and the job reads this one through its address
    return OK if box[M_FN] == t[T_FN] else E_BUFFERS


# --- capture -----------------------------------------------------------------------------------------------

def _locate(a, regions):
    """``(region index, byte offset)`` of array ``a`` inside one of ``regions`` (arrays), or None."""
    start = a.__array_interface__["data"][0]
    for i, r in enumerate(regions):
        r0 = r.__array_interface__["data"][0]
        if r0 <= start and start + a.nbytes <= r0 + max(r.nbytes, 1) and (a.nbytes or start < r0 + r.nbytes):
            return i, start - r0
    return None


def _capture_once(fn, arrays, out):
    # looked up, not imported: an import would make the public functions' module a kernel source (nbconv._cache)
    forward = sys.modules[f"{__package__}.forward"]
    CAPTURE.calls = calls = []
    try:
        fn(*arrays, out=out)
    finally:
        CAPTURE.calls = None
    if len(calls) != 1:
        raise Unsupported(f"the call launches {len(calls)} kernels (one can run natively)")
    ws = getattr(forward._WORKSPACE, "buf", None)
    return calls[0], ws


class NativeCall:
    """A captured forward call (see the module docstring): ``template`` (int64), ``scratch_bytes``, the
    buffers' dtypes and shapes; it keeps its job and constants alive."""

    def __init__(self, template, scratch_bytes, job, constants, buffers):
        self.template = template
        self.scratch_bytes = scratch_bytes
        self.job = job
        self.constants = constants
        self.buffers = buffers

    def run(self, arrays, out, scratch, from_python):
        """Run natively on NumPy ``arrays`` into ``out`` with ``scratch`` (at least :attr:`scratch_bytes` bytes);
        returns :data:`OK` or :func:`run_template`'s error code (``from_python``: see there)."""
        ptrs = np.array([a.__array_interface__["data"][0] for a in (*arrays, out, scratch)], np.int64)
        return run_template(self.template, ptrs, from_python)

    def __call__(self, *arrays, out):
        """Run natively on NumPy ``arrays`` into ``out`` (tests and the capture's own check)."""
        err = self.run(arrays, out, np.empty(self.scratch_bytes, np.uint8), False)
        if err != OK:
            raise RuntimeError(f"nbconv: native call failed with code {err}")
        return out


def _sig_of(kernel, args):
    return tuple(kernel.typeof_pyval(a) for a in args)


def capture(fn, arrays, out, other=None):
    """Capture ``fn(*arrays, out=out)`` (see the module docstring) as a :class:`NativeCall` on the threads the
    call would use now; ``other`` are the same inputs with other values (default: ``arrays`` negated and
    halved).

    The arrays must be C-contiguous NumPy arrays of the op's shapes and
    dtypes; their values matter only in that the two captures differ.
    Raises :class:`Unsupported`.
    """
    if not NATIVE_SLEEP:
        raise Unsupported("native calls need the helpers' futex (Linux)")
    if other is None:
        other = [np.ascontiguousarray(-a.astype(np.float32) / 2 + 1).astype(a.dtype) for a in arrays]
    (kernel, threads, args), ws = _capture_once(fn, arrays, out)
    (kernel_b, _, args_b), ws_b = _capture_once(fn, other, out)
    if kernel_b is not kernel or len(args_b) != len(args) or ws_b is not ws:
        raise Unsupported("the two captures launch different kernels")
    args, args_b = args[:-3], args_b[:-3]  # sched, sig and lead are the job's own
    # regions: the inputs, the output, then the workspace from its first 64-byte boundary
    regions = list(arrays) + [out]
    if ws is not None:
        ws_start = ws.__array_interface__["data"][0]
        regions.append(ws[-ws_start % 64:])
    nbuf = len(arrays) + 2
    constants, specs, patches, payload = [], [], [], {}
    slot = M_ARGS_AT
    scratch_bytes = 64
    for a, b in zip(args, args_b):
        if isinstance(a, np.ndarray):
            if not a.flags.c_contiguous or a.dtype != b.dtype or a.shape != b.shape:
                raise Unsupported("a kernel argument is not a C-contiguous array of one shape")
            where = _locate(a, regions)
            if where != _locate(b, list(other) + regions[len(arrays):]):
                raise Unsupported("a kernel argument moves between captures")
            region, off = where if where is not None else (None, 0)
            if region == len(arrays) + 1:  # the workspace: the call's scratch buffer
                region = nbuf - 1
                scratch_bytes = max(scratch_bytes, off + a.nbytes + 64)
            if region is None:
                if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                    raise Unsupported("the call computes on its inputs in Python (a converted copy)")
                constants.append(a)
                payload[slot] = a.__array_interface__["data"][0]
            else:
                patches.append((slot, region, off))
                payload[slot] = 0
            specs.append(("array", a.dtype, a.ndim))
            for k, d in enumerate(a.shape):
                payload[slot + 1 + k] = d
            slot += 1 + a.ndim
        elif isinstance(a, (bool, np.bool_)):
            if bool(a) != bool(b):
                raise Unsupported("a flag differs between captures")
            specs.append(("bool",))
            payload[slot] = int(a)
            slot += 1
        elif isinstance(a, (int, np.integer)):
            if int(a) != int(b):
                raise Unsupported("a size differs between captures")
            specs.append(("int", str(kernel.typeof_pyval(a))))  # the job passes it as the kernel was compiled
            payload[slot] = int(a)
            slot += 1
        else:
            raise Unsupported(f"a kernel argument of type {type(a).__name__}")
    if slot > POOL.MAILBOX_SLOTS:
        raise Unsupported("the arguments do not fit the mailbox")
    threads = max(1, min(int(threads), get_num_threads(), _MAX_PARTS))
    # the kernel's machine code must exist: compiling it here would stall a trace for a minute
    sig = _sig_of(kernel, args + (np.zeros(4, np.int64), POOL.sig, 0))
    if sig not in kernel.overloads:
        if _compile.get_mode() == "sync":
            kernel.compile(sig)
        elif _compile._load_cached(kernel, sig) is None:
            _compile.submit([(_compile._name(kernel), sig)])
            raise NotReady("the kernel is not compiled yet (it is compiling in the background)")
    job = _job(kernel, tuple(specs))
    template = _template(payload, slot, patches, threads, job.address, nbuf,
                         [(b.dtype, b.shape) for b in (*arrays, out)] + [(np.dtype(np.uint8), (scratch_bytes,))])
    call = NativeCall(template, scratch_bytes, job, constants, [(b.dtype, b.shape) for b in (*arrays, out)])
    POOL.ensure_started()
    POOL.sig[NONCE_SLOT] = NONCE
    _self_check(fn, call, arrays, out)
    return call


def _self_check(fn, call, arrays, out):
    """The native run must give the Python call's result bit for bit (the same kernel on the same plan)."""
    expected = np.array(fn(*arrays, out=np.empty_like(out)), copy=True)
    got = call(*arrays, out=np.empty_like(out))
    if not np.array_equal(expected.view(np.uint8), got.view(np.uint8)):
        raise Unsupported("the native run differs from the Python call")


def _template(payload, length, patches, threads, fn, nbuf, buffers):
    words = [0] * _T_HEADER
    words[T_NONCE], words[T_FN], words[T_THREADS], words[T_NBUF] = NONCE, fn, threads, nbuf
    words[T_SIG] = POOL.sig.ctypes.data
    words[T_NARGS] = nbuf - 2
    words[T_PATCH], words[T_NPATCH] = len(words), len(patches)
    for p in patches:
        words += list(p)
    words[T_CHECK] = len(words)
    for dtype, shape in buffers:
        words += [xla_dtype(dtype), len(shape), *shape]
    mailbox = [payload.get(i, 0) for i in range(length)]
    mailbox[M_FN], mailbox[M_SIG] = fn, POOL.sig.ctypes.data
    words[T_PAYLOAD], words[T_PAYLOAD_LEN] = len(words), length
    words += mailbox
    return np.array(words, np.int64)


# --- the generated jobs ------------------------------------------------------------------------------------

_JOB_LOCK = threading.Lock()


def _job_source(kernel, specs):
    mod, name = kernel.py_func.__module__, kernel.py_func.__qualname__
    lines = ["# generated by nbconv._native: one kernel's native job (see that module)", "import numpy as np",
             "from numba import carray, cfunc, types", "from nbconv._native import as_ptr",
             f"from {mod} import {name} as kernel", "", "",
             "@cfunc(types.void(types.CPointer(types.int64), types.int64), cache=True, error_model='numpy')",
             "def run(m, lead):"]
    args, slot = [], M_ARGS_AT
    for spec in specs:
        if spec[0] == "array":
            dims = ", ".join(f"m[{slot + 1 + k}]" for k in range(spec[2]))
            args.append(f"carray(as_ptr(m[{slot}]), ({dims},), np.{spec[1].name})")
            slot += 1 + spec[2]
        elif spec[0] == "bool":
            args.append(f"m[{slot}] != 0")
            slot += 1
        else:
            args.append(f"m[{slot}]" if spec[1] == "int64" else f"np.{spec[1]}(m[{slot}])")
            slot += 1
    args.append(f"carray(as_ptr(m[{M_SCHED}]), (m[{M_SCHED_LEN}],), np.int64)")
    args.append(f"carray(as_ptr(m[{M_SIG}]), ({SIG_SLOTS},), np.int64)")
    args.append("lead")
    lines.append("    kernel(" + ",\n           ".join(args) + ")")
    return "\n".join(lines) + "\n"


def _job(kernel, specs):
    """The compiled job for ``kernel`` with arguments ``specs`` (loaded from Numba's cache when it is there).

    In the background compile mode a job that no process has built yet (a
    second or two) is built by a child meanwhile: :class:`Unsupported`.
    """
    source = _job_source(kernel, specs)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    folder = os.path.join(_cache.cache_dir(), "native")
    path = os.path.join(folder, f"job_{digest}.py")
    with _JOB_LOCK:
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(source)
            os.replace(tmp, path)
    name = f"job_{digest}"
    if name not in _JOBS and _compile.get_mode() == "background" and not entry_built(name):
        _build_in_background(name, f"from nbconv import _native; _native.load_job({path!r})")
        raise NotReady("the native job is compiling in the background")
    return load_job(path)


_JOBS = {}


def load_job(path):
    """Import the generated job module at ``path`` (compiling its cfunc, or loading it from Numba's cache) and
    return its ``run``."""
    name = os.path.splitext(os.path.basename(path))[0]
    with _JOB_LOCK:
        run = _JOBS.get(name)
        if run is None:
            module_name = f"nbconv_native_{name}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # Numba's cache finds the job's globals by module name
            spec.loader.exec_module(module)
            run = _JOBS[name] = module.run
            _mark_built(name)
    return run


# --- XLA's typed FFI ---------------------------------------------------------------------------------------

#: byte offsets of the XLA FFI C structs' fields and their ``*_STRUCT_SIZE`` (the end of the last field that
#: c_api.h's XLA_FFI_DEFINE_STRUCT_TRAITS names: what a caller puts in ``struct_size``), 64-bit; checked by the tests
#: against the header jaxlib ships
FRAME_SIZE, FRAME_EXT, FRAME_API, FRAME_STAGE, FRAME_ARGS, FRAME_RETS, FRAME_ATTRS = 168, 8, 16, 32, 40, 80, 120
ARGS_SIZE, ARGS_N, ARGS_TYPES, ARGS_PTRS = 40, 16, 24, 32
ATTRS_SIZE, ATTRS_N, ATTRS_TYPES, ATTRS_NAMES, ATTRS_PTRS = 48, 16, 24, 32, 40
BUFFER_SIZE, BUFFER_DTYPE, BUFFER_DATA, BUFFER_RANK, BUFFER_DIMS = 48, 16, 24, 32, 40
ARRAY_DTYPE, ARRAY_N, ARRAY_DATA = 0, 8, 16
EXT_TYPE, METADATA_EXT_SIZE, METADATA_EXT_METADATA = 8, 32, 24
METADATA_SIZE, METADATA_VERSION, METADATA_TRAITS, METADATA_STATE, VERSION_SIZE, VERSION_MAJOR = 36, 8, 32, 40, 24, 16
API_ERROR_CREATE, ERROR_ARGS_SIZE, ERROR_ARGS_MESSAGE, ERROR_ARGS_CODE = 48, 28, 16, 24
#: enum values used
FFI_EXECUTE, FFI_EXT_METADATA, FFI_BUFFER, FFI_ATTR_ARRAY, FFI_S64, FFI_INVALID_ARGUMENT = 3, 1, 1, 1, 5, 3
#: the API version whose layouts the handler reads (the oldest of the typed FFI that has them)
FFI_API_VERSION = (0, 1)

_MESSAGES = {
    E_NONCE: "nbconv: this XLA call was prepared by another process (persistent compilation cache?); "
             "disable the cache for it or set NBCONV_JAX_FFI=0",
    E_BUFFERS: "nbconv: the XLA FFI call frame does not hold the buffers the op was traced for",
    E_DTYPE: "nbconv: an XLA FFI buffer's dtype is not the one the op was traced for",
    E_SHAPE: "nbconv: an XLA FFI buffer's shape is not the one the op was traced for",
    9: "nbconv: the XLA FFI call frame's layout is not the one nbconv reads (jaxlib's FFI ABI changed?); "
       "set NBCONV_JAX_FFI=0 to use the host callback",
}
#: NUL-terminated messages, by code, alive for the process (XLA copies the message)
_MESSAGE_BUFFERS = np.zeros((10, 256), np.uint8)
for _code, _text in _MESSAGES.items():
    _MESSAGE_BUFFERS[_code, :len(_text)] = np.frombuffer(_text.encode()[:255], np.uint8)
E_LAYOUT = 9


@intrinsic
def _call_error_create(typingctx, fn, args):
    """``XLA_FFI_Error *fn(XLA_FFI_Error_Create_Args *args)`` (addresses as int64)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, a):
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(i8p, [i8p])
        res = builder.call(builder.inttoptr(a[0], fnty.as_pointer()), [builder.inttoptr(a[1], i8p)])
        return builder.ptrtoint(res, ir.IntType(64))

    return sig, codegen


@jit
def _i32(addr):
    return carray(as_ptr(addr), (1,), np.int32)[0]


@jit
def _error(frame, code, messages):
    """An ``XLA_FFI_Error *`` made by the API's ``XLA_FFI_Error_Create`` (0 if it has none)."""
    api = _words(frame + FRAME_API, 1)[0]
    if api == 0:
        return 0
    create = _words(api + API_ERROR_CREATE, 1)[0]
    if create == 0:
        return 0
    args = np.zeros(4, np.int64)
    args[0] = ERROR_ARGS_SIZE
    args[ERROR_ARGS_MESSAGE // 8] = np.int64(messages.ctypes.data) + messages.shape[1] * code
    args[ERROR_ARGS_CODE // 8] = FFI_INVALID_ARGUMENT
    err = _call_error_create(create, np.int64(args.ctypes.data))
    return err if args[0] == ERROR_ARGS_SIZE else 0  # keeps ``args`` alive through the call


@jit
def _ffi_call(frame):
    """The body of :func:`ffi_handler`: 0 (success) or an ``XLA_FFI_Error *``."""
    f = _words(frame, 2)
    if f[0] < FRAME_SIZE:
        return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
    ext = f[FRAME_EXT // 8]
    if ext != 0 and _i32(ext + EXT_TYPE) == FFI_EXT_METADATA:
        e = _words(ext, 4)
        if e[0] < METADATA_EXT_SIZE:
            return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
        md = e[METADATA_EXT_METADATA // 8]
        m = _words(md, 1)
        if m[0] < METADATA_SIZE:
            return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
        v = _words(md + METADATA_VERSION, 2)
        v[0], v[1] = VERSION_SIZE, 0
        iv = carray(as_ptr(md + METADATA_VERSION + VERSION_MAJOR), (2,), np.int32)
        iv[0], iv[1] = FFI_API_VERSION[0], FFI_API_VERSION[1]
        carray(as_ptr(md + METADATA_TRAITS), (1,), np.uint32)[0] = 0
        if m[0] >= METADATA_STATE + 8:
            _words(md + METADATA_STATE, 1)[0] = 0
        return 0
    if _i32(frame + FRAME_STAGE) != FFI_EXECUTE:
        return 0
    a = _words(frame + FRAME_ARGS, 5)
    r = _words(frame + FRAME_RETS, 5)
    at = _words(frame + FRAME_ATTRS, 6)
    if a[0] < ARGS_SIZE or r[0] < ARGS_SIZE or at[0] < ATTRS_SIZE or at[2] != 1:
        return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
    if _i32(at[ATTRS_TYPES // 8]) != FFI_ATTR_ARRAY:
        return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
    arr = _words(at[ATTRS_PTRS // 8], 1)[0]
    if _i32(arr + ARRAY_DTYPE) != FFI_S64:
        return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
    n = _words(arr + ARRAY_N, 1)[0]
    t = carray(as_ptr(_words(arr + ARRAY_DATA, 1)[0]), (n,), np.int64)
    nargs, nbuf = t[T_NARGS], t[T_NBUF]
    if n < _T_HEADER or a[2] != nargs or r[2] != nbuf - nargs:
        return _error(frame, E_BUFFERS, _MESSAGE_BUFFERS)
    ptrs = np.empty(nbuf, np.int64)
    c = t[T_CHECK]
    for i in range(nbuf):
        if i < nargs:
            kind, bufp = _i32(a[3] + 4 * i), _words(a[4] + 8 * i, 1)[0]
        else:
            kind, bufp = _i32(r[3] + 4 * (i - nargs)), _words(r[4] + 8 * (i - nargs), 1)[0]
        b = _words(bufp, 6)
        if kind != FFI_BUFFER or b[0] < BUFFER_SIZE:
            return _error(frame, E_LAYOUT, _MESSAGE_BUFFERS)
        if _i32(bufp + BUFFER_DTYPE) != t[c]:
            return _error(frame, E_DTYPE, _MESSAGE_BUFFERS)
        rank = b[BUFFER_RANK // 8]
        if rank != t[c + 1]:
            return _error(frame, E_SHAPE, _MESSAGE_BUFFERS)
        dims = _words(b[BUFFER_DIMS // 8], max(rank, 1))
        for k in range(rank):
            if dims[k] != t[c + 2 + k]:
                return _error(frame, E_SHAPE, _MESSAGE_BUFFERS)
        c += 2 + rank
        ptrs[i] = b[BUFFER_DATA // 8]
    err = run_template(t, ptrs, False)
    if err != OK:
        return _error(frame, err, _MESSAGE_BUFFERS)
    return 0


_HANDLER = []
_HANDLER_LOCK = threading.Lock()


def ffi_handler():
    """The compiled ``XLA_FFI_Error *handler(XLA_FFI_CallFrame *)`` (a Numba cfunc; ``.address``), built or loaded
    once (a bridge's warm-up thread may be loading it as a trace asks for it)."""
    with _HANDLER_LOCK:
        if not _HANDLER:
            _HANDLER.append(_handler_cfunc())
            _mark_built("ffi")
        return _HANDLER[0]


def available():
    """Whether native calls can run in this process (Linux futex for the helpers)."""
    return NATIVE_SLEEP



def _handler_cfunc():
    @cfunc(types.int64(types.int64), cache=True, error_model="numpy")
    def xla_ffi_handler(frame):
        return _ffi_call(frame)

    return xla_ffi_handler


# --- TensorFlow's C kernel API ---------------------------------------------------------------------------------

#: the C functions of TensorFlow's kernel API the compute function calls (pointers as int64), bound to LLVM symbols
#: by :func:`tf_compute` (the addresses of the loaded library, so the compiled function stays cacheable)
_TF_API = {
    "TF_NumInputs": types.int32(types.int64),
    "TF_GetInput": types.void(types.int64, types.int32, types.int64, types.int64),
    "TF_TensorData": types.int64(types.int64),
    "TF_TensorType": types.int32(types.int64),
    "TF_NumDims": types.int32(types.int64),
    "TF_Dim": types.int64(types.int64, types.int32),
    "TF_DeleteTensor": types.void(types.int64),
    "TF_AllocateOutput": types.int64(types.int64, types.int32, types.int32, types.int64, types.int32, types.int64,
                                     types.int64),
    "TF_NewStatus": types.int64(),
    "TF_DeleteStatus": types.void(types.int64),
    "TF_GetCode": types.int32(types.int64),
    "TF_SetStatus": types.void(types.int64, types.int32, types.int64),
    "TF_OpKernelContext_Failure": types.void(types.int64, types.int64),
}
_tf = {name: types.ExternalFunction("nbconv_" + name, sig) for name, sig in _TF_API.items()}
_TF_NumInputs, _TF_GetInput, _TF_TensorData, _TF_TensorType = (_tf[n] for n in (
    "TF_NumInputs", "TF_GetInput", "TF_TensorData", "TF_TensorType"))
_TF_NumDims, _TF_Dim, _TF_DeleteTensor, _TF_AllocateOutput = (_tf[n] for n in (
    "TF_NumDims", "TF_Dim", "TF_DeleteTensor", "TF_AllocateOutput"))
_TF_NewStatus, _TF_DeleteStatus, _TF_GetCode, _TF_SetStatus, _TF_Failure = (_tf[n] for n in (
    "TF_NewStatus", "TF_DeleteStatus", "TF_GetCode", "TF_SetStatus", "TF_OpKernelContext_Failure"))
#: TF_DataType and item size by XLA FFI data type (the template's check table holds XLA's codes)
_TF_TYPE = np.zeros(32, np.int32)
_ITEMSIZE = np.zeros(32, np.int64)
for _xla, _tfc, _size in ((11, 1, 4), (12, 2, 8), (16, 14, 2), (6, 4, 1), (7, 17, 2)):
    _TF_TYPE[_xla], _ITEMSIZE[_xla] = _tfc, _size
_TF_INVALID_ARGUMENT = 3


@jit
def _tf_call(ctx):
    """The body of :func:`tf_compute`: the op's inputs then the template (int64) in, the result and the scratch
    bytes out (allocated here with the template's shapes)."""
    status = _TF_NewStatus()
    slot = np.zeros(1, np.int64)
    n = _TF_NumInputs(ctx)
    err = E_BUFFERS
    tensors = np.zeros(max(n, 0) + 2, np.int64)
    if n >= 1:
        _TF_GetInput(ctx, n - 1, np.int64(slot.ctypes.data), status)
        tensors[n - 1] = slot[0]
        if _TF_GetCode(status) == 0:
            tt = slot[0]
            t = carray(as_ptr(_TF_TensorData(tt)), (_TF_Dim(tt, 0),), np.int64)
            err = _tf_run(ctx, status, t, n, slot, tensors)
    for i in range(tensors.shape[0]):
        if tensors[i] != 0:
            _TF_DeleteTensor(tensors[i])
    if err != OK:
        _TF_SetStatus(status, _TF_INVALID_ARGUMENT, np.int64(_MESSAGE_BUFFERS.ctypes.data) + 256 * err)
        _TF_Failure(ctx, status)
    _TF_DeleteStatus(status)
    return slot[0]  # keeps ``slot`` alive through the calls that write it


@jit
def _tf_run(ctx, status, t, n, slot, tensors):
    nargs, nbuf = t[T_NARGS], t[T_NBUF]
    if t.shape[0] < _T_HEADER or n - 1 != nargs or nbuf != nargs + 2:
        return E_BUFFERS
    ptrs = np.empty(nbuf, np.int64)
    c = t[T_CHECK]
    for i in range(nargs):
        _TF_GetInput(ctx, i, np.int64(slot.ctypes.data), status)
        if _TF_GetCode(status) != 0:
            return E_BUFFERS
        ten = slot[0]
        tensors[i] = ten
        if _TF_TensorType(ten) != _TF_TYPE[t[c]]:
            return E_DTYPE
        rank = t[c + 1]
        if _TF_NumDims(ten) != rank:
            return E_SHAPE
        for k in range(rank):
            if _TF_Dim(ten, k) != t[c + 2 + k]:
                return E_SHAPE
        ptrs[i] = _TF_TensorData(ten)
        c += 2 + rank
    for j in range(2):
        code, rank = t[c], t[c + 1]
        nbytes = _ITEMSIZE[code]
        for k in range(rank):
            nbytes *= t[c + 2 + k]
        ten = _TF_AllocateOutput(ctx, j, _TF_TYPE[code], np.int64(t.ctypes.data) + 8 * (c + 2), rank, nbytes, status)
        if ten == 0 or _TF_GetCode(status) != 0:
            return E_BUFFERS
        tensors[n + j] = ten
        ptrs[nargs + j] = _TF_TensorData(ten)
        c += 2 + rank
    return run_template(t, ptrs, False)


@functools.lru_cache(maxsize=None)
def tf_compute(library):
    """The compiled ``void compute(void *kernel, TF_OpKernelContext *ctx)`` of TensorFlow's C kernel API (a Numba
    cfunc; ``.address``), calling the kernel API of ``library`` (a ``ctypes.CDLL`` of TensorFlow's framework
    library)."""
    import ctypes

    import llvmlite.binding as llvm

    for name in _TF_API:
        llvm.add_symbol("nbconv_" + name, ctypes.cast(getattr(library, name), ctypes.c_void_p).value)

    @cfunc(types.void(types.int64, types.int64), cache=True, error_model="numpy")
    def tf_kernel_compute(kernel, ctx):
        _tf_call(ctx)

    _mark_built("tf")
    return tf_kernel_compute


def tf_library():
    """TensorFlow's framework library (``ctypes.CDLL``), whose C API registers ops and kernels."""
    import ctypes

    import tensorflow as tf

    return ctypes.CDLL(os.path.join(tf.sysconfig.get_lib(), "libtensorflow_framework.so.2"))


# --- building the entry points ahead of use --------------------------------------------------------------------
# The handler and the TF compute function take 2-3 s to compile the first time (then 0.1 s from the disk cache).
# In the background compile mode a framework's first trace must not wait for them: it keeps its host call while a
# child builds them into the cache, and the next trace finds them.

def _marker(name):
    return os.path.join(_cache.cache_dir(), "native", f"{name}.built")


def _mark_built(name):
    try:
        os.makedirs(os.path.dirname(_marker(name)), exist_ok=True)
        open(_marker(name), "a").close()
    except OSError:
        pass


def entry_built(name):
    """Whether entry point ``name`` ("ffi": :func:`ffi_handler`, "tf": :func:`tf_compute`, or a job) is in the
    disk cache."""
    return os.path.exists(_marker(name))


_BUILDING = set()


def build_in_background(name):
    """Build entry point ``name`` ("ffi" or "tf") into the disk cache in a child process (once per process)."""
    _build_in_background(name, "from nbconv import _native; _native.ffi_handler()" if name == "ffi"
                         else "from nbconv import _native; _native.tf_compute(_native.tf_library())")


def _build_in_background(name, code):
    if name in _BUILDING:
        return
    _BUILDING.add(name)
    try:
        _compile._spawn([], code=code)
    except Exception:  # noqa: BLE001  (no child possible: the caller keeps its host call)
        pass
