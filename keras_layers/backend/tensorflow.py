"""TensorFlow bridge: ``tf.custom_gradient`` around calls into nbconv: a C kernel for the forward,
``tf.numpy_function`` else.

The forward is an op of nbconv's own, ``NbconvForward``, registered at run
time through TensorFlow's C kernel API (op definition and CPU kernel) with
:func:`nbconv._native.tf_compute` as its compute function: TensorFlow's
executor calls the kernel directly, without the interpreter or the GIL, and
allocates the result.  The op is captured for its shapes and dtypes when the
graph is built (:func:`nbconv._native.capture`; its template is the op's last
input, a constant).  Where that is not possible (shapes not fully known,
not Linux, a kernel still compiling in the background, ``NBCONV_TF_NATIVE=0``)
the forward, like every backward, is a ``numpy_function``.

Runs eagerly and inside ``tf.function`` (Keras's default ``fit``/``predict``).
XLA cannot compile a Python call, so the layers set ``supports_jit = False`` on
this backend and Keras falls back to a non-XLA ``tf.function``.  For the same
reason a SavedModel written by ``model.export()`` (or a TFLite conversion) does
not carry the kernel: it only runs in a Python process that can import nbconv.

``numpy_function`` loses static shapes; they are restored with ``set_shape``.
The gradients of the inputs that a ``GradientTape`` watched when the op ran
are computed in one stateless call; no tape can ask for the others (``x`` of
a model's first layer, the weights of a frozen layer), so eagerly they are not
computed and in a graph they get a call of their own, which pruning drops when
nothing uses it.  When no tape watches anything (``tf.gradients``), ``x`` and
the weights get one call each, as pruning needs.

The forward result is written by the kernel into a 64-byte aligned buffer
(``out=``) that is reused once TensorFlow has let go of it.  ``numpy_function``
wraps a returned array without a copy only when its data is aligned to
``EIGEN_MAX_ALIGN_BYTES`` (64 in TensorFlow's CPU builds); NumPy's own
allocations are 16-byte aligned, so every result used to be copied into a new
tensor.  A fresh array also page-faults all its memory in (and the kernel's
first write zero-fills it) on every call.  A wrapped array stays referenced by
the tensor's buffer (and by anything sharing it: a downstream op writing in
place, ``.numpy()`` views) until TensorFlow frees it, so a buffer is handed out
again only when the pool holds the last reference.  The pool keeps at most
:data:`POOL_PER_SHAPE` buffers per (shape, dtype) of forward result, for the
:data:`POOL_SHAPES` pairs used last; :func:`clear_buffers` drops them.
"""
import collections
import ctypes
import functools
import os
import sys
import threading
import warnings

import numpy as np
import tensorflow as tf

try:  # which inputs a GradientTape watches (private module; without it every gradient is computed)
    from tensorflow.python.eager import record as _record
except ImportError:  # pragma: no cover
    _record = None

from . import _common

#: alignment (bytes) at which ``numpy_function`` adopts a returned array instead of copying it
ALIGN = 64
#: forward result buffers kept per (shape, dtype)
POOL_PER_SHAPE = 4
#: (shape, dtype) pairs kept, least recently used dropped first
POOL_SHAPES = 64

_pool = collections.OrderedDict()
_pool_lock = threading.Lock()


def _aligned_empty(shape, dtype):
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def _result_buffer(shape, dtype):
    """An aligned array of ``shape``/``dtype`` that nothing else references: a pooled one if one is free."""
    key = (tuple(shape), np.dtype(dtype).str)
    with _pool_lock:
        buffers = _pool.get(key)
        if buffers is None:
            buffers = _pool[key] = []
            while len(_pool) > POOL_SHAPES:  # least recently used first (inputs of ever new sizes)
                del _pool[next(iter(_pool))]
        else:
            _pool.move_to_end(key)
        for buf in buffers:
            # referenced only by the list, ``buf`` and getrefcount's argument: TensorFlow has released it
            if sys.getrefcount(buf) == 3:
                return buf
        buf = _aligned_empty(shape, dtype)
        if len(buffers) < POOL_PER_SHAPE:
            buffers.append(buf)
        return buf


def clear_buffers():
    """Drop the pooled forward result buffers (those still in use stay alive with their tensors)."""
    with _pool_lock:
        _pool.clear()


@functools.lru_cache(maxsize=256)
def _result_shape(cfg, x_shape, kernel_shapes):
    # per call, inside the host call: the validated output-size arithmetic once per shape
    return _common.output_shape(cfg, x_shape, kernel_shapes[0], _common.filters_of(cfg, kernel_shapes))


#: environment variable: "0" keeps the forward on ``numpy_function``
NATIVE_ENV = "NBCONV_TF_NATIVE"
#: the op registered for the native forward
OP_NAME = "NbconvForward"
_REGISTERED, _OFF = [], []


def _register_op(lib, compute):
    """Register :data:`OP_NAME` (inputs of any dtypes, then the template; the result and scratch bytes out) and its
    CPU kernel with TensorFlow's C API; raises RuntimeError with TensorFlow's message on failure."""
    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    for name, res, args in (("TF_NewStatus", vp, []), ("TF_DeleteStatus", None, [vp]),
                            ("TF_GetCode", ctypes.c_int, [vp]), ("TF_Message", cp, [vp]),
                            ("TF_NewOpDefinitionBuilder", vp, [cp]),
                            ("TF_OpDefinitionBuilderAddAttr", None, [vp, cp]),
                            ("TF_OpDefinitionBuilderAddInput", None, [vp, cp]),
                            ("TF_OpDefinitionBuilderAddOutput", None, [vp, cp]),
                            ("TF_RegisterOpDefinition", None, [vp, vp]),
                            ("TF_NewKernelBuilder", vp, [cp, cp, vp, vp, vp]),
                            ("TF_RegisterKernelBuilder", None, [cp, vp, vp])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    status = lib.TF_NewStatus()
    try:
        b = lib.TF_NewOpDefinitionBuilder(OP_NAME.encode())
        for attr in (b"Tin: list(type)", b"Tout: type"):
            lib.TF_OpDefinitionBuilderAddAttr(b, attr)
        lib.TF_OpDefinitionBuilderAddInput(b, b"inputs: Tin")
        lib.TF_OpDefinitionBuilderAddInput(b, b"template: int64")
        lib.TF_OpDefinitionBuilderAddOutput(b, b"output: Tout")
        lib.TF_OpDefinitionBuilderAddOutput(b, b"scratch: uint8")
        lib.TF_RegisterOpDefinition(b, status)
        if lib.TF_GetCode(status) != 0:
            raise RuntimeError(lib.TF_Message(status).decode())
        kb = lib.TF_NewKernelBuilder(OP_NAME.encode(), b"CPU", None, compute, None)
        lib.TF_RegisterKernelBuilder(OP_NAME.encode(), kb, status)
        if lib.TF_GetCode(status) != 0:
            raise RuntimeError(lib.TF_Message(status).decode())
    finally:
        lib.TF_DeleteStatus(status)


def native_ready():
    """Whether the forward can run as the native op here (registered once per process).

    In the background compile mode a compute function not yet in the disk
    cache is built by a child process meanwhile: graphs built until then keep
    ``numpy_function``.
    """
    if _REGISTERED:
        return True
    if _OFF:
        return False
    from nbconv import _compile, _native

    if os.environ.get(NATIVE_ENV, "1") == "0" or not _native.available():
        _OFF.append(True)
        return False
    if _compile.get_mode() == "background" and not _native.entry_built("tf"):
        _native.build_in_background("tf")
        return False
    try:
        lib = _native.tf_library()
        _register_op(lib, _native.tf_compute(lib).address)
    except Exception as exc:  # noqa: BLE001  (another TensorFlow: numpy_function still works)
        warnings.warn(f"nbconv: cannot register the native TensorFlow op ({exc!r}); using numpy_function",
                      RuntimeWarning, stacklevel=2)
        _OFF.append(True)
        return False
    _REGISTERED.append(OP_NAME)  # once per process: TensorFlow keeps the op and its kernel
    return True


def native_forward():
    """Whether the forward runs as compiled code called by TensorFlow (:func:`native_ready`)."""
    return native_ready()


def _native_forward(cfg, args):
    """The forward as :data:`OP_NAME`, or None where it cannot be (then ``numpy_function`` runs it)."""
    shapes = [tuple(a.shape) for a in args]
    if any(d is None for sh in shapes for d in sh) or not native_ready():
        return None
    from nbconv import get_num_threads

    call = _common.native_call(cfg, tuple(shapes), tuple(np.dtype(a.dtype.as_numpy_dtype) for a in args),
                               get_num_threads())
    if call is None:
        return None
    template = tf.constant(call.template)
    tout = args[0].dtype
    if tf.executing_eagerly():
        from tensorflow.python.eager import context, execute

        attrs = ("Tin", [a.dtype.as_datatype_enum for a in args], "Tout", tout.as_datatype_enum)
        out, _ = execute.execute(OP_NAME.encode(), 2, inputs=list(args) + [template], attrs=attrs,
                                 ctx=context.context())
        return out
    from tensorflow.python.framework import op_def_library

    _, _, op, _ = op_def_library._apply_op_helper(OP_NAME, inputs=list(args), template=template, Tout=tout)
    return op.outputs[0]


def _forward(cfg, *arrays):
    arrays = [np.asarray(a) for a in arrays]
    out = _result_buffer(_result_shape(cfg, arrays[0].shape, tuple(a.shape for a in arrays[1:])), arrays[0].dtype)
    return _common.forward(cfg, *arrays, out=out)


def _grads(cfg, wrt, inputs, like):
    """One stateless host call computing the gradients named in ``wrt``, shaped like the tensors ``like``."""
    if len(wrt) == 1:  # a one-element Tout list would come back as a bare tensor
        def fn(*arrays):
            return _common.backward(cfg, wrt, *arrays)[0]

        outs = [tf.numpy_function(fn, inputs, Tout=like[0].dtype, stateful=False)]
    else:
        outs = tf.numpy_function(functools.partial(_common.backward, cfg, wrt), inputs,
                                 Tout=[t.dtype for t in like], stateful=False)
    for out, t in zip(outs, like):
        out.set_shape(t.shape)
    return list(outs)


def _watched(tensors):
    """Which of ``tensors`` a ``GradientTape`` records, or None when that is unknown (no tape watches any).

    A gradient can only ever be asked through the op for an input that a tape
    watched when the op ran, so the gradients of the watched inputs are
    computed in one host call (it shares the depthwise recomputation and the
    pointwise product between ``x`` and the weights: 181 against 260 ms for the
    backward of the 13 MobileNet blocks at batch 8 in two calls; a training
    step of the 13-block model, batch 8: 239-291 against 268-318 ms).
    """
    if _record is None or not _record.could_possibly_record():
        return None
    flags = tuple(bool(_record.should_record_backprop([t])) for t in tensors)
    return flags if any(flags) else None


@functools.lru_cache(maxsize=None)
def _op(cfg, watched):
    names = cfg.names
    # unknown: x apart from the weights, so that graph pruning can drop its call when nothing uses it
    groups = ([0], list(range(1, len(names)))) if watched is None else (
        [i for i, w in enumerate(watched) if w], [i for i, w in enumerate(watched) if not w])

    @tf.custom_gradient
    def op(*args):
        x = args[0]
        y = _native_forward(cfg, args)
        if y is None:
            y = tf.numpy_function(functools.partial(_forward, cfg), list(args), Tout=x.dtype, stateful=False)
        filters = _common.filters_of(cfg, [a.shape for a in args[1:]])
        y.set_shape(_common.output_shape(cfg, x.shape, args[1].shape, filters))

        def grad(g):
            _common.check_differentiable(cfg)  # when the gradient is built, not inside the host call
            y_or_g = y if cfg.activation != "linear" else g
            inputs = [g, y_or_g, *args]
            grads = [None] * len(args)
            for k, idx in enumerate(groups):
                # eagerly, no tape can want the gradient of an input none watched; in a graph the unwatched
                # inputs' call stays separate (pruned when unused: a function differentiated from outside)
                if not idx or (k == 1 and watched is not None and tf.executing_eagerly()):
                    continue
                for i, out in zip(idx, _grads(cfg, tuple(names[i] for i in idx), inputs, [args[i] for i in idx])):
                    grads[i] = out
            return grads

        return y, grad

    return op


def apply(cfg, *tensors):
    """Run the op described by ``cfg`` on ``tensors`` (x, kernel(s)[, bias]): float32, float64 or bfloat16
    TF tensors."""
    tensors = [tf.convert_to_tensor(t) for t in tensors]
    return _op(cfg, _watched(tensors))(*tensors)


def prunes_unused(tensor):
    """Whether ops built now on ``tensor`` whose results nothing uses are dropped before they run (a
    ``tf.function``'s graph: TensorFlow prunes unused stateless ops), so a layer may offer an alternative op
    (``keras_layers.layers``)."""
    return not tf.executing_eagerly()


def needs_gradient(tensors):
    """Whether a ``GradientTape`` records any of ``tensors`` (a training step's trace), as the layers ask it."""
    return _watched([tf.convert_to_tensor(t) for t in tensors]) is not None
