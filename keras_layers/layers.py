"""Drop-in ``SeparableConv2D`` / ``DepthwiseConv2D`` whose convolution runs in nbconv's kernels.

The classes subclass Keras's own and keep their names: constructor, argument
validation, weights (names, shapes, creation order), ``get_config``,
``compute_output_shape`` and therefore saved files are Keras's.  Only ``call``
changes: it casts the tensors to the dtype the kernels compute in (float32,
float64 under a float64 policy, bfloat16 under a bfloat16 one; float16 is
computed in float32), runs the op through the active backend's bridge
(:mod:`keras_layers.backend`) with the bias and a relu, relu6 or linear
activation fused, casts the result to the layer's compute dtype and applies
any other activation through ``keras.ops``.  A model saved with these layers
needs ``import keras_layers`` before ``keras.saving.load_model``.

Where the backend's own kernel is measured faster inside a model (tensorflow,
in a training step: oneDNN's kernels run about as fast as nbconv's, and the
backward's host call costs more than they differ; in inference too where the
bridge has no native forward), the layer runs Keras's own ``call`` instead:
:data:`OWN_KERNEL`, :data:`OWN_KERNEL_WITHOUT_NATIVE` and :data:`NBCONV_UP_TO`
hold the choice per backend, layer kind and mode (inference, or a gradient
recorded), and ``convert(..., verbose=True)`` reports it.

Backends: jax (jit, grad, vmap), torch (eager and ``torch.compile``),
tensorflow (``tf.function``; ``supports_jit`` is False there, since XLA cannot
compile the host call) and numpy (inference only).  Process settings (torch
wants ``OMP_WAIT_POLICY=PASSIVE`` before it is imported; the jax, torch and
numpy bridges keep freed memory in the process) and the measurements behind
them: ``docs/keras.md``.
"""
import inspect
import weakref

import keras
from keras import activations, ops

from . import backend as _backend

try:  # reading a variable without the mixed policy's cast (Keras's own layers use it the same way)
    from keras.src.backend import AutocastScope as _AutocastScope
except ImportError:  # pragma: no cover  (another Keras: the weights arrive cast to bfloat16)
    _AutocastScope = None

__all__ = ["SeparableConv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU", "Activation"]

#: Keras activation functions the kernels fuse, by name
_FUSABLE = {activations.linear: "linear", activations.relu: "relu", activations.relu6: "relu6"}


def _split_activation(activation):
    """``(fused name, activation to apply afterwards or None)``: a Keras function, or a name among
    :data:`keras_layers.backend.FUSED` (the fused layer keeps names)."""
    if activation is None:
        return "linear", None
    if isinstance(activation, str) and activation in _backend.FUSED:
        return activation, None
    name = _FUSABLE.get(activation)
    if name is not None:
        return name, None
    return "linear", activation


def _own_value(variable):
    """A variable's own value, not cast to the layer's compute dtype (a mixed policy's float32 weights); a
    tensor (the folded weights of :class:`_Epilogue`) as it is."""
    if _AutocastScope is None or not isinstance(variable, keras.Variable):
        return variable
    with _AutocastScope(None):
        # ``.value``, not ops.convert_to_tensor: a TF variable is a tensor to Keras's TF backend, which returns it
        # as it is, and the bridge's own conversion would then cast it under the layer's autocast scope
        return variable.value


def _run(layer, kind, inputs, variables, depthwise_bias=False, depthwise_activation=None, use_bias=None,
         activation=None):
    """The layer's op on ``inputs`` through the backend's bridge: ``variables`` are the op's inputs after ``x``
    (``keras_layers.backend.Config.names``), with a ``depthwise_bias`` last for the fused block; ``use_bias`` and
    ``activation`` replace the layer's own (:class:`_Epilogue`)."""
    fused, after = _split_activation(layer.activation if activation is None else activation)
    use_bias = layer.use_bias if use_bias is None else use_bias
    compute_dtype = keras.backend.standardize_dtype(layer.compute_dtype)
    precision = ""
    if compute_dtype == "bfloat16":
        # bfloat16 products, summed in float32: the activations in bfloat16, the variables as they are (a mixed
        # policy's float32 weights are rounded by the kernel as it packs them, not cast by the framework per call)
        precision = "bfloat16"
        tensors = [ops.cast(inputs, "bfloat16")] + [_own_value(v) for v in variables]
    else:
        # float16 is computed in float32
        work = "float64" if compute_dtype == "float64" else "float32"
        tensors = [ops.cast(t, work) for t in [inputs] + list(variables)]
    cfg = _backend.make_config(kind, use_bias, layer.strides, layer.padding, layer.dilation_rate,
                               layer.data_format, fused, precision, depthwise_bias, depthwise_activation)
    out = _backend.bridge().apply(cfg, *tensors)
    if keras.backend.standardize_dtype(out.dtype) != compute_dtype:
        out = ops.cast(out, compute_dtype)
    if after is not None:
        out = after(out)
    return out


def _fused_activation(layer):
    """'relu' / 'relu6' / 'linear' if ``layer`` is a plain activation layer the kernels can fuse, else None."""
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            return None
        if layer.max_value is None:
            return "relu"
        return "relu6" if float(layer.max_value) == 6.0 else None
    if isinstance(layer, keras.layers.Activation):
        return _activation_of(layer.activation)
    return None


def _activation_of(fn):
    """Name of a layer's ``activation`` attribute if fusable, else None."""
    return "linear" if fn is None else _FUSABLE.get(fn)


def _channels_axis_ok(bn, data_format):
    axis = bn.axis if isinstance(bn.axis, int) else (bn.axis[0] if len(bn.axis) == 1 else None)
    if axis is None:
        return False
    axis = axis % 4
    return axis == (3 if data_format == "channels_last" else 1)


class _Epilogue:
    """How to compute a layer's output again with an inference-mode batch norm and an activation folded in.

    nbconv's layers attach one to their output (``_nbconv_epilogue``, or a
    side table for jax's tracers, which take no attributes) where the bridge
    builds a graph that drops unused stateless ops (TensorFlow's
    ``tf.function``, a ``jax.jit`` trace: ``prunes_unused`` of
    :mod:`keras_layers.backend.tensorflow` and :mod:`keras_layers.backend.jax`).
    Float32 layers and a mixed policy's (bfloat16 compute, float32 variables:
    the folded weights are rounded once, as the kernel packs them).
    The :class:`BatchNormalization`, :class:`ReLU` and :class:`Activation`
    that :func:`keras_layers.convert` puts after them then return the fused
    op's output instead of computing on the input: their own pass over the
    result is gone (Grappler fuses it into TensorFlow's own convolutions, not
    into ours), and the layer's first op, no longer used, is pruned.  The
    input's identity is the check: any other input, or the same tensor used
    elsewhere, is computed as written.
    """

    def __init__(self, layer, kind, inputs, variables, bn=None, activation="linear"):
        self.layer, self.kind, self.inputs, self.variables = layer, kind, inputs, variables
        self.bn, self.activation = bn, activation

    @classmethod
    def attach(cls, layer, kind, inputs, variables, out):
        # the bridge first: on the eager backends (every torch call) nothing else is asked
        bridge = _backend.bridge()
        prunes = getattr(bridge, "prunes_unused", None)
        if (prunes is not None and prunes(inputs) and _foldable(layer)
                and _split_activation(layer.activation) == ("linear", None)
                and not bridge.needs_gradient([inputs] + [v.value for v in variables])):
            _tag(out, cls(layer, kind, inputs, variables))
        return out

    def folds(self, bn):
        """Whether ``bn`` (inference mode) folds into this op at a profit."""
        layer = self.layer
        if (self.bn is not None or self.activation != "linear" or not _channels_axis_ok(bn, layer.data_format)
                or not _foldable(bn) or bn.compute_dtype != layer.compute_dtype):
            return False
        if self.kind == "depthwise":
            return True  # a few weights per channel against a pass over the result
        # the pointwise weights (C*F) scaled per call against a pass over the result (N*OH*OW*F)
        shape = layer.compute_output_shape(tuple(self.inputs.shape))
        hw = shape[1:3] if layer.data_format == "channels_last" else shape[2:4]
        pixels = (shape[0] or 1) * hw[0] * hw[1] if None not in hw else 0
        return int(self.variables[1].shape[-2]) <= pixels

    def with_batchnorm(self, bn):
        return self._output(bn, "linear")

    def with_activation(self, name):
        return self._output(self.bn, name)

    def _output(self, bn, activation):
        layer = self.layer
        weights = [_own_value(v) for v in self.variables]
        kernel = weights[-2] if layer.use_bias else weights[-1]
        bias = weights[-1] if layer.use_bias else None
        if bn is not None:
            # (not cast to a mixed policy's bfloat16: the folded weights are rounded once, by the kernel)
            mean, var = _own_value(bn.moving_mean), _own_value(bn.moving_variance)
            scale = ops.rsqrt(ops.add(var, bn.epsilon))
            if bn.scale:
                scale = ops.multiply(scale, _own_value(bn.gamma))
            shift = ops.negative(ops.multiply(mean, scale))
            if bn.center:
                shift = ops.add(shift, _own_value(bn.beta))
            if self.kind == "depthwise":  # output channel c * depth_multiplier + m
                kernel = ops.multiply(kernel, ops.reshape(scale, tuple(kernel.shape[2:])))
            else:
                kernel = ops.multiply(kernel, scale)
            bias = shift if bias is None else ops.add(ops.multiply(bias, scale), shift)
        tensors = weights[:-2 if layer.use_bias else -1] + [kernel] + ([] if bias is None else [bias])
        out = _run(layer, self.kind, self.inputs, tensors, use_bias=bias is not None, activation=activation)
        if activation == "linear":
            _tag(out, _Epilogue(layer, self.kind, self.inputs, self.variables, bn, activation))
        return out


def _foldable(layer):
    """float32, or a mixed policy's bfloat16 compute on float32 variables (the batch norm's statistics and the
    folded weights stay float32 until the kernel rounds them)."""
    compute = keras.backend.standardize_dtype(layer.compute_dtype)
    return compute == "float32" or (
        compute == "bfloat16" and keras.backend.standardize_dtype(layer.variable_dtype) == "float32")


#: id(tensor) -> (weak reference, epilogue) for tensors that take no attributes (jax tracers); an entry goes
#: with its tensor
_TAGS = {}


def _tag(tensor, epilogue):
    try:
        tensor._nbconv_epilogue = epilogue
    except AttributeError:
        key = id(tensor)
        try:
            ref = weakref.ref(tensor, lambda r, key=key: _TAGS.pop(key, None) if _TAGS.get(key, (r,))[0] is r
                              else None)
        except TypeError:  # neither attributes nor weak references: nothing folds into its op
            return tensor
        _TAGS[key] = (ref, epilogue)
    return tensor


def _epilogue_of(inputs):
    epilogue = getattr(inputs, "_nbconv_epilogue", None)
    if epilogue is None:
        ref, tagged = _TAGS.get(id(inputs), (None, None))
        epilogue = tagged if ref is not None and ref() is inputs else None
    return epilogue


def _folding_activation(layer, inputs):
    """``(epilogue, "relu" or "relu6")`` where activation ``layer`` folds into the op that made ``inputs``."""
    epilogue, name = _epilogue_of(inputs), _fused_activation(layer)
    if (epilogue is None or name not in ("relu", "relu6") or not _foldable(layer)
            or layer.compute_dtype != epilogue.layer.compute_dtype):
        return None, None
    return epilogue, name


class _TrainEpilogue:
    """A relu or relu6 after a training-mode batch norm computed by nbconv (:func:`_train_batchnorm`), fused into
    its op: the op runs again with the activation, the moving averages are assigned again from its moments, and
    the first op, no longer used, is pruned from the compiled step (the bridge tags only there:
    ``prunes_unused_in_training``)."""

    def __init__(self, layer, inputs, moving):
        self.layer, self.inputs, self.moving = layer, inputs, moving

    def with_activation(self, name):
        return _train_batchnorm(self.layer, self.inputs, None, name, self.moving)


def _train_batchnorm(layer, inputs, mask, activation="linear", moving=None):
    """The training-mode output of batch norm ``layer`` by nbconv's kernels where the bridge has them (jax: XLA's
    own passes over a large activation are the slow part of a training step there), its moving averages updated
    as Keras's layer updates them; None where Keras's ``call`` computes it (a mask, renorm, synchronized
    moments, another axis than the last, other dtypes)."""
    fn = getattr(_backend.bridge(), "batch_norm_train", None)
    ndim = len(inputs.shape)
    if (fn is None or mask is not None or layer.renorm or layer.synchronized or ndim < 2
            or layer.axis % ndim != ndim - 1 or not _foldable(layer)
            or keras.backend.standardize_dtype(inputs.dtype) not in ("float32", "bfloat16")):
        return None
    c = inputs.shape[-1]
    gamma = _own_value(layer.gamma) if layer.scale else ops.ones((c,), "float32")
    beta = _own_value(layer.beta) if layer.center else ops.zeros((c,), "float32")
    # float32, or a mixed policy's bfloat16: the kernels read it as it is and compute in float32
    x = ops.cast(inputs, keras.backend.standardize_dtype(layer.compute_dtype))
    y, mean, variance = fn(x, gamma, beta, layer.epsilon, activation)
    # the averages as they were before this step (a fused activation's second call assigns them again)
    moving = moving or (_own_value(layer.moving_mean), _own_value(layer.moving_variance))
    layer.moving_mean.assign(moving[0] * layer.momentum + mean * (1.0 - layer.momentum))
    layer.moving_variance.assign(moving[1] * layer.momentum + variance * (1.0 - layer.momentum))
    out = ops.cast(y, layer.compute_dtype)
    if activation == "linear" and _backend.bridge().prunes_unused_in_training(inputs):
        _tag(out, _TrainEpilogue(layer, inputs, moving))
    return out


@keras.saving.register_keras_serializable(package="nbconv")
class BatchNormalization(keras.layers.BatchNormalization):
    """``keras.layers.BatchNormalization``; at inference inside a TensorFlow graph or a jax trace, folded into the
    nbconv layer that feeds it (:class:`_Epilogue`); in training on jax, computed by nbconv's kernels
    (:func:`nbconv.batch_norm_train`).  :func:`keras_layers.convert` puts it after nbconv's layers."""

    def call(self, inputs, training=None, mask=None):
        epilogue = _epilogue_of(inputs)
        if epilogue is not None and not (training and self.trainable) and epilogue.folds(self):
            return epilogue.with_batchnorm(self)
        if training and self.trainable:
            out = _train_batchnorm(self, inputs, mask)
            if out is not None:
                return out
        return super().call(inputs, training=training, mask=mask)


@keras.saving.register_keras_serializable(package="nbconv")
class ReLU(keras.layers.ReLU):
    """``keras.layers.ReLU``; a relu or relu6 after an nbconv layer (and its batch norm) in a TensorFlow graph is
    fused into that layer's op (:class:`_Epilogue`)."""

    def call(self, inputs):
        epilogue, name = _folding_activation(self, inputs)
        if epilogue is not None:
            return epilogue.with_activation(name)
        return super().call(inputs)


@keras.saving.register_keras_serializable(package="nbconv")
class Activation(keras.layers.Activation):
    """``keras.layers.Activation``; fused like :class:`ReLU` where its function is relu or relu6."""

    def call(self, inputs):
        epilogue, name = _folding_activation(self, inputs)
        if epilogue is not None:
            return epilogue.with_activation(name)
        return super().call(inputs)


#: where the backend's own kernel is faster inside a model than nbconv's behind the bridge, measured on
#: keras.applications models (docs/keras.md, "Where the backend's own kernel runs"): backend -> layer kind ->
#: the modes ("predict": no gradient recorded, "train": a gradient may be asked) in which the layer runs Keras's
#: own ``call``.  Edit it to change the choice (``{}``: nbconv everywhere); FusedSeparableConv2D always runs nbconv.
OWN_KERNEL = {
    "tensorflow": {"depthwise": ("train",), "separable": ("train",)},
}
#: modes added to OWN_KERNEL where the bridge has no native forward (``bridge().native_forward()`` False: the
#: forward is a host call, which costs more than oneDNN's kernels differ from nbconv's)
OWN_KERNEL_WITHOUT_NATIVE = {
    "tensorflow": {"depthwise": ("predict",), "separable": ("predict",)},
}
#: exceptions to OWN_KERNEL: backend -> (kind, mode) -> the output size (N*OH*OW pixels; OH*OW when the batch is
#: unknown) up to which nbconv runs all the same, its kernel saving more than the host call costs.  TF's separable
#: layers on 2 images of 6x6x728 took 1.4-2.2x nbconv's time, on 1 of 14x14 or 8 of 6x6 1.03-1.12x
NBCONV_UP_TO = {
    "tensorflow": {("separable", "predict"): 128},
}


def _native_forward(backend):
    if backend == keras.backend.backend():
        return getattr(_backend.bridge(), "native_forward", lambda: False)()
    from nbconv import _native

    return _native.available()  # another backend's bridge is not loaded: what this platform allows


def own_kernel_modes(kind, backend=None):
    """The modes in which a layer of ``kind`` ("depthwise", "separable") runs the backend's own kernel."""
    backend = backend or keras.backend.backend()
    modes = tuple(OWN_KERNEL.get(backend, {}).get(kind, ()))
    extra = tuple(m for m in OWN_KERNEL_WITHOUT_NATIVE.get(backend, {}).get(kind, ()) if m not in modes)
    if extra and not _native_forward(backend):
        modes += extra
    return modes


def _own_kernel(layer, kind, inputs, variables):
    """Whether ``layer`` runs Keras's own ``call`` here (:data:`OWN_KERNEL`, :data:`NBCONV_UP_TO`)."""
    modes = own_kernel_modes(kind)
    if not modes or (keras.backend.backend() == "tensorflow" and layer.strides[0] != layer.strides[1]):
        # TF's depthwise and separable kernels reject unequal strides (tensorflow#57251); nbconv computes them
        return False
    mode = "train" if _backend.bridge().needs_gradient([inputs] + [v.value for v in variables]) else "predict"
    if mode not in modes:
        return False
    limit = NBCONV_UP_TO.get(keras.backend.backend(), {}).get((kind, mode))
    if limit is not None:
        shape = layer.compute_output_shape(tuple(inputs.shape))
        n, hw = shape[0], (shape[1:3] if layer.data_format == "channels_last" else shape[2:4])
        if None not in hw and (n or 1) * hw[0] * hw[1] <= limit:
            return False
    return True


def _jit_ok():
    # XLA cannot compile tf.numpy_function; every other backend's compiled mode can call the kernels
    return keras.backend.backend() != "tensorflow"


@keras.saving.register_keras_serializable(package="nbconv")
class SeparableConv2D(keras.layers.SeparableConv2D):
    """``keras.layers.SeparableConv2D`` computed by :func:`nbconv.separable_conv2d`.

    Same arguments, weights and config as Keras's layer (see its documentation);
    the depthwise result is never materialised in the forward pass.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = _jit_ok()

    __init__.__signature__ = inspect.signature(keras.layers.SeparableConv2D.__init__)

    def call(self, inputs):
        variables = [self.depthwise_kernel, self.pointwise_kernel] + ([self.bias] if self.use_bias else [])
        if _own_kernel(self, "separable", inputs, variables):
            return super().call(inputs)
        return _Epilogue.attach(self, "separable", inputs, variables, _run(self, "separable", inputs, variables))


@keras.saving.register_keras_serializable(package="nbconv")
class DepthwiseConv2D(keras.layers.DepthwiseConv2D):
    """``keras.layers.DepthwiseConv2D`` computed by :func:`nbconv.depthwise_conv2d`.

    Same arguments, weights and config as Keras's layer (see its documentation).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.supports_jit = _jit_ok()

    __init__.__signature__ = inspect.signature(keras.layers.DepthwiseConv2D.__init__)

    def call(self, inputs):
        variables = [self.kernel] + ([self.bias] if self.use_bias else [])
        if _own_kernel(self, "depthwise", inputs, variables):
            return super().call(inputs)
        return _Epilogue.attach(self, "depthwise", inputs, variables, _run(self, "depthwise", inputs, variables))
