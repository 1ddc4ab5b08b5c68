"""The layers under bfloat16 policies: bfloat16 products, bfloat16 outputs, float32 variables updated by training.

Outputs are compared with the float64 reference of the bfloat16-rounded input and weights, within the bound
derived in ``reference.bf16_separable_bound``; gradients with Keras's own layer computing in float32 on the same
bfloat16 values.
"""
import keras
import numpy as np
import pytest

import keras_layers
from helpers import BACKEND, gradients, make_pair, to_numpy
from reference import U_BF16, U_F32, assert_within, bf16_round, bf16_separable_bound, depthwise_ref, separable_ref

POLICIES = ("mixed_bfloat16", "bfloat16")


@pytest.fixture
def policy(request):
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(old)


def _x(rng, data_format, shape=(2, 9, 8, 6)):
    n, h, w, c = shape
    return rng.standard_normal((n, h, w, c) if data_format == "channels_last" else (n, c, h, w)).astype("float32")


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_outputs_within_the_bfloat16_bound(policy, data_format, kind, rng):
    x = _x(rng, data_format)
    kwargs = dict(kernel_size=3, strides=(2, 1), padding="same", data_format=data_format, activation="relu")
    if kind == "separable":
        layer = keras_layers.SeparableConv2D(filters=7, depth_multiplier=2, **kwargs)
    else:
        layer = keras_layers.DepthwiseConv2D(depth_multiplier=2, **kwargs)
    layer.build(x.shape)
    layer.set_weights([rng.standard_normal(w.shape).astype(w.dtype) for w in layer.get_weights()])
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert all(keras.backend.standardize_dtype(w.dtype) == ("float32" if policy == "mixed_bfloat16" else "bfloat16")
               for w in layer.weights)
    # the input is rounded to bfloat16, and so are the pointwise weights (by the kernel, as it packs them); the
    # depthwise part computes in float32 with the variables as they are (bfloat16 under the bfloat16 policy)
    ws = [np.asarray(to_numpy(w), np.float64) for w in layer.weights]
    if kind == "separable":
        ws[1] = bf16_round(ws[1])
    xr = bf16_round(x)
    conv = dict(strides=(2, 1), padding="same", data_format=data_format)
    if kind == "separable":
        dk, pk, b = ws
        ref = separable_ref(xr, dk, pk, b, activation="relu", **conv)
        bound, _ = bf16_separable_bound(xr, dk, pk, b, **conv)
    else:
        k, b = ws
        ref = depthwise_ref(xr, k, b, activation="relu", **conv)
        bound = 11 * U_F32 * depthwise_ref(np.abs(xr), np.abs(k), np.abs(b), **conv)
    assert_within(to_numpy(y).astype(np.float64), ref, bound, U_BF16)


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend has no autodiff")
@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_gradients_match_keras_on_the_same_bfloat16_values(policy, kind, rng):
    x = bf16_round(_x(rng, "channels_last")).astype(np.float32)
    kwargs = dict(kernel_size=3, padding="same", depth_multiplier=2)
    if kind == "separable":
        kwargs["filters"] = 5
    else:
        # the relu mask too (its float32 sums round once, keeping their sign; a separable layer's output, from a
        # bfloat16 intermediate, can change sign near zero and flip an element of the mask)
        kwargs["activation"] = "relu"
    ours, _ = make_pair(kind, x.shape, rng, **kwargs)
    weights = [bf16_round(w).astype(np.float32) for w in ours.get_weights()]
    ours.set_weights(weights)
    # Keras's own layer computing in float32 on the same (bfloat16-valued) weights and input
    keras.config.set_dtype_policy("float32")
    _, ref = make_pair(kind, x.shape, rng, **kwargs)
    ref.set_weights(weights)
    keras.config.set_dtype_policy(policy)
    y_shape = ref.compute_output_shape(x.shape)
    cot = bf16_round(rng.standard_normal(y_shape)).astype(np.float32)
    y, dx, dws = gradients(ours, x, cot)
    y_ref, dx_ref, dws_ref = gradients(ref, x, cot)
    # the bfloat16 intermediate and results cost a relative 2^-8 each; sums over a few hundred products in float32
    for got, want in [(y, y_ref), (dx, dx_ref)] + list(zip(dws, dws_ref)):
        got = np.asarray(got, np.float64)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 4 * U_BF16 * scale, (kind, np.abs(got - want).max(), scale)


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend cannot train")
@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_training_updates_float32_variables(policy, rng):
    model = keras.Sequential([keras.Input((8, 8, 4)), keras_layers.SeparableConv2D(6, 3, padding="same"),
                              keras_layers.DepthwiseConv2D(3), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, dtype="float32")])
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.standard_normal((4, 8, 8, 4)).astype("float32")
    model.fit(x, rng.standard_normal((4, 2)).astype("float32"), epochs=1, verbose=0)
    for w, b in zip(model.trainable_weights, before):
        assert keras.backend.standardize_dtype(w.dtype) == "float32"
        assert not np.array_equal(to_numpy(w), b), w.path


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend cannot train")
@pytest.mark.parametrize("policy", POLICIES, indirect=True)
def test_predict_after_a_training_step_sees_the_new_weights(policy, rng):
    # the torch bridge packs the pointwise weights once for inference: an update must make it pack them again
    layer = keras_layers.SeparableConv2D(5, 3, padding="same", activation="relu")
    model = keras.Sequential([keras.Input((6, 6, 8)), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    x = rng.standard_normal((2, 6, 6, 8)).astype("float32")
    for step in range(2):
        y = to_numpy(model.predict_on_batch(x)).astype(np.float64)
        dk, pk, b = [np.asarray(to_numpy(w), np.float64) for w in layer.weights]
        xr, pkr = bf16_round(x), bf16_round(pk)
        bound, _ = bf16_separable_bound(xr, dk, pkr, b, padding="same")
        assert_within(y, separable_ref(xr, dk, pkr, b, padding="same", activation="relu"), bound, U_BF16)
        if step == 0:
            before = to_numpy(layer.pointwise_kernel).copy()
            model.train_on_batch(x, 4 * rng.standard_normal((2, 6, 6, 5)).astype("float32"))
            assert not np.array_equal(to_numpy(layer.pointwise_kernel), before)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
def test_convert_keeps_the_policy(policy, rng):
    inp = keras.Input((10, 10, 8))
    y = keras.layers.SeparableConv2D(12, 3, padding="same")(inp)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    model = keras.Model(inp, keras.layers.DepthwiseConv2D(3, padding="same")(y))
    for fold in (False, True):
        converted = keras_layers.convert(model, fold_batchnorm=fold)
        assert converted.layers[1].dtype_policy.name == "mixed_bfloat16"
        x = rng.standard_normal((2, 10, 10, 8)).astype("float32")
        got = to_numpy(converted(x))
        want = to_numpy(model(x))
        assert keras.backend.standardize_dtype(converted(x).dtype) == "bfloat16"
        # both compute in bfloat16 (with other roundings: Keras's ops, the folded batch norm)
        assert np.abs(got.astype(np.float64) - want).max() <= 8 * U_BF16 * np.abs(want).max()
