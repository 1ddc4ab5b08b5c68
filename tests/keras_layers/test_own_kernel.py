"""Where a layer runs the backend's own kernel (``keras_layers.layers.OWN_KERNEL``): the shipped table, the
per-mode choice (inference, or a gradient recorded) and what ``convert(verbose=True)`` says about it.  The
outputs are compared with Keras's own layer; the bridge is watched to see which path ran."""
import keras
import numpy as np
import pytest

import keras_layers
import keras_layers.layers as layers_module
from helpers import BACKEND, gradients, make_pair, to_numpy
from keras_layers import backend as kl_backend
from reference import assert_close, depthwise_ref, separable_ref

pytestmark = pytest.mark.own_kernel_policy


@pytest.fixture
def bridge_calls(monkeypatch):
    calls = []
    bridge = kl_backend.bridge()
    real = bridge.apply

    def counting(cfg, *tensors):
        calls.append(cfg.kind)
        return real(cfg, *tensors)
    monkeypatch.setattr(bridge, "apply", counting)
    return calls


def inference(layer, x):
    """The layer's call as in predict: torch records autograd unless told not to (Keras's predict does)."""
    if BACKEND == "torch":
        import torch

        with torch.no_grad():
            return layer(x)
    return layer(x)


def test_shipped_table():
    from nbconv import _native

    assert layers_module.OWN_KERNEL == {"tensorflow": {"depthwise": ("train",), "separable": ("train",)}}
    assert layers_module.OWN_KERNEL_WITHOUT_NATIVE == {
        "tensorflow": {"depthwise": ("predict",), "separable": ("predict",)}}
    assert layers_module.NBCONV_UP_TO == {"tensorflow": {("separable", "predict"): 128}}
    native = _native.available() if BACKEND != "tensorflow" else layers_module._backend.bridge().native_forward()
    assert layers_module.own_kernel_modes("separable", "tensorflow") == (("train",) if native else
                                                                         ("train", "predict"))
    assert layers_module.own_kernel_modes("depthwise", "jax") == ()


def test_without_a_native_forward_the_backend_kernel_infers(monkeypatch):
    """A bridge whose forward is a host call (no native op) adds OWN_KERNEL_WITHOUT_NATIVE's modes."""
    monkeypatch.setattr(layers_module, "OWN_KERNEL", {BACKEND: {"depthwise": ("train",)}})
    monkeypatch.setattr(layers_module, "OWN_KERNEL_WITHOUT_NATIVE", {BACKEND: {"depthwise": ("predict",)}})
    monkeypatch.setattr(layers_module._backend.bridge(), "native_forward", lambda: False, raising=False)
    assert layers_module.own_kernel_modes("depthwise") == ("train", "predict")
    monkeypatch.setattr(layers_module._backend.bridge(), "native_forward", lambda: True, raising=False)
    assert layers_module.own_kernel_modes("depthwise") == ("train",)


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_inference_follows_the_table(kind, rng, bridge_calls):
    x = rng.standard_normal((2, 9, 8, 3)).astype("float32")
    args = dict(kernel_size=3, padding="same", activation="relu") | ({"filters": 4} if kind == "separable" else {})
    ours, ref = make_pair(kind, x.shape, rng, **args)
    y = to_numpy(inference(ours, x))
    own = "predict" in layers_module.own_kernel_modes(kind)
    assert bridge_calls == ([] if own else [kind])
    if own:  # the very same computation as Keras's layer
        np.testing.assert_array_equal(y, to_numpy(ref(x)))
    else:
        assert_close(y, to_numpy(ref(x)), tol=2e-5)


@pytest.mark.parametrize("size, nbconv", [((2, 8, 8, 4), True), ((2, 9, 8, 4), False), ((1, 12, 10, 4), True)])
def test_small_outputs_run_nbconv_all_the_same(size, nbconv, rng, bridge_calls, monkeypatch):
    monkeypatch.setattr(layers_module, "OWN_KERNEL", {BACKEND: {"separable": ("predict",)}})
    monkeypatch.setattr(layers_module, "NBCONV_UP_TO", {BACKEND: {("separable", "predict"): 128}})
    x = rng.standard_normal(size).astype("float32")
    ours, ref = make_pair("separable", x.shape, rng, filters=3, kernel_size=3, padding="same")
    assert_close(to_numpy(inference(ours, x)), to_numpy(ref(x)), tol=2e-5)
    assert bridge_calls == (["separable"] if nbconv else [])  # 128, 144 and 120 output pixels


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_unequal_strides_run_nbconv_on_tensorflow(kind, rng, bridge_calls):
    """TF's own kernels reject unequal strides: there the layer keeps nbconv, whatever the table says."""
    x = rng.standard_normal((2, 9, 8, 3)).astype("float32")
    ours, _ = make_pair(kind, x.shape, rng, kernel_size=3, strides=(1, 2), padding="same",
                        **({"filters": 4} if kind == "separable" else {}))
    y = to_numpy(inference(ours, x))
    w = [to_numpy(v) for v in ours.weights]
    if kind == "separable":
        expected = separable_ref(x, w[0], w[1], w[2], strides=(1, 2), padding="same")
    else:
        expected = depthwise_ref(x, w[0], w[1], strides=(1, 2), padding="same")
    assert_close(y, expected)
    own = "predict" in layers_module.own_kernel_modes(kind) and BACKEND != "tensorflow"
    assert bridge_calls == ([] if own else [kind])


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend has no autodiff")
@pytest.mark.parametrize("modes", [("train",), ("predict",)])
def test_a_recorded_gradient_is_the_train_mode(modes, rng, bridge_calls, monkeypatch):
    monkeypatch.setattr(layers_module, "OWN_KERNEL", {BACKEND: {"depthwise": modes}})
    x = rng.standard_normal((1, 7, 7, 3)).astype("float32")
    ours, ref = make_pair("depthwise", x.shape, rng, kernel_size=3, padding="same")
    inference(ours, x)
    predict_own = "predict" in modes
    assert bridge_calls == ([] if predict_own else ["depthwise"])
    bridge_calls.clear()
    cot = rng.standard_normal(ours.compute_output_shape(x.shape)).astype("float32")
    y, dx, dws = gradients(ours, x, cot)
    y_ref, dx_ref, dws_ref = gradients(ref, x, cot)
    # jax traces the forward pass before any gradient exists: there every call is the predict mode
    train_own = "train" in modes and BACKEND != "jax" or (BACKEND == "jax" and predict_own)
    assert bridge_calls == ([] if train_own else ["depthwise"])
    assert_close(y, y_ref, tol=2e-5)
    assert_close(dx, dx_ref, tol=1e-4)
    for g, g_ref in zip(dws, dws_ref):
        assert_close(g, g_ref, tol=1e-4)


def test_convert_says_where_the_own_kernel_runs(capsys, monkeypatch):
    monkeypatch.setattr(layers_module, "OWN_KERNEL", {BACKEND: {"depthwise": ("predict", "train")}})
    inputs = keras.Input((8, 8, 3))
    y = keras.layers.DepthwiseConv2D(3, padding="same", depthwise_initializer="zeros")(inputs)
    y = keras.layers.SeparableConv2D(4, 3, depthwise_initializer="zeros", pointwise_initializer="zeros")(y)
    converted = keras_layers.convert(keras.Model(inputs, y), verbose=True)
    out = capsys.readouterr().out
    assert (f"note: 1 DepthwiseConv2D layer(s) run {BACKEND}'s own kernel in inference and training: measured "
            "faster inside a model") in out
    assert "SeparableConv2D layer(s) run" not in out
    assert converted.nbconv_report.notes and str(converted.nbconv_report).endswith("set the choice)")
    monkeypatch.setattr(layers_module, "NBCONV_UP_TO", {BACKEND: {("depthwise", "predict"): 64}})
    keras_layers.convert(keras.Model(inputs, y), verbose=True)
    assert ("own kernel in inference and training, nbconv's in inference on outputs of up to 64 pixels (N*OH*OW): "
            in capsys.readouterr().out)
