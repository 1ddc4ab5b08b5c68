"""Drop-in ``SeparableConv2D`` / ``DepthwiseConv2D`` whose convolution runs in nbconv's kernels.

The classes subclass Keras's own and keep their names: constructor, argument
validation, weights (names, shapes, creation order), ``get_config``,
``compute_output_shape`` and therefore saved files are Keras's.  Only ``call``
changes.  A model saved with these layers needs ``import keras_layers`` before
``keras.saving.load_model``; ``.weights.h5`` files interchange both ways with
models built from Keras's layers.

Computation: inputs and weights are cast to float32 (float64 under a float64
policy, float16 compute dtypes are computed in float32) and the result is cast
back to the layer's compute dtype.  Under a bfloat16 policy (``mixed_bfloat16``
included) they stay bfloat16 and nbconv multiplies them in bfloat16 pairs with
float32 sums (AVX512_BF16's VDPBF16PS where the CPU has it); the result is
bfloat16, and training updates the float32 variables as Keras's own layers do.  The bias and a relu, relu6
or linear activation are fused into the kernel; any other activation runs
afterwards through ``keras.ops``.

Backends: jax (jit, grad, vmap), torch (eager and ``torch.compile``),
tensorflow (``tf.function``; ``supports_jit`` is False on this backend, since
XLA cannot compile the host call, and a ``model.export()`` SavedModel does not
carry the kernel) and numpy (inference only, like Keras's numpy backend).

Thread pools: on the torch backend, torch's OpenMP workers spin after every
torch op and starve nbconv's threads on a small machine.  Setting
``OMP_WAIT_POLICY=PASSIVE`` in the environment before torch is first imported
(it is read once, when torch loads libgomp) removes the fight: on a 2-core
machine a 4-block MobileNet-like model at batch 8 predicted in 120 ms without
it and 25 ms with it (Keras's own layers: 180 ms and 64 ms).  Measured again
on MobileNetV1's 13 separable blocks (+ BatchNorm + ReLU) at batch 8, predict:
about 500 ms without it, 65-100 ms with it, against 160-190 ms for Keras's own
layers in a process of their own; nbconv's calls inside the model take what
direct calls take, the rest is Keras's eager BatchNorm/ReLU and predict loop.

Memory on the jax backend: XLA's CPU client takes its buffers from ``malloc``
and frees them after every call; glibc returns large blocks to the OS, so
every predict page-faulted its buffers back in (4 KiB at a time: about
10,000 faults, 40 MiB, per predict of the model above) and the kernel's
result was written into such fresh pages.  The jax bridge raises glibc's
mmap and trim thresholds and keeps malloc to one arena when it loads
(:func:`keras_layers.backend._common.keep_freed_memory`;
``NBCONV_KEEP_FREED_MEMORY=0`` opts out): the model's batch-8 predict went
from 73 ms (1.5x the 13 direct nbconv calls) to 46-49 ms (1.2x).  The torch and
numpy bridges do the same: there nbconv's own results page-faulted in (Keras
keeps every block's output until the call returns, and glibc trimmed the heap
they left free); the 13 calls inside a torch model at batch 8 took 87 ms
against 62 ms called directly, and 62 ms with the setting.

TensorFlow needs no process setting.  Its CPU build has no OpenMP pool (its
oneDNN runs on TF's own Eigen pool), and inside the ``numpy_function``
callbacks the 13 calls of the model above take what the direct calls take
(39 against 39-40 ms at batch 8, interleaved in one process): TF's pool does
not spin against Numba's.  Intra-/inter-op pool sizes of 1 or 2 and
``glibc.malloc.hugetlb=1`` helped neither model consistently (one intra-op
thread slowed Keras's own model at batch 8 from 42-46 to 64 ms).  On this
backend Keras's own layers run TF's oneDNN depthwise and 1x1 kernels, nearly
as fast as nbconv's: at batch 8 the model with Keras's layers took 42-46 ms,
the 13 direct nbconv calls 41-43 ms and the model with ours 59-68 ms.  The
difference is BatchNorm and ReLU, separate TF passes over every block's output
that cannot fuse with a host call (about 12 ms: the model with a host call
returning a cached result took 15 ms, 3 ms without BatchNorm and ReLU), and
the host calls themselves (about 3 ms).  ``convert(model,
fold_batchnorm=True)`` removes those passes for inference: against the
original keras.applications model (interleaved medians) MobileNet ran
1.24-1.55x faster at batch 1 and 1.04x at batch 8, Xception 0.93-1.01x at
batch 1, the unfolded conversion 0.78-0.90x (2 cores, another process using
about one of them: ratios, not absolute times).
"""
import inspect

import keras
from keras import activations, ops

from . import backend as _backend

try:  # reading a variable without the mixed policy's cast (Keras's own layers use it the same way)
    from keras.src.backend import AutocastScope as _AutocastScope
except ImportError:  # pragma: no cover  (another Keras: the weights arrive cast to bfloat16)
    _AutocastScope = None

__all__ = ["SeparableConv2D", "DepthwiseConv2D"]

#: Keras activation functions the kernels fuse, by name
_FUSABLE = {activations.linear: "linear", activations.relu: "relu", activations.relu6: "relu6"}


def _split_activation(activation):
    """``(fused name, activation to apply afterwards or None)``."""
    name = _FUSABLE.get(activation) if activation is not None else "linear"
    if name is not None:
        return name, None
    return "linear", activation


def _own_value(variable):
    """A variable's own value, not cast to the layer's compute dtype (a mixed policy's float32 weights)."""
    if _AutocastScope is None:
        return variable
    with _AutocastScope(None):
        return ops.convert_to_tensor(variable)


def _run(layer, kind, inputs, variables):
    fused, after = _split_activation(layer.activation)
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
    cfg = _backend.make_config(kind, layer.use_bias, layer.strides, layer.padding, layer.dilation_rate,
                               layer.data_format, fused, precision)
    out = _backend.bridge().apply(cfg, *tensors)
    if keras.backend.standardize_dtype(out.dtype) != compute_dtype:
        out = ops.cast(out, compute_dtype)
    if after is not None:
        out = after(out)
    return out


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
        return _run(self, "separable", inputs, variables)


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
        return _run(self, "depthwise", inputs, variables)
