"""Training-mode batch normalisation over the last axis, and its gradient: the layer after a convolution.

A training step normalises each activation with the batch's own moments
(Keras's ``BatchNormalization(training=True)``): one pass for the moments,
one for the result, two for the gradient, each parallel over blocks of rows
(:mod:`nbconv._norm`).  Inputs are float32 or bfloat16 (computed in float32,
a bfloat16 result rounded once); float16 is computed in float32 and float64
in float64 by NumPy.
"""
from typing import NamedTuple

import numpy as np

from . import _args, _compile, _dtypes, _fallback, _plan
from ._compile import operand
from ._norm import ROWS, bn_apply, bn_grad_apply, bn_grad_stats, bn_stats
from ._threads import POOL, launch

__all__ = ["batch_norm_train", "batch_norm_train_backward", "BatchNormGrads"]

_compile.register(bn_stats, bn_apply, bn_grad_stats, bn_grad_apply)

#: elements below which a pass runs on the calling thread alone (a helper would join as it ends)
_SOLO_ELEMENTS = 1 << 15


class BatchNormGrads(NamedTuple):
    """Gradients of :func:`batch_norm_train`: ``x`` (dtype of ``x``), ``gamma`` and ``beta`` (float32)."""

    x: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray


def _check_x(x, name="x"):
    x = _args.as_float_array(x, name)
    if x.ndim < 2 or x.size == 0:
        raise ValueError(f"Expected `{name}` of shape (..., C) with at least one row and one channel. "
                         f"Received: {name} with shape {x.shape}")
    return x


def _check_channels(value, name, c):
    if value is None:
        return None
    value = _args.as_float_array(value, name)
    if value.shape != (c,):
        raise ValueError(f"Expected `{name}` of shape ({c},). Received: {name} with shape {value.shape}")
    return value


def _check_epsilon(epsilon):
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)) or not (
            np.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"Expected `epsilon` to be a finite number >= 0. Received: epsilon={epsilon!r}")
    return float(epsilon)


def _store_dtype(x):
    """The dtype the kernels read and write ``x`` in, or None where NumPy computes (float64)."""
    if _dtypes.is_bf16(x.dtype):
        return _dtypes.BITS
    return None if x.dtype == np.float64 else _dtypes.FLOAT32


def _rows(a, store):
    """``a`` as the kernels' ``(P, C)`` operand of ``store`` dtype."""
    return _dtypes.operand(a, store).reshape(-1, a.shape[-1])


def _launch_rows(kernel, p, c, *args):
    nblocks = -(-p // ROWS)
    threads = max(1, min(nblocks, _plan.pool_threads(), (p * c) // _SOLO_ELEMENTS))
    launch(kernel, threads, *args)


def _block_sums(kernel, p, c, *args):
    """Per-channel ``(sum of term 0, sum of term 1)`` of a sums kernel, its block partials added in float64."""
    parts = np.empty((-(-p // ROWS), 2, c), np.float32)
    _launch_rows(kernel, p, c, *args, parts)
    total = parts.sum(axis=0, dtype=np.float64)
    return total[0], total[1]


def _into(result, out):
    if out is None:
        return result
    out[...] = result
    return out


def _output(x, out, store):
    _args.check_out(out, x.shape, x.dtype, (("x", x),))
    if out is not None:
        return out.view(store) if store == _dtypes.BITS else out
    return np.empty(x.shape, store)


@_compile.entry(_fallback.batch_norm_train)
def batch_norm_train(x, gamma=None, beta=None, *, epsilon=1e-3, activation=None, out=None):
    """Batch normalisation with the batch's own moments (training mode), over every axis but the last.

    ``y = act((x - mean) / sqrt(variance + epsilon) * gamma + beta)``, the
    moments taken per channel over all the other axes (``variance`` biased,
    as Keras's ``BatchNormalization`` takes it).

    Parameters
    ----------
    x : array_like of shape (..., C)
        float32 or bfloat16 (float16 computed in float32, float64 in float64).
    gamma, beta : array_like of shape (C,), optional
        Scale (1 if None) and offset (0 if None).
    epsilon : float
        Added to the variance.
    activation : {None, "linear", "relu", "relu6"}
        Applied to the normalised result.
    out : ndarray, optional
        Where to write ``y``: C-contiguous, writeable, of the shape and
        dtype of ``x``, sharing no memory with it.  Returned.

    Returns
    -------
    y : ndarray of the shape and dtype of ``x``
    mean, variance : ndarray of shape (C,)
        float32 (float64 for float64 ``x``); what a layer's moving averages
        take.
    """
    POOL.wake()
    x = _check_x(x)
    c = x.shape[-1]
    gamma = _check_channels(gamma, "gamma", c)
    beta = _check_channels(beta, "beta", c)
    epsilon = _check_epsilon(epsilon)
    act = _args.normalize_activation(activation)
    if x.dtype == np.float16:
        _args.check_out(out, x.shape, x.dtype, (("x", x),))
        y, mean, var = batch_norm_train(x.astype(np.float32), gamma, beta, epsilon=epsilon, activation=activation)
        return _into(y.astype(np.float16), out), mean, var
    store = _store_dtype(x)
    if store is None:
        return _fallback.batch_norm_train(x, gamma, beta, epsilon=epsilon, activation=activation, out=out)
    y = _output(x, out, store)
    x2 = _rows(x, store)
    p = x2.shape[0]
    # the first row: moments about a point near the mean (no cancellation when the mean dwarfs the spread)
    shift = _dtypes.to_float32(_dtypes.from_bits(x2[:1]) if store == _dtypes.BITS else x2[:1]).reshape(c)
    s, q = _block_sums(bn_stats, p, c, x2, shift)
    m = s / p
    var = np.maximum(q / p - m * m, 0.0)
    mean = shift + m
    scale = 1.0 / np.sqrt(var + epsilon)
    if gamma is not None:
        scale = scale * _dtypes.to_float32(gamma)
    beta32 = np.zeros(c, np.float32) if beta is None else operand(_dtypes.to_float32(beta), np.float32)
    mean32 = mean.astype(np.float32)
    _launch_rows(bn_apply, p, c, x2, mean32, scale.astype(np.float32), beta32, act, y.reshape(p, c))
    if out is None and store == _dtypes.BITS:
        y = _dtypes.from_bits(y)
    return (out if out is not None else y), mean32, var.astype(np.float32)


@_compile.entry(_fallback.batch_norm_train_backward)
def batch_norm_train_backward(grad_output, x, mean, variance, gamma=None, *, epsilon=1e-3, activation=None,
                              output=None, out=None):
    """Gradients of :func:`batch_norm_train` with respect to ``x``, ``gamma`` and ``beta``.

    Parameters
    ----------
    grad_output : array_like of the shape of ``x``
        The gradient of the loss with respect to ``y``.
    x : array_like of shape (..., C)
        The forward call's input.
    mean, variance : array_like of shape (C,)
        The moments the forward call returned.
    gamma : array_like of shape (C,), optional
        The forward call's scale (1 if None).
    epsilon, activation
        As given to the forward call.
    output : array_like of the shape of ``x``, optional
        The forward call's ``y``: required with a relu or relu6 activation,
        whose derivative is read off it.
    out : ndarray, optional
        Where to write the gradient of ``x`` (as :func:`batch_norm_train`'s ``out``).

    Returns
    -------
    BatchNormGrads
        ``(x, gamma, beta)``: the first of the shape and dtype of ``x``, the
        others float32 (float64 for float64 ``x``) of shape (C,).
    """
    POOL.wake()
    x = _check_x(x)
    c = x.shape[-1]
    grad_output = _args.as_float_array(grad_output, "grad_output")
    if grad_output.shape != x.shape:
        raise ValueError(f"Expected `grad_output` of the shape of `x`, {x.shape}. "
                         f"Received: grad_output with shape {grad_output.shape}")
    mean = _check_channels(mean, "mean", c)
    variance = _check_channels(variance, "variance", c)
    if mean is None or variance is None:
        raise ValueError(f"Expected `mean` and `variance` (the forward call's moments). "
                         f"Received: mean={mean!r}, variance={variance!r}")
    gamma = _check_channels(gamma, "gamma", c)
    epsilon = _check_epsilon(epsilon)
    act = _args.normalize_activation(activation)
    if act:
        if output is None:
            raise ValueError(f"Expected `output` (the forward call's result) with activation={activation!r}: the "
                             f"derivative is read off it. Received: output=None")
        output = _args.as_float_array(output, "output")
        if output.shape != x.shape:
            raise ValueError(f"Expected `output` of the shape of `x`, {x.shape}. "
                             f"Received: output with shape {output.shape}")
    if x.dtype == np.float16:
        _args.check_out(out, x.shape, x.dtype, (("x", x),))
        grads = batch_norm_train_backward(grad_output.astype(np.float32), x.astype(np.float32), mean, variance,
                                          gamma, epsilon=epsilon, activation=activation, output=output)
        return grads._replace(x=_into(grads.x.astype(np.float16), out))
    store = _store_dtype(x)
    if store is None:
        return _fallback.batch_norm_train_backward(grad_output, x, mean, variance, gamma, epsilon=epsilon,
                                                   activation=activation, output=output, out=out)
    dx = _output(x, out, store)
    x2 = _rows(x, store)
    p = x2.shape[0]
    g2 = _rows(grad_output, _dtypes.BITS if _dtypes.is_bf16(grad_output.dtype) else _dtypes.FLOAT32)
    y2 = x2 if not act else _rows(output, _dtypes.BITS if _dtypes.is_bf16(output.dtype) else _dtypes.FLOAT32)
    mean32 = operand(_dtypes.to_float32(mean), np.float32)
    sg, sgx = _block_sums(bn_grad_stats, p, c, g2, y2, x2, mean32, act)
    rstd = 1.0 / np.sqrt(_dtypes.to_float32(variance).astype(np.float64) + epsilon)
    g = np.ones(c) if gamma is None else _dtypes.to_float32(gamma).astype(np.float64)
    dgamma = sgx * rstd
    k1 = g * rstd
    k2 = -k1 * rstd * rstd * sgx / p
    k3 = -k1 * sg / p
    _launch_rows(bn_grad_apply, p, c, g2, y2, x2, mean32, k1.astype(np.float32), k2.astype(np.float32),
                 k3.astype(np.float32), act, dx.reshape(p, c))
    if out is None and store == _dtypes.BITS:
        dx = _dtypes.from_bits(dx)
    return BatchNormGrads(out if out is not None else dx, dgamma.astype(np.float32), sg.astype(np.float32))
