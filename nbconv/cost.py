"""Cost model: parameters and multiply-adds (MACs) of standard and depthwise-separable convolutions.

A standard ``k x k`` convolution from ``C`` to ``F`` channels has ``k*k*C*F``
weights and does ``k*k*C*F`` multiply-adds per output pixel.  Its separable
counterpart (a ``k x k`` depthwise convolution with depth multiplier ``dm``,
then a 1x1 convolution to ``F`` channels) has ``k*k*C*dm + C*dm*F`` weights
and does that many multiply-adds per output pixel, so with ``dm = 1`` the
ratio separable / standard is ``1/F + 1/k**2`` (:func:`separable_ratio`).

>>> from nbconv import cost
>>> c = cost.compare((8, 32, 56, 56), filters=64, kernel_size=3, padding=1, data_format="channels_first")
>>> c.standard.params, c.separable.params
(18432, 2336)
>>> print(c)  # doctest: +SKIP

Shapes follow nbconv's own arithmetic (``nbconv/_args.py``: strides, padding
"valid"/"same"/explicit, dilation), so the counts describe exactly what
:func:`nbconv.separable_conv2d` computes.  Multiply-adds count the products
of the convolutions only (a bias add or an activation is one addition or
comparison per output element, not a multiply-add).  A floating-point
operation count for GFLOP/s is ``2 * macs``.

:func:`model_cost` sums the same quantities over a Keras model (original or
converted by :func:`keras_layers.convert`), layer by layer.
"""
from typing import NamedTuple, Tuple

import numpy as np

from ._args import depthwise_geometry, normalize_data_format, normalize_pair

__all__ = [
    "Cost",
    "Comparison",
    "conv2d_cost",
    "depthwise_conv2d_cost",
    "pointwise_conv2d_cost",
    "separable_conv2d_cost",
    "separable_ratio",
    "compare",
    "LayerCost",
    "ModelCost",
    "model_cost",
]


class Cost(NamedTuple):
    """Cost of one operation.

    ``params``: number of weights (biases included when ``use_bias``);
    ``macs``: multiply-adds for the whole input batch;
    ``output_shape``: the output's shape, in the input's data format.
    """

    params: int
    macs: int
    output_shape: Tuple[int, ...]

    @property
    def flops(self):
        """Floating-point operations, counting a multiply-add as two."""
        return 2 * self.macs

    def __add__(self, other):  # a sum of costs keeps the last operation's output shape
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(self.params + other.params, self.macs + other.macs, other.output_shape)


def _zeros_view(shape):
    # a zero-byte stand-in with the right shape for the geometry arithmetic
    return np.broadcast_to(np.zeros((), np.uint8), tuple(int(s) for s in shape))


def _spatial(input_shape, kernel_size, strides, padding, dilation_rate, data_format):
    """Geometry of a k x k sliding window over ``input_shape`` (nbconv's arithmetic)."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4:
        raise ValueError(
            f"Expected `input_shape` to be 4 ints (N, H, W, C) or (N, C, H, W). Received: input_shape={input_shape!r}"
        )
    channels_last = normalize_data_format(data_format)
    c = shape[3] if channels_last else shape[1]
    kh, kw = normalize_pair(kernel_size, "kernel_size")
    return depthwise_geometry(_zeros_view(shape), _zeros_view((kh, kw, c, 1)), strides, padding, dilation_rate,
                              channels_last, x_name="input_shape")


def _out_shape(g, channels):
    return (g.n, g.oh, g.ow, channels) if g.channels_last else (g.n, channels, g.oh, g.ow)


def _check_count(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"Expected `{name}` to be a positive int. Received: {name}={value!r}")
    return int(value)


def conv2d_cost(input_shape, filters, kernel_size, *, strides=1, padding="valid", dilation_rate=1,
                data_format="channels_last", use_bias=False, groups=1):
    """Cost of a standard (dense) 2-D convolution, as ``keras.layers.Conv2D`` / ``torch.nn.Conv2d``.

    Parameters
    ----------
    input_shape : tuple of 4 int
        ``(N, H, W, C)`` for channels_last, ``(N, C, H, W)`` for channels_first.
    filters : int
        Output channels ``F``.
    kernel_size, strides, dilation_rate : int or pair of int
    padding : "valid", "same", int, (ph, pw) or ((top, bottom), (left, right))
    use_bias : bool
        Count ``F`` bias parameters.
    groups : int
        Grouped convolution (``C`` and ``F`` divisible by it): each output channel sees ``C/groups`` inputs.

    Returns
    -------
    Cost
        ``params = kh*kw*(C/groups)*F (+ F)``, ``macs = N*OH*OW*kh*kw*(C/groups)*F``.
    """
    f = _check_count(filters, "filters")
    groups = _check_count(groups, "groups")
    g = _spatial(input_shape, kernel_size, strides, padding, dilation_rate, data_format)
    if g.c % groups or f % groups:
        raise ValueError(f"Expected `groups` to divide the input channels ({g.c}) and `filters` ({f}). "
                         f"Received: groups={groups}")
    per_pixel = g.kh * g.kw * (g.c // groups) * f
    return Cost(per_pixel + (f if use_bias else 0), g.n * g.oh * g.ow * per_pixel, _out_shape(g, f))


def depthwise_conv2d_cost(input_shape, kernel_size, *, depth_multiplier=1, strides=1, padding="valid",
                          dilation_rate=1, data_format="channels_last", use_bias=False):
    """Cost of a depthwise convolution (``keras.layers.DepthwiseConv2D``).

    Returns
    -------
    Cost
        ``params = kh*kw*C*dm (+ C*dm)``, ``macs = N*OH*OW*kh*kw*C*dm``.
    """
    dm = _check_count(depth_multiplier, "depth_multiplier")
    g = _spatial(input_shape, kernel_size, strides, padding, dilation_rate, data_format)
    per_pixel = g.kh * g.kw * g.c * dm
    return Cost(per_pixel + (g.c * dm if use_bias else 0), g.n * g.oh * g.ow * per_pixel,
                _out_shape(g, g.c * dm))


def pointwise_conv2d_cost(input_shape, filters, *, data_format="channels_last", use_bias=False):
    """Cost of a 1x1 convolution from ``C`` to ``F`` channels.

    Returns
    -------
    Cost
        ``params = C*F (+ F)``, ``macs = N*H*W*C*F``.
    """
    return conv2d_cost(input_shape, filters, 1, data_format=data_format, use_bias=use_bias)


def separable_conv2d_cost(input_shape, filters, kernel_size, *, depth_multiplier=1, strides=1, padding="valid",
                          dilation_rate=1, data_format="channels_last", use_bias=False, depthwise_bias=False):
    """Cost of a depthwise-separable convolution (``keras.layers.SeparableConv2D``, :func:`nbconv.separable_conv2d`).

    ``use_bias`` counts the ``F`` output biases, ``depthwise_bias`` the ``C*dm``
    biases of the depthwise result (a fused MobileNet block with batch norm folded in).

    Returns
    -------
    Cost
        ``params = kh*kw*C*dm + C*dm*F (+ biases)``, ``macs = N*OH*OW*(kh*kw*C*dm + C*dm*F)``.
    """
    dw = depthwise_conv2d_cost(input_shape, kernel_size, depth_multiplier=depth_multiplier, strides=strides,
                               padding=padding, dilation_rate=dilation_rate, data_format=data_format,
                               use_bias=depthwise_bias)
    pw = pointwise_conv2d_cost(dw.output_shape, filters, data_format=data_format, use_bias=use_bias)
    return dw + pw


def separable_ratio(filters, kernel_size, depth_multiplier=1):
    """Separable / standard, for parameters and for multiply-adds (no biases): ``dm/F + dm/(kh*kw)``.

    With ``depth_multiplier=1`` this is the classic ``1/F + 1/k**2``.
    """
    f = _check_count(filters, "filters")
    dm = _check_count(depth_multiplier, "depth_multiplier")
    kh, kw = normalize_pair(kernel_size, "kernel_size")
    return dm / f + dm / (kh * kw)


class Comparison(NamedTuple):
    """A standard convolution next to its separable counterpart (see :func:`compare`)."""

    standard: Cost
    depthwise: Cost
    pointwise: Cost
    separable: Cost

    @property
    def params_ratio(self):
        return self.separable.params / self.standard.params

    @property
    def macs_ratio(self):
        return self.separable.macs / self.standard.macs

    def __str__(self):
        rows = [("standard convolution", self.standard), ("depthwise", self.depthwise),
                ("pointwise 1x1", self.pointwise), ("separable total", self.separable)]
        lines = [f"{'':<22}{'parameters':>12}{'multiply-adds':>16}"]
        for name, c in rows:
            lines.append(f"{name:<22}{c.params:>12,}{_mega(c.macs):>16}")
        lines.append(f"separable / standard: parameters {self.params_ratio:.1%}, multiply-adds {self.macs_ratio:.1%}"
                     f" ({1 / self.macs_ratio:.1f}x less work)")
        return "\n".join(lines)


def _mega(macs):
    if macs >= 1e9:
        return f"{macs / 1e9:.2f} G"
    return f"{macs / 1e6:.1f} M"


def compare(input_shape, filters, kernel_size, *, depth_multiplier=1, strides=1, padding="valid", dilation_rate=1,
            data_format="channels_last", use_bias=False):
    """Standard vs depthwise-separable convolution of the same geometry.

    Returns
    -------
    Comparison
        ``standard``, ``depthwise``, ``pointwise`` and ``separable`` (= depthwise + pointwise)
        :class:`Cost`, with ``params_ratio`` / ``macs_ratio``; ``str()`` gives a small table.
    """
    geometry = dict(strides=strides, padding=padding, dilation_rate=dilation_rate, data_format=data_format)
    standard = conv2d_cost(input_shape, filters, kernel_size, use_bias=use_bias, **geometry)
    dw = depthwise_conv2d_cost(input_shape, kernel_size, depth_multiplier=depth_multiplier, **geometry)
    pw = pointwise_conv2d_cost(dw.output_shape, filters, data_format=data_format, use_bias=use_bias)
    return Comparison(standard, dw, pw, dw + pw)


# --- whole Keras models ------------------------------------------------------------------------------------

class LayerCost(NamedTuple):
    """One row of :class:`ModelCost`: a layer's name, class name, kind of op and cost (batch of ``N``)."""

    name: str
    class_name: str
    kind: str
    params: int
    macs: int


class ModelCost(NamedTuple):
    """Multiply-adds and parameters of a Keras model's convolution and dense layers, for a batch of ``batch``.

    ``params`` counts every weight of the model (``model.count_params()``);
    ``macs`` sums the multiply-adds of the layers in ``layers`` (convolutions,
    depthwise, separable and fused separable, dense); other layers (batch norm,
    activations, pooling, additions) are not multiply-adds and are left out.
    """

    batch: int
    params: int
    macs: int
    layers: Tuple[LayerCost, ...]

    @property
    def flops(self):
        return 2 * self.macs

    def by_kind(self):
        """``{kind: macs}`` summed over the layers."""
        out = {}
        for row in self.layers:
            out[row.kind] = out.get(row.kind, 0) + row.macs
        return out

    def __str__(self):
        lines = [f"{'layer':<32}{'op':<12}{'parameters':>12}{'multiply-adds':>16}"]
        for row in self.layers:
            lines.append(f"{row.name[:31]:<32}{row.kind:<12}{row.params:>12,}{_mega(row.macs):>16}")
        lines.append(f"total (batch {self.batch}): {self.params:,} parameters, {_mega(self.macs)} multiply-adds")
        return "\n".join(lines)


def _shape(tensor_or_shape, batch):
    shape = tuple(getattr(tensor_or_shape, "shape", tensor_or_shape))
    shape = (batch,) + tuple(shape[1:])
    if any(s is None for s in shape):
        raise ValueError(
            "Expected a model with a known input size (build it with a fixed input_shape). "
            f"Received: a layer input of shape {tuple(getattr(tensor_or_shape, 'shape', tensor_or_shape))}"
        )
    return shape


def _geometry_of(layer):
    return dict(strides=layer.strides, padding=getattr(layer, "padding", "valid"),
                dilation_rate=layer.dilation_rate, data_format=layer.data_format)


def _layer_cost(layer, in_shape):
    """``(kind, Cost)`` of one Keras layer, or None when it does no multiply-adds that we count."""
    import keras

    name = type(layer).__name__
    if name == "FusedSeparableConv2D" or isinstance(layer, keras.layers.SeparableConv2D):
        c = separable_conv2d_cost(in_shape, layer.filters, layer.kernel_size,
                                  depth_multiplier=layer.depth_multiplier, use_bias=layer.use_bias,
                                  depthwise_bias=getattr(layer, "depthwise_bias", None) is not None,
                                  **_geometry_of(layer))
        return "separable", c
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return "depthwise", depthwise_conv2d_cost(in_shape, layer.kernel_size, depth_multiplier=layer.depth_multiplier,
                                                  use_bias=layer.use_bias, **_geometry_of(layer))
    if isinstance(layer, keras.layers.Conv2D) and not isinstance(layer, keras.layers.Conv2DTranspose):
        c = conv2d_cost(in_shape, layer.filters, layer.kernel_size, use_bias=layer.use_bias,
                        groups=getattr(layer, "groups", 1), **_geometry_of(layer))
        kh, kw = layer.kernel_size
        return ("pointwise" if (kh, kw) == (1, 1) else "conv"), c
    if isinstance(layer, keras.layers.Dense):
        units = layer.units
        k = in_shape[-1]
        rows = int(np.prod(in_shape[:-1]))
        return "dense", Cost(k * units + (units if layer.use_bias else 0), rows * k * units,
                             tuple(in_shape[:-1]) + (units,))
    return None


def _flatten_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):  # a nested model (e.g. a Sequential inside a Functional)
            yield from _flatten_layers(layer)
        else:
            yield layer


def model_cost(model, batch=1):
    """Parameters and multiply-adds of a built Keras model for a batch of ``batch`` inputs.

    Works on the original model and on its :func:`keras_layers.convert`-ed
    versions (folded batch norms show up as fewer parameters, fused blocks as
    one "separable" row).  The model's input sizes must be known (e.g.
    ``keras.applications.MobileNet(input_shape=(224, 224, 3), weights=None)``).

    Returns
    -------
    ModelCost
        ``str()`` gives a per-layer table and the totals.
    """
    batch = _check_count(batch, "batch")
    rows = []
    total = 0
    for layer in _flatten_layers(model):
        nodes = getattr(layer, "_inbound_nodes", [])
        # the layer's first call builds the model's graph; later nodes come from reusing the model elsewhere
        if not nodes or not nodes[0].input_tensors:
            continue
        found = _layer_cost(layer, _shape(nodes[0].input_tensors[0], batch))
        if found is None:
            continue
        kind, c = found
        rows.append(LayerCost(layer.name, type(layer).__name__, kind, c.params, c.macs))
        total += c.macs
    return ModelCost(batch, int(model.count_params()), int(total), tuple(rows))
