"""nbconv.pack_pointwise_kernel: packed pointwise weights give the results of the float64 reference."""
import numpy as np
import pytest

import nbconv
from reference import (assert_close, assert_within, bf16_round, bf16_separable_bound, pointwise_ref, random_array,
                       separable_ref, tolerance_for)

FORMATS = ["channels_last", "channels_first"]
# (N, H, W, C, F): filters below one panel, whole panels, a partial last panel, several blocks of filters
SHAPES = [(1, 5, 5, 24, 40), (1, 7, 7, 40, 130), (2, 6, 5, 8, 200), (1, 3, 4, 300, 64), (3, 4, 4, 6, 257)]


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shared_bytes", [0, 1 << 30])
def test_packed_separable_and_pointwise_every_plan(rng, data_format, threads, shared_bytes):
    """Fused and shared modes, filter blocks split at panel boundaries, 1-3 threads; bias and relu6 epilogue."""
    from nbconv import _plan

    # split the filters, not the pixels
    plans = _plan.override(threads=threads, tiny_macs=0, shared_bytes=shared_bytes, shared_min_channels=1,
                           fused_weight_bytes=0, min_split_pixels=1 << 20, min_filter_block=16, filter_block=48)
    with plans:
        _check_every_shape(rng, data_format)


def _check_every_shape(rng, data_format):
    for n, h, w, c, f in SHAPES:
        shape = (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)
        x = random_array(rng, shape, np.float32)
        dk = random_array(rng, (3, 3, c, 1), np.float32)
        pk = random_array(rng, (1, 1, c, f), np.float32)
        bias = random_array(rng, (f,), np.float32)
        packed = nbconv.pack_pointwise_kernel(pk)
        kw = dict(padding="same", data_format=data_format, activation="relu6")
        assert_close(nbconv.separable_conv2d(x, dk, packed, bias, **kw), separable_ref(x, dk, pk, bias, **kw),
                     tol=tolerance_for(np.float32))
        assert_close(nbconv.pointwise_conv2d(x, packed, bias, data_format=data_format, activation="relu6"),
                     pointwise_ref(x, pk, bias, data_format=data_format, activation="relu6"),
                     tol=tolerance_for(np.float32))


@pytest.mark.parametrize("x_dtype, k_dtype", [(np.float32, np.float32), (np.float64, np.float64),
                                              (np.float64, np.float32), (np.float32, np.float16),
                                              (np.float16, np.float16)])
def test_packed_dtypes(rng, x_dtype, k_dtype):
    """Packed in the kernel's compute dtype; a call computing in another dtype uses the kernel unpacked."""
    x = random_array(rng, (1, 6, 6, 20), x_dtype)
    dk = random_array(rng, (3, 3, 20, 1), x_dtype)
    pk = random_array(rng, (20, 150), k_dtype)
    packed = nbconv.pack_pointwise_kernel(pk)
    assert packed.compute_dtype == (np.float32 if k_dtype == np.float16 else k_dtype)
    y = nbconv.separable_conv2d(x, dk, packed, padding="same")
    expected = separable_ref(x, dk, pk, padding="same")
    assert y.dtype == np.result_type(x_dtype, k_dtype)
    assert_close(y, expected, tol=tolerance_for(y.dtype))
    np.testing.assert_array_equal(y, nbconv.separable_conv2d(x, dk, pk, padding="same"))


def test_packed_is_a_read_only_snapshot(rng):
    pk = random_array(rng, (1, 1, 16, 70), np.float32)
    original = pk.copy()
    packed = nbconv.pack_pointwise_kernel(pk)
    pk[...] = 0  # later changes of the source are not seen
    assert packed.shape == (1, 1, 16, 70) and packed.dtype == np.float32 and packed.ndim == 4
    arr = np.asarray(packed)
    np.testing.assert_array_equal(arr, original)
    assert not arr.flags.writeable
    with pytest.raises(ValueError):
        arr[0, 0, 0, 0] = 1
    x = random_array(rng, (1, 5, 5, 16), np.float32)
    assert_close(nbconv.pointwise_conv2d(x, packed), pointwise_ref(x, original), tol=tolerance_for(np.float32))
    assert nbconv.pack_pointwise_kernel(packed) is packed
    assert "PackedPointwiseKernel" in repr(packed)


@pytest.mark.parametrize("precision", [None, "bfloat16"])
def test_pack_view_keeps_the_kernel_itself(rng, precision):
    from nbconv import packing

    pk = random_array(rng, (1, 1, 40, 130), np.float32)
    packed = packing.pack_view(pk, precision)
    assert np.asarray(packed) is pk
    assert packed.compute_dtype == nbconv.pack_pointwise_kernel(pk, precision).compute_dtype
    x = random_array(rng, (1, 6, 5, 40), np.float32)
    dk = random_array(rng, (3, 3, 40, 1), np.float32)
    got = nbconv.separable_conv2d(x, dk, packed, padding="same", precision=precision)
    if precision is None:
        assert_close(got, separable_ref(x, dk, pk, padding="same"), tol=tolerance_for(np.float32))
    else:
        xr, pkr = bf16_round(x), bf16_round(pk)
        bound, _ = bf16_separable_bound(xr, dk, pkr, padding="same")
        assert_within(got, separable_ref(xr, dk, pkr, padding="same"), bound)


def test_backward_accepts_a_packed_kernel(rng):
    x = random_array(rng, (2, 6, 6, 8), np.float32)
    dk = random_array(rng, (3, 3, 8, 1), np.float32)
    pk = random_array(rng, (1, 1, 8, 70), np.float32)
    g = random_array(rng, (2, 6, 6, 70), np.float32)
    plain = nbconv.separable_conv2d_backward(g, x, dk, pk, padding="same")
    packed = nbconv.separable_conv2d_backward(g, x, dk, nbconv.pack_pointwise_kernel(pk), padding="same")
    for a, b in zip(plain, packed):
        np.testing.assert_array_equal(a, b)


def test_pack_rejects_bad_kernels():
    with pytest.raises(ValueError, match=r"Expected `kernel`.*Received: kernel with shape \(3, 4, 5\)"):
        nbconv.pack_pointwise_kernel(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"Expected `kernel` to be a 1x1 kernel"):
        nbconv.pack_pointwise_kernel(np.zeros((3, 3, 4, 5), np.float32))
    with pytest.raises(TypeError, match=r"Expected `kernel` to be a floating-point array.*int64"):
        nbconv.pack_pointwise_kernel(np.zeros((4, 5), np.int64))
    packed = nbconv.pack_pointwise_kernel(np.zeros((1, 1, 4, 5), np.float32))
    with pytest.raises(ValueError, match=r"Expected `pointwise_kernel` to have 6 input channels"):
        nbconv.separable_conv2d(np.zeros((1, 3, 3, 6), np.float32), np.zeros((3, 3, 6, 1), np.float32), packed)
