"""nbconv._gemm.gemm_nn (the pointwise product's micro-kernels) against float64 NumPy matmul."""
import numpy as np
import pytest

from nbconv import _gemm

# (m, n, k): below, at and beyond each block size (MR=6 rows, vectors of 8/16 lanes, NV vectors, KC=256)
SHAPES = [(1, 1, 1), (2, 3, 4), (5, 15, 7), (6, 16, 16), (7, 17, 255), (13, 70, 300), (49, 33, 257), (12, 64, 512),
          (19, 129, 100), (100, 200, 3), (4, 5, 0), (0, 5, 3), (3, 0, 5)]


def _layout(rng, m, n, k, dtype, transposed_a):
    """Operands inside larger NaN-filled buffers, so reads or writes outside the named elements show up."""
    pad = 37
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    lda, ldb, ldc = k + 3, n + 5, n + 2
    if transposed_a:
        abuf = np.full(pad + k * (m + 4) + pad, np.nan, dtype)
        abuf[pad:pad + k * (m + 4)].reshape(k, m + 4)[:, :m] = a.T
        ars, aks = 1, m + 4
    else:
        abuf = np.full(pad + m * lda + pad, np.nan, dtype)
        abuf[pad:pad + m * lda].reshape(m, lda)[:, :k] = a
        ars, aks = lda, 1
    bbuf = np.full(pad + k * ldb + pad, np.nan, dtype)
    bbuf[pad:pad + k * ldb].reshape(k, ldb)[:, :n] = b
    cbuf = np.full(pad + m * ldc + pad, np.nan, dtype)
    return a, b, abuf, ars, aks, bbuf, ldb, cbuf, ldc, pad


@pytest.mark.parametrize("transposed_a", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
def test_gemm_nn_matches_numpy(rng, shape, dtype, transposed_a):
    m, n, k = shape
    a, b, abuf, ars, aks, bbuf, ldb, cbuf, ldc, pad = _layout(rng, m, n, k, dtype, transposed_a)
    _gemm.gemm_nn(m, n, k, abuf, pad, ars, aks, bbuf, pad, ldb, cbuf, pad, ldc, False, np.empty(0, dtype), 0, 0, 0)
    expected = a.astype(dtype).astype(np.float64) @ b.astype(dtype).astype(np.float64)
    c = cbuf[pad:pad + m * ldc].reshape(m, ldc) if m else np.empty((0, ldc))
    tol = (2e-6 if dtype == np.float32 else 1e-14) * max(1, k)
    np.testing.assert_allclose(c[:, :n], expected, rtol=0, atol=tol)
    # nothing written outside C's m x n elements (NaN padding and the gaps between rows intact)
    assert np.isnan(cbuf[:pad]).all() and np.isnan(cbuf[pad + m * ldc:]).all()
    assert np.isnan(c[:, n:]).all()


def test_gemm_nn_overwrites_c():
    a = np.ones(6 * 4, np.float32)
    b = np.ones(4 * 20, np.float32)
    c = np.full(6 * 20, 1e30, np.float32)
    _gemm.gemm_nn(6, 20, 4, a, 0, 4, 1, b, 0, 20, c, 0, 20, False, np.empty(0, np.float32), 0, 0, 0)
    assert (c == 4).all()


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("act", [0, 1, 2])
@pytest.mark.parametrize("bmode", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 37, 300), (13, 16, 5), (1, 3, 1), (4, 2, 0)])
def test_gemm_nn_epilogue(rng, shape, bmode, act, accumulate):
    """C (+)= A @ B, plus a bias per column (NHWC) or per row (NCHW), then linear / ReLU / ReLU6."""
    m, n, k = shape
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c0 = (3 * rng.standard_normal((m, n))).astype(np.float32)
    bias = (4 * rng.standard_normal(3 + max(m, n))).astype(np.float32)
    expected = a.astype(np.float64) @ b + (c0 if accumulate else 0)
    if bmode == 1:
        expected = expected + bias[3:3 + n][None, :]
    elif bmode == 2:
        expected = expected + bias[3:3 + m][:, None]
    expected = {0: expected, 1: np.maximum(expected, 0), 2: np.clip(expected, 0, 6)}[act]
    c = c0.copy()
    _gemm.gemm_nn(m, n, k, a.reshape(-1), 0, k, 1, b.reshape(-1), 0, n, c.reshape(-1), 0, n, accumulate, bias, 3,
                  bmode, act)
    np.testing.assert_allclose(c, expected, rtol=0, atol=2e-5 * max(1, k))


def _aligned_nan(size, dtype, shift):
    """A NaN-filled array of ``size`` elements whose element 0 lies ``shift`` elements past a 64-byte boundary."""
    isz = np.dtype(dtype).itemsize
    buf = np.full(size + 64 // isz + shift, np.nan, dtype)
    start = (-buf.ctypes.data % 64) // isz + shift
    return buf[start:start + size]


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("shift", [0, 1, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(13, 64, 30), (7, 48, 256), (20, 70, 257), (1, 16, 3), (6, 5, 9)])
def test_gemm_nn_streamed(rng, shape, dtype, shift, accumulate):
    """``stream=True``: aligned whole vectors of C stored non-temporally, the rest as usual; the same result
    with a bias and ReLU, rows aligned or not (``shift``), k beyond one block, and accumulation (not streamed)."""
    m, n, k = shape
    pad, ldc = 16, n + (0 if shift == 0 else 3)
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    c0 = rng.standard_normal((m, n))
    cbuf = _aligned_nan(pad + m * ldc + pad, dtype, shift)
    c = cbuf[pad:pad + m * ldc].reshape(m, ldc)
    c[:, :n] = c0
    _gemm.gemm_nn(m, n, k, a.reshape(-1), 0, k, 1, b.reshape(-1), 0, n, cbuf, pad, ldc, accumulate, bias, 0, 1, 1,
                  True)
    expected = np.maximum(a.astype(np.float64) @ b + bias + (c0 if accumulate else 0), 0)
    tol = (2e-6 if dtype == np.float32 else 1e-14) * max(1, k) * 4
    np.testing.assert_allclose(c[:, :n], expected, rtol=0, atol=tol)
    assert np.isnan(cbuf[:pad]).all() and np.isnan(cbuf[pad + m * ldc:]).all()
    assert np.isnan(c[:, n:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows, cols", [(49, 1024), (16, 16), (3, 40), (37, 5), (1, 1), (64, 17), (0, 4)])
def test_transpose_tile(rng, rows, cols, dtype):
    """A block of a strided source lands transposed in a strided destination; nothing around it is touched."""
    lds, ldd = cols + 5, rows + 7
    src = np.full(3 + rows * lds + 11, np.nan, dtype)
    block = rng.standard_normal((rows, cols)).astype(dtype)
    for i in range(rows):
        src[3 + i * lds:3 + i * lds + cols] = block[i]
    dst = np.full(2 + max(cols, 1) * ldd + 9, -7.0, dtype)
    _gemm.transpose_tile(src, 3, lds, rows, cols, dst, 2, ldd)
    expected = np.full_like(dst, -7.0)
    for j in range(cols):
        expected[2 + j * ldd:2 + j * ldd + rows] = block[:, j]
    np.testing.assert_array_equal(dst, expected)


# (m, n, k, panels before the block, columns after it): whole panels, a last partial panel, k past one block; a
# block that does not end the matrix spans whole panels (n = 128: 2 or 4 panels)
PACKED = [(7, 64, 300, 0, 0), (13, 70, 257, 0, 0), (6, 200, 5, 1, 0), (49, 33, 100, 2, 0), (5, 128, 40, 1, 100),
          (1, 3, 1, 0, 0), (12, 16, 513, 0, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", PACKED, ids=[str(s) for s in PACKED])
def test_gemm_nn_packed_b(rng, shape, dtype):
    """B packed by pack_b (packed_k = K): columns [before, before + n) of a K x F matrix, as a filter block reads
    them; the same product as the float64 matmul, C written only where named, the buffer's NaN guards unread."""
    m, n, k, panels_before, after = shape
    dt = np.dtype(dtype)
    before = panels_before * _gemm.panel_width(dt)
    f = before + n + after
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, f))
    pad = 19
    bbuf = np.full(pad + k * f + pad, np.nan, dtype)
    bbuf[pad:pad + k * f] = _gemm.pack_b(b, dt)
    cbuf = np.full(pad + m * n + pad, np.nan, dtype)
    _gemm.gemm_nn(m, n, k, a.astype(dtype).reshape(-1), 0, k, 1, bbuf[pad:pad + k * f], before, f, cbuf, pad, n,
                  False, np.empty(0, dtype), 0, 0, 0, False, k)
    expected = a.astype(dtype).astype(np.float64) @ b[:, before:before + n].astype(dtype).astype(np.float64)
    tol = (2e-6 if dtype == np.float32 else 1e-14) * max(1, k)
    np.testing.assert_allclose(cbuf[pad:pad + m * n].reshape(m, n), expected, rtol=0, atol=tol)
    assert np.isnan(cbuf[:pad]).all() and np.isnan(cbuf[pad + m * n:]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_b_layout(rng, dtype):
    """Panel p holds columns p*nr .. p*nr + w row-major from element p*nr*K on (w < nr only for the last)."""
    dt = np.dtype(dtype)
    nr = _gemm.panel_width(dt)
    k, f = 5, 2 * nr + 3
    b = rng.standard_normal((k, f)).astype(dt)
    packed = _gemm.pack_b(b, dt)
    assert packed.shape == (k * f,) and packed.dtype == dt
    for p, col0 in enumerate(range(0, f, nr)):
        w = min(nr, f - col0)
        np.testing.assert_array_equal(packed[col0 * k:col0 * k + k * w].reshape(k, w), b[:, col0:col0 + w])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m, n, k, bmode, act", [(18, 64, 300, 1, 1), (49, 96, 257, 2, 2), (30, 16, 1, 0, 0),
                                                 (19, 144, 600, 1, 0), (100, 32, 256, 0, 2)])
def test_gemm_nn_wide_b(rng, m, n, k, bmode, act, dtype, accumulate, stream):
    """A plain B with rows 4 KiB or more apart (a block of columns of 1024+ filters, as the fused kernel passes it):
    result and epilogue exact, nothing around C written."""
    pad = 37
    ldb = max(1024, 4096 // np.dtype(dtype).itemsize) + 48
    col0 = 16 if n < ldb - 16 else 0
    a = rng.standard_normal((m, k))
    b = rng.standard_normal((k, n))
    bbuf = np.full(pad + k * ldb + pad, np.nan, dtype)
    bbuf[pad:pad + k * ldb].reshape(k, ldb)[:, col0:col0 + n] = b
    ldc = n + 3
    c0 = 3 * rng.standard_normal((m, n))
    cbuf = np.full(pad + m * ldc + pad, np.nan, dtype)
    cbuf[pad:pad + m * ldc].reshape(m, ldc)[:, :n] = c0
    bias = (4 * rng.standard_normal(5 + max(m, n))).astype(dtype)
    _gemm.gemm_nn(m, n, k, a.astype(dtype).reshape(-1), 0, k, 1, bbuf, pad + col0, ldb, cbuf, pad, ldc, accumulate,
                  bias, 5, bmode, act, stream)
    expected = a.astype(dtype).astype(np.float64) @ b.astype(dtype).astype(np.float64)
    expected += c0.astype(dtype) if accumulate else 0
    if bmode == 1:
        expected = expected + bias[5:5 + n][None, :]
    elif bmode == 2:
        expected = expected + bias[5:5 + m][:, None]
    expected = {0: expected, 1: np.maximum(expected, 0), 2: np.clip(expected, 0, 6)}[act]
    c = cbuf[pad:pad + m * ldc].reshape(m, ldc)
    tol = (4e-6 if dtype == np.float32 else 1e-14) * max(1, k)
    np.testing.assert_allclose(c[:, :n], expected, rtol=0, atol=tol)
    assert np.isnan(cbuf[:pad]).all() and np.isnan(cbuf[pad + m * ldc:]).all() and np.isnan(c[:, n:]).all()
