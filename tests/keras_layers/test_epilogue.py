"""Batch norms and activations after nbconv's layers, folded into their op at inference in a TensorFlow graph or a
jax jit trace (``keras_layers.layers._Epilogue``).  Keras's own layers (the original model) are the reference."""
import collections
import os
import tempfile

import keras
import numpy as np
import pytest

import keras_layers
from keras_layers import layers as _layers
from keras_layers.convert import convert

from test_convert import RTOL, ATOL, randomize

BACKEND = keras.backend.backend()


def _model():
    """Xception's and MobileNet's chains after our layers, and the same layers feeding a branch or an output."""
    inputs = keras.Input((16, 16, 8))
    x = keras.layers.SeparableConv2D(12, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=True)(x)
    x = keras.layers.BatchNormalization(center=False)(x)
    x = keras.layers.ReLU(6.0)(x)
    y = keras.layers.SeparableConv2D(24, 3, padding="same")(x)
    y = keras.layers.BatchNormalization(scale=False, name="last_bn")(y)  # feeds the Add: the relu stays
    x = keras.layers.Activation("relu", name="after_add")(keras.layers.Add()([x, y]))
    z = keras.layers.DepthwiseConv2D(3, padding="same", name="feature")(x)  # no batch norm after it
    model = keras.Model(inputs, [x, z], name="epilogue_chains")
    randomize(model)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def x16():
    return np.random.default_rng(2).standard_normal((2, 16, 16, 8)).astype("float32")


def _close(got, want):
    for g, w in zip(got, want):
        g, w = keras.ops.convert_to_numpy(g), keras.ops.convert_to_numpy(w)
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(w).max())))


def test_convert_puts_the_folding_subclasses_after_our_layers(model):
    """Same config and weights; only the batch norms and activations that our layers alone feed."""
    converted = convert(model)
    by_name = {layer.name: layer for layer in converted.layers}
    swapped = [layer.name for layer in converted.layers
               if type(layer) in (_layers.BatchNormalization, _layers.ReLU, _layers.Activation)]
    assert len(swapped) == 5 and "last_bn" in swapped
    assert type(by_name["after_add"]) is keras.layers.Activation  # after the Add: not ours to fold
    for layer in model.layers[1:]:  # (the input layer is renamed by the clone)
        new = by_name[layer.name]
        assert new.get_config() == layer.get_config()
        for a, b in zip(new.get_weights(), layer.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert "fold into the nbconv op" in str(converted.nbconv_report)


#: backends whose predict step drops unused ops (a tf.function, a jax.jit trace): the batch norms fold there
FOLDS = ("tensorflow", "jax")


def _count_forward_runs(monkeypatch, runs):
    """The host-call forward, so that each run of an op can be counted from Python (appended to ``runs``)."""
    if BACKEND == "tensorflow":
        from keras_layers.backend import tensorflow as bridge

        monkeypatch.setattr(bridge, "_native_forward", lambda cfg, args: None)
        forward = bridge._forward
        monkeypatch.setattr(bridge, "_forward", lambda cfg, *a: runs.append(cfg.kind) or forward(cfg, *a))
    elif BACKEND == "jax":
        from keras_layers.backend import _common
        from keras_layers.backend import jax as bridge

        monkeypatch.setattr(bridge, "ffi_ready", lambda: False)
        forward = _common.forward
        monkeypatch.setattr(_common, "forward", lambda cfg, *a, **k: runs.append(cfg.kind) or forward(cfg, *a, **k))


def test_predict_matches_keras_and_folds_in_traced_graphs(model, x16, monkeypatch):
    """predict equals the original's; where it runs a graph that drops unused ops (TensorFlow's tf.function,
    jax's jit) the three chains fold, and the ops they replace are dropped: each layer's forward runs once per
    call, not twice."""
    converted = convert(model)
    folded, runs = [], []
    original_output = _layers._Epilogue._output

    def spy(self, bn, activation):
        folded.append((self.kind, bn is not None, activation))
        return original_output(self, bn, activation)

    monkeypatch.setattr(_layers._Epilogue, "_output", spy)
    _count_forward_runs(monkeypatch, runs)
    want = model.predict(x16, verbose=0, batch_size=2)
    got = converted.predict(x16, verbose=0, batch_size=2)
    _close(got, want)
    if BACKEND not in FOLDS:
        assert folded == []  # eager backends would compute both ops
        return
    # separable: BN, then relu; depthwise: BN, then relu6; the last separable: its BN only (per trace)
    chains = collections.Counter([("separable", True, "linear"), ("separable", True, "relu"),
                                  ("depthwise", True, "linear"), ("depthwise", True, "relu6"),
                                  ("separable", True, "linear")])
    traces = len(folded) // 5
    assert traces >= 1 and collections.Counter(folded) == collections.Counter(
        {key: n * traces for key, n in chains.items()})
    runs.clear()
    got = converted.predict(x16, verbose=0, batch_size=2)
    _close(got, want)
    assert sorted(runs) == ["depthwise", "depthwise", "separable", "separable"]


def test_mixed_bfloat16_folds_too(x16, monkeypatch):
    """Under mixed_bfloat16 (bfloat16 compute, float32 variables) the batch norms fold as well, their statistics
    and the folded weights in float32 until the kernel rounds the weights.  Against the float32 original with the
    same weights: within 6 bfloat16 units of the largest output (Keras's own layers under the policy: about 2)."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        converted = convert(_model())
    finally:
        keras.config.set_dtype_policy(old)
    folded, runs = [], []
    original_output = _layers._Epilogue._output
    monkeypatch.setattr(_layers._Epilogue, "_output",
                        lambda self, bn, act: folded.append(self.kind) or original_output(self, bn, act))
    _count_forward_runs(monkeypatch, runs)
    want = _model().predict(x16, verbose=0, batch_size=2)  # float32, the same (seeded) weights
    got = converted.predict(x16, verbose=0, batch_size=2)
    for g, w in zip(got, want):
        g, w = np.asarray(keras.ops.convert_to_numpy(g), np.float32), keras.ops.convert_to_numpy(w)
        assert np.abs(g - w).max() <= 6 * 2.0 ** -8 * np.abs(w).max()
    if BACKEND in FOLDS:
        assert len(folded) >= 5
        runs.clear()
        converted.predict(x16, verbose=0, batch_size=2)
        assert sorted(runs) == ["depthwise", "depthwise", "separable", "separable"]
    else:
        assert folded == []


def test_the_layers_called_alone_or_in_another_model_do_not_fold(model, x16):
    """A model that outputs a layer's result before its batch norm gets that result, the batch norm called on
    another tensor computes as Keras's, and eager calls compute as written."""
    converted = convert(model)
    sep = converted.layers[1]
    bn = converted.layers[2]
    assert type(bn) is _layers.BatchNormalization
    features = keras.Model(converted.input, sep.output)
    ref_features = keras.Model(model.input, model.layers[1].output)
    _close([features.predict(x16, verbose=0)], [ref_features.predict(x16, verbose=0)])
    both = keras.Model(converted.input, [sep.output, bn.output])
    ref_both = keras.Model(model.input, [model.layers[1].output, model.layers[2].output])
    _close(both.predict(x16, verbose=0), ref_both.predict(x16, verbose=0))
    y = np.random.default_rng(3).standard_normal((2, 16, 16, 12)).astype("float32")
    _close([bn(y, training=False)], [model.layers[2](y, training=False)])
    _close(converted(x16, training=False), model(x16, training=False))


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend cannot train")
def test_training_is_unchanged(x16):
    """A training step updates the batch norms' statistics (batch statistics, nothing folded) as Keras's."""
    ref = _model()
    ours = convert(ref)
    target = [np.zeros((2, 16, 16, 24), "float32"), np.zeros((2, 16, 16, 24), "float32")]
    for m in (ref, ours):
        m.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        m.train_on_batch(x16, target)
    for a, b in zip(ours.layers, ref.layers):
        if isinstance(b, keras.layers.BatchNormalization):
            for wa, wb in zip(a.get_weights(), b.get_weights()):
                np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)
    _close(ours.predict(x16, verbose=0), ref.predict(x16, verbose=0))


def test_saves_and_loads(model, x16):
    converted = convert(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.keras")
        converted.save(path)
        loaded = keras.saving.load_model(path)
    assert sum(type(layer) is _layers.BatchNormalization for layer in loaded.layers) == 3
    _close(loaded.predict(x16, verbose=0), model.predict(x16, verbose=0))
    assert keras_layers.BatchNormalization is _layers.BatchNormalization
