"""Gradients through nbconv's layers equal the backend's autodiff through Keras's layers.

jax: ``jax.grad`` over ``stateless_call``; tensorflow: ``tf.GradientTape``;
torch: ``.backward()``.  Keras's numpy backend has no autodiff, so there is
nothing to compare there.
"""
import keras
import numpy as np
import pytest

from helpers import BACKEND, gradients, make_pair, to_numpy
from reference import assert_close
from test_outputs import GRID, _ids, _input, keras_tf_unreliable

pytestmark = pytest.mark.skipif(BACKEND == "numpy", reason="Keras's numpy backend has no autodiff")

# every third grid case: all kernel sizes, strides, paddings, formats, activations, bias on/off
GRAD_GRID = GRID[::3]


@pytest.mark.parametrize("kind", ["separable", "depthwise"])
@pytest.mark.parametrize("case", GRAD_GRID, ids=_ids)
def test_gradients_match_keras(kind, case, rng):
    x = _input(case, rng)
    layer_args = {k: v for k, v in case.items() if k != "size"}
    if kind == "separable":
        layer_args["filters"] = 4
    ours, ref = make_pair(kind, x.shape, rng, **layer_args)
    if keras_tf_unreliable(case, ours.compute_output_shape(x.shape)):
        # Keras's own TF layer rejects or miscomputes these; test_gradients_finite_differences covers them
        s = case["strides"]
        case = dict(case, strides=s[0] if isinstance(s, tuple) else s, data_format="channels_last")
        x = _input(case, rng)
        layer_args.update(strides=case["strides"], data_format="channels_last")
        ours, ref = make_pair(kind, x.shape, rng, **layer_args)
    cot = rng.standard_normal(ours.compute_output_shape(x.shape)).astype("float32")
    y, dx, dws = gradients(ours, x, cot)
    y_ref, dx_ref, dws_ref = gradients(ref, x, cot)
    assert_close(y, y_ref, tol=2e-5)
    assert_close(dx, dx_ref, tol=1e-4)
    assert len(dws) == len(dws_ref) == len(ours.trainable_variables)
    for v, g, g_ref in zip(ours.trainable_variables, dws, dws_ref):
        assert g.shape == tuple(v.shape)
        assert_close(g, g_ref, tol=1e-4)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_gradients_finite_differences(kind, data_format, rng):
    """Unequal strides and dilation (which TF's own layer rejects), float64, against central differences."""
    if BACKEND == "jax":
        # jax compares against Keras's layer for every stride (test_gradients_match_keras); under JAX_ENABLE_X64
        # Keras's own jax layers returned float32 outputs for float64 inputs here, which ruins central differences
        pytest.skip("finite differences need float64 end to end; jax is covered against Keras's layer")
    args = dict(kernel_size=3, strides=(2, 1), dilation_rate=(1, 2), padding="same", activation="tanh",
                depth_multiplier=2, dtype="float64", data_format=data_format)
    if kind == "separable":
        args["filters"] = 3
    x = rng.standard_normal((1, 7, 8, 2) if data_format == "channels_last" else (1, 2, 7, 8))
    ours, _ = make_pair(kind, x.shape, rng, **args)
    cot = rng.standard_normal(ours.compute_output_shape(x.shape))
    _, dx, dws = gradients(ours, x, cot)

    def loss(xv):
        # an explicit float64 tensor: Keras on jax converts a NumPy input to floatx (float32)
        return float(np.sum(to_numpy(ours(keras.ops.convert_to_tensor(xv, dtype="float64"))) * cot))

    eps = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        num[idx] = (loss(xp) - loss(xm)) / (2 * eps)
    assert_close(dx, num, tol=1e-6)
    weights = ours.get_weights()
    for i, w in enumerate(weights):
        numw = np.zeros_like(w)
        for idx in np.ndindex(*w.shape):
            for sign in (1, -1):
                ws = [v.copy() for v in weights]
                ws[i][idx] += sign * eps
                ours.set_weights(ws)
                numw[idx] += sign * loss(x) / (2 * eps)
        ours.set_weights(weights)
        assert_close(dws[i], numw, tol=1e-6)


def test_unused_gradients_not_computed(monkeypatch, rng):
    """The first layer of a model gets no input gradient computed (jax: symbolic zeros; torch: needs_input_grad)."""
    from keras_layers.backend import _common

    calls = []
    real = _common.backward

    def spy(cfg, wrt, *arrays):
        calls.append(tuple(wrt))
        return real(cfg, wrt, *arrays)

    monkeypatch.setattr(_common, "backward", spy)
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    ours, _ = make_pair("separable", x.shape, rng, filters=4, kernel_size=3, activation="relu")
    cot = rng.standard_normal(ours.compute_output_shape(x.shape)).astype("float32")
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in ours.trainable_variables]

        def loss(tv):
            return jnp.sum(ours.stateless_call(tv, [], x)[0] * cot)

        jax.grad(loss)(tv)
        assert calls == [("depthwise_kernel", "pointwise_kernel", "bias")]
    elif BACKEND == "torch":
        import torch

        (ours(torch.tensor(x)) * torch.tensor(cot)).sum().backward()
        assert calls == [("depthwise_kernel", "pointwise_kernel", "bias")]
    else:
        import tensorflow as tf

        @tf.function
        def weight_grads():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(ours(tf.constant(x)) * cot)
            return tape.gradient(loss, [v.value for v in ours.trainable_variables])

        weight_grads()
        # graph pruning drops the stateless x-gradient call
        assert calls == [("depthwise_kernel", "pointwise_kernel", "bias")]


def test_jitted_gradients(rng):
    """The gradient also works under the backend's compiler (jax.jit, torch.compile, tf.function)."""
    x = rng.standard_normal((2, 7, 6, 3)).astype("float32")
    ours, ref = make_pair("separable", x.shape, rng, filters=4, kernel_size=3, strides=2, padding="same",
                          activation="relu6")
    cot = rng.standard_normal(ours.compute_output_shape(x.shape)).astype("float32")
    _, dx_ref, dws_ref = gradients(ref, x, cot)
    if BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tv = [v.value for v in ours.trainable_variables]

        @jax.jit
        def grads(tv, x):
            return jax.grad(lambda tv, x: jnp.sum(ours.stateless_call(tv, [], x)[0] * cot), argnums=(0, 1))(tv, x)

        dws, dx = grads(tv, jnp.asarray(x))
    elif BACKEND == "torch":
        import torch

        def step(x):
            return (ours(x) * torch.tensor(cot)).sum()

        compiled = torch.compile(step, fullgraph=True)
        xt = torch.tensor(x, requires_grad=True)
        compiled(xt).backward()
        dx, dws = xt.grad, [v.value.grad for v in ours.trainable_variables]
    else:
        import tensorflow as tf

        @tf.function
        def grads(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(ours(x) * cot)
            return tape.gradient(loss, [x] + [v.value for v in ours.trainable_variables])

        dx, *dws = grads(tf.constant(x))
    assert_close(to_numpy(dx), dx_ref, tol=1e-4)
    for g, g_ref in zip(dws, dws_ref):
        assert_close(to_numpy(g), g_ref, tol=1e-4)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.vmap")
@pytest.mark.parametrize("kind", ["separable", "depthwise"])
def test_vmap_forward_and_gradient(kind, rng):
    """``jax.vmap`` over an extra leading axis, of the output and of its input gradient, equals Keras's layer."""
    import jax
    import jax.numpy as jnp

    xs = rng.standard_normal((3, 2, 6, 5, 3)).astype("float32")
    args = dict(kernel_size=3, strides=2, padding="same", activation="relu")
    if kind == "separable":
        args["filters"] = 4
    ours, ref = make_pair(kind, xs.shape[1:], rng, **args)

    def batched(layer):
        tv = [v.value for v in layer.trainable_variables]

        def loss(x):
            return jnp.sum(layer.stateless_call(tv, [], x)[0] ** 2)

        def fwd(x):
            return layer.stateless_call(tv, [], x)[0]

        return jax.jit(jax.vmap(fwd))(xs), jax.jit(jax.vmap(jax.grad(loss)))(xs)

    (y, dx), (y_ref, dx_ref) = batched(ours), batched(ref)
    assert y.shape == y_ref.shape == (3,) + tuple(ours.compute_output_shape(xs.shape[1:]))
    assert_close(np.asarray(y), np.asarray(y_ref), tol=2e-5)
    assert_close(np.asarray(dx), np.asarray(dx_ref), tol=1e-4)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="GradientTape watching")
@pytest.mark.parametrize("graph", [False, True])
def test_tensorflow_host_calls_follow_the_tape(monkeypatch, rng, graph):
    """The watched inputs' gradients come from one host call; inputs no tape watched get none (values: Keras's)."""
    import tensorflow as tf

    from keras_layers.backend import _common

    calls = []
    real = _common.backward

    def spy(cfg, wrt, *arrays):
        calls.append(tuple(wrt))
        return real(cfg, wrt, *arrays)

    monkeypatch.setattr(_common, "backward", spy)
    x = rng.standard_normal((2, 7, 6, 3)).astype("float32")
    ours, ref = make_pair("separable", x.shape, rng, filters=4, kernel_size=3, padding="same", activation="relu")
    cot = rng.standard_normal(ours.compute_output_shape(x.shape)).astype("float32")
    _, dx_ref, dws_ref = gradients(ref, x, cot)
    all_names = ("x", "depthwise_kernel", "pointwise_kernel", "bias")

    def run(watch_x, watch_weights):
        def body(xt):
            weights = [v.value for v in ours.trainable_variables]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                if watch_x:
                    tape.watch(xt)
                if watch_weights:
                    tape.watch(weights)
                loss = tf.reduce_sum(ours(xt) * cot)
            return tape.gradient(loss, ([xt] if watch_x else []) + (weights if watch_weights else []))
        return (tf.function(body) if graph else body)(tf.constant(x))

    for watch_x, watch_weights in ((True, True), (False, True), (True, False)):
        calls.clear()
        got = run(watch_x, watch_weights)
        assert calls == [tuple(n for n, w in zip(all_names, (watch_x,) + (watch_weights,) * 3) if w)]
        expected = ([dx_ref] if watch_x else []) + (list(dws_ref) if watch_weights else [])
        assert len(got) == len(expected)
        for g, g_ref in zip(got, expected):
            assert_close(to_numpy(g), g_ref, tol=1e-4)
