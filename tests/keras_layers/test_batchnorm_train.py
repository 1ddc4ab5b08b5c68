"""keras_layers.BatchNormalization in training: nbconv's kernels where the bridge has them (jax), with a relu after
it fused into the op; Keras's own layers in the same model, trained from the same weights, are the reference."""
import collections

import keras
import numpy as np
import pytest

import keras_layers
from keras_layers.backend import _common

from test_convert import randomize

BACKEND = keras.backend.backend()

pytestmark = pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend does not train")


def _model(own, activation, branch):
    """Conv -> BatchNorm -> activation layer (-> also an Add of the batch norm's output) -> pool -> Dense."""
    bn_cls = keras.layers.BatchNormalization if own else keras_layers.BatchNormalization
    relu_cls = keras.layers.ReLU if own else keras_layers.ReLU
    inputs = keras.Input((9, 9, 6))
    x = keras.layers.Conv2D(20, 3, padding="same")(inputs)
    y = bn_cls(momentum=0.9)(x)
    z = relu_cls(6.0 if activation == "relu6" else None)(y) if activation else y
    if branch:  # the batch norm's output read twice: both ops run, results unchanged
        z = keras.layers.Add()([z, y])
    z = bn_cls(axis=-1, center=False, scale=False)(z)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(z))
    return keras.Model(inputs, out)


def _trained(own, activation, branch, policy, steps=2):
    keras.config.set_dtype_policy(policy)
    try:
        model = _model(own, activation, branch)
    finally:
        keras.config.set_dtype_policy("float32")
    randomize(model)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 9, 9, 6)) + 0.5).astype("float32")
    t = rng.standard_normal((4, 3)).astype("float32")
    losses = [float(model.train_on_batch(x, t)) for _ in range(steps)]
    return losses, model.get_weights(), keras.ops.convert_to_numpy(model(x, training=False))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("activation, branch", [("relu", False), ("relu6", False), (None, False), ("relu", True)])
def test_training_matches_keras(policy, activation, branch):
    """Losses, every weight (the moving averages included) and the predictions after two SGD steps."""
    got = _trained(False, activation, branch, policy)
    want = _trained(True, activation, branch, policy)
    rtol = 3e-2 if policy == "mixed_bfloat16" else 1e-4
    np.testing.assert_allclose(got[0], want[0], rtol=rtol)
    assert len(got[1]) == len(want[1])
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, float(np.abs(b).max())))
    np.testing.assert_allclose(got[2].astype("float32"), want[2].astype("float32"), rtol=rtol,
                               atol=rtol * max(1.0, float(np.abs(want[2].astype("float32")).max())))
    assert float(np.abs(want[2].astype("float32")).std()) > 1e-3  # the predictions carry signal


def test_jax_training_runs_the_fused_op(monkeypatch):
    """On jax each training step runs one batch-norm op per layer, with the relu fused, and no other."""
    calls = collections.Counter()
    forward = _common.batch_norm_forward

    def counting(epsilon, activation, *args, **kwargs):
        calls[activation] += 1
        return forward(epsilon, activation, *args, **kwargs)

    monkeypatch.setattr(_common, "batch_norm_forward", counting)
    _trained(False, "relu", False, "float32", steps=3)
    if BACKEND == "jax":
        # per step: the first batch norm with its relu fused, the second alone
        assert calls == {"relu": 3, "linear": 3}
    else:
        assert not calls  # the backend's own batch norm: no nbconv op
