"""Argument normalisation, validation and output-shape arithmetic: the one place that owns them.

Every public function (forward and backward) goes through here before any
kernel runs, so every bad input gets the same clear ``ValueError`` /
``TypeError`` naming the argument and the value received, in Keras's style
("Expected .... Received: ...").
"""
import numbers
from typing import NamedTuple

import numpy as np

from ._dtypes import BITS, bfloat16, is_bf16

__all__ = [
    "DEFAULT",
    "ACTIVATIONS",
    "Geometry",
    "resolve_aliases",
    "normalize_pair",
    "normalize_padding",
    "normalize_data_format",
    "normalize_activation",
    "as_float_array",
    "Dtypes",
    "dtypes_for",
    "check_bias",
    "depthwise_geometry",
    "pointwise_matrix",
    "separable_operands",
    "same_padding",
    "conv_output_size",
    "conv_output_hw",
]


class _Default(int):
    """An int default that can be told apart from the same value passed explicitly.

    Lets ``strides=1`` show in the signature while still detecting a caller
    who passes both ``strides=`` and its alias ``stride=``.
    """

    def __repr__(self):
        return int.__repr__(self)


DEFAULT = _Default(1)

#: activation name -> code the kernels understand
ACTIVATIONS = {None: 0, "linear": 0, "relu": 1, "relu6": 2}

_ALIASES = {"stride": "strides", "dilation": "dilation_rate"}


def resolve_aliases(func_name, strides, dilation_rate, extra):
    """Apply the PyTorch-style aliases ``stride=`` / ``dilation=``; reject unknown keywords."""
    for key in extra:
        if key not in _ALIASES:
            raise TypeError(f"{func_name}() got an unexpected keyword argument {key!r}")
    if "stride" in extra:
        if strides is not DEFAULT:
            raise TypeError(
                f"{func_name}() got both `strides` and its alias `stride`. Pass only one. "
                f"Received: strides={strides!r}, stride={extra['stride']!r}"
            )
        strides = normalize_pair(extra["stride"], "stride")  # errors name the spelling the caller used
    if "dilation" in extra:
        if dilation_rate is not DEFAULT:
            raise TypeError(
                f"{func_name}() got both `dilation_rate` and its alias `dilation`. Pass only one. "
                f"Received: dilation_rate={dilation_rate!r}, dilation={extra['dilation']!r}"
            )
        dilation_rate = normalize_pair(extra["dilation"], "dilation")
    return strides, dilation_rate


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def normalize_pair(value, name):
    """``int`` or length-2 sequence of positive ints -> ``(int, int)``."""
    if type(value) is int or type(value) is _Default:
        if value > 0:
            return (int(value), int(value))
    if _is_int(value):
        pair = (int(value), int(value))
    else:
        try:
            pair = tuple(value)
        except TypeError:
            pair = ()
        if len(pair) != 2 or not all(_is_int(v) for v in pair):
            raise ValueError(
                f"Expected `{name}` to be a positive int or a tuple of 2 positive ints. "
                f"Received: {name}={value!r}"
            )
        pair = (int(pair[0]), int(pair[1]))
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(
            f"Expected `{name}` to be a positive int or a tuple of 2 positive ints. "
            f"Received: {name}={value!r}"
        )
    return pair


def normalize_padding(padding):
    """Return ``"valid"``, ``"same"`` or explicit ``((top, bottom), (left, right))``.

    Explicit forms: ``p``, ``(ph, pw)`` or ``((top, bottom), (left, right))``,
    non-negative ints (zero padding, as PyTorch's ``padding=1``).
    """
    if isinstance(padding, str):
        mode = padding.lower()
        if mode in ("valid", "same"):
            return mode
        raise ValueError(
            "Expected `padding` to be 'valid', 'same', a non-negative int, a pair (ph, pw) or "
            f"((top, bottom), (left, right)). Received: padding={padding!r}"
        )
    error = ValueError(
        "Expected `padding` to be 'valid', 'same', a non-negative int, a pair (ph, pw) or "
        f"((top, bottom), (left, right)) of non-negative ints. Received: padding={padding!r}"
    )
    if _is_int(padding):
        if padding < 0:
            raise error
        p = int(padding)
        return ((p, p), (p, p))
    try:
        items = tuple(padding)
    except TypeError:
        raise error from None
    if len(items) != 2:
        raise error
    if all(_is_int(v) for v in items):
        pairs = ((items[0], items[0]), (items[1], items[1]))
    else:
        try:
            pairs = tuple(tuple(v) for v in items)
        except TypeError:
            raise error from None
        if any(len(p) != 2 or not all(_is_int(v) for v in p) for p in pairs):
            raise error
    if any(v < 0 for p in pairs for v in p):
        raise error
    return tuple((int(a), int(b)) for a, b in pairs)


def normalize_data_format(data_format):
    """Return True for channels_last (NHWC), False for channels_first (NCHW).

    None means "channels_last", the default of Keras's ``image_data_format`` (Keras passes None for "the default").
    """
    if data_format is None:
        return True
    if isinstance(data_format, str):
        df = data_format.lower()
        if df == "channels_last":
            return True
        if df == "channels_first":
            return False
    raise ValueError(
        "Expected `data_format` to be 'channels_last', 'channels_first' or None. "
        f"Received: data_format={data_format!r}"
    )


def normalize_activation(activation, name="activation"):
    """Return the kernel code of a fused activation (None/'linear' -> 0, 'relu' -> 1, 'relu6' -> 2)."""
    key = activation.lower() if isinstance(activation, str) else activation
    try:
        return ACTIVATIONS[key]
    except (KeyError, TypeError):
        raise ValueError(
            f"Expected `{name}` to be None, 'linear', 'relu' or 'relu6'. Received: {name}={activation!r}"
        ) from None


_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
#: ``precision=`` values: the products' precision (None: the inputs' own)
PRECISIONS = (None, "float32", "bfloat16")


def _is_float(dtype):
    """float16, bfloat16, float32 or float64."""
    return dtype in _FLOATS or is_bf16(dtype)


def as_float_array(value, name):
    """``np.asarray(value)``, checked to be float16, bfloat16, float32 or float64 (no copy when it already is)."""
    arr = value if type(value) is np.ndarray else np.asarray(value)
    if not _is_float(arr.dtype):
        raise TypeError(
            f"Expected `{name}` to be a floating-point array (float16, bfloat16, float32 or float64). "
            f"Received: {name} with dtype {arr.dtype}"
        )
    return arr


class Dtypes(NamedTuple):
    """The dtypes of one call.

    ``compute`` is float32 or float64, or bfloat16 for bfloat16 products
    (float32 sums); ``result`` is what the caller gets back.
    """

    compute: np.dtype
    result: np.dtype

    @property
    def bf16(self):
        """Whether the pointwise products multiply bfloat16 pairs."""
        return is_bf16(self.compute)

    @property
    def act(self):
        """What the kernels compute and keep their scratch in: float32 for bfloat16 products."""
        return _F32 if is_bf16(self.compute) else self.compute

    @property
    def store(self):
        """The dtype of the array the kernel writes: bfloat16 bits (``uint16``) for a bfloat16 result of bfloat16
        products, else :attr:`act` (cast to the result afterwards when that differs)."""
        return BITS if is_bf16(self.compute) and is_bf16(self.result) else self.act


def _output_dtype(output_dtype):
    try:
        dtype = np.dtype(output_dtype)
    except TypeError:
        dtype = None
    if not _is_float(dtype):
        raise TypeError(f"Expected `output_dtype` to be None, float16, bfloat16, float32 or float64. "
                        f"Received: output_dtype={output_dtype!r}")
    return dtype


def _promoted(arrays):
    promoted = arrays[0].dtype
    for a in arrays[1:]:
        if a is not None and a.dtype != promoted:
            return np.result_type(*[a.dtype for a in arrays if a is not None])
    return promoted


def dtypes_for(*arrays, biases=(), precision=None, output_dtype=None):
    """The call's :class:`Dtypes`: the result follows NumPy promotion of the inputs (or ``output_dtype``);
    float16 computes in float32, bfloat16 with bfloat16 products, and ``precision`` ("float32" or
    "bfloat16") overrides the products' precision of float16, bfloat16 and float32 inputs.

    ``biases`` join the promotion unless the other inputs are all bfloat16: they are added to float32 sums,
    and a float32 bias of bfloat16 layers (as frameworks keep it) should not turn the call into float32.
    """
    promoted = _promoted(arrays)
    if not is_bf16(promoted) and any(b is not None for b in biases):
        promoted = _promoted(arrays + tuple(biases))
    if precision not in PRECISIONS:
        raise ValueError(f"Expected `precision` to be one of {PRECISIONS}. Received: precision={precision!r}")
    if precision is None:
        compute = _F32 if promoted == _F16 else promoted
    elif promoted == _F64:
        if precision == "bfloat16":
            raise ValueError("Expected float16, bfloat16 or float32 inputs for precision='bfloat16'. "
                             "Received: float64 inputs")
        compute = _F64
    else:
        compute = bfloat16() if precision == "bfloat16" else _F32
    result = promoted if output_dtype is None else _output_dtype(output_dtype)
    return Dtypes(compute, result)


def check_ndim(arr, name, ndim, what):
    if arr.ndim != ndim:
        raise ValueError(f"Expected `{name}` to be a {ndim}-D array {what}. Received: {name} with shape {arr.shape}")


def check_bias(bias, name, size):
    """Validate a bias of shape ``(size,)``; None passes through."""
    if bias is None:
        return None
    bias = as_float_array(bias, name)
    if bias.shape != (size,):
        raise ValueError(f"Expected `{name}` of shape ({size},). Received: {name} with shape {bias.shape}")
    return bias


class Geometry(NamedTuple):
    """Shapes and offsets of one 2-D convolution, all as plain ints.

    Input ``(n, h, w, c)`` whatever the data format, kernel ``(kh, kw)``,
    depth multiplier ``dm``, strides ``(sh, sw)``, dilation ``(dh, dw)``,
    zero padding ``pt`` (top), ``pb``, ``pl`` (left), ``pr`` and output ``(oh, ow)``.
    """

    n: int
    h: int
    w: int
    c: int
    kh: int
    kw: int
    dm: int
    sh: int
    sw: int
    dh: int
    dw: int
    pt: int
    pb: int
    pl: int
    pr: int
    oh: int
    ow: int
    channels_last: bool

    def out_shape(self, channels):
        if self.channels_last:
            return (self.n, self.oh, self.ow, channels)
        return (self.n, channels, self.oh, self.ow)

    def in_shape(self):
        if self.channels_last:
            return (self.n, self.h, self.w, self.c)
        return (self.n, self.c, self.h, self.w)


def check_out(out, shape, dtype, inputs):
    """Validate a caller's ``out`` array: a writeable C-contiguous ndarray of the result's shape and dtype,
    sharing no memory with the inputs (the kernels read them while writing it)."""
    if out is None:
        return
    dtype = np.dtype(dtype)
    if (not isinstance(out, np.ndarray) or out.shape != tuple(shape) or out.dtype != dtype
            or not out.flags.c_contiguous or not out.flags.writeable):
        got = (f"ndarray of shape {out.shape}, dtype {out.dtype}, c_contiguous={out.flags.c_contiguous}, "
               f"writeable={out.flags.writeable}" if isinstance(out, np.ndarray) else type(out).__name__)
        raise ValueError(
            f"Expected `out` to be a writeable C-contiguous ndarray of shape {tuple(shape)} and dtype {dtype}. "
            f"Received: out={got}"
        )
    for name, arr in inputs:
        if arr is not None and np.may_share_memory(out, arr):
            raise ValueError(f"Expected `out` to share no memory with the inputs. Received: out overlapping {name}")


def same_padding(size, k, s, d):
    """Keras/TF 'same' padding (before, after): the odd extra row/column goes at the end."""
    out = -(-size // s)
    total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def conv_output_size(size, k, stride, dilation, padding):
    """Output size along one axis of a convolution: ``None`` for an unknown ``size`` (a symbolic shape).

    ``padding`` is "valid", "same" (Keras/TF: ``ceil(size / stride)``) or
    explicit ``(before, after)``; 0 when the dilated kernel is larger than
    the padded input (callers validate).
    """
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    before, after = (0, 0) if padding == "valid" else padding
    return max(0, (size + before + after - (k - 1) * dilation - 1) // stride + 1)


def conv_output_hw(h, w, kernel_hw, strides, padding, dilation_rate):
    """``(OH, OW)`` of a convolution in any of the spellings the public functions take (sizes may be None).

    ``padding``: "valid", "same", an int, ``(ph, pw)`` or ``((top, bottom), (left, right))``.
    """
    kh, kw = kernel_hw
    sh, sw = normalize_pair(strides, "strides")
    dh, dw = normalize_pair(dilation_rate, "dilation_rate")
    pad = padding if type(padding) is str and padding in ("same", "valid") else normalize_padding(padding)
    rows, cols = (pad, pad) if isinstance(pad, str) else pad
    return conv_output_size(h, kh, sh, dh, rows), conv_output_size(w, kw, sw, dw, cols)


def depthwise_geometry(x, kernel, strides, padding, dilation_rate, channels_last, kernel_name="kernel", x_name="x"):
    """Validate ``x`` (4-D) against a Keras depthwise kernel ``(kh, kw, C, dm)`` and return the :class:`Geometry`."""
    layout = "(N, H, W, C)" if channels_last else "(N, C, H, W)"
    check_ndim(x, x_name, 4, f"of shape {layout}")
    check_ndim(kernel, kernel_name, 4, "of shape (kh, kw, C, depth_multiplier)")
    if channels_last:
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    kh, kw, kc, dm = kernel.shape
    if kh == 0 or kw == 0 or kc == 0 or dm == 0:
        raise ValueError(
            f"Expected `{kernel_name}` of shape (kh, kw, C, depth_multiplier) with no zero dimension. "
            f"Received: {kernel_name} with shape {kernel.shape}"
        )
    if kc != c:
        raise ValueError(
            f"Expected `{kernel_name}` to have {c} input channels (axis 2) to match `{x_name}` of shape "
            f"{x.shape} ({'channels_last' if channels_last else 'channels_first'}). "
            f"Received: {kernel_name} with shape {kernel.shape}"
        )
    sh, sw = normalize_pair(strides, "strides")
    dh, dw = normalize_pair(dilation_rate, "dilation_rate")
    pad = padding if type(padding) is str and padding in ("same", "valid") else normalize_padding(padding)
    if pad == "valid":
        (pt, pb), (pl, pr) = (0, 0), (0, 0)
    elif pad == "same":
        (pt, pb), (pl, pr) = same_padding(h, kh, sh, dh), same_padding(w, kw, sw, dw)
    else:
        (pt, pb), (pl, pr) = pad
    oh = conv_output_size(h, kh, sh, dh, pad if pad == "same" else (pt, pb))
    ow = conv_output_size(w, kw, sw, dw, pad if pad == "same" else (pl, pr))
    # 'same' keeps an empty input empty; otherwise an output of no pixels means a kernel larger than the input
    if pad != "same" and (oh <= 0 or ow <= 0):
        raise ValueError(
            f"Expected an output of positive size. Received: {x_name} with spatial size {(h, w)}, "
            f"kernel size {(kh, kw)}, dilation_rate={(dh, dw)}, padding={padding!r}, "
            f"which give an output of size {(oh, ow)}"
        )
    return Geometry(n, h, w, c, kh, kw, dm, sh, sw, dh, dw, pt, pb, pl, pr, oh, ow, channels_last)


def pointwise_matrix(kernel, channels, name="pointwise_kernel"):
    """Return a Keras pointwise kernel ``(1, 1, K, F)`` or ``(K, F)`` as a ``(K, F)`` view, checked against
    ``channels``."""
    if kernel.ndim == 4:
        if kernel.shape[:2] != (1, 1):
            raise ValueError(
                f"Expected `{name}` to be a 1x1 kernel of shape (1, 1, {channels}, filters). "
                f"Received: {name} with shape {kernel.shape}"
            )
        matrix = kernel.reshape(kernel.shape[2], kernel.shape[3])
    elif kernel.ndim == 2:
        matrix = kernel
    else:
        raise ValueError(
            f"Expected `{name}` of shape (1, 1, {channels}, filters) or ({channels}, filters). "
            f"Received: {name} with shape {kernel.shape}"
        )
    if matrix.shape[0] != channels:
        raise ValueError(
            f"Expected `{name}` to have {channels} input channels to match its input. "
            f"Received: {name} with shape {kernel.shape}"
        )
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"Expected `{name}` to have at least one input channel and one filter. "
                         f"Received: {name} with shape {kernel.shape}")
    return matrix


def separable_operands(x, depthwise_kernel, pointwise_kernel, strides, padding, dilation_rate, channels_last):
    """Validate the arrays of a separable convolution (forward or backward).

    Returns ``(x, depthwise_kernel, pointwise_kernel, geometry, pointwise matrix (C*dm, F))``,
    the arrays as float ndarrays (no copies).
    """
    x = as_float_array(x, "x")
    dk = as_float_array(depthwise_kernel, "depthwise_kernel")
    pk = as_float_array(pointwise_kernel, "pointwise_kernel")
    g = depthwise_geometry(x, dk, strides, padding, dilation_rate, channels_last, "depthwise_kernel")
    return x, dk, pk, g, pointwise_matrix(pk, g.c * g.dm)
