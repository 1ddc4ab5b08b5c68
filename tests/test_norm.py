"""nbconv.batch_norm_train / batch_norm_train_backward against the float64 reference (tests/reference.py), whose
gradient is itself checked against finite differences of its forward."""
import ml_dtypes
import numpy as np
import pytest

import nbconv
from nbconv import _fallback
from nbconv._norm import GROUP, ROWS
from reference import batch_norm_grad_ref, batch_norm_ref, bf16_round

BF16 = np.dtype(ml_dtypes.bfloat16)
#: (..., C): one block, rows not a multiple of the block, many blocks (both threads), one row, channels past a
#: vector, channels of several register groups
SHAPES = [(2, 5, 7, 3), (3, 9, 16), (ROWS + 37, 17), (8, 12, 12, 64), (1, 1, 1, 1), (5, 3 * GROUP * 16 + 40),
          (4, 7, 7, 512)]
ACTS = [None, "relu", "relu6"]


def _inputs(rng, shape, dtype, offset=0.0):
    c = shape[-1]
    x = (rng.standard_normal(shape) * 2.0 + offset).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    return x.astype(dtype), gamma, beta, g.astype(dtype)


def _close(got, want, rtol, scale=None):
    got = np.asarray(got, dtype=np.float64)
    scale = float(np.nanmax(np.abs(want))) if scale is None else scale
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, scale))


def test_reference_gradient_matches_finite_differences(rng):
    """The reference's textbook gradient against central differences of the reference forward."""
    x = rng.standard_normal((3, 4, 5)) * 2 + 1
    gamma, beta = rng.uniform(0.5, 2, 5), rng.standard_normal(5)
    g = rng.standard_normal(x.shape)
    for act in ACTS:
        dx, dgamma, dbeta = batch_norm_grad_ref(g, x, gamma, 1e-3, act, beta)

        def loss(xx, gg=gamma, bb=beta, act=act):
            return float((batch_norm_ref(xx, gg, bb, 1e-3, act)[0] * g).sum())

        e = 1e-6
        for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
            xp, xm = x.copy(), x.copy()
            xp[idx] += e
            xm[idx] -= e
            np.testing.assert_allclose(dx[idx], (loss(xp) - loss(xm)) / (2 * e), rtol=1e-5, atol=1e-7)
        for j in range(5):
            gp, gm, bp, bm = gamma.copy(), gamma.copy(), beta.copy(), beta.copy()
            gp[j] += e
            gm[j] -= e
            bp[j] += e
            bm[j] -= e
            np.testing.assert_allclose(dgamma[j], (loss(x, gp) - loss(x, gm)) / (2 * e), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(dbeta[j], (loss(x, gamma, bp) - loss(x, gamma, bm)) / (2 * e), rtol=1e-5,
                                       atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("affine", [True, False])
def test_float32(rng, shape, activation, affine):
    x, gamma, beta, g = _inputs(rng, shape, np.float32)
    gamma, beta = (gamma, beta) if affine else (None, None)
    y, mean, var = nbconv.batch_norm_train(x, gamma, beta, epsilon=1e-3, activation=activation)
    y_ref, mean_ref, var_ref = batch_norm_ref(x, gamma, beta, 1e-3, activation)
    assert y.dtype == np.float32 and mean.dtype == np.float32 and var.dtype == np.float32
    _close(y, y_ref, 2e-5)
    _close(mean, mean_ref, 2e-6, float(np.abs(x).max()))
    _close(var, var_ref, 2e-5)
    dx, dgamma, dbeta = nbconv.batch_norm_train_backward(g, x, mean, var, gamma, epsilon=1e-3,
                                                         activation=activation, output=y)
    dx_ref, dgamma_ref, dbeta_ref = batch_norm_grad_ref(g, x, gamma, 1e-3, activation, beta)
    assert dx.dtype == np.float32 and dx.shape == x.shape
    _close(dx, dx_ref, 1e-4)
    _close(dgamma, dgamma_ref, 1e-4)
    _close(dbeta, dbeta_ref, 1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
def test_bfloat16(rng, shape, activation):
    """bfloat16 in and out: the reference on the bfloat16 values, the results within a rounding of bfloat16."""
    x, gamma, beta, g = _inputs(rng, shape, BF16)
    y, mean, var = nbconv.batch_norm_train(x, gamma, beta, activation=activation)
    y_ref, mean_ref, var_ref = batch_norm_ref(x.astype(np.float64), gamma, beta, 1e-3, activation)
    assert y.dtype == BF16 and mean.dtype == np.float32
    _close(y.astype(np.float64), y_ref, 2.0 ** -8)
    assert np.array_equal(np.asarray(bf16_round(y.astype(np.float64))), y.astype(np.float64))
    _close(mean, mean_ref, 2e-6, float(np.abs(x.astype(np.float32)).max()))
    _close(var, var_ref, 2e-5)
    dx, dgamma, dbeta = nbconv.batch_norm_train_backward(g, x, mean, var, gamma, activation=activation, output=y)
    # the mask read off the rounded output: the reference's where both agree on the sign
    dx_ref, dgamma_ref, dbeta_ref = batch_norm_grad_ref(g.astype(np.float64), x.astype(np.float64), gamma, 1e-3,
                                                        activation, beta)
    assert dx.dtype == BF16 and dgamma.dtype == np.float32
    if activation is None:
        _close(dx.astype(np.float64), dx_ref, 2.0 ** -7)
        _close(dgamma, dgamma_ref, 1e-4)
        _close(dbeta, dbeta_ref, 1e-5)
    else:
        # against float32 on the same bfloat16 operands (the activation's mask is read off the bfloat16 output)
        d32 = nbconv.batch_norm_train_backward(g.astype(np.float32), x.astype(np.float32), mean, var, gamma,
                                               activation=activation, output=y.astype(np.float32))
        _close(dx.astype(np.float64), d32.x, 2.0 ** -8)
        _close(dgamma, d32.gamma, 1e-5)
        _close(dbeta, d32.beta, 1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64(rng, dtype):
    x, gamma, beta, g = _inputs(rng, (2, 6, 6, 20), dtype)
    y, mean, var = nbconv.batch_norm_train(x, gamma, beta, activation="relu")
    y_ref, mean_ref, var_ref = batch_norm_ref(x, gamma, beta, 1e-3, "relu")
    rtol = 2.0 ** -10 if dtype == np.float16 else 1e-12
    assert y.dtype == dtype
    _close(y, y_ref, rtol)
    _close(var, var_ref, 1e-5 if dtype == np.float16 else 1e-12)
    dx, dgamma, dbeta = nbconv.batch_norm_train_backward(g, x, mean, var, gamma, activation="relu", output=y)
    dx_ref, dgamma_ref, _ = batch_norm_grad_ref(g, x, gamma, 1e-3, "relu", beta)
    assert dx.dtype == dtype
    _close(dx, dx_ref, 2.0 ** -9 if dtype == np.float16 else 1e-10)


def test_large_mean_keeps_the_variance(rng):
    """Moments about the first row: a mean 1000x the spread loses no digits of the variance."""
    x, gamma, beta, _ = _inputs(rng, (4, 16, 16, 8), np.float32, offset=3000.0)
    _, mean, var = nbconv.batch_norm_train(x, gamma, beta)
    _, mean_ref, var_ref = batch_norm_ref(x)
    np.testing.assert_allclose(var, var_ref, rtol=1e-4)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)


def test_nan_stays_in_its_channel(rng):
    x, gamma, beta, g = _inputs(rng, (2, 5, 5, 6), np.float32)
    x[1, 2, 3, 4] = np.nan
    y, mean, var = nbconv.batch_norm_train(x, gamma, beta)
    assert np.isnan(y[..., 4]).all() and np.isnan(mean[4]) and np.isnan(var[4])
    assert np.isfinite(np.delete(y, 4, axis=-1)).all()
    dx, dgamma, dbeta = nbconv.batch_norm_train_backward(g, x, mean, var, gamma)
    assert np.isnan(dx[..., 4]).all() and np.isfinite(np.delete(dx, 4, axis=-1)).all()
    assert np.isfinite(dbeta).all()


def test_out_and_inputs_untouched(rng):
    x, gamma, beta, g = _inputs(rng, (3, 7, 7, 24), BF16)
    copies = [a.copy() for a in (x, gamma, beta, g)]
    out = np.empty_like(x)
    y, mean, var = nbconv.batch_norm_train(x, gamma, beta, activation="relu6", out=out)
    assert y is out
    np.testing.assert_array_equal(out, nbconv.batch_norm_train(x, gamma, beta, activation="relu6")[0])
    dout = np.empty_like(x)
    grads = nbconv.batch_norm_train_backward(g, x, mean, var, gamma, activation="relu6", output=y, out=dout)
    assert grads.x is dout
    for a, b in zip((x, gamma, beta, g), copies):
        np.testing.assert_array_equal(a, b)
    x.setflags(write=False)  # a framework's read-only buffer
    np.testing.assert_array_equal(nbconv.batch_norm_train(x, gamma, beta, activation="relu6")[0], out)


def test_fallback_agrees(rng):
    """The NumPy versions that answer while the kernels compile in the background."""
    for dtype in (np.float32, BF16):
        x, gamma, beta, g = _inputs(rng, (2, 9, 9, 20), dtype)
        fwd = nbconv.batch_norm_train(x, gamma, beta, activation="relu")
        got = _fallback.batch_norm_train(x, gamma, beta, activation="relu")
        for a, b in zip(got, fwd):
            assert a.dtype == b.dtype
            _close(np.asarray(a, np.float64), np.asarray(b, np.float64), 2.0 ** -8 if dtype == BF16 else 1e-5)
        args = (g, x, fwd[1], fwd[2], gamma)
        want = nbconv.batch_norm_train_backward(*args, activation="relu", output=fwd[0])
        got = _fallback.batch_norm_train_backward(*args, activation="relu", output=fwd[0])
        for a, b in zip(got, want):
            assert a.dtype == b.dtype
            _close(np.asarray(a, np.float64), np.asarray(b, np.float64), 2.0 ** -7 if dtype == BF16 else 1e-4)


@pytest.mark.parametrize("call, match, error", [
    (lambda x, m, g: nbconv.batch_norm_train(x.astype(np.int32)), "floating-point", TypeError),
    (lambda x, m, g: nbconv.batch_norm_train(x[0, 0, 0]), r"shape \(\.\.\., C\)", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x[:0]), "at least one row", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, np.ones(3)), r"`gamma` of shape \(4,\)", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, None, np.ones((4, 1))), r"`beta` of shape \(4,\)", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, epsilon=-1.0), "epsilon=-1.0", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, epsilon="1"), "epsilon='1'", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, activation="gelu"), "activation='gelu'", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, out=np.empty((2, 3, 3, 4), np.float64)), "`out`", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train(x, out=x), "share no memory", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train_backward(g[:1], x, *m), "grad_output with shape", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train_backward(g, x, m[0][:2], m[1]), r"`mean` of shape", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train_backward(g, x, None, m[1]), "Received: mean=None", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train_backward(g, x, *m, activation="relu"), "output=None", ValueError),
    (lambda x, m, g: nbconv.batch_norm_train_backward(g, x, *m, activation="relu", output=x[:1]),
     "output with shape", ValueError),
])
def test_bad_arguments(rng, call, match, error):
    x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    moments = nbconv.batch_norm_train(x)[1:]
    with pytest.raises(error, match=match):
        call(x, moments, g)
