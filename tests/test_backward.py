"""nbconv's backward functions against finite differences of the float64 reference and jax.grad of Keras's ops.

Reference gradients never come from nbconv: either central differences of
``sum(grad_output * reference_forward(...))`` (tests/reference.py, float64;
the convolution is linear in each argument, so the differences are exact up
to rounding), or ``jax.grad`` of ``keras.ops.depthwise_conv`` /
``separable_conv`` / ``conv`` and of ``jax.lax.conv_general_dilated`` with
explicit pads, evaluated in float64 (``jax.enable_x64``, scoped to the test).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbconv
import nbconv.backward as nbb
from nbconv._backward import ACT_BLOCK
from reference import (
    assert_close,
    depthwise_ref,
    pair,
    pointwise_ref,
    random_array,
    resolve_padding,
    separable_ref,
)

FORMATS = ["channels_last", "channels_first"]


def _x_shape(n, h, w, c, data_format):
    return (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)


def _channel_axis(data_format):
    return 3 if data_format == "channels_last" else 1


def _bias_grad(g, data_format):
    axes = (0, 1, 2) if data_format == "channels_last" else (0, 2, 3)
    return np.asarray(g, np.float64).sum(axis=axes)


def _fd_grads(fun, args, g, which, h=1e-3):
    """Central differences of ``L = sum(g * fun(*args))`` with respect to ``args[i]`` for ``i`` in ``which``."""
    args = [np.array(a, dtype=np.float64, order="C") for a in args]  # C order: reshape(-1) below is a view
    g = np.asarray(g, np.float64)
    out = []
    for i in which:
        a = args[i]
        grad = np.empty_like(a)
        flat = a.reshape(-1)
        for j in range(flat.size):
            keep = flat[j]
            flat[j] = keep + h
            lp = np.sum(g * fun(*args))
            flat[j] = keep - h
            lm = np.sum(g * fun(*args))
            flat[j] = keep
            grad.reshape(-1)[j] = (lp - lm) / (2 * h)
        out.append(grad)
    return out


# ---------------------------------------------------------------- finite differences (float64, reference.py)

# (N, H, W, C, dm, (kh, kw), strides, dilation, padding)
FD_CASES = [
    (2, 5, 6, 2, 1, (3, 3), 1, 1, "valid"),
    (2, 6, 5, 2, 2, (3, 3), 2, 1, "same"),
    (1, 7, 6, 1, 3, (2, 3), (2, 1), 1, "same"),  # even kernel: uneven 'same' padding
    (1, 8, 7, 2, 1, (3, 2), (1, 2), (2, 1), "same"),
    (2, 7, 7, 1, 2, (3, 3), 2, 2, 1),
    (1, 9, 8, 2, 1, (2, 2), 3, 1, "valid"),  # stride 3 > kernel: skipped rows/cols get zero gradient
    (1, 6, 7, 1, 1, (3, 3), (3, 2), 1, ((2, 0), (0, 3))),
    (1, 5, 6, 2, 2, (3, 2), 1, (1, 2), (1, 2)),
    (3, 4, 5, 1, 1, (5, 3), 1, (2, 1), ((4, 3), (1, 1))),  # large dilated kernel: spills across many row chunks
]
# the image's last output rows own every input row left, some above their first tap (top padding): the separable
# kernel's gather stores them all
FD_ONE_TILE = [
    (2, 1, 3, 2, 1, (2, 2), 1, 1, ((1, 0), (1, 0))),
    (1, 2, 4, 3, 1, (3, 3), 2, 1, ((2, 0), (1, 1))),
]


def _geom_kwargs(case, data_format):
    n, h, w, c, dm, k, strides, dilation, padding = case
    return dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", FD_CASES, ids=[str(c) for c in FD_CASES])
def test_depthwise_backward_finite_differences(rng, case, data_format):
    n, h, w, c, dm, (kh, kw), *_ = case
    kwargs = _geom_kwargs(case, data_format)
    x = rng.standard_normal(_x_shape(n, h, w, c, data_format))
    kernel = rng.standard_normal((kh, kw, c, dm))
    y = depthwise_ref(x, kernel, **kwargs)
    g = rng.standard_normal(y.shape)
    dx, dk = _fd_grads(lambda a, b: depthwise_ref(a, b, **kwargs), (x, kernel), g, (0, 1))
    with nbconv.num_threads(2):
        got = nbconv.depthwise_conv2d_backward(g, x, kernel, **kwargs)
    assert isinstance(got, nbconv.DepthwiseConv2DGrads)
    assert got.x.dtype == got.kernel.dtype == got.bias.dtype == np.float64
    assert_close(got.x, dx, tol=1e-9)
    assert_close(got.kernel, dk, tol=1e-9)
    assert_close(got.bias, _bias_grad(g, data_format), tol=1e-12)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", FD_CASES[1::2] + FD_ONE_TILE, ids=[str(c) for c in FD_CASES[1::2] + FD_ONE_TILE])
def test_separable_backward_finite_differences(rng, case, data_format):
    n, h, w, c, dm, (kh, kw), *_ = case
    f = 3
    kwargs = _geom_kwargs(case, data_format)
    x = rng.standard_normal(_x_shape(n, h, w, c, data_format))
    dk = rng.standard_normal((kh, kw, c, dm))
    pk = rng.standard_normal((1, 1, c * dm, f))
    bias = rng.standard_normal(f)
    y = separable_ref(x, dk, pk, bias, **kwargs)
    g = rng.standard_normal(y.shape)
    ref = _fd_grads(lambda a, b, p, q: separable_ref(a, b, p, q, **kwargs), (x, dk, pk, bias), g, (0, 1, 2, 3))
    with nbconv.num_threads(2):
        got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    assert isinstance(got, nbconv.SeparableConv2DGrads)
    for actual, expected in zip(got, ref):
        assert actual.shape == expected.shape
        assert_close(actual, expected, tol=1e-9)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("kernel_ndim", [2, 4])
def test_pointwise_backward_finite_differences(rng, data_format, kernel_ndim):
    x = rng.standard_normal(_x_shape(2, 3, 4, 5, data_format))
    kernel = rng.standard_normal((5, 3) if kernel_ndim == 2 else (1, 1, 5, 3))
    bias = rng.standard_normal(3)
    kw = dict(data_format=data_format)
    g = rng.standard_normal(pointwise_ref(x, kernel, bias, **kw).shape)
    ref = _fd_grads(lambda a, b, q: pointwise_ref(a, b, q, **kw), (x, kernel, bias), g, (0, 1, 2))
    got = nbconv.pointwise_conv2d_backward(g, x, kernel, **kw)
    assert isinstance(got, nbconv.PointwiseConv2DGrads)
    assert got.kernel.shape == kernel.shape
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, tol=1e-9)


# ---------------------------------------------------------------- jax.grad of Keras's ops (float64)

# (H, W, C, dm, (kh, kw), strides, dilation, padding)
JAX_CASES = [
    (8, 9, 3, 1, (3, 3), 1, 1, "valid"),
    (8, 9, 3, 2, (3, 3), 1, 1, "same"),
    (9, 8, 2, 3, (3, 3), 2, 1, "same"),
    (9, 9, 3, 1, (3, 3), 2, 1, "valid"),
    (7, 10, 2, 1, (3, 3), (1, 2), 1, "same"),
    (10, 7, 2, 2, (3, 2), (2, 1), 1, "valid"),
    (10, 9, 3, 1, (3, 3), 1, 2, "same"),
    (9, 11, 2, 2, (3, 3), 1, (2, 1), "valid"),
    (11, 11, 2, 1, (3, 3), 2, 2, "same"),
    (12, 10, 2, 3, (4, 4), (2, 3), (1, 2), "same"),
    (6, 6, 4, 1, (5, 5), 1, 1, "same"),
    (1, 1, 3, 2, (3, 3), 1, 1, "same"),
    (7, 20, 5, 1, (3, 3), 1, 1, "same"),   # wider rows
    (6, 34, 3, 1, (3, 3), 2, 1, "same"),
]


@pytest.fixture(scope="module")
def jx():
    """(jax, jax.numpy, keras.ops); the caller enables float64 with ``jax.enable_x64(True)`` around its use."""
    import jax
    import jax.numpy as jnp
    import keras

    return jax, jnp, keras.ops


def _to64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", JAX_CASES, ids=[str(c) for c in JAX_CASES])
def test_depthwise_backward_matches_jax_grad(rng, jx, case, data_format):
    jax, jnp, ops = jx
    h, w, c, dm, (kh, kw), strides, dilation, padding = case
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    x = random_array(rng, _x_shape(2, h, w, c, data_format), np.float64)
    kernel = random_array(rng, (kh, kw, c, dm), np.float64)
    bias = random_array(rng, (c * dm,), np.float64)
    baxis = (None, None, None, slice(None)) if data_format == "channels_last" else (None, slice(None), None, None)
    with jax.enable_x64(True):
        y = np.asarray(ops.depthwise_conv(x, kernel, **kwargs))
        g = random_array(rng, y.shape, np.float64)

        def loss(a, b, q):
            return jnp.sum((ops.depthwise_conv(a, b, **kwargs) + q[baxis]) * g)

        ref = _to64(*jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias))
    got = nbconv.depthwise_conv2d_backward(g, x, kernel, **kwargs)
    for actual, expected in zip(got, ref):
        assert actual.dtype == np.float64
        assert_close(actual, expected, tol=1e-10)


@pytest.mark.parametrize("data_format, path", [("channels_first", "auto"), ("channels_last", "auto"),
                                               ("channels_last", "whole"), ("channels_last", "tiled")])
@pytest.mark.parametrize("case", JAX_CASES, ids=[str(c) for c in JAX_CASES])
def test_separable_backward_matches_jax_grad(rng, jx, case, data_format, path, plan_override):
    """Both NHWC strategies (the intermediate held whole, or recomputed per tile) are forced in turn."""
    if path == "whole":
        plan_override(whole_weight_bytes=0)
    elif path == "tiled":
        plan_override(whole_bytes=0)
    jax, jnp, ops = jx
    h, w, c, dm, (kh, kw), strides, dilation, padding = case
    f = 5
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    x = random_array(rng, _x_shape(2, h, w, c, data_format), np.float64)
    dk = random_array(rng, (kh, kw, c, dm), np.float64)
    pk = random_array(rng, (1, 1, c * dm, f), np.float64)
    bias = random_array(rng, (f,), np.float64)
    baxis = (None, None, None, slice(None)) if data_format == "channels_last" else (None, slice(None), None, None)
    with jax.enable_x64(True):
        y = np.asarray(ops.separable_conv(x, dk, pk, **kwargs))
        g = random_array(rng, y.shape, np.float64)

        def loss(a, b, p, q):
            return jnp.sum((ops.separable_conv(a, b, p, **kwargs) + q[baxis]) * g)

        ref = _to64(*jax.grad(loss, argnums=(0, 1, 2, 3))(x, dk, pk, bias))
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for actual, expected in zip(got, ref):
        assert actual.dtype == np.float64
        assert_close(actual, expected, tol=1e-10)


@pytest.mark.parametrize("data_format", FORMATS)
def test_pointwise_backward_matches_jax_grad(rng, jx, data_format):
    jax, jnp, ops = jx
    x = random_array(rng, _x_shape(3, 7, 6, 9, data_format), np.float64)
    kernel = random_array(rng, (1, 1, 9, 11), np.float64)
    bias = random_array(rng, (11,), np.float64)
    baxis = (None, None, None, slice(None)) if data_format == "channels_last" else (None, slice(None), None, None)
    with jax.enable_x64(True):
        y = np.asarray(ops.conv(x, kernel, data_format=data_format))
        g = random_array(rng, y.shape, np.float64)

        def loss(a, b, q):
            return jnp.sum((ops.conv(a, b, data_format=data_format) + q[baxis]) * g)

        ref = _to64(*jax.grad(loss, argnums=(0, 1, 2))(x, kernel, bias))
    got = nbconv.pointwise_conv2d_backward(g, x, kernel, data_format=data_format)
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, tol=1e-10)
    got2 = nbconv.pointwise_conv2d_backward(g, x, kernel.reshape(9, 11), data_format=data_format)
    assert got2.kernel.shape == (9, 11)
    assert_close(got2.kernel, ref[1].reshape(9, 11), tol=1e-10)


# explicit paddings (all forms): jax.lax.conv_general_dilated with the pads resolved by tests/reference.py
PAD_CASES = [
    (1, 1, 1, 1),
    (2, (1, 2), 1, 1),
    (3, ((0, 2), (1, 0)), (2, 1), (1, 2)),
    (3, ((2, 1), (3, 0)), 2, 1),
    (2, 0, 1, 2),
    (3, (2, 0), (1, 3), 1),
]


def _lax_separable(jax, jnp, x, dk, pk, strides, pads, dilation, data_format):
    c, dm = dk.shape[2], dk.shape[3]
    dims = ("NHWC", "HWIO", "NHWC") if data_format == "channels_last" else ("NCHW", "HWIO", "NCHW")
    d = jax.lax.conv_general_dilated(
        x, dk.reshape(dk.shape[0], dk.shape[1], 1, c * dm), window_strides=pair(strides), padding=pads,
        rhs_dilation=pair(dilation), dimension_numbers=dims, feature_group_count=c)
    if pk is None:
        return d
    p = pk.reshape(c * dm, -1)
    return jnp.einsum("nhwk,kf->nhwf", d, p) if data_format == "channels_last" else jnp.einsum("nkhw,kf->nfhw", d, p)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", PAD_CASES, ids=[str(c) for c in PAD_CASES])
def test_explicit_padding_matches_jax_grad(rng, jx, case, data_format):
    jax, jnp, ops = jx
    k, padding, strides, dilation = case
    n, h, w, c, dm, f = 2, 7, 8, 3, 2, 4
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    pads = resolve_padding(padding, h, w, k, k, strides, dilation)
    x = random_array(rng, _x_shape(n, h, w, c, data_format), np.float64)
    dk = random_array(rng, (k, k, c, dm), np.float64)
    pk = random_array(rng, (c * dm, f), np.float64)
    with jax.enable_x64(True):
        y = np.asarray(_lax_separable(jax, jnp, x, dk, pk, strides, pads, dilation, data_format))
        g = random_array(rng, y.shape, np.float64)
        yd = np.asarray(_lax_separable(jax, jnp, x, dk, None, strides, pads, dilation, data_format))
        gd = random_array(rng, yd.shape, np.float64)
        ref = _to64(*jax.grad(lambda a, b, p: jnp.sum(_lax_separable(jax, jnp, a, b, p, strides, pads, dilation,
                                                                       data_format) * g), argnums=(0, 1, 2))(x, dk, pk))
        refd = _to64(*jax.grad(lambda a, b: jnp.sum(_lax_separable(jax, jnp, a, b, None, strides, pads, dilation,
                                                                     data_format) * gd), argnums=(0, 1))(x, dk))
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for actual, expected in zip(got[:3], ref):
        assert_close(actual, expected, tol=1e-10)
    assert_close(got.bias, _bias_grad(g, data_format), tol=1e-12)
    gotd = nbconv.depthwise_conv2d_backward(gd, x, dk, **kwargs)
    assert_close(gotd.x, refd[0], tol=1e-10)
    assert_close(gotd.kernel, refd[1], tol=1e-10)


# ---------------------------------------------------------------- dtypes

def _jax_separable_grads(jx, x, dk, pk, g, kwargs):
    """float64 jax.grad of Keras's separable_conv (+ bias) at float64 copies of the inputs."""
    jax, jnp, ops = jx
    x, dk, pk, g = _to64(x, dk, pk, g)
    with jax.enable_x64(True):
        ref = jax.grad(lambda a, b, p: jnp.sum(ops.separable_conv(a, b, p, **kwargs) * g), argnums=(0, 1, 2))(x, dk, pk)
    return _to64(*ref) + [_bias_grad(g, kwargs["data_format"])]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype,tol", [(np.float16, 4e-3), (np.float32, 2e-5), (np.float64, 1e-10)])
def test_separable_backward_dtypes(rng, jx, data_format, dtype, tol):
    kwargs = dict(strides=(2, 1), padding="same", dilation_rate=1, data_format=data_format)
    x = random_array(rng, _x_shape(2, 11, 10, 6, data_format), dtype)
    dk = random_array(rng, (3, 3, 6, 2), dtype)
    pk = random_array(rng, (1, 1, 12, 7), dtype)
    g = random_array(rng, separable_ref(x, dk, pk, **kwargs).shape, dtype)
    ref = _jax_separable_grads(jx, x, dk, pk, g, kwargs)
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for actual, expected in zip(got, ref):
        assert actual.dtype == dtype
        assert_close(actual, expected, tol=tol)


# ---------------------------------------------------------------- fused activations

@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", ["relu", "relu6", "linear", None])
@pytest.mark.parametrize("op", ["separable", "depthwise", "pointwise"])
def test_fused_activation_backward_matches_jax_grad(rng, jx, op, activation, data_format):
    """``activation=``/``output=``: the gradient of activation(conv(x) + b), against jax.grad in float64.

    The output has more elements than one block of the parallel mask (and a partial last block), and
    values spread over [-8, 8] so that relu6's upper edge is crossed.
    """
    jax, jnp, ops = jx
    geo = dict(padding="same", data_format=data_format)
    kwargs = dict(geo, strides=(1, 2)) if op != "pointwise" else dict(data_format=data_format)
    x = random_array(rng, _x_shape(2, 37, 121, 6, data_format), np.float32, -8, 8)
    dk = random_array(rng, (3, 3, 6, 2), np.float32)
    pk = random_array(rng, (1, 1, 12 if op == "separable" else 6, 9), np.float32)
    b = random_array(rng, (9 if op != "depthwise" else 12,), np.float32)
    weights = {"separable": (dk, pk), "depthwise": (dk,), "pointwise": (pk,)}[op]
    fwd = {"separable": nbconv.separable_conv2d, "depthwise": nbconv.depthwise_conv2d,
           "pointwise": nbconv.pointwise_conv2d}[op]
    bwd = {"separable": nbconv.separable_conv2d_backward, "depthwise": nbconv.depthwise_conv2d_backward,
           "pointwise": nbconv.pointwise_conv2d_backward}[op]
    y = fwd(x, *weights, b, activation=activation, **kwargs)
    assert y.size > ACT_BLOCK * 2 and y.size % ACT_BLOCK
    g = random_array(rng, y.shape, np.float32)
    bshape = (1, -1, 1, 1) if data_format == "channels_first" else (-1,)

    def loss(a, bias, *w):
        if op == "separable":
            z = ops.separable_conv(a, *w, strides=(1, 2), **geo)
        elif op == "depthwise":
            z = ops.depthwise_conv(a, *w, strides=(1, 2), **geo)
        else:
            z = ops.conv(a, *w, data_format=data_format)
        z = z + bias.reshape(bshape)
        z = {"relu": jax.nn.relu, "relu6": jax.nn.relu6}.get(activation, lambda t: t)(z)
        return jnp.sum(z * _to64(g)[0])

    with jax.enable_x64(True):
        ref = _to64(*jax.grad(loss, argnums=tuple(range(2 + len(weights))))(*_to64(x, b, *weights)))
    got = bwd(g, x, *weights, activation=activation, output=y, **kwargs)
    assert_close(got.x, ref[0], tol=2e-5)
    assert_close(got.bias, ref[1], tol=2e-5)
    for actual, expected in zip(got[1:-1], ref[2:]):
        assert_close(actual.reshape(expected.shape), expected, tol=2e-5)


def test_fused_activation_bad_output():
    x = np.zeros((1, 4, 4, 2), np.float32)
    dk = np.zeros((3, 3, 2, 1), np.float32)
    g = np.zeros((1, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match=r"Expected `output` .*activation='relu'.*Received: output=None"):
        nbconv.depthwise_conv2d_backward(g, x, dk, padding="same", activation="relu")
    with pytest.raises(ValueError, match=r"Expected `output` of the shape of `grad_output`, \(1, 4, 4, 2\).*"
                                         r"Received: output with shape \(1, 4, 4\)"):
        nbconv.depthwise_conv2d_backward(g, x, dk, padding="same", activation="relu6", output=g[..., 0])
    with pytest.raises(ValueError, match=r"Expected `activation` to be None.*Received: activation='gelu'"):
        nbconv.pointwise_conv2d_backward(g, x, np.zeros((2, 2), np.float32), activation="gelu", output=g)
    with pytest.raises(TypeError, match="Expected `output` to be a floating-point array"):
        nbconv.separable_conv2d_backward(g, x, dk, np.zeros((2, 2), np.float32), padding="same",
                                         activation="relu", output=g.astype(np.int32))


def test_fused_activation_inputs_not_modified(rng):
    x = random_array(rng, (2, 9, 9, 3), np.float32, -3, 3)
    dk = random_array(rng, (3, 3, 3, 1), np.float32)
    y = nbconv.depthwise_conv2d(x, dk, padding="same", activation="relu")
    g = random_array(rng, y.shape, np.float32)
    copies = [a.copy() for a in (x, dk, y, g)]
    nbconv.depthwise_conv2d_backward(g, x, dk, padding="same", activation="relu", output=y)
    for a, b in zip((x, dk, y, g), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype,tol", [(np.float16, 4e-3), (np.float32, 2e-5)])
def test_depthwise_and_pointwise_backward_dtypes(rng, data_format, dtype, tol):
    kwargs = dict(strides=1, padding=1, dilation_rate=2, data_format=data_format)
    x = random_array(rng, _x_shape(2, 9, 8, 5, data_format), dtype)
    kernel = random_array(rng, (3, 3, 5, 2), dtype)
    g = random_array(rng, depthwise_ref(x, kernel, **kwargs).shape, dtype)
    ref = _fd_grads(lambda a, b: depthwise_ref(a, b, **kwargs), (x, kernel), g, (0, 1))
    got = nbconv.depthwise_conv2d_backward(g, x, kernel, **kwargs)
    for actual, expected in zip(got, ref + [_bias_grad(g, data_format)]):
        assert actual.dtype == dtype
        assert_close(actual, expected, tol=tol)

    pk = random_array(rng, (5, 4), dtype)
    gp = random_array(rng, pointwise_ref(x, pk, data_format=data_format).shape, dtype)
    refp = _fd_grads(lambda a, b: pointwise_ref(a, b, data_format=data_format), (x, pk), gp, (0, 1))
    gotp = nbconv.pointwise_conv2d_backward(gp, x, pk, data_format=data_format)
    for actual, expected in zip(gotp, refp + [_bias_grad(gp, data_format)]):
        assert actual.dtype == dtype
        assert_close(actual, expected, tol=tol)


def test_mixed_dtypes_promote(rng, jx):
    kwargs = dict(strides=1, padding="same", dilation_rate=1, data_format="channels_last")
    x = random_array(rng, (2, 6, 7, 3), np.float32)
    dk = random_array(rng, (3, 3, 3, 1), np.float64)
    pk = random_array(rng, (3, 4), np.float16)
    g = random_array(rng, (2, 6, 7, 4), np.float32)
    ref = _jax_separable_grads(jx, x, dk, pk.reshape(1, 1, 3, 4), g, kwargs)
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    assert [a.dtype for a in got] == [np.float64] * 4
    assert got.pointwise_kernel.shape == (3, 4)
    for actual, expected in zip(got, [ref[0], ref[1], ref[2].reshape(3, 4), ref[3]]):
        assert_close(actual, expected, tol=1e-10)
    got16 = nbconv.depthwise_conv2d_backward(g[..., :3].astype(np.float16), x.astype(np.float16),
                                             dk.astype(np.float32), **kwargs)
    assert [a.dtype for a in got16] == [np.float32] * 3


# ---------------------------------------------------------------- wrt subsets

@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("wrt", [("x",), ("depthwise_kernel",), ("pointwise_kernel",), ("bias",),
                                 ("x", "bias"), ("depthwise_kernel", "pointwise_kernel"), "x", ()])
@pytest.mark.parametrize("whole", [False, True])
def test_separable_wrt_subsets(rng, jx, data_format, wrt, whole, plan_override):
    if whole:  # the NHWC whole-intermediate strategy (channels_first ignores the setting)
        plan_override(whole_weight_bytes=0)
    kwargs = dict(strides=2, padding="same", dilation_rate=1, data_format=data_format)
    x = random_array(rng, _x_shape(2, 9, 8, 4, data_format), np.float64)
    dk = random_array(rng, (3, 3, 4, 2), np.float64)
    pk = random_array(rng, (1, 1, 8, 5), np.float64)
    g = random_array(rng, _x_shape(2, 5, 4, 5, data_format), np.float64)
    ref = _jax_separable_grads(jx, x, dk, pk, g, kwargs)
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, wrt=wrt, **kwargs)
    names = (wrt,) if isinstance(wrt, str) else wrt
    for name, actual, expected in zip(got._fields, got, ref):
        if name in names:
            assert_close(actual, expected, tol=1e-10)
        else:
            assert actual is None


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("wrt", [("x",), ("kernel",), ("bias",), ("kernel", "bias"), []])
def test_depthwise_and_pointwise_wrt_subsets(rng, data_format, wrt):
    kwargs = dict(strides=(1, 2), padding="valid", dilation_rate=1, data_format=data_format)
    x = rng.standard_normal(_x_shape(1, 6, 7, 2, data_format))
    kernel = rng.standard_normal((3, 3, 2, 2))
    g = rng.standard_normal(depthwise_ref(x, kernel, **kwargs).shape)
    ref = _fd_grads(lambda a, b: depthwise_ref(a, b, **kwargs), (x, kernel), g, (0, 1)) + [_bias_grad(g, data_format)]
    got = nbconv.depthwise_conv2d_backward(g, x, kernel, wrt=wrt, **kwargs)
    for name, actual, expected in zip(got._fields, got, ref):
        if name in wrt:
            assert_close(actual, expected, tol=1e-9)
        else:
            assert actual is None

    pk = rng.standard_normal((2, 3))
    gp = rng.standard_normal(pointwise_ref(x, pk, data_format=data_format).shape)
    refp = _fd_grads(lambda a, b: pointwise_ref(a, b, data_format=data_format), (x, pk), gp, (0, 1))
    refp.append(_bias_grad(gp, data_format))
    gotp = nbconv.pointwise_conv2d_backward(gp, x, pk, data_format=data_format, wrt=wrt)
    for name, actual, expected in zip(gotp._fields, gotp, refp):
        if name in wrt:
            assert_close(actual, expected, tol=1e-9)
        else:
            assert actual is None


# ---------------------------------------------------------------- tiling, chunking, determinism

@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_small_tiles_and_many_chunks(rng, plan_override, data_format, threads):
    """Tiles of 16 pixels crossing output rows, chunks of one output row, halos spanning several chunks."""
    plan_override(backward_tile_bytes=1, backward_pointwise_tile_bytes=1, threads=threads)
    kwargs = dict(strides=(1, 2), padding=((3, 4), (1, 2)), dilation_rate=(2, 1), data_format=data_format)
    x = rng.standard_normal(_x_shape(2, 7, 13, 2, data_format))
    dk = rng.standard_normal((4, 3, 2, 2))
    pk = rng.standard_normal((4, 3))
    g = rng.standard_normal(separable_ref(x, dk, pk, **kwargs).shape)
    ref = _fd_grads(lambda a, b, p: separable_ref(a, b, p, **kwargs), (x, dk, pk), g, (0, 1, 2))
    with nbconv.num_threads(threads):
        got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for actual, expected in zip(got, ref + [_bias_grad(g, data_format)]):
        assert_close(actual, expected, tol=1e-9)

    xp = rng.standard_normal(_x_shape(3, 5, 11, 4, data_format))
    gp = rng.standard_normal(_x_shape(3, 5, 11, 3, data_format))
    refp = _fd_grads(lambda a, b: pointwise_ref(a, b, data_format=data_format), (xp, pk), gp, (0, 1))
    with nbconv.num_threads(threads):
        gotp = nbconv.pointwise_conv2d_backward(gp, xp, pk, data_format=data_format)
    for actual, expected in zip(gotp, refp + [_bias_grad(gp, data_format)]):
        assert_close(actual, expected, tol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("op", ["depthwise", "separable_whole"])
def test_bias_gradient_over_many_row_blocks(rng, op, dtype):
    """The NHWC bias gradient in parallel blocks of rows (``nbconv._backward.COLSUM_ROWS``; bfloat16 widened a few
    rows at a time): more rows than one block and a partial last one, against the float64 sum."""
    from nbconv._backward import COLSUM_ROWS

    dt = nbconv.as_bfloat16(np.zeros(1, np.float32)).dtype if dtype == "bfloat16" else np.dtype(dtype)
    c, f = (7, None) if op == "depthwise" else (256, 300)  # 300 KiB of float32 weights: the whole-intermediate path
    x = random_array(rng, (3, 30, 29, c), np.float32).astype(dt)
    dk = random_array(rng, (3, 3, c, 1), np.float32).astype(dt)
    g = random_array(rng, (3, 30, 29, f or c), np.float32).astype(dt)
    assert 3 * 30 * 29 > 2 * COLSUM_ROWS
    if op == "depthwise":
        db = nbconv.depthwise_conv2d_backward(g, x, dk, padding="same", wrt=("bias",)).bias
    else:
        pk = random_array(rng, (1, 1, c, f), np.float32).astype(dt)
        db = nbconv.separable_conv2d_backward(g, x, dk, pk, padding="same", wrt=("bias",)).bias
    want = np.asarray(g, np.float64).reshape(-1, f or c).sum(axis=0)
    scale = np.abs(np.asarray(g, np.float64)).reshape(-1, f or c).sum(axis=0)
    rounding = 2.0 ** -8 if dtype == "bfloat16" else 0.0
    assert db.dtype == dt
    assert np.all(np.abs(np.asarray(db, np.float64) - want) <= 2 * COLSUM_ROWS * 2.0 ** -24 * scale
                  + rounding * np.abs(want))


@pytest.mark.parametrize("data_format", FORMATS)
def test_deterministic_for_a_thread_count(rng, data_format):
    kwargs = dict(strides=1, padding="same", data_format=data_format)
    x = random_array(rng, _x_shape(4, 20, 18, 16, data_format))
    dk = random_array(rng, (3, 3, 16, 1))
    pk = random_array(rng, (16, 24))
    g = random_array(rng, _x_shape(4, 20, 18, 24, data_format))
    with nbconv.num_threads(2):
        first = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
        for _ in range(3):
            again = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
            for a, b in zip(first, again):
                np.testing.assert_array_equal(a, b)
        gd = g[..., :16] if data_format == "channels_last" else g[:, :16]
        d1 = nbconv.depthwise_conv2d_backward(gd, x, dk, **kwargs)
        d2 = nbconv.depthwise_conv2d_backward(gd, x, dk, **kwargs)
        for a, b in zip(d1, d2):
            np.testing.assert_array_equal(a, b)
    with nbconv.num_threads(1):
        single = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for a, b in zip(first, single):  # another chunking: same values up to float32 rounding
        assert_close(a, b.astype(np.float64), tol=2e-5)


def test_inputs_not_modified_and_views_accepted(rng):
    x = rng.standard_normal((2, 4, 6, 5))[:, :, ::2, :].transpose(0, 3, 1, 2)  # non-contiguous NCHW view
    dk = rng.standard_normal((3, 3, 5, 1))
    pk = np.asfortranarray(rng.standard_normal((5, 2)))
    kwargs = dict(padding="same", data_format="channels_first")
    g = rng.standard_normal((2, 2, 4, 3))[..., ::-1]
    copies = [a.copy() for a in (x, dk, pk, g)]
    ref = _fd_grads(lambda a, b, p: separable_ref(a, b, p, **kwargs), (x, dk, pk), g, (0, 1, 2))
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    for actual, expected in zip(got, ref):
        assert_close(actual, expected, tol=1e-9)
    for a, b in zip((x, dk, pk, g), copies):
        np.testing.assert_array_equal(a, b)


def test_empty_batch():
    x = np.zeros((0, 5, 5, 3), np.float32)
    dk = np.ones((3, 3, 3, 1), np.float32)
    pk = np.ones((3, 4), np.float32)
    got = nbconv.separable_conv2d_backward(np.zeros((0, 5, 5, 4), np.float32), x, dk, pk, padding="same")
    assert got.x.shape == x.shape
    np.testing.assert_array_equal(got.depthwise_kernel, np.zeros_like(dk))
    np.testing.assert_array_equal(got.pointwise_kernel, np.zeros_like(pk))
    np.testing.assert_array_equal(got.bias, np.zeros(4, np.float32))


def test_aliases(rng):
    x = rng.standard_normal((1, 7, 7, 2))
    dk = rng.standard_normal((3, 3, 2, 1))
    g = rng.standard_normal((1, 3, 2, 2))
    a = nbconv.depthwise_conv2d_backward(g, x, dk, stride=(2, 2), dilation=(1, 2))
    ref = _fd_grads(lambda u, v: depthwise_ref(u, v, strides=2, dilation_rate=(1, 2)), (x, dk), g, (0, 1))
    assert_close(a.x, ref[0], tol=1e-9)
    assert_close(a.kernel, ref[1], tol=1e-9)


# ---------------------------------------------------------------- bad inputs

def test_grad_output_wrong_shape():
    x = np.zeros((2, 5, 4, 3), np.float32)
    dk = np.zeros((3, 3, 3, 2), np.float32)
    pk = np.zeros((6, 7), np.float32)
    with pytest.raises(ValueError, match=r"Expected `grad_output` of shape \(2, 5, 4, 6\).*"
                                         r"Received: grad_output with shape \(2, 5, 4, 5\)"):
        nbconv.depthwise_conv2d_backward(np.zeros((2, 5, 4, 5), np.float32), x, dk, padding="same")
    with pytest.raises(ValueError, match=r"Expected `grad_output` of shape \(2, 3, 2, 7\).*"
                                         r"Received: grad_output with shape \(2, 5, 4, 7\)"):
        nbconv.separable_conv2d_backward(np.zeros((2, 5, 4, 7), np.float32), x, dk, pk)
    with pytest.raises(ValueError, match=r"Expected `grad_output` of shape \(2, 2, 5, 4\).*"
                                         r"Received: grad_output with shape \(2, 5, 4, 2\)"):
        nbconv.pointwise_conv2d_backward(np.zeros((2, 5, 4, 2), np.float32), x.transpose(0, 3, 1, 2),
                                         np.zeros((3, 2)), data_format="channels_first")
    with pytest.raises(ValueError, match=r"Received: grad_output with shape \(2, 5, 4\)"):
        nbconv.pointwise_conv2d_backward(np.zeros((2, 5, 4), np.float32), x, np.zeros((3, 2)))
    with pytest.raises(TypeError, match="Expected `grad_output` to be a floating-point array.*int64"):
        nbconv.pointwise_conv2d_backward(np.zeros((2, 5, 4, 2), np.int64), x, np.zeros((3, 2)))


def test_bad_wrt():
    x = np.zeros((1, 4, 4, 2))
    k = np.zeros((3, 3, 2, 1))
    g = np.zeros((1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"Expected `wrt` to be a subset of \('x', 'kernel', 'bias'\).*"
                                         r"Received: wrt=\('x', 'kernal'\)"):
        nbconv.depthwise_conv2d_backward(g, x, k, wrt=("x", "kernal"))
    with pytest.raises(ValueError, match=r"Received: wrt=\('kernel',\)"):
        nbconv.separable_conv2d_backward(np.zeros((1, 2, 2, 3)), x, k, np.zeros((2, 3)), wrt=("kernel",))
    with pytest.raises(ValueError, match="Received: wrt=3"):
        nbconv.pointwise_conv2d_backward(np.zeros((1, 4, 4, 3)), x, np.zeros((2, 3)), wrt=3)
    with pytest.raises(ValueError, match="Received: wrt='weights'"):
        nbconv.pointwise_conv2d_backward(np.zeros((1, 4, 4, 3)), x, np.zeros((2, 3)), wrt="weights")


def test_forward_validation_errors():
    x = np.zeros((1, 6, 6, 2), np.float32)
    k = np.zeros((3, 3, 2, 1), np.float32)
    g = np.zeros((1, 4, 4, 2), np.float32)
    pk = np.zeros((2, 3), np.float32)
    gs = np.zeros((1, 4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="Expected `padding`.*Received: padding='full'"):
        nbconv.depthwise_conv2d_backward(g, x, k, padding="full")
    with pytest.raises(ValueError, match="Expected `data_format`.*Received: data_format='NHWC'"):
        nbconv.separable_conv2d_backward(gs, x, k, pk, data_format="NHWC")
    with pytest.raises(ValueError, match="Expected `strides`.*Received: strides=0"):
        nbconv.separable_conv2d_backward(gs, x, k, pk, strides=0)
    with pytest.raises(ValueError, match=r"Expected `dilation_rate`.*Received: dilation_rate=\(1, -1\)"):
        nbconv.depthwise_conv2d_backward(g, x, k, dilation_rate=(1, -1))
    with pytest.raises(ValueError, match=r"Expected `dilation`.*Received: dilation=\(1, -1\)"):
        nbconv.depthwise_conv2d_backward(g, x, k, dilation=(1, -1))
    with pytest.raises(ValueError, match="Expected `depthwise_kernel` to have 2 input channels"):
        nbconv.separable_conv2d_backward(gs, x, np.zeros((3, 3, 3, 1)), pk)
    with pytest.raises(ValueError, match="Expected `pointwise_kernel` to have 2 input channels"):
        nbconv.separable_conv2d_backward(gs, x, k, np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"Expected `x` to be a 4-D array.*Received: x with shape \(6, 6, 2\)"):
        nbconv.depthwise_conv2d_backward(g, x[0], k)
    with pytest.raises(ValueError, match=r"Expected `kernel` to be a 1x1 kernel.*Received: kernel with shape"):
        nbconv.pointwise_conv2d_backward(gs, x, np.zeros((3, 3, 2, 3)))
    with pytest.raises(TypeError, match="Expected `x` to be a floating-point array.*int32"):
        nbconv.depthwise_conv2d_backward(g, x.astype(np.int32), k)
    with pytest.raises(ValueError, match="Expected an output of positive size"):
        nbconv.depthwise_conv2d_backward(g, x[:, :2], k)
    with pytest.raises(TypeError, match="got both `strides` and its alias `stride`"):
        nbconv.depthwise_conv2d_backward(g, x, k, strides=1, stride=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bias'"):
        nbconv.depthwise_conv2d_backward(g, x, k, bias=np.zeros(2))


# ---------------------------------------------------------------- property: adjoint identities on random geometries

@settings(max_examples=30)
@given(
    n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 3), dm=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3),
    dh=st.integers(1, 3), dw=st.integers(1, 3), f=st.integers(1, 4),
    padding=st.one_of(st.sampled_from(["valid", "same"]),
                      st.tuples(st.tuples(st.integers(0, 4), st.integers(0, 4)),
                                st.tuples(st.integers(0, 4), st.integers(0, 4)))),
    data_format=st.sampled_from(FORMATS), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
)
def test_backward_adjoint_property(n, h, w, c, dm, kh, kw, sh, sw, dh, dw, f, padding, data_format, threads, seed):
    """``<dx, v> == <G, conv(v, k)>`` and ``<dk, u> == <G, conv(x, u)>`` (the convolution is linear in each input)."""
    (pt, pb), (pl, pr) = resolve_padding(padding, h, w, kh, kw, (sh, sw), (dh, dw))
    if (h + pt + pb - (kh - 1) * dh - 1) < 0 or (w + pl + pr - (kw - 1) * dw - 1) < 0:
        return  # no output: the forward rejects these geometries, and so does the backward (tested above)
    rng = np.random.default_rng(seed)
    kwargs = dict(strides=(sh, sw), padding=padding, dilation_rate=(dh, dw), data_format=data_format)
    x = rng.standard_normal(_x_shape(n, h, w, c, data_format))
    dk = rng.standard_normal((kh, kw, c, dm))
    pk = rng.standard_normal((c * dm, f))
    v, u, q = rng.standard_normal(x.shape), rng.standard_normal(dk.shape), rng.standard_normal(pk.shape)
    g = rng.standard_normal(separable_ref(x, dk, pk, **kwargs).shape)
    with nbconv.num_threads(threads):
        got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)
        gd = rng.standard_normal(depthwise_ref(x, dk, **kwargs).shape)
        gotd = nbconv.depthwise_conv2d_backward(gd, x, dk, **kwargs)
    checks = [
        (np.sum(got.x * v), np.sum(g * separable_ref(v, dk, pk, **kwargs))),
        (np.sum(got.depthwise_kernel * u), np.sum(g * separable_ref(x, u, pk, **kwargs))),
        (np.sum(got.pointwise_kernel * q), np.sum(g * separable_ref(x, dk, q, **kwargs))),
        (np.sum(gotd.x * v), np.sum(gd * depthwise_ref(v, dk, **kwargs))),
        (np.sum(gotd.kernel * u), np.sum(gd * depthwise_ref(x, u, **kwargs))),
    ]
    for actual, expected in checks:
        assert abs(actual - expected) <= 1e-9 * max(1.0, abs(expected)), (actual, expected)
    assert_close(got.bias, _bias_grad(g, data_format), tol=1e-12)
    assert_close(gotd.bias, _bias_grad(gd, data_format), tol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (17, 3), (16, 16), (33, 70), (130, 257)])
def test_transposed_weights(rng, dtype, shape):
    """The pointwise weights transposed for ``dD = G W^T``: equal to NumPy's transpose, nothing written outside
    (the destination lies inside a NaN-filled buffer)."""
    w = random_array(rng, shape, dtype)
    t = nbb._transposed(w)
    assert t.flags.c_contiguous and t.dtype == dtype
    np.testing.assert_array_equal(t, w.T)
    guard = 64
    buf = np.full(w.size + 2 * guard, np.nan, dtype)
    nbb._transpose_into(w, buf[guard:guard + w.size].reshape(shape[::-1]))
    assert np.isnan(buf[:guard]).all() and np.isnan(buf[guard + w.size:]).all()
    np.testing.assert_array_equal(buf[guard:guard + w.size].reshape(shape[::-1]), w.T)
