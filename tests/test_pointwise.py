"""nbconv.pointwise_conv2d against the float64 reference and Keras's ops.conv with a 1x1 kernel."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import nbconv
from reference import assert_close, pointwise_ref, random_array, tolerance_for

FORMATS = ["channels_last", "channels_first"]

# (N, H, W, K, F): size-1 and odd dims, channel/filter counts around the kernels' block sizes
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 1, 1, 5, 3),
    (2, 3, 5, 3, 7),
    (3, 7, 1, 4, 1),
    (1, 9, 9, 16, 16),
    (2, 8, 7, 17, 33),
    (1, 12, 12, 32, 65),
    (1, 16, 16, 24, 130),
    (5, 4, 3, 6, 9),
    (1, 40, 40, 8, 8),
]


def _inputs(rng, shape, data_format, dtype=np.float32, kernel_2d=False):
    n, h, w, k, f = shape
    x = random_array(rng, (n, h, w, k) if data_format == "channels_last" else (n, k, h, w), dtype)
    kernel = random_array(rng, (k, f) if kernel_2d else (1, 1, k, f), dtype)
    return x, kernel


@pytest.mark.parametrize("kernel_2d", [False, True])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_pointwise_grid(rng, shape, data_format, kernel_2d):
    x, kernel = _inputs(rng, shape, data_format, kernel_2d=kernel_2d)
    y = nbconv.pointwise_conv2d(x, kernel, data_format=data_format)
    assert y.dtype == np.float32
    assert_close(y, pointwise_ref(x, kernel, data_format=data_format))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", [None, "linear", "relu", "relu6"])
def test_pointwise_bias_and_activation(rng, data_format, activation):
    x, kernel = _inputs(rng, (2, 5, 6, 7, 9), data_format)
    x *= 4
    bias = random_array(rng, (9,), np.float32, -3, 3)
    kwargs = dict(data_format=data_format, activation=activation)
    assert_close(nbconv.pointwise_conv2d(x, kernel, bias, **kwargs), pointwise_ref(x, kernel, bias, **kwargs))
    assert_close(nbconv.pointwise_conv2d(x, kernel, **kwargs), pointwise_ref(x, kernel, **kwargs))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_pointwise_dtypes(rng, dtype, data_format):
    x, kernel = _inputs(rng, (2, 5, 6, 7, 9), data_format, dtype)
    bias = random_array(rng, (9,), dtype)
    y = nbconv.pointwise_conv2d(x, kernel, bias, data_format=data_format, activation="relu")
    assert y.dtype == dtype
    assert_close(y, pointwise_ref(x, kernel, bias, data_format=data_format, activation="relu"))


@pytest.mark.parametrize(
    "dtypes",
    [
        (np.float32, np.float64, None),
        (np.float16, np.float32, None),
        (np.float16, np.float16, np.float64),
        (np.float64, np.float16, np.float32),
        (np.float16, np.float16, np.float32),
    ],
)
def test_pointwise_mixed_dtypes(rng, dtypes):
    xd, kd, bd = dtypes
    x = random_array(rng, (2, 4, 5, 6), xd)
    kernel = random_array(rng, (1, 1, 6, 3), kd)
    bias = None if bd is None else random_array(rng, (3,), bd)
    y = nbconv.pointwise_conv2d(x, kernel, bias)
    assert y.dtype == np.result_type(*[d for d in dtypes if d is not None])
    assert_close(y, pointwise_ref(x, kernel, bias))


DTYPES = st.sampled_from([np.float32, np.float32, np.float64, np.float16])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3), h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 40), f=st.integers(1, 80),
    data_format=st.sampled_from(FORMATS), dtypes=st.tuples(DTYPES, DTYPES), use_bias=st.booleans(),
    kernel_2d=st.booleans(), activation=st.sampled_from([None, "linear", "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pointwise_property(n, h, w, k, f, data_format, dtypes, use_bias, kernel_2d, activation, seed):
    rng = np.random.default_rng(seed)
    xd, kd = dtypes
    x = random_array(rng, (n, h, w, k) if data_format == "channels_last" else (n, k, h, w), xd)
    kernel = random_array(rng, (k, f) if kernel_2d else (1, 1, k, f), kd)
    bias = random_array(rng, (f,), xd) if use_bias else None
    kwargs = dict(data_format=data_format, activation=activation)
    y = nbconv.pointwise_conv2d(x, kernel, bias, **kwargs)
    assert y.dtype == np.result_type(xd, kd)
    assert_close(y, pointwise_ref(x, kernel, bias, **kwargs), tol=tolerance_for(y.dtype))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 9, 8, 16, 33)])
def test_pointwise_matches_keras(rng, keras_ops, shape, data_format):
    x, kernel = _inputs(rng, shape, data_format)
    expected = np.asarray(keras_ops.convert_to_numpy(keras_ops.conv(x, kernel, data_format=data_format)))
    assert_close(nbconv.pointwise_conv2d(x, kernel, data_format=data_format), expected, tol=2e-5)
    assert_close(pointwise_ref(x, kernel, data_format=data_format), expected, tol=2e-5)
