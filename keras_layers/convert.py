"""Convert an existing Keras model to nbconv's layers, optionally folding batch norms into fused separable ops.

>>> import keras, keras_layers
>>> model = keras.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, weights=None)
>>> fast = keras_layers.convert(model, fold_batchnorm=True, verbose=True)   # doctest: +SKIP

:func:`convert` builds a new model with ``keras.models.clone_model`` and a
``clone_function``; the original model is never modified.  Every layer that
is not converted is cloned from its config and gets a copy of the original's
weights, so the new model owns all of its weights.

* ``fold_batchnorm=False`` (training and inference): every
  ``keras.layers.SeparableConv2D`` / ``DepthwiseConv2D`` becomes
  :class:`keras_layers.SeparableConv2D` / :class:`keras_layers.DepthwiseConv2D`
  (same config, same weights).
* ``fold_batchnorm=True`` (inference only: batch statistics are frozen into the
  weights, and the fused layer has no gradient):

  - the MobileNet block ``[ZeroPadding2D →] DepthwiseConv2D [→ BatchNormalization]
    [→ ReLU/ReLU6] → Conv2D 1x1 [→ BatchNormalization] [→ ReLU/ReLU6]`` becomes one
    :class:`FusedSeparableConv2D` (one call of :func:`nbconv.separable_conv2d` with
    ``depthwise_bias`` and ``depthwise_activation``; the zero padding becomes the
    op's explicit padding);
  - ``SeparableConv2D [→ BatchNormalization] [→ ReLU/ReLU6]`` (Xception) becomes our
    ``SeparableConv2D`` with the batch norm folded into the pointwise kernel and bias
    and the activation fused;
  - a ``DepthwiseConv2D [→ BatchNormalization] [→ ReLU/ReLU6]`` that no 1x1 convolution
    follows becomes our ``DepthwiseConv2D`` likewise.
  - every other ``Conv2D → BatchNormalization [→ ReLU/ReLU6]`` (stem, MobileNetV2's expand
    convolutions, Xception's shortcuts) stays Keras's own ``Conv2D``, with the batch norm
    folded into its kernel and bias and the activation fused: the framework's
    convolution, without a separate pass of the batch norm and the activation.

  The layers absorbed into a fused op are replaced by :class:`Absorbed`
  placeholders named like them (the graph keeps its shape, the placeholders
  cost nothing).  A chain is only fused where each intermediate result feeds
  the next layer alone (not a model output, not a branch).

Folding, per output channel ``o`` of a batch norm with ``s = gamma / sqrt(var + eps)``:
``kernel[..., o] *= s`` and ``bias[o] = (bias[o] - mean) * s + beta``.

The return value is the new model; the report of what was converted (a
:class:`ConversionReport`; ``str()`` is readable) is attached to it as
``model.nbconv_report`` and printed when ``verbose=True``.
"""
import collections

import keras
import numpy as np

from nbconv._args import conv_output_hw, normalize_data_format, normalize_pair, normalize_padding, same_padding

from .backend._common import activation_name
from . import layers as _layers
from .layers import (DepthwiseConv2D, SeparableConv2D, _activation_of, _channels_axis_ok, _fused_activation, _jit_ok,
                     _run, own_kernel_modes)

__all__ = ["convert", "FusedSeparableConv2D", "Absorbed", "ConversionReport"]


# --- the fused inference layer -----------------------------------------------------------------------------

def _activation_name(value, name):
    """None, a fusable Keras activation function or its name -> "linear", "relu" or "relu6"."""
    if callable(value):
        found = _activation_of(value)
        if found is None:
            raise ValueError(f"Expected `{name}` to be None, 'linear', 'relu' or 'relu6'. Received: {name}={value!r}")
        return found
    return activation_name(value, name)


@keras.saving.register_keras_serializable(package="nbconv")
class FusedSeparableConv2D(keras.layers.Layer):
    """Inference-only fused separable block: ``act(pw(dact(dw(x) + depthwise_bias)) + bias)`` in one nbconv call.

    What :func:`convert` makes of a MobileNet block with its batch norms folded
    in.  Weights: ``depthwise_kernel`` (kh, kw, C, dm), ``depthwise_bias``
    (C*dm,), ``pointwise_kernel`` (1, 1, C*dm, filters), ``bias`` (filters,),
    all non-trainable.  It runs through the same backend bridges as
    :class:`keras_layers.SeparableConv2D` (:mod:`keras_layers.backend`), but
    nbconv has no backward for a depthwise bias or activation: asking for a
    gradient through it raises ValueError.

    Parameters
    ----------
    filters, kernel_size, strides, dilation_rate, depth_multiplier, data_format
        As ``keras.layers.SeparableConv2D``.
    padding : "valid", "same" or ((top, bottom), (left, right))
        Keras's modes or explicit zero padding (a folded ``ZeroPadding2D``).
    depthwise_activation, activation : None, "linear", "relu" or "relu6"
        Applied to the depthwise result (after ``depthwise_bias``) and to the output.
    """

    def __init__(self, filters, kernel_size, strides=(1, 1), padding="valid", data_format=None,
                 dilation_rate=(1, 1), depth_multiplier=1, depthwise_activation=None, activation=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(filters, int) or filters <= 0:
            raise ValueError(f"Expected `filters` to be a positive int. Received: filters={filters!r}")
        if not isinstance(depth_multiplier, int) or depth_multiplier <= 0:
            raise ValueError("Expected `depth_multiplier` to be a positive int. "
                             f"Received: depth_multiplier={depth_multiplier!r}")
        self.filters = filters
        self.kernel_size = normalize_pair(kernel_size, "kernel_size")
        self.strides = normalize_pair(strides, "strides")
        self.dilation_rate = normalize_pair(dilation_rate, "dilation_rate")
        self.depth_multiplier = depth_multiplier
        self.padding = normalize_padding(padding)
        # None: Keras's image_data_format, as its own layers
        data_format = keras.config.image_data_format() if data_format is None else data_format
        self.data_format = "channels_last" if normalize_data_format(data_format) else "channels_first"
        self.depthwise_activation = _activation_name(depthwise_activation, "depthwise_activation")
        self.activation = _activation_name(activation, "activation")
        self.use_bias = True
        self.supports_jit = _jit_ok()
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _channel_axis(self):
        return -1 if self.data_format == "channels_last" else 1

    def build(self, input_shape):
        c = input_shape[self._channel_axis()]
        kh, kw = self.kernel_size
        cm = c * self.depth_multiplier
        self.depthwise_kernel = self.add_weight(name="depthwise_kernel", shape=(kh, kw, c, self.depth_multiplier),
                                                initializer="zeros", trainable=False)
        self.depthwise_bias = self.add_weight(name="depthwise_bias", shape=(cm,), initializer="zeros",
                                              trainable=False)
        self.pointwise_kernel = self.add_weight(name="pointwise_kernel", shape=(1, 1, cm, self.filters),
                                                initializer="zeros", trainable=False)
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros", trainable=False)

    def compute_output_shape(self, input_shape):
        channels_last = self.data_format == "channels_last"
        n, h, w = (input_shape[0], input_shape[1], input_shape[2]) if channels_last else (
            input_shape[0], input_shape[2], input_shape[3])
        oh, ow = conv_output_hw(h, w, self.kernel_size, self.strides, self.padding, self.dilation_rate)
        if oh == 0 or ow == 0:
            raise ValueError(f"Expected an input large enough for a non-empty output. Received: input_shape="
                             f"{tuple(input_shape)}, which gives an output of size {(oh, ow)} for kernel_size="
                             f"{self.kernel_size}, dilation_rate={self.dilation_rate}, padding={self.padding!r}")
        return (n, oh, ow, self.filters) if channels_last else (n, self.filters, oh, ow)

    def call(self, inputs):
        # the bridge's tensor order: x, depthwise_kernel, pointwise_kernel, bias, depthwise_bias
        variables = [self.depthwise_kernel, self.pointwise_kernel, self.bias, self.depthwise_bias]
        return _run(self, "separable", inputs, variables, depthwise_bias=True,
                    depthwise_activation=self.depthwise_activation)

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                      padding=self.padding, data_format=self.data_format, dilation_rate=self.dilation_rate,
                      depth_multiplier=self.depth_multiplier, depthwise_activation=self.depthwise_activation,
                      activation=self.activation)
        return config


@keras.saving.register_keras_serializable(package="nbconv")
class Absorbed(keras.layers.Layer):
    """Placeholder left by :func:`convert` where a layer's computation was folded into a preceding nbconv layer.

    Returns its input unchanged (whatever arguments the original layer was called with).
    """

    def call(self, inputs, **kwargs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


# --- graph inspection --------------------------------------------------------------------------------------

class _Graph:
    """Who feeds whom in a built model (nested models included), for finding fusable chains."""

    def __init__(self, model):
        self.layers = []
        self.protected = set()  # ids of tensors that are model outputs (never absorbed into a fused op)
        self._collect(model)
        self.ids = {id(layer) for layer in self.layers}

    def _collect(self, model):
        for t in keras.tree.flatten(model.outputs):
            self.protected.add(id(t))
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                self._collect(layer)
            else:
                self.layers.append(layer)

    def sole_consumer(self, layer):
        """The one layer reading ``layer``'s output, if that output feeds exactly one single-input layer."""
        nodes = layer._inbound_nodes
        if len(nodes) != 1 or len(nodes[0].output_tensors) != 1:
            return None
        if id(nodes[0].output_tensors[0]) in self.protected:
            return None
        outbound = [n for n in layer._outbound_nodes if id(n.operation) in self.ids]
        if len(outbound) != 1 or len(layer._outbound_nodes) != 1:
            return None
        consumer = outbound[0].operation
        if len(consumer._inbound_nodes) != 1 or len(consumer._inbound_nodes[0].input_tensors) != 1:
            return None
        return consumer

    def sole_producer(self, layer):
        """The layer whose output is ``layer``'s only input, if ``layer`` is that layer's sole consumer."""
        nodes = layer._inbound_nodes
        if len(nodes) != 1 or len(nodes[0].input_tensors) != 1:
            return None
        history = nodes[0].input_tensors[0]._keras_history
        producer = history.operation
        if id(producer) not in self.ids or self.sole_consumer(producer) is not layer:
            return None
        return producer


def _np(v):
    return np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64)


def _bn_scale_shift(bn):
    """``(s, t)`` with ``bn(y) = y * s + t`` at inference, in float64."""
    mean, var = _np(bn.moving_mean), _np(bn.moving_variance)
    gamma = _np(bn.gamma) if bn.scale else np.ones_like(mean)
    beta = _np(bn.beta) if bn.center else np.zeros_like(mean)
    s = gamma / np.sqrt(var + bn.epsilon)
    return s, beta - mean * s


def _is_batchnorm(layer, data_format):
    return (isinstance(layer, keras.layers.BatchNormalization) and not getattr(layer, "renorm", False)
            and _channels_axis_ok(layer, data_format))


def _is_pointwise(layer, data_format):
    return (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and getattr(layer, "groups", 1) == 1
            and layer.data_format == data_format and _activation_of(layer.activation) is not None)


def _tail(graph, layer, data_format, activation):
    """Follow ``[→ BatchNormalization] [→ ReLU/ReLU6]`` after ``layer`` (whose own activation is ``activation``).

    Returns ``(bn or None, activation name, absorbed layers)``.
    """
    absorbed = []
    bn = None
    nxt = graph.sole_consumer(layer)
    if activation == "linear" and nxt is not None and _is_batchnorm(nxt, data_format):
        bn = nxt
        absorbed.append(bn)
        nxt = graph.sole_consumer(bn)
    if activation == "linear" and nxt is not None and _fused_activation(nxt) is not None:
        activation = _fused_activation(nxt)
        absorbed.append(nxt)
    return bn, activation, absorbed


# --- the plan: what each original layer becomes ------------------------------------------------------------

class _Plan:
    def __init__(self):
        self.replace = {}  # id(original layer) -> (factory(), weights or None)
        self.identity = set()  # ids of absorbed layers
        self.entries = []  # (description, [original layer names], new class name)
        self.own = []  # the same, for layers that stay Keras's own (folded weights or the backend's faster kernel)
        self.epilogues = []  # names of the batch norms and activations that may fold into our ops (not folding)


def _copy_config(layer, drop=()):
    config = layer.get_config()
    for key in drop:
        config.pop(key, None)
    return config


def _plan_fused(graph, plan, dw):
    """Try to plan ``[ZeroPadding2D →] DepthwiseConv2D [→ BN] [→ act] → Conv2D 1x1 [→ BN] [→ act]``."""
    df = dw.data_format
    dact = _activation_of(dw.activation)
    if dact is None:
        return False
    bn1, dact, absorbed1 = _tail(graph, dw, df, dact)
    last = absorbed1[-1] if absorbed1 else dw
    conv = graph.sole_consumer(last)
    if conv is None or not _is_pointwise(conv, df):
        return False
    pact = _activation_of(conv.activation)
    bn2, pact, absorbed2 = _tail(graph, conv, df, pact)

    padding = dw.padding
    pad_layer = None
    producer = graph.sole_producer(dw)
    if (dw.padding == "valid" and isinstance(producer, keras.layers.ZeroPadding2D)
            and producer.data_format == df):
        pad_layer = producer
        padding = tuple(tuple(int(v) for v in p) for p in producer.padding)
        # MobileNet's ZeroPadding2D(((0, 1), (0, 1))) before a stride-2 valid conv is exactly 'same' on even
        # sizes: say so, the kernels have their fast path for Keras's own modes
        in_shape = producer._inbound_nodes[0].input_tensors[0].shape  # before the zero padding
        hw = in_shape[1:3] if df == "channels_last" else in_shape[2:4]
        if None not in hw and padding == tuple(
                same_padding(n, k, s, d) for n, p, k, s, d in
                zip(hw, padding, dw.kernel_size, dw.strides, dw.dilation_rate)):
            padding = "same"

    # folded weights, in float64 then cast to the variable dtype
    dk = _np(dw.kernel)
    kh, kw, c, dm = dk.shape
    db = _np(dw.bias) if dw.use_bias else np.zeros(c * dm)
    if bn1 is not None:
        s, t = _bn_scale_shift(bn1)
        dk = dk * s.reshape(c, dm)
        db = db * s + t
    pk = _np(conv.kernel)
    b = _np(conv.bias) if conv.use_bias else np.zeros(pk.shape[-1])
    if bn2 is not None:
        s, t = _bn_scale_shift(bn2)
        pk = pk * s
        b = b * s + t
    dtype = dw.variable_dtype

    def factory():
        return FusedSeparableConv2D(filters=int(pk.shape[-1]), kernel_size=dw.kernel_size, strides=dw.strides,
                                    padding=padding, data_format=df, dilation_rate=dw.dilation_rate,
                                    depth_multiplier=dm, depthwise_activation=dact, activation=pact,
                                    name=f"{dw.name}_fused", dtype=dw.dtype_policy)

    weights = [a.astype(dtype) for a in (dk, db, pk, b)]
    plan.replace[id(dw)] = (factory, weights)
    chain = ([pad_layer] if pad_layer is not None else []) + [dw] + absorbed1 + [conv] + absorbed2
    for layer in chain:
        if layer is not dw:
            plan.identity.add(id(layer))
    plan.entries.append(("fused separable block", [layer.name for layer in chain],
                         f"FusedSeparableConv2D {dw.name + '_fused'!r}"))
    return True


def _plan_folded_conv(graph, plan, layer, ours):
    """``SeparableConv2D`` / ``DepthwiseConv2D`` [→ BN] [→ act] → ours with bias and activation folded in."""
    act = _activation_of(layer.activation)
    if act is None:
        return False
    bn, act, absorbed = _tail(graph, layer, layer.data_format, act)
    if not absorbed:
        return False
    config = _copy_config(layer)
    config.update(use_bias=True, activation=act)
    separable = isinstance(layer, keras.layers.SeparableConv2D)
    if separable:
        dk, pk = _np(layer.depthwise_kernel), _np(layer.pointwise_kernel)
        out = pk
    else:
        dk = _np(layer.kernel)
        out = None
    channels = (pk.shape[-1] if separable else dk.shape[2] * dk.shape[3])
    b = _np(layer.bias) if layer.use_bias else np.zeros(channels)
    if bn is not None:
        s, t = _bn_scale_shift(bn)
        if separable:
            out = pk * s
        else:
            dk = dk * s.reshape(dk.shape[2], dk.shape[3])
        b = b * s + t
    weights = [dk, out, b] if separable else [dk, b]
    dtype = layer.variable_dtype
    plan.replace[id(layer)] = (lambda: ours.from_config(config), [w.astype(dtype) for w in weights])
    for a in absorbed:
        plan.identity.add(id(a))
    folded = " + ".join(["batch norm"] * (bn is not None) + ["activation"] * (len(absorbed) > (bn is not None)))
    plan.entries.append((f"{type(layer).__name__} + folded {folded}", [layer.name] + [a.name for a in absorbed],
                         f"{ours.__name__} {layer.name!r}"))
    return True


def _plan_folded_keras_conv(graph, plan, layer):
    """Keras's ``Conv2D [→ BN] [→ act]`` → Keras's ``Conv2D`` with the batch norm folded into its kernel and bias
    and the activation fused (the expand and stem convolutions of the MobileNets, Xception's shortcuts)."""
    if getattr(layer, "groups", 1) != 1:
        return False
    act = _activation_of(layer.activation)
    if act is None:
        return False
    bn, act, absorbed = _tail(graph, layer, layer.data_format, act)
    if bn is None:
        return False
    kernel = _np(layer.kernel)
    b = _np(layer.bias) if layer.use_bias else np.zeros(kernel.shape[-1])
    s, t = _bn_scale_shift(bn)
    weights = [(kernel * s).astype(layer.variable_dtype), (b * s + t).astype(layer.variable_dtype)]
    config = _copy_config(layer)
    config.update(use_bias=True, activation=act)
    cls = type(layer)
    plan.replace[id(layer)] = (lambda: cls.from_config(config), weights)
    for a in absorbed:
        plan.identity.add(id(a))
    folded = "batch norm" + (" + activation" if len(absorbed) > 1 else "")
    plan.own.append((f"{cls.__name__} + folded {folded}", [layer.name] + [a.name for a in absorbed],
                     f"{cls.__name__} {layer.name!r} (Keras's)"))
    return True


def _make_plan(model, fold_batchnorm):
    graph = _Graph(model)
    plan = _Plan()
    for layer in graph.layers:
        if id(layer) in plan.replace or id(layer) in plan.identity:
            continue
        is_sep = isinstance(layer, keras.layers.SeparableConv2D)
        is_dw = isinstance(layer, keras.layers.DepthwiseConv2D)
        if fold_batchnorm and type(layer) is keras.layers.Conv2D:
            _plan_folded_keras_conv(graph, plan, layer)
            continue
        if not (is_sep or is_dw):
            continue
        if fold_batchnorm:
            if is_dw and _plan_fused(graph, plan, layer):
                continue
            if _plan_folded_conv(graph, plan, layer, SeparableConv2D if is_sep else DepthwiseConv2D):
                continue
        ours = SeparableConv2D if is_sep else DepthwiseConv2D
        _plan_epilogue(graph, plan, layer)
        if type(layer) is ours:
            continue  # already ours: cloned and copied like any other layer
        config = _copy_config(layer)
        plan.replace[id(layer)] = (lambda c=config, cls=ours: cls.from_config(c), None)
        plan.entries.append((type(layer).__name__, [layer.name], f"{ours.__name__} {layer.name!r}"))
    return graph, plan


#: Keras layers after ours that fold into our op at inference in a TensorFlow graph or a jax jit trace
#: (layers._Epilogue)
_EPILOGUE_CLASSES = {keras.layers.BatchNormalization: _layers.BatchNormalization, keras.layers.ReLU: _layers.ReLU,
                     keras.layers.Activation: _layers.Activation}


def _plan_epilogue(graph, plan, layer):
    """The ``[→ BatchNormalization] [→ ReLU/ReLU6]`` that ``layer``'s output alone feeds: the same layers, as
    the subclasses that fold into its op where that pays (same config and weights; training unchanged)."""
    _, _, tail = _tail(graph, layer, layer.data_format, _activation_of(layer.activation))
    for follower in tail:
        cls = _EPILOGUE_CLASSES.get(type(follower))
        if cls is None or id(follower) in plan.replace:
            continue
        config = _copy_config(follower)
        plan.replace[id(follower)] = (lambda c=config, cls=cls: cls.from_config(c), None)
        plan.epilogues.append(follower.name)


# --- the report ---------------------------------------------------------------------------------------------

class ConversionReport:
    """What :func:`convert` did: one entry per new nbconv layer, the Keras layers it rewrote without nbconv (folded
    batch norms, or the backend's own kernel where that is faster), and the layers left as they were."""

    def __init__(self, model_name, fold_batchnorm, entries, kept, own=(), notes=()):
        self.model_name = model_name
        self.fold_batchnorm = fold_batchnorm
        #: list of (description, original layer names, "NewClass 'new layer name'")
        self.entries = list(entries)
        #: {class name: count} of the layers cloned unchanged (placeholders excluded)
        self.kept = dict(kept)
        #: the same as ``entries`` for layers that stay Keras's own, the description saying why
        self.own = list(own)
        #: lines about how the new layers run on this backend (e.g. where they choose the backend's own kernel)
        self.notes = list(notes)

    @property
    def converted(self):
        """Number of original layers now computed by nbconv (absorbed batch norms etc. included)."""
        return sum(len(names) for _, names, _ in self.entries)

    def __str__(self):
        head = (f"nbconv: converted model {self.model_name!r}"
                f"{' (batch norms folded, inference only)' if self.fold_batchnorm else ''}: "
                f"{len(self.entries)} nbconv layer(s) replace {self.converted} layer(s)")
        lines = [head]
        for title, entries in (("", self.entries), ("Keras's own kernels: ", self.own)):
            if title and entries:
                lines.append(f"  {title}{len(entries)} layer(s), replacing {sum(len(n) for _, n, _ in entries)}")
            for desc, n in collections.Counter(desc for desc, _, _ in entries).items():
                lines.append(f"  {n:4d} x {desc}")
            for desc, names, cls in entries:
                lines.append(f"    {' -> '.join(names)}  =>  {cls}")
        if self.kept:
            kept = ", ".join(f"{n} {cls}" for cls, n in sorted(self.kept.items(), key=lambda kv: -kv[1]))
            lines.append(f"  left as they are: {kept}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    __repr__ = __str__


def _kernel_notes(entries):
    """Where the new layers run the backend's own kernel (:func:`keras_layers.layers.own_kernel_modes`)."""
    notes = []
    for cls, kind in ((SeparableConv2D, "separable"), (DepthwiseConv2D, "depthwise")):
        modes = own_kernel_modes(kind)
        count = sum(new.startswith(cls.__name__ + " ") for _, _, new in entries)
        if modes and count:
            names = {"predict": "inference", "train": "training"}
            when = " and ".join(names.get(m, m) for m in modes)
            up_to = _layers.NBCONV_UP_TO.get(keras.backend.backend(), {})
            but = "".join(f", nbconv's in {names.get(m, m)} on outputs of up to {n} pixels (N*OH*OW)"
                          for (k, m), n in up_to.items() if k == kind and m in modes)
            notes.append(f"{count} {cls.__name__} layer(s) run {keras.backend.backend()}'s own kernel in {when}{but}: "
                         "measured faster inside a model than nbconv's behind the host call (docs/keras.md; "
                         "keras_layers.layers.OWN_KERNEL, OWN_KERNEL_WITHOUT_NATIVE and NBCONV_UP_TO set the "
                         "choice)")
    return notes


def _epilogue_notes(names):
    if not names:
        return []
    return [f"{len(names)} batch norm / activation layer(s) that nbconv layers feed are keras_layers' "
            "BatchNormalization / ReLU / Activation (same config and weights): at inference in a TensorFlow graph "
            "or a jax jit trace they fold into the nbconv op (one op instead of two or three passes over the "
            "result)"]


# --- convert -------------------------------------------------------------------------------------------------

def convert(model, *, fold_batchnorm=False, verbose=False):
    """Return a copy of ``model`` whose separable and depthwise convolutions run in nbconv.

    Parameters
    ----------
    model : keras.Model
        A built Functional or Sequential model (nested models are converted too).
        It is not modified.
    fold_batchnorm : bool
        Fold inference-mode batch norms and ReLU/ReLU6 into the convolutions and
        fuse MobileNet blocks into one :class:`FusedSeparableConv2D` each (see
        the module documentation).  The result is for inference only.
    verbose : bool
        Print the conversion report.

    Returns
    -------
    keras.Model
        The new model, with its own copy of every weight; its
        ``nbconv_report`` attribute is the :class:`ConversionReport`.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected `model` to be a keras.Model. Received: model of type {type(model).__name__}")
    if not isinstance(model, (keras.Sequential, keras.src.models.Functional)):
        raise ValueError("Expected a Functional or Sequential model (a subclassed model has no layer graph to "
                         f"clone). Received: model={model.name!r} of type {type(model).__name__}")
    try:
        outputs = model.outputs if model.built else None
    except (AttributeError, ValueError):
        outputs = None
    if not outputs:
        raise ValueError(f"Expected a built model with known inputs. Received: model={model.name!r}, not built "
                         "(give it an input shape, e.g. keras.Input(...) as its first layer)")
    graph, plan = _make_plan(model, bool(fold_batchnorm))
    pairs = []  # (original, clone, weights or None=copy from original)
    kept = collections.Counter()

    def clone_function(layer):
        key = id(layer)
        if key in plan.identity:
            return Absorbed(name=layer.name)
        if key in plan.replace:
            factory, weights = plan.replace[key]
            new = factory()
            pairs.append((layer, new, weights))
            return new
        new = layer.__class__.from_config(layer.get_config())
        pairs.append((layer, new, None))
        if not isinstance(layer, keras.layers.InputLayer):
            kept[type(layer).__name__] += 1
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for original, new, weights in pairs:
        if weights is None:
            weights = original.get_weights()
        if weights:
            new.set_weights(weights)
    report = ConversionReport(model.name, bool(fold_batchnorm), plan.entries, kept, plan.own,
                              _kernel_notes(plan.entries) + _epilogue_notes(plan.epilogues))
    object.__setattr__(new_model, "nbconv_report", report)
    if verbose:
        print(report)
    return new_model
