"""nbconv.separable_conv2d against the float64 reference and Keras's ops.separable_conv."""
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import nbconv
from reference import (
    assert_close,
    depthwise_ref,
    output_size,
    pair,
    pointwise_ref,
    random_array,
    resolve_padding,
    separable_ref,
    tolerance_for,
)

FORMATS = ["channels_last", "channels_first"]

# (N, H, W, C, dm, F, k, strides, dilation, padding): odd and size-1 dims, every kernel size 1..7,
# unequal strides and dilations, stride+dilation together and every padding form.
GEOMETRIES = [
    (1, 1, 1, 1, 1, 1, 1, 1, 1, "valid"),
    (1, 1, 1, 3, 1, 2, 3, 1, 1, "same"),
    (2, 5, 7, 3, 1, 4, 3, 1, 1, "valid"),
    (2, 5, 7, 3, 2, 4, 3, 1, 1, "same"),
    (1, 8, 8, 4, 1, 8, 2, 1, 1, "same"),
    (3, 9, 6, 2, 3, 5, 4, 2, 1, "same"),
    (1, 11, 9, 5, 1, 3, 5, (2, 1), 1, "valid"),
    (2, 10, 10, 3, 2, 7, 5, 2, 2, "same"),
    (1, 13, 12, 2, 1, 4, 6, (1, 3), 1, "same"),
    (1, 14, 15, 3, 1, 2, 7, 1, (2, 1), "same"),
    (2, 9, 9, 4, 1, 6, 3, 3, 2, "valid"),
    (1, 7, 7, 6, 1, 9, 3, (3, 2), (1, 2), "same"),
    (2, 6, 5, 3, 1, 4, 3, 1, 1, 1),
    (2, 6, 5, 3, 2, 4, 3, 2, 1, (1, 2)),
    (1, 5, 8, 2, 1, 3, 3, 1, 1, ((0, 2), (1, 0))),
    (1, 5, 8, 2, 2, 3, 5, (2, 1), (1, 2), ((2, 1), (3, 0))),
    (1, 4, 4, 3, 1, 5, 7, 1, 1, 3),
    (1, 1, 9, 2, 1, 3, (1, 3), 1, 1, "valid"),
    (1, 3, 3, 1, 4, 2, 3, 1, 1, 0),
    (2, 12, 11, 17, 1, 33, 3, 2, 1, "same"),
    (1, 16, 16, 32, 1, 70, 3, 1, 1, "same"),
    # batches of 4+ (row tiles rather than one shared intermediate), strided and asymmetric
    (5, 9, 8, 3, 2, 7, 3, 1, 1, "same"),
    (4, 11, 10, 5, 1, 9, 5, (2, 1), (1, 2), ((2, 0), (1, 3))),
    (8, 20, 20, 16, 1, 32, 3, 2, 1, 1),
    # wide rows: one-row tiles, few of them, filters split into blocks
    (1, 3, 1024, 256, 1, 128, 3, 1, 1, "same"),
    # many channels: C*dm beyond one inner block, and beyond 4096
    (1, 4, 4, 260, 2, 5, 3, 1, 1, "same"),
    (1, 3, 3, 4100, 1, 3, 3, 1, 1, 1),
    # windows mostly in the padding, strides beyond the input
    (1, 1, 1, 2, 1, 3, 7, 1, 3, "same"),
    (1, 2, 3, 2, 1, 2, 1, 4, 1, 5),
    (2, 5, 5, 3, 1, 2, 3, 10, 1, "same"),
    (1, 3, 4, 2, 1, 2, 2, (5, 7), (2, 3), ((4, 4), (6, 5))),
]


def _geometry_inputs(rng, geom, data_format, dtype=np.float32, pk_2d=False):
    n, h, w, c, dm, f, k, strides, dilation, padding = geom
    kh, kw = pair(k)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x = random_array(rng, shape, dtype)
    dk = random_array(rng, (kh, kw, c, dm), dtype)
    pk = random_array(rng, (c * dm, f) if pk_2d else (1, 1, c * dm, f), dtype)
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    return x, dk, pk, kwargs


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_separable_grid(rng, geom, data_format):
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    y = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    assert y.dtype == np.float32
    assert_close(y, separable_ref(x, dk, pk, **kwargs))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", [None, "linear", "relu", "relu6"])
@pytest.mark.parametrize("depthwise_activation", [None, "relu", "relu6"])
def test_separable_bias_and_activations(rng, data_format, activation, depthwise_activation):
    geom = (2, 7, 6, 5, 2, 6, 3, (2, 1), 1, "same")
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    x *= 4  # outputs well beyond 6 so relu6 clips
    bias = random_array(rng, (6,), np.float32, -3, 3)
    dbias = random_array(rng, (10,), np.float32, -2, 2)
    kwargs.update(activation=activation, depthwise_activation=depthwise_activation)
    y = nbconv.separable_conv2d(x, dk, pk, bias, depthwise_bias=dbias, **kwargs)
    assert_close(y, separable_ref(x, dk, pk, bias, depthwise_bias=dbias, **kwargs))
    y = nbconv.separable_conv2d(x, dk, pk, bias=bias, **kwargs)
    assert_close(y, separable_ref(x, dk, pk, bias, **kwargs))
    y = nbconv.separable_conv2d(x, dk, pk, depthwise_bias=dbias, **kwargs)
    assert_close(y, separable_ref(x, dk, pk, depthwise_bias=dbias, **kwargs))


@pytest.mark.parametrize("data_format", FORMATS)
def test_separable_2d_pointwise_kernel(rng, data_format):
    geom = (2, 6, 7, 3, 2, 5, 3, 1, 1, "same")
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format, pk_2d=True)
    y = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    assert_close(y, separable_ref(x, dk, pk, **kwargs))
    assert np.array_equal(y, nbconv.separable_conv2d(x, dk, pk.reshape(1, 1, *pk.shape), **kwargs))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_separable_dtypes(rng, dtype, data_format):
    geom = (2, 7, 6, 4, 2, 5, 3, 2, 1, "same")
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format, dtype)
    bias = random_array(rng, (5,), dtype)
    y = nbconv.separable_conv2d(x, dk, pk, bias, activation="relu", **kwargs)
    assert y.dtype == dtype
    assert_close(y, separable_ref(x, dk, pk, bias, activation="relu", **kwargs))


@pytest.mark.parametrize(
    "dtypes",
    [
        (np.float32, np.float64, np.float32, None),
        (np.float16, np.float32, np.float16, np.float16),
        (np.float16, np.float16, np.float16, np.float64),
        (np.float64, np.float32, np.float16, np.float32),
        (np.float16, np.float16, np.float32, None),
    ],
)
def test_separable_mixed_dtypes(rng, dtypes):
    xd, dkd, pkd, bd = dtypes
    x = random_array(rng, (2, 6, 5, 3), xd)
    dk = random_array(rng, (3, 3, 3, 2), dkd)
    pk = random_array(rng, (1, 1, 6, 4), pkd)
    bias = None if bd is None else random_array(rng, (4,), bd)
    expected_dtype = np.result_type(*[d for d in dtypes if d is not None])
    y = nbconv.separable_conv2d(x, dk, pk, bias, padding="same")
    assert y.dtype == expected_dtype
    assert_close(y, separable_ref(x, dk, pk, bias, padding="same"))


def test_separable_depthwise_bias_dtype_promotes(rng):
    x = random_array(rng, (1, 5, 5, 2), np.float32)
    dk = random_array(rng, (3, 3, 2, 1), np.float32)
    pk = random_array(rng, (1, 1, 2, 3), np.float32)
    dbias = random_array(rng, (2,), np.float64)
    y = nbconv.separable_conv2d(x, dk, pk, depthwise_bias=dbias)
    assert y.dtype == np.float64
    assert_close(y, separable_ref(x, dk, pk, depthwise_bias=dbias))


# --- hypothesis ------------------------------------------------------------

PADDINGS = st.one_of(
    st.sampled_from(["valid", "same", "VALID", "Same"]),
    st.integers(0, 3),
    st.tuples(st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3))),
)
INTS_OR_PAIRS = lambda hi: st.one_of(st.integers(1, hi), st.tuples(st.integers(1, hi), st.integers(1, hi)))  # noqa: E731
DTYPES = st.sampled_from([np.float32, np.float32, np.float64, np.float16])
ACTS = st.sampled_from([None, "linear", "relu", "relu6"])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 10), dm=st.integers(1, 3),
    f=st.integers(1, 24), kh=st.integers(1, 7), kw=st.integers(1, 7), strides=INTS_OR_PAIRS(3),
    dilation=INTS_OR_PAIRS(3), padding=PADDINGS, data_format=st.sampled_from(FORMATS),
    dtypes=st.tuples(DTYPES, DTYPES, DTYPES), use_bias=st.booleans(), use_dbias=st.booleans(),
    activation=ACTS, dact=ACTS, pk_2d=st.booleans(), seed=st.integers(0, 2**32 - 1),
)
def test_separable_property(n, h, w, c, dm, f, kh, kw, strides, dilation, padding, data_format, dtypes, use_bias,
                            use_dbias, activation, dact, pk_2d, seed):
    rng = np.random.default_rng(seed)
    xd, dkd, pkd = dtypes
    x = random_array(rng, (n, h, w, c) if data_format == "channels_last" else (n, c, h, w), xd)
    dk = random_array(rng, (kh, kw, c, dm), dkd)
    pk = random_array(rng, (c * dm, f) if pk_2d else (1, 1, c * dm, f), pkd)
    bias = random_array(rng, (f,), xd) if use_bias else None
    dbias = random_array(rng, (c * dm,), dkd) if use_dbias else None
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format,
                  activation=activation, depthwise_activation=dact, depthwise_bias=dbias)
    (pt, pb), (pl, pr) = resolve_padding(padding, h, w, kh, kw, strides, dilation)
    sh, sw = pair(strides)
    dh, dw = pair(dilation)
    if output_size(h, kh, sh, dh, pt, pb) == 0 or output_size(w, kw, sw, dw, pl, pr) == 0:
        event("empty output: ValueError")
        with pytest.raises(ValueError, match="positive size"):
            nbconv.separable_conv2d(x, dk, pk, bias, **kwargs)
        return
    y = nbconv.separable_conv2d(x, dk, pk, bias, **kwargs)
    result_dtype = np.result_type(*[a.dtype for a in (x, dk, pk, bias, dbias) if a is not None])
    assert y.dtype == result_dtype
    # the reference reads the same (exactly representable) values; float16 is only rounded at the end
    assert_close(y, separable_ref(x, dk, pk, bias, **kwargs), tol=tolerance_for(result_dtype))


# --- Keras -----------------------------------------------------------------

KERAS_CASES = [
    # (H, W, C, dm, F, k, strides, dilation, padding)
    (7, 7, 3, 1, 4, 3, 1, 1, "valid"),
    (8, 9, 3, 2, 5, 3, 1, 1, "same"),
    (9, 9, 4, 1, 6, 3, 2, 1, "same"),
    (8, 8, 4, 1, 6, 3, 2, 1, "same"),
    (10, 9, 2, 3, 4, 5, (1, 2), 1, "same"),
    (10, 9, 2, 1, 4, 2, (2, 1), 1, "valid"),
    (11, 12, 3, 1, 5, 3, 1, 2, "same"),
    (11, 12, 3, 1, 5, 3, 1, (2, 3), "valid"),
    (12, 11, 3, 2, 4, 3, 2, 2, "same"),
    (13, 12, 2, 1, 3, 3, (2, 3), (2, 1), "same"),
    (13, 12, 2, 1, 3, 4, 3, 2, "valid"),
    (5, 6, 3, 1, 2, 7, 1, 1, "same"),
    (1, 1, 3, 1, 2, 3, 1, 1, "same"),
]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", KERAS_CASES, ids=[str(c) for c in KERAS_CASES])
def test_separable_matches_keras(rng, keras_ops, case, data_format):
    h, w, c, dm, f, k, strides, dilation, padding = case
    x = random_array(rng, (2, h, w, c) if data_format == "channels_last" else (2, c, h, w))
    dk = random_array(rng, (k, k, c, dm))
    pk = random_array(rng, (1, 1, c * dm, f))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    expected = np.asarray(keras_ops.convert_to_numpy(keras_ops.separable_conv(x, dk, pk, **kwargs)))
    y = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    assert_close(y, expected, tol=2e-5)
    # and the reference agrees with Keras, so its padding/stride conventions are Keras's
    assert_close(separable_ref(x, dk, pk, **kwargs), expected, tol=2e-5)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("padding", [1, (2, 0), ((0, 2), (3, 1)), ((1, 0), (0, 1))])
@pytest.mark.parametrize("strides, dilation", [(1, 1), ((2, 1), 1), (1, (1, 2)), (2, 2)])
def test_separable_explicit_padding_matches_keras_on_padded_input(rng, keras_ops, padding, strides, dilation,
                                                                  data_format):
    """Explicit zero padding = Keras 'valid' on the input zero-padded by np.pad."""
    x = random_array(rng, (2, 9, 8, 3) if data_format == "channels_last" else (2, 3, 9, 8))
    dk = random_array(rng, (3, 3, 3, 2))
    pk = random_array(rng, (1, 1, 6, 5))
    (pt, pb), (pl, pr) = resolve_padding(padding, 9, 8, 3, 3, strides, dilation)
    spatial = ((pt, pb), (pl, pr))
    pads = ((0, 0),) + spatial + ((0, 0),) if data_format == "channels_last" else ((0, 0), (0, 0)) + spatial
    expected = np.asarray(keras_ops.convert_to_numpy(keras_ops.separable_conv(
        np.pad(x, pads), dk, pk, strides=strides, padding="valid", dilation_rate=dilation, data_format=data_format)))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    assert_close(nbconv.separable_conv2d(x, dk, pk, **kwargs), expected, tol=2e-5)
    assert_close(separable_ref(x, dk, pk, **kwargs), expected, tol=2e-5)


# ---------------------------------------------------------------- work planning (nbconv._plan)

# (N, H, W, C, F, strides): batch 1 and several, pixels above and below the split threshold, filters beyond FB_TARGET
PLAN_SHAPES = [(1, 7, 7, 24, 40, 1), (1, 10, 9, 8, 200, 1), (3, 6, 5, 6, 70, 2), (2, 13, 11, 5, 9, 1),
               (1, 1, 5, 4, 130, 1), (5, 3, 3, 3, 7, 1), (2, 9, 8, 8, 64, 1)]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("tiles", ["one-row", "default"])
@pytest.mark.parametrize("shared_bytes", [0, 1 << 30])
@pytest.mark.parametrize("stream", [False, True])
def test_separable_every_work_plan(rng, data_format, threads, tiles, shared_bytes, stream):
    """Fused and shared modes, pixel and filter splits, one-row tiles, task counts for 1..5 threads; outputs
    written with ordinary or non-temporal stores (aligned rows where F is a multiple of 16, some rows otherwise)."""
    from nbconv import _plan

    # with room, shared mode whatever the tile count
    changes = dict(threads=threads, tiny_macs=0, shared_bytes=shared_bytes, shared_min_channels=1,
                   fused_weight_bytes=0, min_split_pixels=16, min_filter_block=16, filter_block=48,
                   stream_bytes=0 if stream else 1 << 40)
    if tiles == "one-row":
        changes["fused_tile_bytes"] = 1
    with _plan.override(**changes):
        _check_plan_shapes(rng, data_format)


def _check_plan_shapes(rng, data_format):
    for n, h, w, c, f, s in PLAN_SHAPES:
        x, dk, pk, kwargs = _geometry_inputs(rng, (n, h, w, c, 1, f, 3, s, 1, "same"), data_format)
        bias = random_array(rng, (f,), np.float32)
        expected = separable_ref(x, dk, pk, bias, **kwargs)
        assert_close(nbconv.separable_conv2d(x, dk, pk, bias, **kwargs), expected, tol=tolerance_for(np.float32))
        xp = random_array(rng, (n, h, w, c) if data_format == "channels_last" else (n, c, h, w), np.float32)
        assert_close(nbconv.pointwise_conv2d(xp, pk, bias, data_format=data_format),
                     pointwise_ref(xp, pk, bias, data_format=data_format), tol=tolerance_for(np.float32))
        assert_close(nbconv.depthwise_conv2d(x, dk, **kwargs), depthwise_ref(x, dk, **kwargs),
                     tol=tolerance_for(np.float32))


# (N, H, W, C, F, strides, shared mode expected on 2 threads): the default plan where its choice of mode
# matters, at the layers' own sizes
MODE_SHAPES = [
    (4, 28, 28, 256, 256, 1, False),   # weights of 256 KiB fit L2 beside a tile: fused
    (1, 74, 74, 256, 256, 1, False),
    (4, 28, 28, 256, 512, 2, True),    # 512 KiB of weights: shared
    (2, 7, 7, 1024, 1024, 1, True),
    (1, 28, 28, 64, 128, 1, True),     # fewer tiles than two per thread: shared whatever the channels
]


@pytest.mark.parametrize("shape", MODE_SHAPES, ids=[str(s[:6]) for s in MODE_SHAPES])
def test_separable_default_plan_modes(rng, monkeypatch, shape):
    """The default tunables pick the mode the measurements chose (``_plan.Tunables.fused_weight_bytes``), and the
    result matches the reference in either mode."""
    from nbconv import _plan

    n, h, w, c, f, s, shared = shape
    seen = []
    plan = _plan.separable

    def spy(*args):
        result = plan(*args)
        seen.append(result.shared)
        return result
    monkeypatch.setattr(_plan, "separable", spy)
    x, dk, pk, kwargs = _geometry_inputs(rng, (n, h, w, c, 1, f, 3, s, 1, "same"), "channels_last")
    with _plan.override(threads=2):
        y = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    assert seen == [shared]
    assert_close(y, separable_ref(x, dk, pk, **kwargs), tol=tolerance_for(np.float32))


# ---------------------------------------------------------------- out=

CALLS = {
    "separable": lambda x, dk, pk, **kw: nbconv.separable_conv2d(x, dk, pk, padding="same", **kw),
    "depthwise": lambda x, dk, pk, **kw: nbconv.depthwise_conv2d(x, dk, padding="same", **kw),
    "pointwise": lambda x, dk, pk, **kw: nbconv.pointwise_conv2d(x, pk, **kw),
}


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("func", sorted(CALLS))
def test_out_receives_the_result(rng, func, dtype, data_format):
    x, dk, pk, _ = _geometry_inputs(rng, (2, 9, 7, 5, 1, 6, 3, 1, 1, "same"), data_format, dtype)
    expected = CALLS[func](x, dk, pk, data_format=data_format)
    out = np.full(expected.shape, np.nan, dtype)
    got = CALLS[func](x, dk, pk, data_format=data_format, out=out)
    assert got is out
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("func", sorted(CALLS))
def test_out_rejects_wrong_arrays(rng, func):
    x, dk, pk, _ = _geometry_inputs(rng, (1, 6, 6, 4, 1, 4, 3, 1, 1, "same"), "channels_last")
    shape = CALLS[func](x, dk, pk).shape
    bad = {
        "shape": np.empty(shape[:-1] + (shape[-1] + 1,), np.float32),
        "dtype": np.empty(shape, np.float64),
        "order": np.empty(shape[::-1], np.float32).T,
        "list": np.empty(shape, np.float32).tolist(),
    }
    readonly = np.empty(shape, np.float32)
    readonly.flags.writeable = False
    bad["readonly"] = readonly
    for why, out in bad.items():
        with pytest.raises(ValueError,
                           match=r"Expected `out` to be a writeable C-contiguous ndarray .* Received: out="):
            CALLS[func](x, dk, pk, out=out)
    # the kernels read the input while writing out: no overlap
    big = np.zeros((2,) + shape, np.float32)
    with pytest.raises(ValueError,
                       match="Expected `out` to share no memory with the inputs. Received: out overlapping x"):
        CALLS[func](big[0][..., :4] if func != "pointwise" else big[0], dk, pk, out=big[0])
