"""The NumPy side of every bridge: one op configuration, its output shape, forward and backward calls.

Each backend bridge (``jax.py``, ``tensorflow.py``, ``torch.py``, ``numpy.py``)
wraps the two functions :func:`forward` and :func:`backward` in its own
host-call and custom-gradient machinery.  They receive float32, float64 or
bfloat16 (``ml_dtypes.bfloat16``) NumPy arrays (the layers cast float16 to
float32 in the framework, so autodiff handles the casts) and never see a
framework tensor.

The op is the whole layer minus a non-fusable activation:
``activation(conv(x) + bias)`` with ``activation`` in {linear, relu, relu6}
fused into the kernel epilogue.  Its gradient is nbconv's backward with the
same activation, which masks ``grad_output`` with the op's own output
(``y > 0`` for relu, ``0 < y < 6`` for relu6: the derivative every backend
uses) in parallel before the backward kernels.
"""
import ctypes
import functools
import os
import sys
from typing import NamedTuple

import numpy as np

import nbconv
from nbconv import _args, _dtypes

#: glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: freed blocks up to this size stay in the heap; set NBCONV_KEEP_FREED_MEMORY=0 to leave malloc as it is
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory():
    """Let glibc's malloc keep freed blocks up to :data:`KEEP_FREED_BYTES` instead of unmapping them.

    XLA's CPU client mallocs every buffer of a call and frees it afterwards;
    glibc serves blocks above its mmap threshold (at most 32 MiB, adjusted as
    blocks are freed) with fresh ``mmap`` pages and returns them on ``free``,
    so each call page-faults its buffers in again, 4 KiB at a time, and
    nbconv's results land in such cold pages.  On the torch and numpy
    backends the results are nbconv's own NumPy allocations: a Keras model
    keeps every block's output until the call returns, and glibc trims the
    top of the heap they leave free, so the next call faulted them in again
    (MobileNetV1's 13 blocks, batch 8: the 13 calls took 87 ms inside a torch
    model, 62 ms called directly; 62 ms in both with this setting).  Raising the mmap and trim
    thresholds makes the next call reuse the same warm pages: the resident
    size stays at the peak of a call instead.  One arena, because a
    secondary arena's heaps are unmapped whenever they fall empty,
    whatever the thresholds (XLA's worker threads would each get one).
    Returns True when set.  Only on glibc; ``NBCONV_KEEP_FREED_MEMORY=0``
    opts out.
    """
    if os.environ.get("NBCONV_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has these semantics
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
                and mallopt(_M_ARENA_MAX, 1))


#: input names, in the op's argument order, as nbconv's backward API spells them
DEPTHWISE_NAMES = ("x", "kernel", "bias")
SEPARABLE_NAMES = ("x", "depthwise_kernel", "pointwise_kernel", "bias")

#: activations fused into the kernel epilogue, by the Keras function that the layer holds
FUSED = ("linear", "relu", "relu6")
_ACTIVATION_NAMES = {code: name for name, code in _args.ACTIVATIONS.items() if name is not None}


class Config(NamedTuple):
    """Static description of one op: hashable, so bridges can cache one compiled op per config.

    ``kind`` is "depthwise" or "separable"; ``strides`` and ``dilation_rate``
    are pairs of int; ``padding`` is "valid", "same" or explicit zero padding
    ``((top, bottom), (left, right))``; ``data_format`` is "channels_last" or
    "channels_first"; ``activation`` is one of :data:`FUSED`; ``precision``
    is nbconv's ``precision=`` ("bfloat16": bfloat16 products whatever the
    weights' dtype, with a result of ``x``'s dtype), or "" for the inputs'
    own.  A separable op may also add a ``depthwise_bias`` (its last input)
    and apply ``depthwise_activation`` to the depthwise result: the fused
    inference block of :class:`keras_layers.FusedSeparableConv2D`, which has
    no backward.
    """

    kind: str
    has_bias: bool
    strides: tuple
    padding: object
    dilation_rate: tuple
    data_format: str
    activation: str
    precision: str = ""
    depthwise_bias: bool = False
    depthwise_activation: str = "linear"

    @property
    def names(self):
        """Names of the op's tensor inputs, in order."""
        names = DEPTHWISE_NAMES if self.kind == "depthwise" else SEPARABLE_NAMES
        names = names if self.has_bias else names[:-1]
        return names + ("depthwise_bias",) if self.depthwise_bias else names

    @property
    def differentiable(self):
        """Whether nbconv has a backward for the op (none for a depthwise bias or activation)."""
        return not self.depthwise_bias and self.depthwise_activation == "linear"


def activation_name(value, name="activation"):
    """None or a fused activation's name (any case) -> its name in :data:`FUSED`; ValueError otherwise."""
    return _ACTIVATION_NAMES[_args.normalize_activation(value, name)]


def make_config(kind, has_bias, strides, padding, dilation_rate, data_format, activation, precision="",
                depthwise_bias=False, depthwise_activation=None):
    """Build a :class:`Config` from a layer's attributes, validated by :mod:`nbconv._args`.

    ``padding`` takes every spelling nbconv does ("valid", "same", an int,
    ``(ph, pw)``, ``((top, bottom), (left, right))``); ``activation`` and
    ``depthwise_activation`` are None, "linear", "relu" or "relu6".
    """
    if kind not in ("depthwise", "separable"):
        raise ValueError(f"Expected `kind` to be 'depthwise' or 'separable'. Received: kind={kind!r}")
    if depthwise_bias and kind != "separable":
        raise ValueError(f"Expected a separable op for a depthwise bias. Received: kind={kind!r}")
    if data_format is None or _args.normalize_data_format(data_format):  # validates; None is channels_last
        data_format = "channels_last"
    else:
        data_format = "channels_first"
    return Config(kind, bool(has_bias), _args.normalize_pair(strides, "strides"), _args.normalize_padding(padding),
                  _args.normalize_pair(dilation_rate, "dilation_rate"), data_format,
                  activation_name(activation, "activation"), precision or "", bool(depthwise_bias),
                  activation_name(depthwise_activation, "depthwise_activation"))


def output_shape(cfg, x_shape, kernel_shape, filters):
    """Static output shape of the op for an input of shape ``x_shape`` (entries may be None).

    ``kernel_shape`` is the depthwise kernel's (kh, kw, C, dm); ``filters`` is
    the number of output channels (C*dm for depthwise, F for separable).
    """
    channels_last = cfg.data_format == "channels_last"
    n, h, w = (x_shape[0], x_shape[1], x_shape[2]) if channels_last else (x_shape[0], x_shape[2], x_shape[3])
    oh, ow = _args.conv_output_hw(h, w, kernel_shape[:2], cfg.strides, cfg.padding, cfg.dilation_rate)
    return (n, oh, ow, filters) if channels_last else (n, filters, oh, ow)


def filters_of(cfg, kernel_shapes):
    """Number of output channels from the kernels' shapes (the op's inputs after ``x``, in order)."""
    if cfg.kind == "depthwise":
        return kernel_shapes[0][2] * kernel_shapes[0][3]
    return kernel_shapes[1][-1]


def check_differentiable(cfg):
    """Raise a clear error when a gradient is asked of an op that has none (see :attr:`Config.differentiable`)."""
    if not cfg.differentiable:
        raise ValueError(
            "Expected a differentiable op: nbconv has no backward for a separable convolution with a depthwise "
            "bias or activation (FusedSeparableConv2D, what keras_layers.convert(fold_batchnorm=True) builds, is "
            "inference only; convert without fold_batchnorm to train). Received: a gradient request for an op "
            f"with depthwise_bias={cfg.depthwise_bias}, depthwise_activation={cfg.depthwise_activation!r}"
        )


def _geometry_kwargs(cfg):
    return dict(strides=cfg.strides, padding=cfg.padding, dilation_rate=cfg.dilation_rate,
                data_format=cfg.data_format)


def _precision_kwargs(cfg, x):
    if not cfg.precision:
        return {}
    return dict(precision=cfg.precision, output_dtype=x.dtype)


def forward(cfg, *arrays, out=None):
    """``activation(conv(x) + bias)`` on NumPy arrays; the result has ``x``'s dtype.

    ``out``, if given, is a C-contiguous array of the result's shape and dtype
    that receives the result (a framework's output buffer: no copy).
    """
    # a bridge's cached PackedPointwiseKernel goes through as it is (np.asarray would unpack it)
    arrays = [a if isinstance(a, nbconv.PackedPointwiseKernel) else np.asarray(a) for a in arrays]
    if out is not None and out.dtype != arrays[0].dtype:
        out[...] = forward(cfg, *arrays)
        return out
    inputs = dict(zip(cfg.names, arrays))
    act = None if cfg.activation == "linear" else cfg.activation
    kwargs = dict(activation=act, out=out, **_geometry_kwargs(cfg), **_precision_kwargs(cfg, arrays[0]))
    if cfg.kind == "depthwise":
        res = nbconv.depthwise_conv2d(inputs["x"], inputs["kernel"], inputs.get("bias"), **kwargs)
    else:
        if cfg.depthwise_bias or cfg.depthwise_activation != "linear":
            kwargs.update(depthwise_bias=inputs.get("depthwise_bias"),
                          depthwise_activation=None if cfg.depthwise_activation == "linear"
                          else cfg.depthwise_activation)
        res = nbconv.separable_conv2d(inputs["x"], inputs["depthwise_kernel"], inputs["pointwise_kernel"],
                                      inputs.get("bias"), **kwargs)
    return _dtypes.as_dtype(np.asarray(res), arrays[0].dtype)


def _dummy(shape, dtype, seed):
    # values that differ between neighbouring elements and between arguments (a capture's self-check compares
    # results), cheaper than random ones: the captures run as a model is traced
    pattern = np.linspace(-1.0, 1.0, 62 + 2 * seed, dtype=np.float32)
    return np.resize(pattern, shape).astype(dtype)


@functools.lru_cache(maxsize=None)
def native_call(cfg, shapes, dtypes, threads):
    """The :class:`nbconv._native.NativeCall` of :func:`forward` on inputs of ``shapes``/``dtypes`` (tuples), for
    a framework that calls compiled code for an op (XLA's FFI, TensorFlow's kernel API), or None where the call
    cannot run natively.  ``threads`` (the thread setting when the op is traced) is part of the key.

    Never evicted: a compiled graph holds the template's addresses (its constants, its job) for as long as the
    process may run it."""
    from nbconv import _native

    arrays = [_dummy(sh, dt, 1 + i) for i, (sh, dt) in enumerate(zip(shapes, dtypes))]
    out = np.empty(output_shape(cfg, shapes[0], shapes[1], filters_of(cfg, shapes[1:])), dtypes[0])
    try:
        return _native.capture(functools.partial(forward, cfg), arrays, out)
    except _native.Unsupported:
        return None


def backward(cfg, wrt, grad_output, y, *arrays):
    """Gradients of the op with respect to the inputs named in ``wrt`` (a tuple, in input order).

    ``y`` is the op's output (only read when the activation is relu or relu6;
    any array otherwise).  ``arrays`` are the op's inputs.  Returns one array
    per name in ``wrt``, shaped and typed like that input.  Raises ValueError
    for an op that has no backward (:func:`check_differentiable`).
    """
    check_differentiable(cfg)
    arrays = [np.asarray(a) for a in arrays]
    g = np.asarray(grad_output)
    act = dict(activation=cfg.activation, output=np.asarray(y) if cfg.activation != "linear" else None)
    names = cfg.names
    inputs = dict(zip(names, arrays))
    if cfg.kind == "depthwise":
        grads = nbconv.depthwise_conv2d_backward(g, inputs["x"], inputs["kernel"], wrt=tuple(wrt),
                                                 **act, **_geometry_kwargs(cfg))
    else:
        grads = nbconv.separable_conv2d_backward(g, inputs["x"], inputs["depthwise_kernel"],
                                                 inputs["pointwise_kernel"], wrt=tuple(wrt),
                                                 **act, **_geometry_kwargs(cfg))
    out = []
    for name in wrt:
        ref = inputs[name]
        out.append(_dtypes.as_dtype(np.asarray(getattr(grads, name)), ref.dtype).reshape(ref.shape))
    return tuple(out)


def batch_norm_forward(epsilon, activation, x, gamma, beta, out=None):
    """``(y, mean, variance)`` of a training-mode batch norm over the last axis (:func:`nbconv.batch_norm_train`)."""
    return nbconv.batch_norm_train(x, gamma, beta, epsilon=epsilon, activation=activation, out=out)


def batch_norm_backward(epsilon, activation, grad_output, x, mean, variance, gamma, y, out=None):
    """``(dx, dgamma, dbeta)`` of :func:`batch_norm_forward` (:func:`nbconv.batch_norm_train_backward`)."""
    return tuple(nbconv.batch_norm_train_backward(grad_output, x, mean, variance, gamma, epsilon=epsilon,
                                                  activation=activation, output=y, out=out))
