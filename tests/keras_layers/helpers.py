"""Backend-agnostic helpers for the Keras layer tests: pairs of layers with shared weights, gradients.

Every comparison is between nbconv's layer and either Keras's own layer (same
weights) or the float64 NumPy reference in ``tests/reference.py``.
"""
import keras
import numpy as np

import keras_layers

BACKEND = keras.backend.backend()

#: (ours, Keras's) by name
PAIRS = {
    "separable": (keras_layers.SeparableConv2D, keras.layers.SeparableConv2D),
    "depthwise": (keras_layers.DepthwiseConv2D, keras.layers.DepthwiseConv2D),
}


def to_numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def random_weights(layer, rng):
    """Random weights (biases too, so a bias bug shows) in the layer's variable dtype."""
    return [rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()]


def make_pair(kind, input_shape, rng, **kwargs):
    """Build ours and Keras's layer with identical random weights."""
    ours_cls, keras_cls = PAIRS[kind]
    # cheap initializers: jax compiles a random initializer for every new shape (seconds each)
    kwargs.setdefault("depthwise_initializer", "zeros")
    if kind == "separable":
        kwargs.setdefault("pointwise_initializer", "zeros")
    ours, ref = ours_cls(**kwargs), keras_cls(**kwargs)
    ours.build(input_shape)
    ref.build(input_shape)
    weights = random_weights(ours, rng)
    ours.set_weights(weights)
    ref.set_weights(weights)
    return ours, ref


def separable_config(**kw):
    """A separable op's bridge config (keras_layers.backend._common.Config): 3x3 "same", relu, unless ``kw``."""
    from keras_layers.backend import _common

    base = dict(kind="separable", has_bias=True, strides=(1, 1), padding="same", dilation_rate=(1, 1),
                data_format="channels_last", activation="relu")
    base.update(kw)
    return _common.make_config(**base)


def separable_operands(rng, shape=(2, 19, 21, 24), f=40):
    """float32 ``[x, depthwise_kernel (3x3, dm 1), pointwise_kernel, bias]`` for a bridge's op, uniform in [-1, 1)."""
    from reference import random_array

    c = shape[-1]
    return [random_array(rng, shape), random_array(rng, (3, 3, c, 1)), random_array(rng, (1, 1, c, f)),
            random_array(rng, (f,))]


def concurrent_separable_cases(rng):
    """Four (config, operands) pairs of different shapes, strides and activations for calls from several threads:
    small fused tiles, stride 2, relu6 at 64 channels, and 520 channels (shared mode)."""
    return [(separable_config(), separable_operands(rng)),
            (separable_config(strides=(2, 2)), separable_operands(rng, (1, 30, 30, 16), 32)),
            (separable_config(activation="relu6"), separable_operands(rng, (2, 14, 14, 64), 64)),
            (separable_config(activation="linear"), separable_operands(rng, (1, 9, 9, 520), 512))]


def weights_of(layer):
    """The layer's weights as a dict for the reference functions."""
    if isinstance(layer, keras.layers.SeparableConv2D):
        names = ["depthwise_kernel", "pointwise_kernel"]
    else:
        names = ["kernel"]
    out = {n: to_numpy(getattr(layer, n)) for n in names}
    out["bias"] = to_numpy(layer.bias) if layer.use_bias else None
    return out


def gradients(layer, x, cotangent):
    """d/d(x, trainable weights) of sum(layer(x) * cotangent), by the backend's autodiff, as NumPy arrays.

    Returns ``(y, dx, [dw...])`` with the weights in ``layer.trainable_variables`` order.
    """
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in layer.trainable_variables]
        ntv = [v.value for v in layer.non_trainable_variables]

        def loss(tv, x):
            y, _ = layer.stateless_call(tv, ntv, x)
            return jnp.sum(y * cotangent), y

        (_, y), (dw, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(tv, jnp.asarray(x))
        return to_numpy(y), to_numpy(dx), [to_numpy(g) for g in dw]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        xt = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = layer(xt)
            loss = tf.reduce_sum(y * cotangent)
        grads = tape.gradient(loss, [xt] + [v.value for v in layer.trainable_variables])
        return to_numpy(y), to_numpy(grads[0]), [to_numpy(g) for g in grads[1:]]
    if BACKEND == "torch":
        import torch

        xt = torch.tensor(x, requires_grad=True)
        for v in layer.trainable_variables:
            v.value.grad = None
        y = layer(xt)
        (y * torch.as_tensor(cotangent)).sum().backward()
        return to_numpy(y.detach()), to_numpy(xt.grad), [to_numpy(v.value.grad) for v in layer.trainable_variables]
    raise NotImplementedError(f"no autodiff on the {BACKEND} backend")
