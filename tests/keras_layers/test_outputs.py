"""Forward outputs of nbconv's layers equal Keras's layers with the same weights, over a grid.

On tensorflow, Keras's depthwise/separable ops reject unequal row and column
strides (tensorflow/tensorflow#57251) and get channels_first with strides
wrong: those cases are compared with the float64 NumPy reference
(tests/reference.py) instead.
"""
import itertools

import keras
import numpy as np
import pytest

from helpers import BACKEND, make_pair, to_numpy, weights_of
from reference import assert_close, depthwise_ref, separable_ref

KERNELS = (1, 2, 3, 5)
STRIDES = (1, 2, (1, 2), (2, 1))
PADDINGS = ("valid", "same")
FORMATS = ("channels_last", "channels_first")
# the values below are cycled through the kernel x strides x padding product (each meets several)
DILATIONS = (1, 2, (2, 1), 1, 3)
MULTIPLIERS = (1, 3)
ACTIVATIONS = (None, "relu", "relu6", "tanh", "linear")
SIZES = ((7, 8), (8, 7), (9, 9), (6, 10))  # odd and even


def _grid():
    cases = []
    for i, (k, s, p) in enumerate(itertools.product(KERNELS, STRIDES, PADDINGS)):
        cases.append(dict(kernel_size=k, strides=s, padding=p, data_format=FORMATS[(i // 2 + i // 8) % 2],
                          dilation_rate=DILATIONS[i % len(DILATIONS)], depth_multiplier=MULTIPLIERS[(i // 3) % 2],
                          use_bias=bool((i // 2) % 2), activation=ACTIVATIONS[i % len(ACTIVATIONS)],
                          size=SIZES[(i // 4) % len(SIZES)]))
    return cases


GRID = _grid()


def _ids(case):
    return "k{kernel_size}-s{strides}-{padding}-{data_format}-d{dilation_rate}-m{depth_multiplier}-b{use_bias}-" \
           "{activation}-{size}".format(**case).replace(" ", "")


def _input(case, rng, channels=3, batch=2):
    h, w = case["size"]
    k = case["kernel_size"]
    d = case["dilation_rate"] if isinstance(case["dilation_rate"], tuple) else (case["dilation_rate"],) * 2
    # 'valid' needs room for the dilated kernel
    h, w = max(h, (k - 1) * d[0] + 1), max(w, (k - 1) * d[1] + 1)
    shape = (batch, h, w, channels) if case["data_format"] == "channels_last" else (batch, channels, h, w)
    return rng.standard_normal(shape).astype("float32")


def _unequal_strides(case):
    s = case["strides"]
    return isinstance(s, tuple) and s[0] != s[1]


def keras_tf_unreliable(case, out_shape):
    """Cases Keras's own layers reject or get wrong on tensorflow: compared with the reference there.

    Unequal strides are rejected (tensorflow/tensorflow#57251).  With
    channels_first, a bias, and an output whose width equals its channel
    count, Keras 3.15.1's TF ``ops.add`` takes its ``tf.nn.bias_add`` fast path
    with data_format "NHWC" (it tests the last axis first,
    keras/src/backend/tensorflow/numpy.py ``add``) and adds the bias along the
    width: Keras's layer is wrong there, ours fuses the bias in the kernel.
    """
    if BACKEND != "tensorflow":
        return False
    bias_on_width = case["data_format"] == "channels_first" and case["use_bias"] and out_shape[-1] == out_shape[1]
    return _unequal_strides(case) or bias_on_width


def _reference(kind, layer, x, case):
    w = weights_of(layer)
    geo = dict(strides=case["strides"], padding=case["padding"], dilation_rate=case["dilation_rate"],
               data_format=case["data_format"])
    act = case["activation"] if case["activation"] in (None, "linear", "relu", "relu6") else None
    if kind == "separable":
        y = separable_ref(x, w["depthwise_kernel"], w["pointwise_kernel"], w["bias"], activation=act, **geo)
    else:
        y = depthwise_ref(x, w["kernel"], w["bias"], activation=act, **geo)
    if case["activation"] == "tanh":
        y = np.tanh(y)
    return y


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_matches_keras(kind, case, rng):
    case = dict(case)
    x = _input(case, rng)
    layer_args = {k: v for k, v in case.items() if k != "size"}
    if kind == "separable":
        layer_args["filters"] = 4
    ours, ref = make_pair(kind, x.shape, rng, **layer_args)
    y = to_numpy(ours(x))
    assert y.dtype == np.float32
    assert y.shape == tuple(ours.compute_output_shape(x.shape))
    if keras_tf_unreliable(case, y.shape):
        expected = _reference(kind, ours, x, case)
        assert_close(y, expected, tol=2e-5)
    else:
        expected = to_numpy(ref(x))
        assert_close(y, expected, tol=2e-5)


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_matches_reference_unequal_strides_and_dilation(kind, rng):
    """Unequal strides together with dilation, against the float64 reference on every backend."""
    case = dict(kernel_size=3, strides=(2, 3), padding="same", data_format="channels_last", dilation_rate=(2, 1),
                depth_multiplier=2, use_bias=True, activation="relu", size=(11, 10))
    x = _input(case, rng)
    layer_args = {k: v for k, v in case.items() if k != "size"}
    if kind == "separable":
        layer_args["filters"] = 5
    ours, _ = make_pair(kind, x.shape, rng, **layer_args)
    assert_close(to_numpy(ours(x)), _reference(kind, ours, x, case), tol=2e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu", keras.activations.relu6, keras.layers.ReLU(max_value=2.0)])
def test_activations_fused_or_applied_after(activation, rng):
    x = rng.standard_normal((1, 6, 6, 3)).astype("float32")
    ours, ref = make_pair("separable", x.shape, rng, filters=4, kernel_size=3, activation=activation)
    assert_close(to_numpy(ours(x)), to_numpy(ref(x)), tol=2e-5)


def test_inputs_not_modified(rng):
    x = rng.standard_normal((2, 7, 7, 3)).astype("float32")
    x0 = x.copy()
    ours, _ = make_pair("separable", x.shape, rng, filters=4, kernel_size=3, activation="relu")
    ours(x)
    np.testing.assert_array_equal(x, x0)
