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
    _gemm.gemm_nn(m, n, k, abuf, pad, ars, aks, bbuf, pad, ldb, cbuf, pad, ldc)
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
    _gemm.gemm_nn(6, 20, 4, a, 0, 4, 1, b, 0, 20, c, 0, 20)
    assert (c == 4).all()
