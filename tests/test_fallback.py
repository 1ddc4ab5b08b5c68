"""The NumPy versions answering calls while kernels compile (nbconv._fallback), against the float64 reference
and finite differences of it (how the public functions reach them: tests/test_compile.py)."""
import numpy as np
import pytest

import nbconv
from nbconv import _fallback
from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref
from test_backward import FD_CASES, _bias_grad, _fd_grads, _geom_kwargs, _x_shape

FORMATS = ["channels_last", "channels_first"]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", FD_CASES, ids=[str(c) for c in FD_CASES])
@pytest.mark.parametrize("activation", [None, "relu6"])
def test_forward_matches_reference(rng, case, data_format, activation):
    n, h, w, c, dm, (kh, kw), *_ = case
    kwargs = _geom_kwargs(case, data_format)
    x = random_array(rng, _x_shape(n, h, w, c, data_format), low=-4, high=4)
    dk = random_array(rng, (kh, kw, c, dm), low=-4, high=4)
    pk = random_array(rng, (1, 1, c * dm, 5))
    bias, dbias = random_array(rng, (5,)), random_array(rng, (c * dm,))
    got = _fallback.separable_conv2d(x, dk, pk, bias, activation=activation, depthwise_bias=dbias,
                                     depthwise_activation="relu", **kwargs)
    d = np.maximum(depthwise_ref(x, dk, dbias, **kwargs), 0)
    assert got.dtype == np.float32
    assert_close(got, pointwise_ref(d, pk, bias, data_format=data_format, activation=activation), np.float32)
    got = _fallback.depthwise_conv2d(x, dk, dbias, activation=activation, **kwargs)
    assert_close(got, depthwise_ref(x, dk, dbias, activation=activation, **kwargs), np.float32)
    got = _fallback.pointwise_conv2d(x, pk[:, :, :c], bias, data_format=data_format, activation=activation)
    assert_close(got, pointwise_ref(x, pk[:, :, :c], bias, data_format=data_format, activation=activation),
                 np.float32)


def test_forward_dtypes_out_and_aliases(rng):
    x = random_array(rng, (2, 8, 8, 3), np.float16)
    dk = random_array(rng, (3, 3, 3, 1), np.float16)
    pk = random_array(rng, (3, 4), np.float16)
    y = _fallback.separable_conv2d(x, dk, pk, stride=2, padding=1)
    assert y.dtype == np.float16 and y.flags.c_contiguous
    assert_close(y, separable_ref(x, dk, pk, strides=2, padding=1), np.float16)
    out = np.empty((2, 4, 4, 4), np.float32)
    assert _fallback.separable_conv2d(x.astype(np.float32), dk, pk, stride=2, padding=1, out=out) is out
    assert_close(out, separable_ref(x, dk, pk, strides=2, padding=1), np.float16)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", FD_CASES[::2], ids=[str(c) for c in FD_CASES[::2]])
def test_backward_finite_differences(rng, case, data_format):
    n, h, w, c, dm, (kh, kw), *_ = case
    kwargs = _geom_kwargs(case, data_format)
    x = rng.standard_normal(_x_shape(n, h, w, c, data_format))
    dk = rng.standard_normal((kh, kw, c, dm))
    pk = rng.standard_normal((1, 1, c * dm, 3))
    bias = rng.standard_normal(3)
    g = rng.standard_normal(separable_ref(x, dk, pk, bias, **kwargs).shape)
    ref = _fd_grads(lambda a, b, p, q: separable_ref(a, b, p, q, **kwargs), (x, dk, pk, bias), g, (0, 1, 2, 3))
    got = _fallback.separable_conv2d_backward(g, x, dk, pk, **kwargs)
    assert isinstance(got, nbconv.SeparableConv2DGrads)
    for actual, expected in zip(got, ref):
        assert actual.dtype == np.float64
        assert_close(actual, expected, tol=1e-9)

    gd = rng.standard_normal(depthwise_ref(x, dk, **kwargs).shape)
    dx, ddk = _fd_grads(lambda a, b: depthwise_ref(a, b, **kwargs), (x, dk), gd, (0, 1))
    got = _fallback.depthwise_conv2d_backward(gd, x, dk, **kwargs)
    assert_close(got.x, dx, tol=1e-9)
    assert_close(got.kernel, ddk, tol=1e-9)
    assert_close(got.bias, _bias_grad(gd, data_format), tol=1e-12)

    pw = rng.standard_normal((c, 4))
    gp = rng.standard_normal(pointwise_ref(x, pw, data_format=data_format).shape)
    dx, dw = _fd_grads(lambda a, b: pointwise_ref(a, b, data_format=data_format), (x, pw), gp, (0, 1))
    got = _fallback.pointwise_conv2d_backward(gp, x, pw, data_format=data_format, wrt=("x", "kernel"))
    assert got.bias is None and got.kernel.shape == pw.shape
    assert_close(got.x, dx, tol=1e-9)
    assert_close(got.kernel, dw, tol=1e-9)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_backward_activation_mask_and_wrt(rng, activation):
    x = rng.standard_normal((2, 6, 5, 3)) * 4
    dk = rng.standard_normal((3, 3, 3, 1))
    pk = rng.standard_normal((3, 4))
    y = separable_ref(x, dk, pk, padding="same", activation=activation)
    g = rng.standard_normal(y.shape)
    keep = (y > 0) & (y < 6) if activation == "relu6" else y > 0
    ref = _fd_grads(lambda a, b, p: separable_ref(a, b, p, padding="same"), (x, dk, pk), g * keep, (0, 1, 2))
    got = _fallback.separable_conv2d_backward(g, x, dk, pk, padding="same", activation=activation, output=y,
                                              wrt=("x", "depthwise_kernel", "pointwise_kernel"))
    assert got.bias is None
    for actual, expected in zip(got[:3], ref):
        assert_close(actual, expected, tol=1e-9)
    only = _fallback.separable_conv2d_backward(g, x, dk, pk, padding="same", activation=activation, output=y,
                                               wrt="bias")
    assert only.x is None and only.depthwise_kernel is None and only.pointwise_kernel is None
    assert_close(only.bias, (g * keep).sum(axis=(0, 1, 2)), tol=1e-12)
