"""PyTorch bridge: ``torch.library`` custom ops calling nbconv, with fake and autograd registrations.

``nbconv::depthwise_conv2d`` and ``nbconv::separable_conv2d`` run the forward
kernels; their backward is another pair of custom ops
(``nbconv::depthwise_conv2d_backward`` / ``nbconv::separable_conv2d_backward``),
so both eager mode and ``torch.compile`` (no graph break) work.  The backward
computes only the gradients autograd asks for (``ctx.needs_input_grad``).
The separable op also carries FusedSeparableConv2D's depthwise bias and
activation, for which nbconv has no backward: its autograd formula raises
ValueError.  Explicit padding travels as ``padding="explicit"`` plus
``pads=[top, bottom, left, right]`` (custom ops take no nested tuples).
Tensors on another device are computed on the CPU and moved back.

Run with ``OMP_WAIT_POLICY=PASSIVE`` set before torch is imported: otherwise
torch's spinning OpenMP workers slow nbconv's kernels several-fold when torch
ops and nbconv calls alternate (see :mod:`keras_layers.layers`).
"""
import weakref
from typing import List, Optional

import numpy as np
import torch

import nbconv
from nbconv import packing

from . import _common

_BF16 = nbconv.as_bfloat16(np.zeros(0, np.float32)).dtype

#: nbconv's results (NumPy allocations) otherwise page-fault in on every call (see keep_freed_memory)
MALLOC_TUNED = _common.keep_freed_memory()


def _np(t):
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, viewed as ml_dtypes' (no copy)
        return nbconv.as_bfloat16(t.view(torch.int16).numpy())
    return t.numpy()


def _tensor(a):
    """A torch tensor sharing ``a``'s memory (bfloat16 arrays as torch's bfloat16)."""
    a = np.ascontiguousarray(a)
    if a.dtype == _BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _padding_args(padding):
    """A Config's padding as the ops' ``(padding: str, pads: List[int])``: custom ops take no nested tuples."""
    if isinstance(padding, str):
        return padding, []
    (top, bottom), (left, right) = padding
    return "explicit", [top, bottom, left, right]


def _cfg(kind, bias, strides, padding, pads, dilation_rate, data_format, activation, precision, depthwise_bias=None,
         depthwise_activation="linear"):
    if padding == "explicit":
        padding = ((pads[0], pads[1]), (pads[2], pads[3]))
    return _common.make_config(kind, bias is not None, strides, padding, dilation_rate, data_format, activation,
                               precision, depthwise_bias is not None, depthwise_activation)


def _arrays(cfg, x, weights, bias, depthwise_bias):
    """The op's inputs as NumPy arrays, in ``cfg.names`` order."""
    tensors = [x, *weights] + ([bias] if bias is not None else []) + (
        [depthwise_bias] if depthwise_bias is not None else [])
    return [_np(t) for t in tensors]


def _forward(cfg, x, weights, bias, depthwise_bias=None):
    return _tensor(_common.forward(cfg, *_arrays(cfg, x, weights, bias, depthwise_bias))).to(x.device)


#: pointwise weights packed for inference calls (:func:`_packed_pointwise`): id(weight tensor) -> (weak reference
#: to it, key, packed); a tensor's entry goes with it (a WeakKeyDictionary would compare tensors with ``==``)
_PACKED = {}


def _packed_pointwise(cfg, tensor):
    """``tensor`` (a separable op's pointwise kernel) packed once for bfloat16 products
    (:func:`nbconv.pack_pointwise_kernel`) and reused while its version counter and storage stay the same; None
    for other ops.

    Unpacked weights are rounded and paired on every call; float32 products gain nothing from packed weights
    inside models, so they are not given a second copy (figures: docs/keras.md).  Every in-place change through
    torch (an optimizer step, Keras's ``assign``, ``load_weights``) bumps the version, so the next call packs
    again; writes through ``tensor.data`` bypass the counter, as they do for autograd.  Only channels_last ops
    read packed weights.
    """
    if (cfg.precision != "bfloat16" or cfg.data_format != "channels_last" or type(tensor) not in _PLAIN_TYPES
            or tensor.device.type != "cpu"):
        return None
    try:
        key = (tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
    except RuntimeError:  # an inference-mode tensor has no version counter
        return None
    ident = id(tensor)
    hit = _PACKED.get(ident)
    if hit is not None and hit[0]() is tensor and hit[1] == key:
        return hit[2]
    packed = packing.pack_view(_np(tensor), "bfloat16")
    _PACKED[ident] = (weakref.ref(tensor, lambda _, ident=ident: _PACKED.pop(ident, None)), key, packed)
    return packed


def _inference(cfg, x, weights, bias, depthwise_bias):
    """:func:`_forward` for the eager no-autograd path, with the pointwise weights packed once."""
    arrays = _arrays(cfg, x, weights, bias, depthwise_bias)
    if cfg.kind == "separable":
        packed = _packed_pointwise(cfg, weights[1])
        if packed is not None:
            arrays[2] = packed
    return _tensor(_common.forward(cfg, *arrays)).to(x.device)


def _fake_forward(cfg, x, weights):
    filters = _common.filters_of(cfg, [w.shape for w in weights])
    return x.new_empty(_common.output_shape(cfg, x.shape, weights[0].shape, filters))


def _wrt_names(kind, mask):
    # custom ops take no list of str: ``wrt`` travels as one bool per input of the forward op
    names = _common.DEPTHWISE_NAMES if kind == "depthwise" else _common.SEPARABLE_NAMES
    return tuple(n for n, m in zip(names, mask) if m)


def _backward(cfg, grad, y, x, weights, bias, mask):
    wrt = _wrt_names(cfg.kind, mask)
    grads = _common.backward(cfg, tuple(wrt), _np(grad), _np(y), *_arrays(cfg, x, weights, bias, None))
    return [_tensor(g).to(x.device) for g in grads]


def _fake_backward(kind, x, weights, bias, mask):
    wrt = _wrt_names(kind, mask)
    by_name = dict(zip(_common.DEPTHWISE_NAMES if kind == "depthwise" else _common.SEPARABLE_NAMES,
                       [x, *weights, bias]))
    return [torch.empty_like(by_name[n]) for n in wrt]


# --- depthwise ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nbconv::depthwise_conv2d", mutates_args=())
def depthwise_conv2d(x: torch.Tensor, kernel: torch.Tensor, bias: Optional[torch.Tensor], strides: List[int],
                     padding: str, pads: List[int], dilation_rate: List[int], data_format: str, activation: str,
                     precision: str) -> torch.Tensor:
    cfg = _cfg("depthwise", bias, strides, padding, pads, dilation_rate, data_format, activation, precision)
    return _forward(cfg, x, [kernel], bias)


@depthwise_conv2d.register_fake
def _(x, kernel, bias, strides, padding, pads, dilation_rate, data_format, activation, precision):
    cfg = _cfg("depthwise", bias, strides, padding, pads, dilation_rate, data_format, activation, precision)
    return _fake_forward(cfg, x, [kernel])


@torch.library.custom_op("nbconv::depthwise_conv2d_backward", mutates_args=())
def depthwise_conv2d_backward(grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, kernel: torch.Tensor,
                              bias: Optional[torch.Tensor], strides: List[int], padding: str, pads: List[int],
                              dilation_rate: List[int], data_format: str, activation: str, precision: str,
                              wrt: List[bool]) -> List[torch.Tensor]:
    cfg = _cfg("depthwise", bias, strides, padding, pads, dilation_rate, data_format, activation, precision)
    return _backward(cfg, grad, y, x, [kernel], bias, wrt)


@depthwise_conv2d_backward.register_fake
def _(grad, y, x, kernel, bias, strides, padding, pads, dilation_rate, data_format, activation, precision, wrt):
    return _fake_backward("depthwise", x, [kernel], bias, wrt)


def _setup_depthwise(ctx, inputs, output):
    x, kernel, bias, *static = inputs
    ctx.save_for_backward(x, kernel, bias, output)
    ctx.static = static


def _depthwise_grad(ctx, grad):
    x, kernel, bias, y = ctx.saved_tensors
    mask = [bool(m) for m in ctx.needs_input_grad[:3]]
    wrt = _wrt_names("depthwise", mask)
    grads = dict(zip(wrt, depthwise_conv2d_backward(grad, y, x, kernel, bias, *ctx.static, mask))) if wrt else {}
    return (grads.get("x"), grads.get("kernel"), grads.get("bias")) + (None,) * len(ctx.static)


depthwise_conv2d.register_autograd(_depthwise_grad, setup_context=_setup_depthwise)


# --- separable ---------------------------------------------------------------------------------------------

@torch.library.custom_op("nbconv::separable_conv2d", mutates_args=())
def separable_conv2d(x: torch.Tensor, depthwise_kernel: torch.Tensor, pointwise_kernel: torch.Tensor,
                     bias: Optional[torch.Tensor], depthwise_bias: Optional[torch.Tensor], strides: List[int],
                     padding: str, pads: List[int], dilation_rate: List[int], data_format: str, activation: str,
                     precision: str, depthwise_activation: str) -> torch.Tensor:
    cfg = _cfg("separable", bias, strides, padding, pads, dilation_rate, data_format, activation, precision,
               depthwise_bias, depthwise_activation)
    return _forward(cfg, x, [depthwise_kernel, pointwise_kernel], bias, depthwise_bias)


@separable_conv2d.register_fake
def _(x, depthwise_kernel, pointwise_kernel, bias, depthwise_bias, strides, padding, pads, dilation_rate, data_format,
      activation, precision, depthwise_activation):
    cfg = _cfg("separable", bias, strides, padding, pads, dilation_rate, data_format, activation, precision,
               depthwise_bias, depthwise_activation)
    return _fake_forward(cfg, x, [depthwise_kernel, pointwise_kernel])


@torch.library.custom_op("nbconv::separable_conv2d_backward", mutates_args=())
def separable_conv2d_backward(grad: torch.Tensor, y: torch.Tensor, x: torch.Tensor, depthwise_kernel: torch.Tensor,
                              pointwise_kernel: torch.Tensor, bias: Optional[torch.Tensor], strides: List[int],
                              padding: str, pads: List[int], dilation_rate: List[int], data_format: str,
                              activation: str, precision: str, wrt: List[bool]) -> List[torch.Tensor]:
    cfg = _cfg("separable", bias, strides, padding, pads, dilation_rate, data_format, activation, precision)
    return _backward(cfg, grad, y, x, [depthwise_kernel, pointwise_kernel], bias, wrt)


@separable_conv2d_backward.register_fake
def _(grad, y, x, depthwise_kernel, pointwise_kernel, bias, strides, padding, pads, dilation_rate, data_format,
      activation, precision, wrt):
    return _fake_backward("separable", x, [depthwise_kernel, pointwise_kernel], bias, wrt)


def _setup_separable(ctx, inputs, output):
    x, dk, pk, bias, depthwise_bias, *static = inputs
    ctx.save_for_backward(x, dk, pk, bias, output)
    ctx.cfg = _cfg("separable", bias, *static[:-1], depthwise_bias, static[-1])
    ctx.static = static[:-1]  # the backward op has no depthwise activation
    ctx.n_inputs = len(inputs)


def _separable_grad(ctx, grad):
    _common.check_differentiable(ctx.cfg)  # the fused inference block has no backward
    x, dk, pk, bias, y = ctx.saved_tensors
    names = _common.SEPARABLE_NAMES
    mask = [bool(m) for m in ctx.needs_input_grad[:4]]
    wrt = _wrt_names("separable", mask)
    grads = dict(zip(wrt, separable_conv2d_backward(grad, y, x, dk, pk, bias, *ctx.static, mask))) if wrt else {}
    return tuple(grads.get(n) for n in names) + (None,) * (ctx.n_inputs - len(names))


separable_conv2d.register_autograd(_separable_grad, setup_context=_setup_separable)


def _private(module, name):
    fn = getattr(module, name, None)
    # a torch without the check: assume the state it detects, so the op goes through the dispatcher
    return fn if fn is not None else (lambda: True)


_TRANSFORMS_ACTIVE = _private(torch._C, "_are_functorch_transforms_active")
_FUNCTION_MODE = _private(torch._C, "_is_torch_function_mode_enabled")
_DISPATCH_MODES = _private(torch._C, "_len_torch_dispatch_stack")
_PROFILING = _private(torch.autograd, "_profiler_enabled")
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(tensors):
    """Whether the op may skip torch's dispatcher: eager CPU tensors that need no autograd, nothing tracing.

    A model's predict (Keras runs it under ``torch.no_grad``) then calls nbconv directly.  The custom op's
    dispatch costs 35 us per call on a small tensor and 2-4 ms per b8 predict of MobileNetV1's 13 blocks
    (alternating blocks, one process): run right after a kernel that swept the caches, its Python path is
    cold.  torch.compile, jit tracing, functorch transforms, dispatch or function modes (FakeTensorMode,
    make_fx), the profiler, subclasses and meta tensors all need the op, and get it.
    """
    if (torch.compiler.is_compiling() or torch.jit.is_tracing() or _PROFILING()
            or _TRANSFORMS_ACTIVE() or _FUNCTION_MODE() or _DISPATCH_MODES()):
        return False
    grad = torch.is_grad_enabled()
    return all(type(t) in _PLAIN_TYPES and t.device.type == "cpu" and not (grad and t.requires_grad)
               for t in tensors if t is not None)


def apply(cfg, *tensors):
    """Run the op described by ``cfg`` on ``tensors`` (the inputs named by ``cfg.names``): float32, float64 or
    bfloat16 torch tensors."""
    inputs = dict(zip(cfg.names, tensors))
    bias, depthwise_bias = inputs.get("bias"), inputs.get("depthwise_bias")
    weights = [inputs["kernel"]] if cfg.kind == "depthwise" else [inputs["depthwise_kernel"],
                                                                   inputs["pointwise_kernel"]]
    if _plain_eager(tensors):
        return _inference(cfg, tensors[0], weights, bias, depthwise_bias)
    padding, pads = _padding_args(cfg.padding)
    static = (list(cfg.strides), padding, pads, list(cfg.dilation_rate), cfg.data_format, cfg.activation,
              cfg.precision)
    if cfg.kind == "depthwise":
        return depthwise_conv2d(tensors[0], weights[0], bias, *static)
    return separable_conv2d(tensors[0], *weights, bias, depthwise_bias, *static, cfg.depthwise_activation)


def needs_gradient(tensors):
    """Whether autograd records an op on ``tensors`` (a training step, not Keras's no_grad predict)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors if t is not None)
