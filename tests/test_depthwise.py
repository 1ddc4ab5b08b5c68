"""nbconv.depthwise_conv2d against the float64 reference and Keras's ops.depthwise_conv."""
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

import nbconv
from reference import (assert_close, assert_within, bf16_separable_bound, depthwise_ref, output_size, pair,
                       random_array, resolve_padding, separable_ref, tolerance_for)

FORMATS = ["channels_last", "channels_first"]

# (N, H, W, C, dm, k, strides, dilation, padding)
GEOMETRIES = [
    (1, 1, 1, 1, 1, 1, 1, 1, "valid"),
    (1, 1, 1, 3, 2, 3, 1, 1, "same"),
    (2, 5, 7, 3, 1, 3, 1, 1, "valid"),
    (2, 5, 7, 3, 2, 3, 1, 1, "same"),
    (1, 8, 8, 4, 1, 2, 1, 1, "same"),
    (3, 9, 6, 2, 3, 4, 2, 1, "same"),
    (1, 11, 9, 5, 1, 5, (2, 1), 1, "valid"),
    (2, 10, 10, 3, 2, 5, 2, 2, "same"),
    (1, 13, 12, 2, 1, 6, (1, 3), 1, "same"),
    (1, 14, 15, 3, 1, 7, 1, (2, 1), "same"),
    (2, 9, 9, 4, 1, 3, 3, 2, "valid"),
    (1, 7, 7, 6, 1, 3, (3, 2), (1, 2), "same"),
    (2, 6, 5, 3, 1, 3, 1, 1, 1),
    (2, 6, 5, 3, 2, 3, 2, 1, (1, 2)),
    (1, 5, 8, 2, 1, 3, 1, 1, ((0, 2), (1, 0))),
    (1, 5, 8, 2, 2, 5, (2, 1), (1, 2), ((2, 1), (3, 0))),
    (1, 4, 4, 3, 1, 7, 1, 1, 3),
    (1, 1, 9, 2, 1, (1, 3), 1, 1, "valid"),
    (1, 3, 3, 1, 4, 3, 1, 1, 0),
    (2, 12, 11, 17, 1, 3, 2, 1, "same"),
    (1, 16, 16, 40, 2, 3, 1, 1, "same"),
    (5, 9, 8, 3, 2, 3, 1, 1, "same"),
    (8, 20, 20, 16, 1, 3, 2, 1, 1),
    (1, 3, 1024, 256, 1, 3, 1, 1, "same"),
    (1, 4, 4, 260, 2, 3, 1, 1, "same"),
    (1, 3, 3, 4100, 1, 3, 1, 1, 1),
    (1, 1, 1, 2, 1, 7, 1, 3, "same"),
    (1, 2, 3, 2, 1, 1, 4, 1, 5),
    (2, 5, 5, 3, 1, 3, 10, 1, "same"),
    (1, 3, 4, 2, 1, 2, (5, 7), (2, 3), ((4, 4), (6, 5))),
]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("padding", ["same", "valid", 1, ((0, 2), (2, 1))])
def test_depthwise_3x3_all_widths(rng, data_format, strides, padding):
    """The 3x3 kernels' multi-pixel blocks: every width from 1 to 20 plus a few beyond, C*dm small and large."""
    for w in list(range(1, 21)) + [31, 33, 64]:
        for c, dm in ((1, 1), (3, 2), (16, 1), (40, 3)):
            geom = (2, 5, w, c, dm, 3, strides, 1, padding)
            if padding == "valid" and w < 3:
                continue
            x, kernel, kwargs = _inputs(rng, geom, data_format)
            bias = random_array(rng, (c * dm,))
            y = nbconv.depthwise_conv2d(x, kernel, bias, activation="relu", **kwargs)
            assert_close(y, depthwise_ref(x, kernel, bias, activation="relu", **kwargs))


@pytest.mark.parametrize("geom", [
    (2, 7, 7, 512, 1, 3, 1, 1, "same"),         # 2 KiB between output pixels
    (1, 9, 10, 1024, 1, 3, 2, 1, "same"),       # 4 KiB, stride 2
    (1, 6, 5, 512, 2, 3, 1, 2, "valid"),        # depth multiplier (C*dm = 1024), dilation 2
    (1, 5, 6, 2048, 1, 5, 1, 1, 2),             # 8 KiB, the general (5x5) micro-kernel
    (1, 9, 9, 768, 1, 3, 1, 1, "same"),         # 3 KiB: not a power of two, all rows per call
], ids=str)
def test_depthwise_power_of_two_pixel_strides(rng, geom):
    """NHWC outputs whose pixels lie a power of two of 2 KiB or more apart are stored one row per micro-kernel
    call (the per-row path of ``dw_packed_rows``), with bias and activation, alone and inside the fused kernel."""
    x, kernel, kwargs = _inputs(rng, geom, "channels_last")
    bias = random_array(rng, (kernel.shape[2] * kernel.shape[3],))
    y = nbconv.depthwise_conv2d(x, kernel, bias, activation="relu6", **kwargs)
    assert_close(y, depthwise_ref(x, kernel, bias, activation="relu6", **kwargs))
    pointwise = random_array(rng, (1, 1, bias.shape[0], 24))
    z = nbconv.separable_conv2d(x, kernel, pointwise, **kwargs)
    assert_close(z, separable_ref(x, kernel, pointwise, **kwargs))


def _inputs(rng, geom, data_format, dtype=np.float32):
    n, h, w, c, dm, k, strides, dilation, padding = geom
    kh, kw = pair(k)
    x = random_array(rng, (n, h, w, c) if data_format == "channels_last" else (n, c, h, w), dtype)
    kernel = random_array(rng, (kh, kw, c, dm), dtype)
    return x, kernel, dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_depthwise_grid(rng, geom, data_format):
    x, kernel, kwargs = _inputs(rng, geom, data_format)
    y = nbconv.depthwise_conv2d(x, kernel, **kwargs)
    assert y.dtype == np.float32
    assert_close(y, depthwise_ref(x, kernel, **kwargs))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", [None, "linear", "relu", "relu6"])
def test_depthwise_bias_and_activation(rng, data_format, activation):
    x, kernel, kwargs = _inputs(rng, (2, 7, 6, 5, 2, 3, (1, 2), 1, "same"), data_format)
    x *= 5  # outputs beyond 6 so relu6 clips
    bias = random_array(rng, (10,), np.float32, -3, 3)
    y = nbconv.depthwise_conv2d(x, kernel, bias, activation=activation, **kwargs)
    assert_close(y, depthwise_ref(x, kernel, bias, activation=activation, **kwargs))
    y = nbconv.depthwise_conv2d(x, kernel, activation=activation, **kwargs)
    assert_close(y, depthwise_ref(x, kernel, activation=activation, **kwargs))


def test_depthwise_channel_order_is_c_times_dm_plus_m(rng):
    """Output channel c*dm + m comes from input channel c and kernel[..., c, m] (Keras's order)."""
    c, dm = 3, 2
    x = np.zeros((1, 3, 3, c), np.float32)
    x[0, 1, 1, 1] = 1.0  # only input channel 1 is non-zero
    kernel = np.zeros((1, 1, c, dm), np.float32)
    kernel[0, 0, 1, 0], kernel[0, 0, 1, 1] = 2.0, 3.0
    y = nbconv.depthwise_conv2d(x, kernel)
    expected = np.zeros((1, 3, 3, c * dm))
    expected[0, 1, 1, 1 * dm + 0], expected[0, 1, 1, 1 * dm + 1] = 2.0, 3.0
    assert np.array_equal(y, expected)
    assert_close(y, depthwise_ref(x, kernel))


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_depthwise_dtypes(rng, dtype, data_format):
    x, kernel, kwargs = _inputs(rng, (2, 7, 6, 4, 2, 3, 2, 1, "same"), data_format, dtype)
    bias = random_array(rng, (8,), dtype)
    y = nbconv.depthwise_conv2d(x, kernel, bias, activation="relu6", **kwargs)
    assert y.dtype == dtype
    assert_close(y, depthwise_ref(x, kernel, bias, activation="relu6", **kwargs))


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
def test_depthwise_mixed_dtypes(rng, dtypes):
    xd, kd, bd = dtypes
    x = random_array(rng, (2, 6, 5, 3), xd)
    kernel = random_array(rng, (3, 3, 3, 2), kd)
    bias = None if bd is None else random_array(rng, (6,), bd)
    y = nbconv.depthwise_conv2d(x, kernel, bias, padding=1)
    assert y.dtype == np.result_type(*[d for d in dtypes if d is not None])
    assert_close(y, depthwise_ref(x, kernel, bias, padding=1))


PADDINGS = st.one_of(
    st.sampled_from(["valid", "same"]),
    st.integers(0, 3),
    st.tuples(st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3))),
)
INTS_OR_PAIRS = lambda hi: st.one_of(st.integers(1, hi), st.tuples(st.integers(1, hi), st.integers(1, hi)))  # noqa: E731
DTYPES = st.sampled_from([np.float32, np.float32, np.float64, np.float16])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 12), dm=st.integers(1, 3),
    kh=st.integers(1, 7), kw=st.integers(1, 7), strides=INTS_OR_PAIRS(3), dilation=INTS_OR_PAIRS(3),
    padding=PADDINGS, data_format=st.sampled_from(FORMATS), dtypes=st.tuples(DTYPES, DTYPES),
    use_bias=st.booleans(), activation=st.sampled_from([None, "linear", "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_depthwise_property(n, h, w, c, dm, kh, kw, strides, dilation, padding, data_format, dtypes, use_bias,
                            activation, seed):
    rng = np.random.default_rng(seed)
    xd, kd = dtypes
    x = random_array(rng, (n, h, w, c) if data_format == "channels_last" else (n, c, h, w), xd)
    kernel = random_array(rng, (kh, kw, c, dm), kd)
    bias = random_array(rng, (c * dm,), kd) if use_bias else None
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format,
                  activation=activation)
    (pt, pb), (pl, pr) = resolve_padding(padding, h, w, kh, kw, strides, dilation)
    sh, sw = pair(strides)
    dh, dw = pair(dilation)
    if output_size(h, kh, sh, dh, pt, pb) == 0 or output_size(w, kw, sw, dw, pl, pr) == 0:
        event("empty output: ValueError")
        with pytest.raises(ValueError, match="positive size"):
            nbconv.depthwise_conv2d(x, kernel, bias, **kwargs)
        return
    y = nbconv.depthwise_conv2d(x, kernel, bias, **kwargs)
    assert y.dtype == np.result_type(xd, kd)
    assert_close(y, depthwise_ref(x, kernel, bias, **kwargs), tol=tolerance_for(y.dtype))


KERAS_CASES = [
    # (H, W, C, dm, k, strides, dilation, padding)
    (7, 7, 3, 1, 3, 1, 1, "valid"),
    (8, 9, 3, 2, 3, 1, 1, "same"),
    (9, 9, 4, 1, 3, 2, 1, "same"),
    (8, 8, 4, 3, 3, 2, 1, "same"),
    (10, 9, 2, 3, 5, (1, 2), 1, "same"),
    (10, 9, 2, 1, 2, (2, 1), 1, "valid"),
    (11, 12, 3, 1, 3, 1, 2, "same"),
    (11, 12, 3, 1, 3, 1, (2, 3), "valid"),
    (12, 11, 3, 2, 3, 2, 2, "same"),
    (13, 12, 2, 1, 3, (2, 3), (2, 1), "same"),
    (13, 12, 2, 2, 4, 3, 2, "valid"),
    (5, 6, 3, 1, 7, 1, 1, "same"),
    (1, 1, 3, 2, 3, 1, 1, "same"),
]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("case", KERAS_CASES, ids=[str(c) for c in KERAS_CASES])
def test_depthwise_matches_keras(rng, keras_ops, case, data_format):
    h, w, c, dm, k, strides, dilation, padding = case
    x = random_array(rng, (2, h, w, c) if data_format == "channels_last" else (2, c, h, w))
    kernel = random_array(rng, (k, k, c, dm))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    expected = np.asarray(keras_ops.convert_to_numpy(keras_ops.depthwise_conv(x, kernel, **kwargs)))
    y = nbconv.depthwise_conv2d(x, kernel, **kwargs)
    assert_close(y, expected, tol=2e-5)
    assert_close(depthwise_ref(x, kernel, **kwargs), expected, tol=2e-5)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("padding", [1, (2, 0), ((0, 2), (3, 1)), ((1, 0), (0, 1))])
@pytest.mark.parametrize("strides, dilation", [(1, 1), ((2, 1), 1), (1, (1, 2)), (2, 2)])
def test_depthwise_explicit_padding_matches_keras_on_padded_input(rng, keras_ops, padding, strides, dilation,
                                                                  data_format):
    """Explicit zero padding = Keras 'valid' on the input zero-padded by np.pad."""
    x = random_array(rng, (2, 9, 8, 3) if data_format == "channels_last" else (2, 3, 9, 8))
    kernel = random_array(rng, (3, 3, 3, 2))
    (pt, pb), (pl, pr) = resolve_padding(padding, 9, 8, 3, 3, strides, dilation)
    spatial = ((pt, pb), (pl, pr))
    pads = ((0, 0),) + spatial + ((0, 0),) if data_format == "channels_last" else ((0, 0), (0, 0)) + spatial
    expected = np.asarray(keras_ops.convert_to_numpy(keras_ops.depthwise_conv(
        np.pad(x, pads), kernel, strides=strides, padding="valid", dilation_rate=dilation, data_format=data_format)))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format)
    assert_close(nbconv.depthwise_conv2d(x, kernel, **kwargs), expected, tol=2e-5)
    assert_close(depthwise_ref(x, kernel, **kwargs), expected, tol=2e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("c, dm", [(1, 1), (16, 1), (37, 1), (5, 3), (24, 2), (7, 4)])
def test_pack_rows_layout(rng, dtype, channels_last, c, dm):
    """The channel-blocked packed rows the micro-kernels read, built element by element in NumPy.

    The scratch lies inside a NaN-filled buffer: a store before or after its
    span, or a read of padding from outside the input, shows as a changed
    guard or a NaN in the packed rows.
    """
    from nbconv._depthwise import pack_rows, pack_rows_blocks, pack_rows_nchw
    from nbconv._simd import lanes_of

    lanes = lanes_of(dtype)
    h, w, pt, pl, pr0, nrows = 4, 37, 1, 2, 0, 6
    wp = w + 3  # two zero columns on the left, one on the right
    x = random_array(rng, (h, w, c) if channels_last else (c, h, w), dtype)
    cm = c * dm
    nb = -(-cm // lanes)
    span = nb * nrows * wp * lanes
    buf = np.full(span + 2 * lanes, np.nan, dtype)
    if channels_last:
        pack_rows(x, dm, pr0, nrows, pt, pl, wp, lanes, buf[lanes:lanes + span])
    else:
        pack_rows_nchw(x, dm, pr0, nrows, pt, pl, wp, lanes, buf[lanes:lanes + span], 0, nb)
    assert np.isnan(buf[:lanes]).all() and np.isnan(buf[lanes + span:]).all()

    xh = x if channels_last else x.transpose(1, 2, 0)
    expected = np.zeros((nb, nrows, wp, lanes), dtype)
    for r in range(nrows):
        ih = pr0 + r - pt
        for col in range(wp):
            iw = col - pl
            if 0 <= ih < h and 0 <= iw < w:
                for k in range(cm):
                    expected[k // lanes, r, col, k % lanes] = xh[ih, iw, k // dm]
    np.testing.assert_array_equal(buf[lanes:lanes + span].reshape(expected.shape), expected)

    # one task's blocks of channels only (a call split by channel groups): the others stay as they were
    if nb > 1:
        b0, b1 = 1, nb
        buf[:] = np.nan
        (pack_rows_blocks if channels_last else pack_rows_nchw)(x, dm, pr0, nrows, pt, pl, wp, lanes,
                                                               buf[lanes:lanes + span], b0, b1)
        got = buf[lanes:lanes + span].reshape(expected.shape)
        assert np.isnan(buf[:lanes]).all() and np.isnan(buf[lanes + span:]).all()
        assert np.isnan(got[:b0]).all()
        np.testing.assert_array_equal(got[b0:b1], expected[b0:b1])


# (N, H, W, C, dm, k, strides, dilation, padding): a few row tiles at most, so the tasks are channel groups
GROUP_GEOMETRIES = [
    (1, 7, 7, 72, 1, 3, 1, 1, "same"),          # 72 channels: groups of 16, the last one a masked half vector
    (1, 6, 9, 20, 3, 3, 2, 1, "same"),          # C*dm = 60 from a depth multiplier
    (2, 5, 40, 48, 1, 3, 1, 1, "same"),         # 40-pixel rows: bfloat16 input read in place, with strips
    (1, 5, 6, 33, 1, 5, 1, 2, 2),               # the general micro-kernel, 33 channels
]


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", GROUP_GEOMETRIES, ids=str)
def test_depthwise_channel_groups(rng, geom, data_format, dtype):
    """Calls with few row tiles split their tasks by groups of channels (``_plan.Tunables.channel_group``),
    alone and in the fused kernel's shared phase: every group packs and computes only its channels, each
    output element written once, as in one task."""
    from nbconv import _plan

    x, kernel, kwargs = _inputs(rng, geom, data_format)
    bias = random_array(rng, (kernel.shape[2] * kernel.shape[3],))
    pointwise = random_array(rng, (1, 1, bias.shape[0], 24))
    if dtype == "bfloat16":
        x, kernel, bias, pointwise = (nbconv.as_bfloat16(a) for a in (x, kernel, bias, pointwise))
    ref = [np.asarray(a, np.float64) for a in (x, kernel, bias, pointwise)]
    with _plan.override(threads=2, tiny_macs=0, channel_group=16):
        plan = _plan.depthwise(nbconv._args.depthwise_geometry(x, kernel, kwargs["strides"], kwargs["padding"],
                                                               kwargs["dilation_rate"],
                                                               data_format == "channels_last"), 4)
        assert plan.cg < bias.shape[0]
        y = nbconv.depthwise_conv2d(x, kernel, bias, activation="relu", output_dtype=np.float32, **kwargs)
        z = nbconv.separable_conv2d(x, kernel, pointwise, output_dtype=np.float32, **kwargs)
    # the depthwise part computes in float32 from the bfloat16 values; the pointwise part's bfloat16 products
    # have their derived bound
    assert_close(y, depthwise_ref(ref[0], ref[1], ref[2], activation="relu", **kwargs))
    if dtype == "bfloat16":
        bound, _ = bf16_separable_bound(ref[0], ref[1], ref[3], **kwargs)
        assert_within(z, separable_ref(ref[0], ref[1], ref[3], **kwargs), bound, 0.0)
    else:
        assert_close(z, separable_ref(ref[0], ref[1], ref[3], **kwargs))
