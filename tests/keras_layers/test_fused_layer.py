"""FusedSeparableConv2D on its own, through the backend bridges shared with the other layers: outputs against
the float64 reference (``tests/reference.py``), its validation messages, and the clear error its missing
backward raises on every backend with autodiff."""
import keras
import numpy as np
import pytest

from helpers import BACKEND, to_numpy
from reference import assert_close, separable_ref

from keras_layers import FusedSeparableConv2D
from keras_layers.backend import _common, make_config


def _fused(rng, input_shape, **kwargs):
    layer = FusedSeparableConv2D(**kwargs)
    layer.build(input_shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()])
    return layer


CASES = [
    dict(filters=5, kernel_size=3, padding="same", depthwise_activation="relu", activation="relu6"),
    dict(filters=4, kernel_size=3, strides=2, padding=((0, 1), (0, 1)), depthwise_activation="relu6"),
    dict(filters=3, kernel_size=(3, 2), padding="valid", dilation_rate=(2, 1), depth_multiplier=2,
         activation="relu"),
    dict(filters=4, kernel_size=3, strides=2, padding="same", data_format="channels_first",
         depthwise_activation="relu", activation="linear"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()
                                                               if k != "filters").replace(" ", ""))
def test_outputs_match_the_reference(case, rng):
    channels_first = case.get("data_format") == "channels_first"
    shape = (2, 6, 9, 8) if channels_first else (2, 9, 8, 6)
    x = rng.standard_normal(shape).astype("float32")
    layer = _fused(rng, shape, **case)
    y = to_numpy(layer(x))
    dk, db, pk, b = [to_numpy(w) for w in layer.weights]
    expected = separable_ref(x, dk, pk, b, strides=layer.strides, padding=layer.padding,
                             dilation_rate=layer.dilation_rate, data_format=layer.data_format,
                             activation=case.get("activation"), depthwise_bias=db,
                             depthwise_activation=case.get("depthwise_activation"))
    assert y.shape == expected.shape == layer.compute_output_shape(shape)
    assert_close(y, expected)


def test_output_shape_of_unknown_and_explicit_sizes():
    layer = FusedSeparableConv2D(7, 3, strides=2, padding=((1, 2), (0, 0)))
    assert layer.compute_output_shape((None, None, 9, 4)) == (None, None, 4, 7)
    assert layer.compute_output_shape((2, 10, 9, 4)) == (2, 6, 4, 7)


def test_bad_arguments_raise_keras_style_errors():
    with pytest.raises(ValueError, match=r"Expected `depthwise_activation` to be None, 'linear', 'relu' or 'relu6'. "
                                         r"Received: depthwise_activation='tanh'"):
        FusedSeparableConv2D(4, 3, depthwise_activation="tanh")
    with pytest.raises(ValueError, match=r"Expected `activation` to be None.*Received: activation=<function"):
        FusedSeparableConv2D(4, 3, activation=keras.activations.tanh)
    with pytest.raises(ValueError, match=r"Expected `strides` to be a positive int or a tuple of 2 positive ints. "
                                         r"Received: strides=\(1, 0\)"):
        FusedSeparableConv2D(4, 3, strides=(1, 0))
    with pytest.raises(ValueError, match=r"Expected `data_format` to be 'channels_last', 'channels_first' or None. "
                                         r"Received: data_format='NHWC'"):
        FusedSeparableConv2D(4, 3, data_format="NHWC")
    with pytest.raises(ValueError, match=r"Expected `padding` to be 'valid', 'same'.*Received: padding='causal'"):
        FusedSeparableConv2D(4, 3, padding="causal")
    with pytest.raises(ValueError, match=r"Expected an input large enough for a non-empty output. Received: "
                                         r"input_shape=\(1, 2, 8, 3\), which gives an output of size \(0, 6\)"):
        FusedSeparableConv2D(4, 3).compute_output_shape((1, 2, 8, 3))


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"Expected `kind` to be 'depthwise' or 'separable'. Received: kind='x'"):
        make_config("x", True, 1, "same", 1, "channels_last", "relu")
    with pytest.raises(ValueError, match=r"Expected a separable op for a depthwise bias. Received: kind='depthwise'"):
        make_config("depthwise", True, 1, "same", 1, "channels_last", "relu", "", True)
    cfg = make_config("separable", True, 2, 1, (1, 1), None, "RELU", "", True, "relu6")
    assert cfg.padding == ((1, 1), (1, 1)) and cfg.strides == (2, 2) and cfg.data_format == "channels_last"
    assert cfg.activation == "relu" and cfg.names[-1] == "depthwise_bias" and not cfg.differentiable
    # the cache takes unhashable spellings too
    assert make_config("separable", False, [2, 2], [[0, 1], [0, 1]], 1, None, None).padding == ((0, 1), (0, 1))


GRADIENT_ERROR = r"Expected a differentiable op: nbconv has no backward for a separable convolution with a " \
                 r"depthwise bias or activation.*Received: a gradient request for an op with depthwise_bias=True"


def test_host_backward_raises():
    cfg = make_config("separable", True, 1, "same", 1, None, "relu", "", True, "relu")
    with pytest.raises(ValueError, match=GRADIENT_ERROR):
        _common.backward(cfg, ("x",), *[np.zeros((1, 1, 1, 1), "float32")] * 7)


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend has no autodiff")
def test_gradient_request_raises_a_clear_error(rng):
    shape = (1, 6, 6, 3)
    layer = _fused(rng, shape, filters=2, kernel_size=3, padding="same", depthwise_activation="relu")
    x = rng.standard_normal(shape).astype("float32")
    with pytest.raises(ValueError, match=GRADIENT_ERROR):
        if BACKEND == "jax":
            import jax

            ntv = [v.value for v in layer.non_trainable_variables]
            jax.grad(lambda t: layer.stateless_call([], ntv, t)[0].sum())(x)
        elif BACKEND == "tensorflow":
            import tensorflow as tf

            xt = tf.convert_to_tensor(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = tf.reduce_sum(layer(xt))
            tape.gradient(y, xt)
        else:
            import torch

            xt = torch.tensor(x, requires_grad=True)
            layer(xt).sum().backward()


@pytest.mark.skipif(BACKEND != "torch", reason="the torch custom op")
def test_torch_fused_op_under_fake_tensors_and_compile(rng):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = (2, 8, 8, 3)
    layer = _fused(rng, shape, filters=4, kernel_size=3, strides=2, padding=((0, 1), (0, 1)),
                   depthwise_activation="relu", activation="relu6")
    x = rng.standard_normal(shape).astype("float32")
    expected = to_numpy(layer(x))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the weights stay real
        fake = layer(mode.from_tensor(torch.tensor(x)))
    assert tuple(fake.shape) == expected.shape == (2, 4, 4, 4)
    compiled = torch.compile(lambda t: layer(t), fullgraph=True, backend="eager")
    assert_close(to_numpy(compiled(torch.tensor(x))), expected)
