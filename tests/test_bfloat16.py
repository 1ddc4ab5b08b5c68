"""bfloat16: the forward functions with bfloat16 products against the float64 reference of the bfloat16-rounded
operands, within the error bound derived in ``reference.bf16_separable_bound``; the backward on bfloat16 inputs."""
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import nbconv
from nbconv import _simd
from reference import (
    U_BF16,
    U_F32,
    assert_within,
    bf16_round,
    bf16_separable_bound,
    depthwise_ref,
    pair,
    pointwise_ref,
    random_array,
    separable_ref,
)
from test_separable import GEOMETRIES, _geometry_inputs

BF16 = np.dtype(ml_dtypes.bfloat16)
FORMATS = ["channels_last", "channels_first"]


def _bf16(*arrays):
    return [None if a is None else np.asarray(a).astype(BF16) for a in arrays]


def _f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


def _abs(a):
    return None if a is None else np.abs(_f64(a))


def _check_separable(y, x, dk, pk, bias=None, dbias=None, bf16_output=True, **kwargs):
    """``y`` against the reference of the (bfloat16-valued) operands, within the derived bound."""
    ref = separable_ref(_f64(x), _f64(dk), _f64(pk), _f64(bias), depthwise_bias=_f64(dbias), **kwargs)
    bound, _ = bf16_separable_bound(_f64(x), _f64(dk), _f64(pk), _f64(bias), depthwise_bias=_f64(dbias), **kwargs)
    assert_within(y, ref, bound, U_BF16 if bf16_output else 0.0)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_separable_grid(rng, geom, data_format):
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    x, dk, pk = _bf16(x, dk, pk)
    y = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    assert y.dtype == BF16
    _check_separable(y, x, dk, pk, **kwargs)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("output_dtype", [None, np.float32])
@pytest.mark.parametrize("geom", [(2, 7, 6, 5, 2, 33, 3, (2, 1), 1, "same"), (1, 9, 9, 17, 1, 70, 3, 1, 2, 1),
                                  (3, 12, 11, 64, 1, 128, 3, 1, 1, "valid"), (1, 7, 7, 300, 1, 100, 3, 1, 1, "same"),
                                  (2, 9, 34, 48, 1, 64, 3, 1, 1, "same"), (1, 12, 70, 16, 1, 40, 3, 2, 1, "same")],
                         ids=str)
def test_separable_packed_and_output_dtype(rng, geom, data_format, packed, output_dtype):
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    x, dk, pk = _bf16(x, dk, pk)
    weights = nbconv.pack_pointwise_kernel(pk) if packed else pk
    y = nbconv.separable_conv2d(x, dk, weights, **kwargs, output_dtype=output_dtype)
    assert y.dtype == (BF16 if output_dtype is None else np.float32)
    _check_separable(y, x, dk, pk, bf16_output=output_dtype is None, **kwargs)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("depthwise_activation", [None, "relu6"])
def test_separable_bias_and_activations(rng, data_format, activation, depthwise_activation):
    x, dk, pk, kwargs = _geometry_inputs(rng, (2, 7, 6, 5, 2, 6, 3, (2, 1), 1, "same"), data_format)
    x, dk, pk = _bf16(x * 4, dk, pk)  # outputs beyond 6, so relu6 clips
    bias = random_array(rng, (6,), np.float32, -3, 3)  # a float32 bias keeps the call in bfloat16
    dbias = random_array(rng, (10,), np.float32, -2, 2)
    kwargs.update(activation=activation, depthwise_activation=depthwise_activation)
    y = nbconv.separable_conv2d(x, dk, pk, bias, depthwise_bias=dbias, **kwargs)
    assert y.dtype == BF16
    _check_separable(y, x, dk, pk, bias, dbias, **kwargs)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("geom", [(2, 9, 8, 12, 2, 40, 3, (2, 1), 1, "same"), (1, 12, 40, 24, 1, 40, 5, 1, 2, "valid")],
                         ids=["3x3-dm2", "5x5-d2"])
def test_bfloat16_weights_and_biases(rng, data_format, with_bias, packed, geom):
    """A bfloat16 model's own operands (depthwise weights and biases in bfloat16, which the kernels read as bits)
    against the reference, and bit for bit what the same values give as float32 operands."""
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    x, dk, pk = _bf16(x * 4, dk, pk)
    bias, dbias = _bf16(random_array(rng, (40,), np.float32, -3, 3), random_array(rng, (24,), np.float32, -2, 2))
    if not with_bias:
        bias = dbias = None
    weights = nbconv.pack_pointwise_kernel(pk) if packed else pk
    kwargs.update(activation="relu6", depthwise_activation="relu")
    y = nbconv.separable_conv2d(x, dk, weights, bias, depthwise_bias=dbias, **kwargs)
    assert y.dtype == BF16
    _check_separable(y, x, dk, pk, bias, dbias, **kwargs)
    f32 = [None if a is None else a.astype(np.float32) for a in (dk, bias, dbias)]
    same = nbconv.separable_conv2d(x, f32[0], weights, f32[1], depthwise_bias=f32[2], precision="bfloat16",
                                    output_dtype=BF16, **kwargs)
    np.testing.assert_array_equal(y.view(np.uint16), same.view(np.uint16))

    conv = {k: kwargs[k] for k in ("strides", "padding", "dilation_rate", "data_format")}
    d = nbconv.depthwise_conv2d(x, dk, dbias, activation="relu", **conv)
    assert d.dtype == BF16
    ref = depthwise_ref(_f64(x), _f64(dk), _f64(dbias), activation="relu", **conv)
    bound = (geom[6] ** 2 + 1) * U_F32 * depthwise_ref(np.abs(_f64(x)), np.abs(_f64(dk)), _abs(dbias), **conv)
    assert_within(d, ref, bound, U_BF16)
    same = nbconv.depthwise_conv2d(x, f32[0], f32[2], activation="relu", precision="bfloat16", output_dtype=BF16,
                                   **conv)
    np.testing.assert_array_equal(d.view(np.uint16), same.view(np.uint16))

    w = pk
    p = nbconv.pointwise_conv2d(d, nbconv.pack_pointwise_kernel(w) if packed else w, bias,
                                data_format=data_format, activation="relu6")
    assert p.dtype == BF16
    ref = pointwise_ref(_f64(d), _f64(w), _f64(bias), data_format=data_format, activation="relu6")
    bound = (w.shape[2] + 1) * U_F32 * pointwise_ref(np.abs(_f64(d)), np.abs(_f64(w)), _abs(bias),
                                                     data_format=data_format)
    assert_within(p, ref, bound, U_BF16)
    same = nbconv.pointwise_conv2d(d, w, f32[1], data_format=data_format, activation="relu6", precision="bfloat16",
                                   output_dtype=BF16)
    np.testing.assert_array_equal(p.view(np.uint16), same.view(np.uint16))


# rows of 32+ output pixels, NHWC, dm = 1: the bits read in place where the taps stay inside the input
# (N, H, W, C, dm, k, strides, dilation, padding)
IN_PLACE = [
    (2, 9, 36, 16, 1, 3, 1, 1, "same"),                 # 3x3 stride 1, one edge column each side
    (1, 8, 67, 17, 1, 3, 2, 1, "same"),                 # stride 2, a masked vector of channels
    (1, 10, 40, 5, 1, 3, 1, 2, "same"),                 # dilation 2: two edge columns each side
    (1, 9, 37, 40, 1, 5, (2, 1), (1, 2), ((2, 1), (3, 0))),  # the general micro-kernel, uneven padding
    (1, 7, 40, 24, 1, (1, 3), 1, 1, "same"),            # no vertical taps
    (1, 12, 33, 8, 1, (3, 1), 1, 1, 1),                 # no horizontal taps, edge columns all padding
    (2, 6, 36, 32, 1, 3, 1, 1, "valid"),                # no edges at all
    (1, 5, 64, 64, 1, 2, 1, 1, "same"),                 # even kernel: padding after only
    (1, 9, 33, 1024, 1, 3, 1, 1, "same"),               # 2 KiB between output pixels: one row per call
    (1, 6, 34, 16, 1, 3, 1, 1, ((0, 3), (5, 0))),       # 5 padding columns: a wide left edge
    (1, 4, 40, 3, 1, 7, 1, 1, "same"),                  # every row reaches into the padding
    (1, 7, 33, 16, 1, 3, (1, 2), 1, ((1, 1), (20, 20))),  # interior narrower than half the row: packed
]


@pytest.mark.parametrize("tile_bytes", [1, 3000, None], ids=["row-tiles", "few-row-tiles", "default-tiles"])
@pytest.mark.parametrize("geom", IN_PLACE, ids=str)
def test_reads_input_in_place(rng, geom, tile_bytes, plan_override):
    """NHWC bfloat16 tiles read the input in place between packed edge strips, and pack the rows that reach into
    the top or bottom padding: tiles of one row, of a few rows (padded and inside rows in one tile) and the
    default, alone and inside the fused kernel (fused and shared modes), against the float64 reference."""
    if tile_bytes is not None:
        plan_override(fused_tile_bytes=tile_bytes)
    n, h, w, c, dm, k, strides, dilation, padding = geom
    kh, kw = pair(k)
    x, dk, pk = _bf16(random_array(rng, (n, h, w, c)), random_array(rng, (kh, kw, c, dm)),
                      random_array(rng, (1, 1, c * dm, 20)))
    bias = random_array(rng, (c * dm,))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation)
    y = nbconv.depthwise_conv2d(x, dk, bias, activation="relu6", output_dtype=np.float32, **kwargs)
    ref = depthwise_ref(_f64(x), _f64(dk), bias, activation="relu6", **kwargs)
    bound = (kh * kw + 1) * U_F32 * depthwise_ref(np.abs(_f64(x)), np.abs(_f64(dk)), np.abs(bias), **kwargs)
    assert_within(y, ref, bound)
    for mode in ({"shared_bytes": 0}, {"shared_bytes": 1 << 30, "shared_min_channels": 0, "fused_weight_bytes": 0}):
        plan_override(**mode)
        z = nbconv.separable_conv2d(x, dk, pk, depthwise_bias=bias, **kwargs)
        _check_separable(z, x, dk, pk, dbias=bias, **kwargs)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", [(2, 7, 6, 5, 1, 0, 3, 1, 1, "same"), (1, 9, 8, 17, 3, 0, 5, (2, 1), (1, 2), 1),
                                  (2, 14, 14, 64, 1, 0, 3, 2, 1, "same"), (1, 3, 3, 300, 2, 0, 3, 1, 1, "valid"),
                                  # NHWC rows of 32+ pixels: the bits read in place between packed edges
                                  (1, 9, 33, 17, 1, 0, 3, 1, 1, "same"), (2, 6, 34, 512, 1, 0, 3, 1, 1, "same"),
                                  (1, 8, 40, 40, 1, 0, 5, (2, 1), (1, 2), ((2, 1), (3, 0)))],
                         ids=str)
@pytest.mark.parametrize("output_dtype", [None, np.float32])
def test_depthwise(rng, geom, data_format, output_dtype):
    n, h, w, c, dm, _, k, strides, dilation, padding = geom
    kh, kw = pair(k)
    shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
    x, dk = _bf16(random_array(rng, shape), random_array(rng, (kh, kw, c, dm)))
    bias = random_array(rng, (c * dm,))
    kwargs = dict(strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format,
                  activation="relu")
    y = nbconv.depthwise_conv2d(x, dk, bias, output_dtype=output_dtype, **kwargs)
    assert y.dtype == (BF16 if output_dtype is None else np.float32)
    ref = depthwise_ref(_f64(x), _f64(dk), bias, **kwargs)
    # float32 sums of kh*kw products, rounded once
    bound = (kh * kw + 1) * U_F32 * depthwise_ref(np.abs(_f64(x)), np.abs(_f64(dk)), np.abs(bias),
                                                  **{**kwargs, "activation": None})
    assert_within(y, ref, bound, U_BF16 if output_dtype is None else 0.0)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kf", [(1, 1), (7, 33), (64, 64), (129, 200), (512, 48)], ids=str)
def test_pointwise(rng, data_format, packed, kf):
    k, f = kf
    shape = (2, 5, 7, k) if data_format == "channels_last" else (2, k, 5, 7)
    x, w = _bf16(random_array(rng, shape), random_array(rng, (1, 1, k, f)))
    bias = random_array(rng, (f,))
    y = nbconv.pointwise_conv2d(x, nbconv.pack_pointwise_kernel(w) if packed else w, bias, data_format=data_format,
                                activation="relu6")
    assert y.dtype == BF16
    ref = pointwise_ref(_f64(x), _f64(w), bias, data_format=data_format, activation="relu6")
    bound = (k + 1) * U_F32 * pointwise_ref(np.abs(_f64(x)), np.abs(_f64(w)), np.abs(bias), data_format=data_format)
    assert_within(y, ref, bound, U_BF16)


@pytest.mark.parametrize("data_format", FORMATS)
def test_float32_inputs_with_bfloat16_products(rng, data_format):
    x, dk, pk, kwargs = _geometry_inputs(rng, (2, 9, 8, 24, 1, 40, 3, 1, 1, "same"), data_format)
    bias = random_array(rng, (40,))
    y = nbconv.separable_conv2d(x, dk, pk, bias, precision="bfloat16", **kwargs)
    assert y.dtype == np.float32
    # the input and the pointwise weights are rounded to bfloat16 (the depthwise weights compute as given)
    _check_separable(y, bf16_round(x), dk, bf16_round(pk), bias, bf16_output=False, **kwargs)
    packed = nbconv.pack_pointwise_kernel(pk, precision="bfloat16")
    assert packed.compute_dtype == BF16
    assert np.array_equal(nbconv.separable_conv2d(x, dk, packed, bias, precision="bfloat16", **kwargs), y)
    p = nbconv.pointwise_conv2d(x, pk, bias, precision="bfloat16", data_format=data_format)
    ref = pointwise_ref(bf16_round(x), bf16_round(pk), bias, data_format=data_format)
    bound = 25 * U_F32 * pointwise_ref(np.abs(bf16_round(x)), np.abs(bf16_round(pk)), np.abs(bias),
                                       data_format=data_format)
    assert_within(p, ref, bound)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("geom", [(2, 9, 8, 24, 1, 40, 3, 1, 1, "same"), (1, 7, 7, 300, 1, 1030, 3, 1, 1, "same"),
                                  (1, 14, 14, 33, 2, 70, 3, 2, 1, "same")], ids=str)
def test_bfloat16_input_with_float32_weights(rng, geom, data_format):
    """A mixed-precision layer's call: bfloat16 activations, float32 variables, precision='bfloat16' (the kernel
    rounds each panel of the pointwise weights as it packs it), a bfloat16 result."""
    x, dk, pk, kwargs = _geometry_inputs(rng, geom, data_format)
    xb = _bf16(x)[0]
    y = nbconv.separable_conv2d(xb, dk, pk, precision="bfloat16", output_dtype=BF16, **kwargs)
    assert y.dtype == BF16
    _check_separable(y, xb, dk, bf16_round(pk), **kwargs)
    p = nbconv.pointwise_conv2d(xb, pk[..., :geom[3], :], precision="bfloat16", output_dtype=BF16,
                                data_format=data_format)
    k = geom[3]
    ref = pointwise_ref(_f64(xb), bf16_round(pk[0, 0, :k]), data_format=data_format)
    bound = (k + 1) * U_F32 * pointwise_ref(np.abs(_f64(xb)), np.abs(bf16_round(pk[0, 0, :k])),
                                            data_format=data_format)
    assert_within(p, ref, bound, U_BF16)


def test_bfloat16_inputs_with_float32_products(rng):
    x, dk, pk, kwargs = _geometry_inputs(rng, (2, 9, 8, 24, 1, 40, 3, 1, 1, "same"), "channels_last")
    x, dk, pk = _bf16(x, dk, pk)
    y = nbconv.separable_conv2d(x, dk, pk, precision="float32", **kwargs)
    assert y.dtype == BF16
    ref = separable_ref(_f64(x), _f64(dk), _f64(pk), **kwargs)
    bound = 40 * U_F32 * separable_ref(np.abs(_f64(x)), np.abs(_f64(dk)), np.abs(_f64(pk)), **kwargs)
    assert_within(y, ref, bound, U_BF16)


def test_mixed_dtypes_promote(rng):
    x, dk, pk, kwargs = _geometry_inputs(rng, (1, 6, 6, 8, 1, 16, 3, 1, 1, "same"), "channels_last")
    xb, dkb, pkb = _bf16(x, dk, pk)
    # bfloat16 with float32 weights promotes to float32 (NumPy's rule for ml_dtypes.bfloat16)
    y = nbconv.separable_conv2d(xb, dk, pk, **kwargs)
    assert y.dtype == np.float32
    ref = separable_ref(_f64(xb), dk, pk, **kwargs)
    assert_within(y, ref, 40 * U_F32 * separable_ref(np.abs(_f64(xb)), np.abs(dk), np.abs(pk), **kwargs))
    # a float32 or float64 bias does not: it is added to float32 sums
    assert nbconv.separable_conv2d(xb, dkb, pkb, np.zeros(16), **kwargs).dtype == BF16
    assert nbconv.depthwise_conv2d(xb, dkb, np.zeros(8, np.float32), **kwargs).dtype == BF16


def test_out_argument(rng):
    x, dk, pk, kwargs = _geometry_inputs(rng, (1, 6, 6, 8, 1, 16, 3, 1, 1, "same"), "channels_last")
    x, dk, pk = _bf16(x, dk, pk)
    expected = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    out = np.empty(expected.shape, BF16)
    assert nbconv.separable_conv2d(x, dk, pk, out=out, **kwargs) is out
    assert np.array_equal(out.view(np.uint16), expected.view(np.uint16))
    out32 = np.empty(expected.shape, np.float32)
    assert nbconv.separable_conv2d(x, dk, pk, out=out32, output_dtype=np.float32, **kwargs) is out32
    with pytest.raises(ValueError, match="Expected `out`.*dtype bfloat16"):
        nbconv.separable_conv2d(x, dk, pk, out=out32, **kwargs)


def test_inputs_not_modified(rng):
    x, dk, pk, kwargs = _geometry_inputs(rng, (2, 9, 9, 20, 2, 30, 3, 2, 1, "same"), "channels_first")
    arrays = _bf16(x, dk, pk)
    copies = [a.copy() for a in arrays]
    nbconv.separable_conv2d(*arrays, **kwargs)
    nbconv.separable_conv2d_backward(np.ones((2, 30, 5, 5), BF16), *arrays, **kwargs)
    for a, c in zip(arrays, copies):
        assert np.array_equal(a.view(np.uint16), c.view(np.uint16))


@pytest.mark.parametrize("data_format", FORMATS)
def test_nan_and_inf_propagate(rng, data_format):
    x, dk, pk, kwargs = _geometry_inputs(rng, (1, 8, 8, 6, 1, 20, 3, 1, 1, "same"), data_format)
    x = x.copy()
    idx = (0, 2, 3, 1) if data_format == "channels_last" else (0, 1, 2, 3)
    x[idx] = np.nan
    idx2 = (0, 6, 6, 4) if data_format == "channels_last" else (0, 4, 6, 6)
    x[idx2] = np.inf
    x, dk, pk = _bf16(x, dk, pk)
    for act in (None, "relu"):
        y = nbconv.separable_conv2d(x, dk, pk, activation=act, **kwargs)
        _check_separable(y, x, dk, pk, activation=act, **kwargs)
        assert np.isnan(y.astype(np.float32)).any()
    d = nbconv.depthwise_conv2d(x, dk, **kwargs)
    ref = depthwise_ref(_f64(x), _f64(dk), **kwargs)
    assert_within(d, ref, 10 * U_F32 * depthwise_ref(np.abs(_f64(x)), np.abs(_f64(dk)), **kwargs), U_BF16)


def test_rounding_to_nearest_even_and_large_values():
    # 1 + 2^-8 is halfway between two bfloat16 values: ties go to the even one (1.0); 1 + 3*2^-9 rounds up
    x = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -9, 3.4e38, -7.0], np.float32).reshape(1, 1, 4, 1)
    w = np.ones((1, 1), np.float32)
    y = nbconv.pointwise_conv2d(x, w, precision="float32", output_dtype=BF16)
    assert y.dtype == BF16
    assert np.array_equal(y.astype(np.float64).ravel(), bf16_round(x.ravel()))
    assert np.isposinf(y.astype(np.float32)[0, 0, 2, 0])  # beyond bfloat16's largest finite value


def test_denormals():
    """bfloat16 denormals (below 2^-126): the products of VDPBF16PS read them as zero, and results stored as
    bfloat16 flush to zero where VCVTNEPS2BF16 rounds them (both documented); elsewhere they are kept."""
    tiny = np.float32(2.0 ** -130)
    x = np.full((1, 2, 2, 4), tiny, np.float32).astype(BF16)
    w = np.ones((4, 3), BF16)
    y = nbconv.pointwise_conv2d(x, w, output_dtype=np.float32)
    if _simd.NATIVE_BF16:
        assert np.all(y == 0)
    else:
        assert np.allclose(y, 4 * float(tiny), rtol=1e-6, atol=0)
    # the depthwise part computes in float32 FMAs and keeps them
    d = nbconv.depthwise_conv2d(x, np.ones((1, 1, 4, 1), BF16), output_dtype=np.float32)
    assert np.allclose(d, float(tiny), rtol=1e-6, atol=0)
    d16 = nbconv.depthwise_conv2d(x, np.ones((1, 1, 4, 1), BF16))
    assert d16.dtype == BF16
    if _simd.NATIVE_BF16:
        assert np.all(d16.astype(np.float32) == 0)
    else:
        assert np.array_equal(d16.view(np.uint16), x.view(np.uint16))
    # casts round as NumPy does on every CPU: a denormal stays one
    cast = nbconv.as_bfloat16(np.full(3, tiny))
    assert np.array_equal(cast.view(np.uint16), np.full(3, tiny).astype(BF16).view(np.uint16))


def _jax_grads(fn, args, cot):
    """float64 jax gradients of ``sum(fn(*args) * cot)`` with respect to every argument."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        return [np.asarray(v, np.float64) for v in jax.grad(lambda *a: jnp.sum(fn(*a) * cot),
                                                            argnums=tuple(range(len(args))))(*args)]


# the last three hold the intermediate whole (nbconv._plan.whole_intermediate); the first three recompute it per
# tile (rows of 32+ pixels read x in place, and the kernel gradient reads the packed rows of the recompute)
@pytest.mark.parametrize("shape", [(2, 8, 7, 6, 2, 9, (2, 1)), (2, 6, 36, 24, 1, 40, 1), (1, 5, 66, 17, 1, 30, 2),
                                   (1, 7, 7, 300, 1, 250, 1), (2, 9, 9, 256, 1, 300, 1),
                                   (2, 8, 7, 130, 2, 260, (2, 1))], ids=str)
@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_separable_backward_within_the_bfloat16_bound(rng, shape, weights):
    """bfloat16 inputs, NHWC: both pointwise products of the backward multiply bfloat16 pairs (dD = G W^T and
    dW = D^T G, with D and G rounded), in the tiled kernel and with the intermediate held whole; also with
    float32 weights beside bfloat16 activations (a mixed policy's), the pointwise weights rounded as they are
    packed, the depthwise ones used as given, float32 gradients.  Against float64 jax gradients of the same
    operands; the bound is each gradient's map applied to absolute values (the same jax gradient of |x|, |dk|,
    |pk| with cotangent |G|), times 3 * 2^-8 for the operands' roundings and the float32 sums, plus 2^-8 of
    |ref| for the rounded result."""
    import keras

    n, h, w, c, dm, f, strides = shape
    kwargs = dict(strides=strides, padding="same", dilation_rate=1, data_format="channels_last")
    x, dk, pk = _bf16(random_array(rng, (n, h, w, c)), random_array(rng, (3, 3, c, dm)),
                      random_array(rng, (1, 1, c * dm, f)))
    if weights == "float32":
        dk, pk = random_array(rng, dk.shape), random_array(rng, pk.shape)
    y = nbconv.separable_conv2d(x, dk, pk, precision="bfloat16", output_dtype=BF16, **kwargs)
    g = _bf16(random_array(rng, y.shape))[0]
    got = nbconv.separable_conv2d_backward(g, x, dk, pk, **kwargs)

    def fn(a, b, p):
        return keras.ops.separable_conv(a, b, p, **kwargs)
    ref = _jax_grads(fn, [_f64(x), _f64(dk), _f64(pk)], _f64(g))
    bound = _jax_grads(fn, [np.abs(_f64(x)), np.abs(_f64(dk)), np.abs(_f64(pk))], np.abs(_f64(g)))
    for name, actual, want, b in zip(("x", "depthwise_kernel", "pointwise_kernel"), got, ref, bound):
        assert actual.dtype == (BF16 if weights == "bfloat16" else np.float32), name
        assert_within(actual, want, 3 * U_BF16 * b, U_BF16 if weights == "bfloat16" else U_F32)


@pytest.mark.parametrize("wrt", [("x", "kernel", "pointwise_kernel", "bias"), ("x",), ("kernel",),
                                 ("pointwise_kernel", "bias")], ids="+".join)
@pytest.mark.parametrize("case", ["3x3", "3x3-stride1", "5x5", "relu", "relu6"])
@pytest.mark.parametrize("kind", ["separable", "depthwise", "separable-whole"])
def test_backward_of_bfloat16_inputs_read_as_bits(rng, monkeypatch, kind, wrt, case):
    """NHWC backward, the tiled kernels and (separable-whole) the whole-intermediate path: bfloat16 ``x`` and
    ``grad_output`` (relu's derivative applied on the bits) go in as they are and are widened as they are read,
    or are widened whole first (a 5x5 kernel gradient reads ``x`` outside the packed rows).  Small tiles, several
    per chunk and several chunks; stride 1 takes the input gradient through the forward's micro-kernels (the
    whole path's stride (2, 1) input gradient widens ``x`` for the scatter kernel).  Against float64 jax
    gradients: the depthwise backward and the bias sums in float32 arithmetic, within 2^-8 of the result plus
    float32 sums; the separable products of bits multiply bfloat16 pairs (``D`` rounded), within the bound of
    :func:`test_separable_backward_within_the_bfloat16_bound`."""
    import keras

    from nbconv import _plan
    from nbconv import backward as backward_module

    whole = kind == "separable-whole"
    kind = "separable" if whole else kind
    names = {"separable": ("x", "depthwise_kernel", "pointwise_kernel", "bias"), "depthwise": ("x", "kernel", "bias")}
    wrt = tuple(n.replace("kernel", "depthwise_kernel") if kind == "separable" and n == "kernel" else n for n in wrt)
    wrt = tuple(n for n in wrt if n in names[kind])
    if not wrt:
        pytest.skip("no gradient of this op among those asked")
    k = 5 if case == "5x5" else 3
    act = case if case.startswith("relu") else None
    kw = dict(strides=1 if case == "3x3-stride1" else (2, 1), padding="same", dilation_rate=1)
    dm, f = 2, 7
    # relu6: outputs on both sides of 6 too
    x, dk, pk = _bf16(random_array(rng, (2, 11, 9, 6), low=-8, high=8), random_array(rng, (k, k, 6, dm)),
                      random_array(rng, (1, 1, 6 * dm, f)))
    b = _bf16(random_array(rng, (f if kind == "separable" else 6 * dm,)))[0]
    if kind == "separable":
        y = nbconv.separable_conv2d(x, dk, pk, b, activation=act, **kw)
    else:
        y = nbconv.depthwise_conv2d(x, dk, b, activation=act, **kw)
    g = _bf16(random_array(rng, y.shape))[0]
    widened = []  # grad_output converted whole to float32 first
    real = backward_module._dtypes.operand
    monkeypatch.setattr(backward_module._dtypes, "operand",
                        lambda a, *r: (widened.append(1) if a is g else None) or real(a, *r))
    whole_calls = []  # the dtype of grad_output as the whole-intermediate path gets it
    real_whole = backward_module._sep_backward_whole
    monkeypatch.setattr(backward_module, "_sep_backward_whole",
                        lambda g_, xc, dk_, wc, gc, *r: whole_calls.append(gc.dtype) or real_whole(g_, xc, dk_, wc,
                                                                                                    gc, *r))
    opts = dict(activation=act, output=y if act else None, wrt=wrt, **kw)
    tunables = dict(whole_weight_bytes=0) if whole else dict(backward_tile_bytes=12 * 4 * 16)
    with _plan.override(**tunables):
        if kind == "separable":
            got = nbconv.separable_conv2d_backward(g, x, dk, pk, **opts)
        else:
            got = nbconv.depthwise_conv2d_backward(g, x, dk, **opts)
    dk_name = "depthwise_kernel" if kind == "separable" else "kernel"
    assert bool(widened) == (case == "5x5" and dk_name in wrt)
    assert whole_calls == ([np.dtype(np.float32 if widened else np.uint16)] if whole else [])

    def fn(a, c, *rest):
        if kind == "separable":
            return keras.ops.separable_conv(a, c, rest[0], **kw) + rest[1]
        return keras.ops.depthwise_conv(a, c, **kw) + rest[0]
    # relu's derivative read off the op's own output (which the bfloat16 rounding may put on the other side of 0
    # than the exact pre-activation), as every backend does
    top = 6.0 if act == "relu6" else np.inf
    cot = _f64(g) * ((_f64(y) > 0) & (_f64(y) < top)) if act else _f64(g)
    if act == "relu6":
        assert np.any(_f64(y) == 6) and np.any((_f64(y) > 0) & (_f64(y) < 6))  # saturated and not
    args = [_f64(x), _f64(dk)] + ([_f64(pk)] if kind == "separable" else []) + [_f64(b)]
    ref = _jax_grads(fn, args, cot)
    bound = _jax_grads(fn, [np.abs(a) for a in args], np.abs(cot))
    for name, want, bnd in zip(names[kind], ref, bound):
        actual = getattr(got, name)
        if name not in wrt:
            assert actual is None
            continue
        assert actual.dtype == BF16, name
        pairs = kind == "separable" and name != "bias"
        assert_within(actual, want, (3 * U_BF16 if pairs else 64 * U_F32) * bnd, U_BF16)


@pytest.mark.parametrize("activation", ["relu", "relu6"])
def test_activation_derivative_on_bfloat16_bits(activation):
    """The mask compared on bfloat16 bits: zeros, denormals, the bound itself, infinities and NaNs."""
    from nbconv import backward as backward_module
    from nbconv._elementwise import RELU, RELU6

    tiny = np.float32(2.0 ** -130)  # a bfloat16 denormal
    y = np.array([-np.inf, -1.0, -0.0, 0.0, tiny, -tiny, 1.0, 5.96875, 6.0, 6.5, np.inf, np.nan, -np.nan,
                  3.0e38], np.float32)
    g = np.arange(1, y.size + 1, dtype=np.float32)
    top = 6.0 if activation == "relu6" else np.inf
    want = np.where((y > 0) & (y < top), g, 0)
    got = backward_module._masked_bits(g.astype(BF16), RELU6 if activation == "relu6" else RELU, y.astype(BF16))
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got.view(BF16).astype(np.float32), want)


@pytest.mark.parametrize("op", ["separable_nchw", "depthwise", "pointwise"])
def test_backward_in_float32_on_bfloat16_values(rng, op):
    """NCHW separable, depthwise and pointwise backward of bfloat16 inputs: float32 on the widened operands,
    rounded once (NHWC separable products are bfloat16 pairs: the test above).  Against float64 jax gradients,
    within 2^-8 of the result plus float32 sums (64 * 2^-24 of the absolute-value map)."""
    import keras

    ops = keras.ops
    kw = dict(strides=(2, 1), padding="same", dilation_rate=1)
    if op == "separable_nchw":
        x, dk, pk = _bf16(random_array(rng, (2, 6, 8, 7)), random_array(rng, (3, 3, 6, 2)),
                          random_array(rng, (1, 1, 12, 9)))
        args, fmt = (x, dk, pk), "channels_first"

        def fn(a, b, p):
            return ops.separable_conv(a, b, p, data_format=fmt, **kw)
        g = _bf16(random_array(rng, nbconv.separable_conv2d(x, dk, pk, data_format=fmt, **kw).shape))[0]
        got = nbconv.separable_conv2d_backward(g, x, dk, pk, data_format=fmt, **kw)[:3]
    elif op == "depthwise":
        x, dk = _bf16(random_array(rng, (2, 8, 7, 6)), random_array(rng, (3, 3, 6, 2)))
        args = (x, dk)

        def fn(a, b):
            return ops.depthwise_conv(a, b, **kw)
        g = _bf16(random_array(rng, nbconv.depthwise_conv2d(x, dk, **kw).shape))[0]
        got = nbconv.depthwise_conv2d_backward(g, x, dk, **kw)[:2]
    else:
        x, w = _bf16(random_array(rng, (2, 8, 7, 6)), random_array(rng, (6, 9)))
        args = (x, w)

        def fn(a, b):
            return ops.matmul(a, b)
        g = _bf16(random_array(rng, (2, 8, 7, 9)))[0]
        got = nbconv.pointwise_conv2d_backward(g, x, w)[:2]
    ref = _jax_grads(fn, [_f64(a) for a in args], _f64(g))
    bound = _jax_grads(fn, [np.abs(_f64(a)) for a in args], np.abs(_f64(g)))
    for actual, want, b in zip(got, ref, bound):
        assert actual.dtype == BF16
        assert_within(actual, want, 64 * U_F32 * b, U_BF16)


def test_as_bfloat16():
    v = np.array([1.0, -2.5, 3.140625], np.float32)
    b = nbconv.as_bfloat16(v)
    assert b.dtype == BF16 and np.array_equal(b.astype(np.float32), v)
    bits = b.view(np.int16)  # what torch's bfloat16_tensor.view(torch.int16).numpy() hands over
    viewed = nbconv.as_bfloat16(bits)
    assert np.shares_memory(viewed, bits) and np.array_equal(viewed.astype(np.float32), v)
    with pytest.raises(TypeError, match=r"Expected `a` to hold bfloat16 bits .* Received: a with dtype int32"):
        nbconv.as_bfloat16(np.zeros(3, np.int32))


def test_bad_arguments(rng):
    x, dk, pk, kwargs = _geometry_inputs(rng, (1, 6, 6, 8, 1, 16, 3, 1, 1, "same"), "channels_last")
    with pytest.raises(ValueError, match=r"Expected `precision` to be one of .* Received: precision='bf16'"):
        nbconv.separable_conv2d(x, dk, pk, precision="bf16", **kwargs)
    with pytest.raises(ValueError, match=r"precision='bfloat16'. Received: float64 inputs"):
        nbconv.pointwise_conv2d(x.astype(np.float64), pk, precision="bfloat16")
    with pytest.raises(TypeError, match=r"Expected `output_dtype` .* Received: output_dtype='int8'"):
        nbconv.depthwise_conv2d(x, dk, output_dtype="int8")
    with pytest.raises(TypeError, match=r"Expected `x` to be a floating-point array \(float16, bfloat16"):
        nbconv.separable_conv2d(x.astype(np.int16), dk, pk)


@pytest.mark.skipif(not _simd.NATIVE_BF16, reason="the CPU has no VDPBF16PS: the tests above ran the FMA path")
def test_fma_path_gives_the_same_results(tmp_path):
    """The path of CPUs without AVX512_BF16 (forced by NBCONV_BF16=emulate, its own kernel cache) against the
    reference, and equal to the native path but for VDPBF16PS's rounding of each pair sum."""
    script = textwrap.dedent("""
        import sys, numpy as np, ml_dtypes
        import nbconv
        from nbconv import _simd
        assert not _simd.NATIVE_BF16
        rng = np.random.default_rng(5)
        bf = ml_dtypes.bfloat16
        x = rng.uniform(-1, 1, (2, 7, 9, 13)).astype(bf)
        dk = rng.uniform(-1, 1, (3, 3, 13, 1)).astype(bf)
        pk = rng.uniform(-1, 1, (1, 1, 13, 21)).astype(bf)
        ys = [nbconv.separable_conv2d(x, dk, w, padding="same", output_dtype=np.float32)
              for w in (pk, nbconv.pack_pointwise_kernel(pk))]
        np.save(sys.argv[1], np.stack(ys))
    """)
    out = tmp_path / "emulated.npy"
    env = dict(os.environ, NBCONV_BF16="emulate", NBCONV_COMPILE="sync")
    subprocess.run([sys.executable, "-c", script, str(out)], check=True, env=env, timeout=900)
    emulated = np.load(out)
    r = np.random.default_rng(5)
    x = r.uniform(-1, 1, (2, 7, 9, 13)).astype(BF16)
    dk = r.uniform(-1, 1, (3, 3, 13, 1)).astype(BF16)
    pk = r.uniform(-1, 1, (1, 1, 13, 21)).astype(BF16)
    native = nbconv.separable_conv2d(x, dk, pk, padding="same", output_dtype=np.float32)
    for y in emulated:
        _check_separable(y, x, dk, pk, bf16_output=False, padding="same")
        assert np.allclose(y, native, rtol=0, atol=1e-5 * np.abs(native).max())
