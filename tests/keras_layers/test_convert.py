"""keras_layers.convert: converted models predict what the original Keras model predicts (Keras's own layers
are the reference), on the active backend, and the original model is left untouched."""
import os
import tempfile

import keras
import numpy as np
import pytest

import keras_layers
from keras_layers.convert import Absorbed, FusedSeparableConv2D, convert

BACKEND = keras.backend.backend()
RTOL, ATOL = 1e-4, 1e-4


def randomize(model, seed=0):
    """Random weights everywhere, batch-norm statistics included (variances positive), so folding matters."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize(layer, seed + 1)
            continue
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            new = []
            for w, v in zip(layer.weights, weights):
                if "variance" in v.dtype.name or "variance" in w.path:
                    new.append(rng.uniform(0.3, 2.0, v.shape).astype(v.dtype))
                elif "gamma" in w.path:
                    new.append(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))
                else:
                    new.append((0.3 * rng.standard_normal(v.shape)).astype(v.dtype))
            layer.set_weights(new)
        else:
            fan_in = max(int(np.prod(weights[0].shape[:-1])), 1)
            layer.set_weights([(rng.standard_normal(w.shape) / np.sqrt(fan_in)).astype(w.dtype) for w in weights])


def all_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        else:
            yield layer


def snapshot(model):
    return [(type(layer), layer.name, [np.array(w) for w in layer.get_weights()]) for layer in all_layers(model)]


def assert_untouched(model, before):
    after = snapshot(model)
    assert [(t, n) for t, n, _ in after] == [(t, n) for t, n, _ in before]
    for (_, _, wa), (_, _, wb) in zip(after, before):
        for a, b in zip(wa, wb):
            np.testing.assert_array_equal(a, b)


def predict(model, x):
    return np.asarray(model.predict(x, verbose=0, batch_size=len(x)))


def check_conversion(model, x, fold):
    before = snapshot(model)
    expected = predict(model, x)
    converted = convert(model, fold_batchnorm=fold)
    got = predict(converted, x)
    assert_untouched(model, before)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(expected).max())))
    return converted


def kinds(model):
    return [type(layer) for layer in all_layers(model)]


ZEROS = dict(depthwise_initializer="zeros")


def small_functional(data_format="channels_last"):
    """MobileNet-like and Xception-like blocks, plus chains that must NOT be fused (branch, model output)."""
    shape = (15, 15, 3) if data_format == "channels_last" else (3, 15, 15)
    bn_axis = -1 if data_format == "channels_last" else 1
    cf = dict(data_format=data_format)
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, padding="same", kernel_initializer="zeros", use_bias=False, **cf)(inputs)
    x = keras.layers.BatchNormalization(axis=bn_axis)(x)
    x = keras.layers.ReLU(6.0)(x)
    # MobileNet v1 strided block: ZeroPadding2D -> DW valid s2 -> BN -> ReLU6 -> 1x1 -> BN -> ReLU6
    x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), **cf)(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", use_bias=False, **ZEROS, **cf)(x)
    x = keras.layers.BatchNormalization(axis=bn_axis)(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(12, 1, use_bias=False, kernel_initializer="zeros", **cf)(x)
    x = keras.layers.BatchNormalization(axis=bn_axis)(x)
    x = keras.layers.ReLU(6.0)(x)
    # MobileNetV2 residual: DW -> BN -> ReLU -> 1x1 -> BN (no activation) -> Add
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, **ZEROS, **cf)(x)
    y = keras.layers.BatchNormalization(axis=bn_axis)(y)
    y = keras.layers.Activation("relu")(y)
    y = keras.layers.Conv2D(12, 1, kernel_initializer="zeros", **cf)(y)
    y = keras.layers.BatchNormalization(axis=bn_axis, center=False)(y)
    x = keras.layers.Add()([x, y])
    # Xception: SeparableConv2D -> BN -> relu, and SeparableConv2D -> BN feeding a branch
    x = keras.layers.SeparableConv2D(16, 3, padding="same", use_bias=False, pointwise_initializer="zeros",
                                     **ZEROS, **cf)(x)
    x = keras.layers.BatchNormalization(axis=bn_axis, scale=False)(x)
    x = keras.layers.Activation("relu")(x)
    z = keras.layers.SeparableConv2D(16, 3, padding="same", pointwise_initializer="zeros", **ZEROS, **cf)(x)
    z = keras.layers.BatchNormalization(axis=bn_axis)(z)
    x = keras.layers.Add()([x, z])
    # a depthwise conv whose BN output is also used elsewhere: the BN cannot be absorbed
    d = keras.layers.DepthwiseConv2D(3, padding="same", activation="tanh", **ZEROS, **cf)(x)
    x = keras.layers.Concatenate(axis=bn_axis)([x, d])
    out = keras.layers.GlobalAveragePooling2D(**cf)(x)
    out = keras.layers.Dense(5, kernel_initializer="zeros")(out)
    model = keras.Model(inputs, out, name="small_functional")
    randomize(model)
    return model


@pytest.fixture(scope="module")
def functional():
    return small_functional()


@pytest.fixture(scope="module")
def x15():
    return np.random.default_rng(1).standard_normal((2, 15, 15, 3)).astype("float32")


def test_functional_without_folding(functional, x15):
    converted = check_conversion(functional, x15, fold=False)
    types = kinds(converted)
    assert keras_layers.DepthwiseConv2D in types and keras_layers.SeparableConv2D in types
    assert keras.layers.BatchNormalization in types  # nothing folded
    for layer in all_layers(converted):
        if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            assert type(layer) in (keras_layers.DepthwiseConv2D, keras_layers.SeparableConv2D)
    # same weights, not shared ones
    assert len(converted.weights) == len(functional.weights)
    assert all(a is not b for a, b in zip(converted.weights, functional.weights))
    report = converted.nbconv_report
    assert report.converted == 5 and len(report.entries) == 5
    assert "left as they are" in str(report) and "Conv2D" in str(report)


def test_functional_with_folding(functional, x15):
    converted = check_conversion(functional, x15, fold=True)
    by_name = {layer.name: layer for layer in all_layers(functional)}
    new = list(all_layers(converted))
    fused = [layer for layer in new if isinstance(layer, FusedSeparableConv2D)]
    assert len(fused) == 2
    # the strided block took its ZeroPadding2D in as explicit padding
    assert any(layer.padding == ((0, 1), (0, 1)) for layer in fused)
    # the first separable conv absorbed BN and relu; the second only its BN (its output feeds the Add)
    seps = [layer for layer in new if type(layer) is keras_layers.SeparableConv2D]
    assert [s.activation.__name__ for s in seps] == ["relu", "linear"] and all(s.use_bias for s in seps)
    # the tanh depthwise conv cannot absorb anything but is still ours
    assert sum(type(layer) is keras_layers.DepthwiseConv2D for layer in new) == 1
    # the first Conv2D (no 1x1 chain) stays Keras's own, with its BN and ReLU6 folded in; every batch norm and
    # activation absorbed became a placeholder
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in new)
    stem = [layer for layer in new if type(layer) is keras.layers.Conv2D]
    first_conv = [n for n, ly in by_name.items() if type(ly) is keras.layers.Conv2D][0]
    assert len(stem) == 1 and stem[0].name == first_conv and stem[0].use_bias
    assert stem[0].activation is keras.activations.relu6
    assert sum(isinstance(layer, Absorbed) for layer in new) == 15  # 6 + 4 + 2 + 1 + the stem's BN and ReLU6
    report = converted.nbconv_report
    assert [names for _, names, _ in report.own] == [[first_conv] + by_name_after(by_name, first_conv)]
    text = str(report)
    assert "fused separable block" in text and "folded" in text
    assert "Keras's own kernels: 1 layer(s), replacing 3" in text and "Conv2D + folded batch norm + activation" in text
    assert converted.count_params() < functional.count_params()


def by_name_after(by_name, name):
    """Names of the two layers that follow ``name`` in the model's layer order."""
    names = list(by_name)
    i = names.index(name)
    return names[i + 1:i + 3]


def test_channels_first(x15):
    model = small_functional("channels_first")
    x = np.ascontiguousarray(x15.transpose(0, 3, 1, 2))
    converted = check_conversion(model, x, fold=True)
    assert sum(isinstance(layer, FusedSeparableConv2D) for layer in all_layers(converted)) == 2


def test_sequential_and_nested():
    inner = keras.Sequential([
        keras.Input((9, 9, 4)),
        keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, **ZEROS),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(6, 1, use_bias=False, kernel_initializer="zeros"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(6.0),
    ], name="inner")
    inputs = keras.Input((9, 9, 4))
    out = keras.layers.SeparableConv2D(3, 3, pointwise_initializer="zeros", **ZEROS)(inner(inputs))
    outer = keras.Model(inputs, out)
    randomize(inner)
    randomize(outer)
    x = np.random.default_rng(2).standard_normal((3, 9, 9, 4)).astype("float32")
    for fold in (False, True):
        seq = check_conversion(inner, x, fold)
        assert isinstance(seq, keras.Sequential)
        nested = check_conversion(outer, x, fold)
        types = kinds(nested)
        assert keras_layers.SeparableConv2D in types
        assert (FusedSeparableConv2D in types) == fold and (keras_layers.DepthwiseConv2D in types) != fold


@pytest.mark.parametrize("policy, tol", [("float64", 1e-6), ("mixed_float16", 2e-2)])
def test_dtype_policies(policy, tol, x15):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = small_functional()
        expected = predict(model, x15)
        got = predict(convert(model, fold_batchnorm=True), x15)
    finally:
        keras.config.set_dtype_policy(previous)
    assert got.dtype == expected.dtype
    np.testing.assert_allclose(got.astype("float64"), expected, rtol=tol,
                               atol=tol * float(np.abs(expected).max()))


def test_fused_model_saves_and_loads(functional, x15):
    converted = convert(functional, fold_batchnorm=True)
    expected = predict(converted, x15)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fused.keras")
        converted.save(path)
        loaded = keras.saving.load_model(path)
    assert sum(isinstance(layer, FusedSeparableConv2D) for layer in all_layers(loaded)) == 2
    np.testing.assert_allclose(predict(loaded, x15), expected, rtol=1e-6, atol=1e-6)


def test_verbose_prints_the_report(functional, capsys):
    convert(functional, fold_batchnorm=True, verbose=True)
    out = capsys.readouterr().out
    assert "nbconv: converted model 'small_functional'" in out and "=>  FusedSeparableConv2D" in out


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        convert(keras.layers.Dense(3))
    with pytest.raises(ValueError, match="activation"):
        FusedSeparableConv2D(4, 3, activation="tanh")
    with pytest.raises(ValueError, match="not built"):
        convert(keras.Sequential([keras.layers.SeparableConv2D(2, 3)]))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.SeparableConv2D(2, 3, **ZEROS, pointwise_initializer="zeros")

        def call(self, x):
            return self.conv(x)

    model = Subclassed()
    model.build((None, 8, 8, 3))
    with pytest.raises(ValueError, match="subclassed"):
        convert(model)


# --- keras.applications, weights=None (no downloads), small inputs ------------------------------------------

APPLICATIONS = {
    "MobileNet": (lambda: keras.applications.MobileNet(input_shape=(64, 64, 3), alpha=0.25, weights=None,
                                                       classifier_activation=None), (2, 64, 64, 3), 13),
    "MobileNetV2": (lambda: keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None,
                                                           classifier_activation=None), (2, 64, 64, 3), 17),
    "Xception": (lambda: keras.applications.Xception(input_shape=(71, 71, 3), weights=None,
                                                     classifier_activation=None), (1, 71, 71, 3), 0),
}


@pytest.fixture
def cheap_initializers(monkeypatch):
    """Zero initial weights (``randomize`` replaces them all): jax would compile a random initializer per shape."""
    monkeypatch.setattr(keras.initializers.VarianceScaling, "__call__",
                        lambda self, shape, dtype=None: keras.ops.zeros(shape, dtype=dtype))


@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_keras_applications(name, cheap_initializers):
    build, shape, fused_blocks = APPLICATIONS[name]
    model = build()
    randomize(model)
    x = np.random.default_rng(3).uniform(-1, 1, shape).astype("float32")
    plain = check_conversion(model, x, fold=False)
    assert not any(type(layer) in (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
                   for layer in all_layers(plain))
    folded = check_conversion(model, x, fold=True)
    layers = list(all_layers(folded))
    assert sum(isinstance(layer, FusedSeparableConv2D) for layer in layers) == fused_blocks
    # the cost model sees the same multiply-adds in the original and in the fused model (other layer classes)
    from nbconv import cost

    original, fused = cost.model_cost(model), cost.model_cost(folded)
    assert fused.macs == original.macs
    if fused_blocks:
        kinds_before, kinds_after = original.by_kind(), fused.by_kind()
        assert kinds_after["separable"] == kinds_before["depthwise"] + kinds_before["pointwise"] - kinds_after.get(
            "pointwise", 0)
    if name == "MobileNet":  # ZeroPadding2D(((0, 1), (0, 1))) + stride-2 'valid' on even sizes is 'same'
        strided = [layer for layer in layers if isinstance(layer, FusedSeparableConv2D) and layer.strides == (2, 2)]
        assert len(strided) == 4 and all(layer.padding == "same" for layer in strided)
    if name == "Xception":  # every separable conv took its batch norm in
        assert sum(type(layer) is keras_layers.SeparableConv2D for layer in layers) == 34
        # the 6 Conv2Ds (stem and shortcuts) stay Keras's own with their batch norms folded in
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in layers)
        assert sum(type(layer) is keras.layers.Conv2D for layer in layers) == 6
