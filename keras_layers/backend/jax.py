"""JAX bridge: ``jax.custom_vjp`` around calls into nbconv: XLA's FFI for the forward, host callbacks else.

The forward runs as an XLA custom call (``jax.ffi.ffi_call``) whose handler
is nbconv's compiled :func:`nbconv._native.ffi_handler`: XLA calls the
kernel directly, without the interpreter, the GIL or a copy.  The op is
captured for its shapes and dtypes when it is traced
(:func:`nbconv._native.capture`: the kernel's arguments as a template that
travels as the call's attribute; its scratch is a second result that XLA
allocates).  Where that is not possible (no ``jax.ffi``, not Linux, a
kernel still compiling in the background, a call that works on its inputs
in Python, ``NBCONV_JAX_FFI=0``) the forward, like every backward, is a host
callback (``buffer_callback``, else ``pure_callback``).

Works under ``jax.jit``, ``jax.grad`` (reverse mode only: forward-mode ``jax.jvp``
is not defined for a custom_vjp function) and ``jax.vmap`` (the callback runs
sequentially over the mapped axis), hence Keras's jitted ``fit`` / ``predict``.

The vjp is defined with ``symbolic_zeros=True``: the forward rule sees which
inputs are differentiated (``CustomVJPPrimal.perturbed``) and the backward
callback computes only those gradients, so the first layer of a model never
computes a gradient for the input data.  The set is carried to the backward
rule as static pytree metadata of the residuals.
"""
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from . import _common

try:  # the tracer of a jit trace (prunes_unused)
    from jax.interpreters.partial_eval import DynamicJaxprTracer as _JaxprTracer
except ImportError:  # pragma: no cover  (another jax: nothing folds into the op)
    _JaxprTracer = ()

try:
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # jax < 0.7
    _buffer_callback = None

#: XLA's per-call buffers otherwise page-fault in on every call (see keep_freed_memory)
MALLOC_TUNED = _common.keep_freed_memory()

#: environment variable: "0" keeps the forward on the host callback
FFI_ENV = "NBCONV_JAX_FFI"
#: the custom call target of the native forward
FFI_TARGET = "nbconv_forward"
_REGISTERED, _OFF = [], []


def ffi_ready():
    """Whether the forward can be an XLA FFI call here (the handler registered once per process).

    In the background compile mode a handler not yet in the disk cache is
    built by a child process meanwhile: the ops traced until then keep the
    host callback.
    """
    if _REGISTERED:
        return True
    if _OFF:
        return False
    from nbconv import _compile, _native

    if not _ffi_possible():
        _OFF.append(True)
        return False
    if _compile.get_mode() == "background" and not _native.entry_built("ffi"):
        _native.build_in_background("ffi")
        return False
    ffi = jax.ffi
    try:
        ffi.register_ffi_target(FFI_TARGET, ffi.pycapsule(_native.ffi_handler().address), platform="cpu")
    except Exception as exc:  # noqa: BLE001  (an XLA that refuses the handler: the callback still works)
        warnings.warn(f"nbconv: XLA refused the native forward ({exc!r}); using the host callback",
                      RuntimeWarning, stacklevel=2)
        _OFF.append(True)
        return False
    _REGISTERED.append(FFI_TARGET)  # once per process: XLA keeps the target
    return True


def _ffi_possible():
    """Whether this jax has XLA's FFI, nbconv's native calls run here, and ``NBCONV_JAX_FFI`` allows them."""
    from nbconv import _native

    ffi = getattr(jax, "ffi", None)
    return (os.environ.get(FFI_ENV, "1") != "0" and _native.available() and ffi is not None
            and hasattr(ffi, "ffi_call"))


def _load_handler():
    """Load a cached FFI handler ahead of the first trace (:func:`nbconv._runtime.warm_up`): the first load of a
    process takes about 0.2 s, mostly Numba filling its target context."""
    from nbconv import _native, _runtime

    if _ffi_possible() and _native.entry_built("ffi"):
        _runtime.warm_up(_native.ffi_handler)


_load_handler()


def native_forward():
    """Whether the forward runs as compiled code called by XLA (:func:`ffi_ready`)."""
    return ffi_ready()


@jax.tree_util.register_pytree_node_class
class _Residuals:
    """Residuals of the forward rule: arrays as children, the names to differentiate as static metadata."""

    def __init__(self, wrt, arrays, y):
        self.wrt, self.arrays, self.y = wrt, arrays, y

    def tree_flatten(self):
        return (self.arrays, self.y), self.wrt

    @classmethod
    def tree_unflatten(cls, wrt, children):
        return cls(wrt, *children)


def _sds(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _host_call(fn, result, *args, writes_out=False):
    """``fn(*ndarrays)`` on the host, declared to return ``result`` (a ShapeDtypeStruct or a tuple of them).

    ``fn`` returns an ndarray, or a tuple of them when ``result`` is a tuple;
    its results are fresh arrays (they may only alias its inputs while it runs).
    With ``writes_out``, ``fn`` also takes ``out=``, XLA's buffer for the
    (first) result, and writes that result there: no copy.
    """
    if _buffer_callback is None:
        return jax.pure_callback(fn, result, *args, vmap_method="sequential")
    many = isinstance(result, tuple)

    def callback(ctx, out, *buffers):
        # the buffers are XLA's own, valid during this call only: nothing read from them may outlive it
        outs = out if many else (out,)
        if writes_out:
            dst = np.asarray(outs[0])
            if dst.flags.c_contiguous and dst.flags.writeable:
                values = fn(*[np.asarray(b) for b in buffers], out=dst)
                for d, src in zip(outs[1:], values[1:] if many else ()):
                    np.copyto(np.asarray(d), src, casting="no")
                return
        values = fn(*[np.asarray(b) for b in buffers])
        for dst, src in zip(outs, values if many else (values,)):
            np.copyto(np.asarray(dst), src, casting="no")

    return _buffer_callback(callback, result, vmap_method="sequential")(*args)


def _forward(cfg, args):
    out_shape = _common.output_shape(cfg, args[0].shape, args[1].shape,
                                     _common.filters_of(cfg, [a.shape for a in args[1:]]))
    if ffi_ready():
        from nbconv import get_num_threads

        call = _common.native_call(cfg, tuple(tuple(a.shape) for a in args),
                                   tuple(np.dtype(a.dtype) for a in args), get_num_threads())
        if call is not None:
            out, _ = jax.ffi.ffi_call(FFI_TARGET, (jax.ShapeDtypeStruct(out_shape, args[0].dtype),
                                                   jax.ShapeDtypeStruct((call.scratch_bytes,), np.uint8)),
                                      vmap_method="sequential")(*args, nbconv=call.template)
            return out
    return _host_call(functools.partial(_common.forward, cfg), jax.ShapeDtypeStruct(out_shape, args[0].dtype), *args,
                      writes_out=True)


@functools.lru_cache(maxsize=None)
def _op(cfg):
    names = cfg.names

    @jax.custom_vjp
    def op(*args):
        return _forward(cfg, args)

    def fwd(*primals):
        args = tuple(p.value for p in primals)
        wrt = tuple(n for n, p in zip(names, primals) if p.perturbed)
        y = _forward(cfg, args)
        # the output is only read back by the relu/relu6 mask
        res_y = y if cfg.activation != "linear" else None
        return y, _Residuals(wrt, args, res_y)

    def bwd(res, g):
        if not res.wrt:
            return tuple(None for _ in names)
        _common.check_differentiable(cfg)  # at trace time, not inside the host call
        by_name = dict(zip(names, res.arrays))
        shapes = tuple(_sds(by_name[n]) for n in res.wrt)
        y = res.y if res.y is not None else g
        grads = _host_call(functools.partial(_common.backward, cfg, res.wrt), shapes, g, y, *res.arrays)
        got = dict(zip(res.wrt, grads))
        return tuple(got.get(n) for n in names)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op


@functools.lru_cache(maxsize=None)
def _batch_norm_op(epsilon, activation):
    def forward(x, gamma, beta):
        c = (x.shape[-1],)
        return _host_call(functools.partial(_common.batch_norm_forward, epsilon, activation),
                          (_sds(x), jax.ShapeDtypeStruct(c, np.float32), jax.ShapeDtypeStruct(c, np.float32)),
                          x, gamma, beta, writes_out=True)

    @jax.custom_vjp
    def op(x, gamma, beta):
        return forward(x, gamma, beta)

    def fwd(x, gamma, beta):
        y, mean, var = forward(x, gamma, beta)
        return (y, mean, var), (x, gamma, mean, var, y)

    def bwd(res, cts):
        # the moments reach the loss only through y: the caller stops their gradient (batch_norm_train)
        x, gamma, mean, var, y = res
        return _host_call(functools.partial(_common.batch_norm_backward, epsilon, activation),
                          (_sds(x), _sds(gamma), _sds(gamma)), cts[0], x, mean, var, gamma, y, writes_out=True)

    op.defvjp(fwd, bwd)
    return op


def batch_norm_train(x, gamma, beta, epsilon, activation="linear"):
    """``(y, mean, variance)``: training-mode batch norm over the last axis of ``x`` (float32 or bfloat16), with
    float32 ``gamma`` and ``beta``, by nbconv's kernels in host callbacks (XLA's own reductions and element-wise
    passes over a large activation take 3-6x as long on the CPU).  The moments come without gradient (a layer's
    moving averages take them)."""
    y, mean, var = _batch_norm_op(float(epsilon), activation)(jnp.asarray(x), jnp.asarray(gamma, jnp.float32),
                                                               jnp.asarray(beta, jnp.float32))
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def apply(cfg, *tensors):
    """Run the op described by ``cfg`` on ``tensors`` (x, kernel(s)[, bias]): float32, float64 or bfloat16
    jax arrays."""
    tensors = tuple(jnp.asarray(t) for t in tensors)
    return _op(cfg)(*tensors)


def prunes_unused(tensor):
    """Whether ops on ``tensor`` whose results nothing uses are dropped before they run: a ``jax.jit`` trace
    (Keras's predict step), whose unused custom calls and callbacks XLA removes (neither has side effects).
    Not under autodiff or vmap (a tensor of another tracer), nor eagerly."""
    return isinstance(tensor, _JaxprTracer)


def prunes_unused_in_training(tensor):
    """Whether unused ops on ``tensor`` are dropped where a gradient may be taken: a jit trace, seen through the
    tracers of autodiff (Keras's jitted ``train_step``); not eagerly, where every op runs."""
    for _ in range(8):
        if isinstance(tensor, _JaxprTracer):
            return True
        tensor = getattr(tensor, "primal", None)
        if tensor is None:
            return False
    return False


def needs_gradient(tensors):
    """Always False: under jax the gradient is taken after tracing, so nothing tells training from inference."""
    return False
