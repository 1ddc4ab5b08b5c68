"""Model-level behaviour: fit, predict (jitted or not), saving, config, shapes, dtype policies, validation."""
import inspect
import os

import keras
import numpy as np
import pytest

import keras_layers
from helpers import BACKEND, PAIRS, make_pair, to_numpy
from reference import assert_close


def _build(lib, input_shape=(9, 8, 3), data_format="channels_last"):
    """A small conv net made of ``lib``'s SeparableConv2D and DepthwiseConv2D (lib: keras.layers or keras_layers)."""
    inputs = keras.Input(input_shape)
    h = lib.SeparableConv2D(6, 3, padding="same", activation="relu", data_format=data_format)(inputs)
    h = lib.DepthwiseConv2D(3, strides=2, depth_multiplier=2, activation="relu6", data_format=data_format)(h)
    h = lib.SeparableConv2D(4, 2, dilation_rate=2, padding="same", activation="tanh", use_bias=False,
                            data_format=data_format)(h)
    h = keras.layers.GlobalAveragePooling2D(data_format=data_format)(h)
    outputs = keras.layers.Dense(1)(h)
    return keras.Model(inputs, outputs)


def _twin_models(seed=0):
    keras.utils.set_random_seed(seed)
    ref = _build(keras.layers)
    ours = _build(keras_layers)
    ours.set_weights(ref.get_weights())
    return ours, ref


def _data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 9, 8, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) - x[..., 2].std(axis=(1, 2)))[:, None].astype("float32")
    return x, y


def test_layers_are_ours():
    ours, _ = _twin_models()
    kinds = [type(layer) for layer in ours.layers]
    assert keras_layers.SeparableConv2D in kinds and keras_layers.DepthwiseConv2D in kinds


@pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend cannot fit (inference only)")
def test_fit_decreases_loss_and_tracks_keras():
    x, y = _data()
    ours, ref = _twin_models()
    histories = []
    for model in (ours, ref):
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        histories.append(model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0).history["loss"])
    ours_loss, ref_loss = histories
    assert ours_loss[-1] < 0.8 * ours_loss[0], ours_loss
    np.testing.assert_allclose(ours_loss, ref_loss, rtol=1e-3)
    for w, w_ref in zip(ours.get_weights(), ref.get_weights()):
        assert_close(w, w_ref, tol=1e-3)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_predict_jitted_and_not(jit_compile):
    x, _ = _data(n=10)
    ours, ref = _twin_models()
    if BACKEND != "numpy":
        ours.compile(jit_compile=jit_compile)
        ref.compile(jit_compile=jit_compile)
    expected = ref.predict(x, batch_size=4, verbose=0)
    got = ours.predict(x, batch_size=4, verbose=0)
    assert_close(got, expected, tol=2e-5)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_results_of_earlier_calls_stay_intact(jit_compile):
    """A result the caller still holds is never written by a later call (bridges may reuse result buffers).

    Layers of equal output shape are chained, so a buffer released inside one
    call could be handed to the next layer; the final output is the layer's
    own result (no op after it), returned to the caller eagerly and by predict.
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(2)
    inputs = keras.Input((7, 6, 4))
    h = inputs
    for _ in range(3):
        h = keras_layers.SeparableConv2D(4, 3, padding="same", activation="relu")(h)
    h = keras_layers.DepthwiseConv2D(3, padding="same")(h)
    ours = keras.Model(inputs, h)
    keras.utils.set_random_seed(0)
    ref_in = keras.Input((7, 6, 4))
    r = ref_in
    for _ in range(3):
        r = keras.layers.SeparableConv2D(4, 3, padding="same", activation="relu")(r)
    r = keras.layers.DepthwiseConv2D(3, padding="same")(r)
    ref = keras.Model(ref_in, r)
    ref.set_weights(ours.get_weights())
    if BACKEND != "numpy":
        ours.compile(jit_compile=jit_compile)
    xs = [rng.standard_normal((2, 7, 6, 4)).astype("float32") for _ in range(4)]
    kept = [to_numpy(ours.predict_on_batch(x)) for x in xs[:2]] + [to_numpy(ours(x)) for x in xs[2:]]
    copies = [k.copy() for k in kept]
    for x in xs:  # more calls of every shape while the earlier results are alive
        ours.predict_on_batch(x)
        ours(x)
    for k, c, x in zip(kept, copies, xs):
        np.testing.assert_array_equal(k, c)
        assert_close(k, to_numpy(ref(x)), tol=2e-5)


def test_supports_jit_only_off_on_tensorflow():
    layer = keras_layers.SeparableConv2D(2, 3)
    assert layer.supports_jit == (BACKEND != "tensorflow")
    assert keras_layers.DepthwiseConv2D(3).supports_jit == (BACKEND != "tensorflow")


def test_save_and_load_keras_file(tmp_path):
    x, _ = _data(n=4)
    ours, _ = _twin_models()
    path = os.path.join(tmp_path, "model.keras")
    ours.save(path)
    loaded = keras.saving.load_model(path)
    assert {type(layer) for layer in loaded.layers} >= {keras_layers.SeparableConv2D, keras_layers.DepthwiseConv2D}
    assert_close(to_numpy(loaded(x)), to_numpy(ours(x)), tol=1e-6)


@pytest.mark.parametrize("direction", ["keras_to_ours", "ours_to_keras"])
def test_weights_h5_interchange(tmp_path, direction):
    x, _ = _data(n=4)
    ours, ref = _twin_models(seed=3)
    src, dst_lib = (ref, keras_layers) if direction == "keras_to_ours" else (ours, keras.layers)
    path = os.path.join(tmp_path, "model.weights.h5")
    src.save_weights(path)
    keras.utils.set_random_seed(99)  # different initial weights
    dst = _build(dst_lib)
    dst.load_weights(path)
    assert_close(to_numpy(dst(x)), to_numpy(src(x)), tol=2e-5)


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_config_matches_keras_and_round_trips(kind):
    ours_cls, keras_cls = PAIRS[kind]
    args = dict(kernel_size=(3, 2), strides=(2, 1), padding="same", dilation_rate=1, depth_multiplier=2,
                activation="relu6", use_bias=False, data_format="channels_first", name="layer")
    if kind == "separable":
        args["filters"] = 7
    ours, ref = ours_cls(**args), keras_cls(**args)
    config = ours.get_config()
    assert config == ref.get_config()
    clone = ours_cls.from_config(config)
    assert type(clone) is ours_cls
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(ours)
    assert serialized["registered_name"] == f"nbconv>{ours_cls.__name__}"
    assert type(keras.saving.deserialize_keras_object(serialized)) is ours_cls


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_same_signature_as_keras(kind):
    ours_cls, keras_cls = PAIRS[kind]
    assert ours_cls.__name__ == keras_cls.__name__
    assert inspect.signature(ours_cls.__init__) == inspect.signature(keras_cls.__init__)
    # positional order differs between the two Keras classes: depth_multiplier is 4th in DepthwiseConv2D
    positional = (5, 3, 1, "valid") if kind == "separable" else (3, 1, "valid", 2)
    assert ours_cls(*positional, name="a").get_config() == keras_cls(*positional, name="a").get_config()


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
@pytest.mark.parametrize("bad", [dict(strides=(1, 0)), dict(depth_multiplier=0), dict(padding="causal"),
                                 dict(kernel_size=(3, 3, 3)), dict(dilation_rate=-1), dict(data_format="nhwc")])
def test_validation_errors_match_keras(kind, bad):
    ours_cls, keras_cls = PAIRS[kind]
    args = dict(kernel_size=3, **({"filters": 4} if kind == "separable" else {}))
    args.update(bad)
    with pytest.raises(Exception) as expected:
        keras_cls(**args)
    with pytest.raises(type(expected.value)) as got:
        ours_cls(**args)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_symbolic_shapes(kind, data_format):
    ours_cls, keras_cls = PAIRS[kind]
    args = dict(kernel_size=3, strides=2, padding="same", data_format=data_format, depth_multiplier=2)
    if kind == "separable":
        args["filters"] = 5
    shape = (None, None, 3) if data_format == "channels_last" else (3, None, 11)
    sym = keras.Input(shape)
    assert ours_cls(**args)(sym).shape == keras_cls(**args)(sym).shape
    assert ours_cls(**args).compute_output_shape((2, 9, 11, 3) if data_format == "channels_last" else (2, 3, 9, 11)) \
        == keras_cls(**args).compute_output_shape((2, 9, 11, 3) if data_format == "channels_last" else (2, 3, 9, 11))


def test_model_with_unknown_spatial_size(rng):
    """A functional model with (None, None, C) inputs runs on several image sizes."""
    inputs = keras.Input((None, None, 3))
    outputs = keras_layers.SeparableConv2D(4, 3, padding="same", activation="relu")(inputs)
    model = keras.Model(inputs, outputs)
    for hw in ((5, 7), (8, 8)):
        x = rng.standard_normal((2, *hw, 3)).astype("float32")
        ref = keras.layers.SeparableConv2D(4, 3, padding="same", activation="relu")
        ref.build(x.shape)
        ref.set_weights(model.layers[-1].get_weights())
        assert_close(model.predict(x, verbose=0), to_numpy(ref(x)), tol=2e-5)


def _jax_x64():
    import jax

    return bool(jax.config.jax_enable_x64)


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
@pytest.mark.parametrize("policy", ["float32", "float64", "mixed_float16", "mixed_bfloat16"])
def test_dtype_policies(kind, policy, rng):
    args = dict(kernel_size=3, padding="same", activation="relu", dtype=policy, depth_multiplier=2)
    if kind == "separable":
        args["filters"] = 4
    x = rng.standard_normal((2, 7, 6, 3)).astype("float32")
    ours, ref = make_pair(kind, x.shape, rng, **args)
    y, y_ref = ours(x), ref(x)
    got_dtype = keras.backend.standardize_dtype(y.dtype)
    if policy == "float64" and BACKEND in ("jax", "numpy") and not _jax_x64():
        # jax truncates float64 to float32, and Keras's numpy backend convolves through jax: Keras's layer
        # returns float32 there; ours returns the policy's float64 on numpy (a plain NumPy call)
        assert got_dtype == ("float32" if BACKEND == "jax" else "float64")
    else:
        assert got_dtype == keras.backend.standardize_dtype(y_ref.dtype) == ours.compute_dtype
    tol = {"float32": 2e-5, "float64": 1e-10, "mixed_float16": 4e-3, "mixed_bfloat16": 3e-2}[policy]
    if "float32" in (got_dtype, keras.backend.standardize_dtype(y_ref.dtype)):  # float64 truncated by jax
        tol = max(tol, 2e-5)
    assert_close(to_numpy(keras.ops.cast(y, "float32")), to_numpy(keras.ops.cast(y_ref, "float32")), tol=tol)
    # mixed_bfloat16 gradients: Keras's own layer sums them in bfloat16 on jax (errors of 10-20% of their scale
    # against the float64 truth, where ours stay within 2^-8); test_bfloat16.py compares them with Keras's layer
    # computing in float32 on the same bfloat16 values
    if policy == "mixed_float16" and BACKEND != "numpy":
        cot = np.ones(ours.compute_output_shape(x.shape), "float32")
        from helpers import gradients

        _, dx, dws = gradients(ours, x, cot)
        _, dx_ref, dws_ref = gradients(ref, x, cot)
        assert_close(dx.astype("float32"), dx_ref.astype("float32"), tol=tol)
        for g, g_ref in zip(dws, dws_ref):
            assert g.dtype == g_ref.dtype
            assert_close(g.astype("float32"), g_ref.astype("float32"), tol=tol)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the tensorflow bridge's result buffers")
def test_tensorflow_result_buffers_bounded_and_reused():
    """Inputs of ever new sizes do not grow the pool without bound; a repeated shape reuses its buffers."""
    from keras_layers.backend import tensorflow as tfb

    tfb.clear_buffers()
    layer = keras_layers.DepthwiseConv2D(3, padding="same")
    layer.build((1, None, None, 2))
    for size in range(4, 4 + tfb.POOL_SHAPES + 8):
        layer(np.ones((1, size, 5, 2), "float32"))
    assert len(tfb._pool) <= tfb.POOL_SHAPES
    x = np.ones((1, 6, 6, 2), "float32")
    first = to_numpy(layer(x))
    ids = {id(b) for bufs in tfb._pool.values() for b in bufs}
    for _ in range(3):
        np.testing.assert_array_equal(to_numpy(layer(x)), first)
    assert {id(b) for bufs in tfb._pool.values() for b in bufs} == ids
    tfb.clear_buffers()
    assert not tfb._pool


@pytest.mark.skipif(BACKEND not in ("jax", "torch", "numpy"), reason="the bridges that set malloc (not tensorflow)")
@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") and not os.path.exists("/lib64/libc.so.6"),
                    reason="glibc's mallopt")
@pytest.mark.parametrize("opt_out", [False, True])
def test_bridge_keeps_freed_memory_unless_opted_out(opt_out):
    """The bridge raises glibc's mmap/trim thresholds at import (buffers stay warm); the env var opts out."""
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    env.pop("NBCONV_KEEP_FREED_MEMORY", None)
    if opt_out:
        env["NBCONV_KEEP_FREED_MEMORY"] = "0"
    code = f"import keras_layers, keras_layers.backend.{BACKEND} as b; print(b.MALLOC_TUNED)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(not opt_out)
