"""Repeated forward calls replayed from a captured template, past the Python side of the call.

A public forward call spends 15 us in Python before its kernel starts (its
argument checks, planning, allocation and the kernel's dispatch), and after
a few milliseconds of idle time 50-200 us: every page of interpreter and
NumPy code it touches has to be fetched again (docs/tuning.md, "Replayed
calls").  Layers called in a loop, a server answering requests, and a
framework calling a layer between its own ops repeat the same call with new
data.  So the third call with the same *key* -- the inputs' types, shapes,
dtypes and strides, the other arguments (each tagged with its type) and the
thread count, which together decide everything the Python side does -- is
captured as a native call (:func:`nbconv._native.capture`: the kernel's
arguments as a template, every buffer located in the inputs, the output or
the scratch workspace), checked against the Python call bit for bit, and
from then on each call with that key only allocates its output and runs the
template (:func:`nbconv._native.run_template`).

Packed pointwise weights (:class:`nbconv.PackedPointwiseKernel`) are keyed
by their arrays' shapes and dtypes like plain ones, and an ``out=`` array by
its shape, dtype, strides and writeability (a replayed call writes into it,
after checking that it shares no memory with the inputs).  Calls that
cannot be replayed keep the Python path: an input that is not a plain NumPy
array (lists, subclasses), an argument that is not hashable, calls under
:func:`nbconv._plan.override`, and any call the capture refuses (one that computes on its inputs in Python
or launches two kernels: float16 inputs, bfloat16 depthwise weights beside a float32 bias).
A capture that waits on a kernel still compiling in the background is tried
again :data:`RETRY` calls later.  ``NBCONV_REPLAY=0`` turns replay off.
"""
import collections
import functools
import os
import threading

import numpy as np

from . import _compile, _native, _plan
from .packing import PackedPointwiseKernel
from ._threads import CAPTURE, POOL, get_num_threads

__all__ = ["replayable", "ENV", "AFTER", "RETRY", "clear"]

#: environment variable: "0" runs every call through its Python path
ENV = "NBCONV_REPLAY"
#: calls with one key that run in Python before the next is captured (a one-off call never pays a capture)
AFTER = 2
#: calls to wait before a capture that found a kernel still compiling is tried again
RETRY = 32
#: keys remembered, least recently used forgotten first
KEYS = 256

_ENABLED = os.environ.get(ENV, "1") != "0" and _native.available()
# compiled by the background child with the kernels, never in a caller's first replay
_compile.companions((_native.run_template, (np.zeros(1, np.int64), np.zeros(1, np.int64), True)))
#: the planner's own tunables: calls under :func:`nbconv._plan.override` (tests) keep the Python path
_DEFAULT_TUNABLES = _plan.tunables()
_TABLE = collections.OrderedDict()
_LOCK = threading.Lock()


class _Entry:
    __slots__ = ("seen", "call", "shape", "dtype", "dead", "retry_at")

    def __init__(self):
        self.seen, self.call, self.dead, self.retry_at = 1, None, False, 0


def clear():
    """Forget every captured call (tests; a process that changed what its calls must do)."""
    with _LOCK:
        _TABLE.clear()


def _plain(value):
    """``value`` tagged with its type (and its items', for a tuple): ``1`` and ``1.0``, or ``True``, compare equal
    but are not the same argument (the Python path may refuse one of them); raises TypeError if unhashable."""
    if type(value) is tuple:
        return tuple, tuple(_plain(v) for v in value)
    hash(value)
    return type(value), value


def _describe(value, arrays):
    """``value``'s part of a key: an array's (shape, dtype, strides), noted in ``arrays``; packed weights' two
    arrays likewise; else the value itself, tagged with its type; None when the call cannot be replayed (an
    array subclass, an unhashable value)."""
    if type(value) is np.ndarray:
        arrays.append(value)
        return value.shape, value.dtype, value.strides
    if type(value) is PackedPointwiseKernel:
        parts = [_describe(a, arrays) for a in _packed_arrays(value)]
        return None if None in parts else (PackedPointwiseKernel, value.compute_dtype, *parts)
    if isinstance(value, np.ndarray):
        return None
    try:
        return _plain(value)
    except TypeError:
        return None


def _packed_arrays(packed):
    # the plain kernel too: calls computing in another dtype read it instead of the panels
    return packed._kernel, packed._panels


def _compute_of(value):
    return value.compute_dtype if type(value) is PackedPointwiseKernel else None


def _key(fn, args, kwargs):
    """``(key, arrays)`` of a call (module notes): ``arrays`` its input arrays in order (not ``out``)."""
    arrays = []
    parts = [fn, get_num_threads()]
    for a in args:
        d = _describe(a, arrays)
        if d is None:
            return None, None
        parts.append(d)
    for name, value in kwargs.items():
        if name == "out":
            if value is None:
                continue
            if type(value) is not np.ndarray:
                return None, None
            d = value.shape, value.dtype, value.strides, value.flags.writeable
        else:
            d = _describe(value, arrays)
        if d is None:
            return None, None
        parts.append((name, d))
    return tuple(parts), arrays


def _out_overlaps(out, arrays):
    """Whether ``out`` may share memory with an input (the Python path then refuses it, or copies)."""
    return any(np.may_share_memory(out, a) for a in arrays)


def _run(call, arrays, workspace, out):
    """Run the captured ``call`` on ``arrays`` into ``out`` in the calling thread's workspace; False if the
    template refused to run (another process's, or its mailbox overwritten: the caller then takes the Python
    path)."""
    return call.run(arrays, out, workspace(call.scratch_bytes), True) == _native.OK


def _capture(entry, fn, args, kwargs, arrays, workspace, new_result):
    """This call's result from its Python path, capturing it on the way (see the module notes) unless the
    capture is refused: ``entry`` then replays the key's next calls, is marked dead, or waits to try again."""
    # (position or name, packed weights' compute dtype or None) of each argument holding arrays, in key order
    slots = [(i, _compute_of(a)) for i, a in enumerate(args) if type(a) in (np.ndarray, PackedPointwiseKernel)]
    slots += [(name, _compute_of(v)) for name, v in kwargs.items()
              if name != "out" and type(v) in (np.ndarray, PackedPointwiseKernel)]

    def call(*arrs, out):
        a, kw = list(args), dict(kwargs)
        kw.pop("out", None)
        arrs = list(arrs)
        for slot, compute in slots:
            value = arrs.pop(0) if compute is None else PackedPointwiseKernel(arrs.pop(0), arrs.pop(0), compute)
            if isinstance(slot, int):
                a[slot] = value
            else:
                kw[slot] = value
        return fn(*a, **kw, out=out)

    expected = fn(*args, **kwargs)
    if type(expected) is not np.ndarray or not expected.flags.c_contiguous:
        entry.dead = True
        return expected
    try:
        if _compile.get_mode() != "sync" and not _compile.companions_ready(submit=True):
            raise _native.NotReady("the replay's own function is compiling in the background")
        captured = _native.capture(call, arrays, np.empty_like(expected))
        entry.shape, entry.dtype = expected.shape, expected.dtype
        # every byte of the result must be the kernel's: a result converted in Python after the kernel (which
        # the capture does not see) would be left as this filler
        got = new_result(entry.shape, entry.dtype)
        got.view(np.uint8)[...] = 0xFF
        if not (_run(captured, arrays, workspace, got)
                and np.array_equal(expected.view(np.uint8), got.view(np.uint8))):
            raise _native.Unsupported("the replay differs from the Python call")
        entry.call = captured  # last: another thread may replay the key from now on
    except _native.NotReady:
        entry.call = None
        entry.retry_at = entry.seen + RETRY
    except _native.Unsupported:
        entry.call, entry.dead = None, True
    return expected


def replayable(workspace, new_result):
    """Decorate a public forward function ``fn(..., out=None, ...)`` so that repeated calls replay (module
    notes); ``workspace(nbytes)`` returns the calling thread's scratch buffer of at least ``nbytes`` bytes,
    ``new_result(shape, dtype)`` a result array as the function allocates it."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if (not _ENABLED or CAPTURE.calls is not None or _compile.recording()
                    or _plan.tunables() is not _DEFAULT_TUNABLES):
                return fn(*args, **kwargs)
            key, arrays = _key(fn, args, kwargs)
            if key is None:
                return fn(*args, **kwargs)
            try:
                entry = _TABLE.get(key)
            except TypeError:  # a value whose hash() works but whose comparison does not
                return fn(*args, **kwargs)
            if entry is not None and entry.call is not None:
                out = kwargs.get("out")
                if out is not None and _out_overlaps(out, arrays):
                    return fn(*args, **kwargs)
                POOL.wake()
                POOL.ensure_started()
                if out is None:
                    out = new_result(entry.shape, entry.dtype)
                if _run(entry.call, arrays, workspace, out):
                    return out
                entry.call, entry.dead = None, True
                return fn(*args, **kwargs)
            if entry is None:
                with _LOCK:
                    _TABLE[key] = _Entry()
                    if len(_TABLE) > KEYS:
                        _TABLE.popitem(last=False)
                return fn(*args, **kwargs)
            entry.seen += 1
            with _LOCK:
                if key in _TABLE:
                    _TABLE.move_to_end(key)
            if entry.dead or entry.seen <= AFTER or entry.seen < entry.retry_at:
                return fn(*args, **kwargs)
            return _capture(entry, fn, args, kwargs, arrays, workspace, new_result)

        return call

    return decorate
