"""Slow, obvious float64 NumPy reference for depthwise, pointwise and separable 2-D convolution.

Shares no code with ``nbconv`` (not even its argument parsing): padding is
resolved here from the Keras/TF definition, the input is zero-padded with
``np.pad`` and the depthwise convolution is a plain loop over the kernel taps.
Everything is computed in float64 whatever the input dtypes.

Conventions (Keras's): NHWC or NCHW input, depthwise kernel ``(kh, kw, C, dm)``
whose output channel ``c*dm + m`` comes from input channel ``c``, pointwise
kernel ``(1, 1, K, F)`` or ``(K, F)``.
"""
import math

import numpy as np

__all__ = [
    "pair",
    "same_pads",
    "resolve_padding",
    "output_size",
    "activate",
    "depthwise_ref",
    "pointwise_ref",
    "separable_ref",
    "assert_close",
    "tolerance_for",
    "random_array",
    "bf16_round",
    "bf16_separable_bound",
    "assert_within",
    "batch_norm_ref",
    "batch_norm_grad_ref",
]


def pair(v):
    """int -> (v, v); a pair stays a pair."""
    if isinstance(v, (tuple, list)):
        a, b = v
        return int(a), int(b)
    return int(v), int(v)


def same_pads(n, k, s, d):
    """Keras/TF 'same' zero padding (before, after) along one axis of size ``n``.

    The output has ceil(n / s) positions; the dilated kernel spans (k-1)*d + 1
    inputs; whatever padding that needs is split with the odd one at the end.
    """
    out = math.ceil(n / s)
    span = (k - 1) * d + 1
    total = max((out - 1) * s + span - n, 0)
    before = total // 2
    return before, total - before


def resolve_padding(padding, h, w, kh, kw, strides, dilation):
    """Any accepted ``padding`` -> ((top, bottom), (left, right))."""
    sh, sw = pair(strides)
    dh, dw = pair(dilation)
    if isinstance(padding, str):
        if padding.lower() == "valid":
            return (0, 0), (0, 0)
        if padding.lower() == "same":
            return same_pads(h, kh, sh, dh), same_pads(w, kw, sw, dw)
        raise ValueError(padding)
    if isinstance(padding, (int, np.integer)):
        p = int(padding)
        return (p, p), (p, p)
    first, second = padding
    if isinstance(first, (tuple, list)):
        return (int(first[0]), int(first[1])), (int(second[0]), int(second[1]))
    return (int(first), int(first)), (int(second), int(second))


def output_size(n, k, s, d, before, after):
    """Number of output positions of a zero-padded, strided, dilated window along one axis."""
    span = (k - 1) * d + 1
    padded = n + before + after
    if padded < span:
        return 0
    return (padded - span) // s + 1


def activate(y, activation):
    """None/'linear' -> y; 'relu' -> max(y, 0); 'relu6' -> min(max(y, 0), 6). NaN stays NaN."""
    if activation is None or activation == "linear":
        return y
    if activation == "relu":
        return np.maximum(y, 0.0)
    if activation == "relu6":
        return np.minimum(np.maximum(y, 0.0), 6.0)
    raise ValueError(activation)


def _to_nhwc(x, data_format):
    x = np.array(x, dtype=np.float64)
    return x if data_format == "channels_last" else x.transpose(0, 2, 3, 1)


def _from_nhwc(y, data_format):
    return y if data_format == "channels_last" else y.transpose(0, 3, 1, 2)


def _depthwise_nhwc(x, kernel, strides, padding, dilation):
    """x: float64 NHWC; kernel float64 (kh, kw, C, dm); returns float64 (N, OH, OW, C*dm)."""
    n, h, w, c = x.shape
    kh, kw, kc, dm = kernel.shape
    assert kc == c
    sh, sw = pair(strides)
    dh, dw = pair(dilation)
    (pt, pb), (pl, pr) = resolve_padding(padding, h, w, kh, kw, strides, dilation)
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = output_size(h, kh, sh, dh, pt, pb)
    ow = output_size(w, kw, sw, dw, pl, pr)
    out = np.zeros((n, oh, ow, c, dm), np.float64)
    for a in range(kh):
        for b in range(kw):
            # input rows i*sh + a*dh for i in range(oh), columns j*sw + b*dw for j in range(ow)
            rows = a * dh + sh * np.arange(oh)
            cols = b * dw + sw * np.arange(ow)
            patch = xp[:, rows][:, :, cols]  # (n, oh, ow, c)
            out += patch[..., :, None] * kernel[a, b][None, None, None, :, :]
    return out.reshape(n, oh, ow, c * dm)


def depthwise_ref(x, kernel, bias=None, *, strides=1, padding="valid", dilation_rate=1,
                  data_format="channels_last", activation=None):
    """float64 depthwise convolution, Keras semantics (output channel c*dm + m)."""
    xn = _to_nhwc(x, data_format)
    k = np.array(kernel, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # Inf - Inf -> NaN is what we want to see
        y = _depthwise_nhwc(xn, k, strides, padding, dilation_rate)
        if bias is not None:
            y = y + np.array(bias, dtype=np.float64)
        return _from_nhwc(activate(y, activation), data_format)


def pointwise_ref(x, kernel, bias=None, *, data_format="channels_last", activation=None):
    """float64 1x1 convolution: y[n, i, j, f] = sum_k x[n, i, j, k] * kernel[k, f]."""
    xn = _to_nhwc(x, data_format)
    k = np.array(kernel, dtype=np.float64)
    if k.ndim == 4:
        assert k.shape[:2] == (1, 1)
        k = k[0, 0]
    n, h, w, kc = xn.shape
    f = k.shape[1]
    y = np.zeros((n, h, w, f), np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        for ch in range(kc):
            y += xn[..., ch:ch + 1] * k[ch][None, None, None, :]
        if bias is not None:
            y = y + np.array(bias, dtype=np.float64)
        return _from_nhwc(activate(y, activation), data_format)


def separable_ref(x, depthwise_kernel, pointwise_kernel, bias=None, *, strides=1, padding="valid",
                  dilation_rate=1, data_format="channels_last", activation=None, depthwise_bias=None,
                  depthwise_activation=None):
    """float64 depthwise, + depthwise_bias, depthwise_activation, then 1x1, + bias, activation."""
    d = depthwise_ref(x, depthwise_kernel, depthwise_bias, strides=strides, padding=padding,
                      dilation_rate=dilation_rate, data_format=data_format, activation=depthwise_activation)
    return pointwise_ref(d, pointwise_kernel, bias, data_format=data_format, activation=activation)


def tolerance_for(dtype):
    """Relative-to-scale tolerance for a result of ``dtype`` (float16 is rounded once at the end)."""
    dtype = np.dtype(dtype)
    if dtype == np.float16:
        return 2e-3
    if dtype == np.float32:
        return 1e-5
    return 1e-12


def assert_close(actual, expected, dtype=None, tol=None):
    """Assert ``actual`` matches the float64 ``expected`` within ``tol`` times the output's scale.

    The scale is the largest finite |expected| (at least 1e-3 of the unit so
    an all-zero output is not compared at zero tolerance).  NaN and infinite
    entries must match exactly in position and value.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if tol is None:
        tol = tolerance_for(dtype if dtype is not None else actual.dtype)
    a64 = actual.astype(np.float64)
    nan_e, nan_a = np.isnan(expected), np.isnan(a64)
    assert np.array_equal(nan_a, nan_e), f"NaN positions differ: {np.argwhere(nan_a != nan_e)[:10]}"
    inf_e = np.isinf(expected)
    assert np.array_equal(np.isinf(a64), inf_e), "Inf positions differ"
    assert np.array_equal(a64[inf_e], expected[inf_e]), "Inf signs differ"
    finite = np.isfinite(expected)
    if not finite.any():
        return
    scale = max(float(np.abs(expected[finite]).max()), 1e-3)
    err = float(np.abs(a64[finite] - expected[finite]).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * scale {scale:.3g}"


def random_array(rng, shape, dtype=np.float32, low=-1.0, high=1.0):
    """Uniform values in [low, high) of ``dtype`` (test data, not part of the reference)."""
    return rng.uniform(low, high, size=shape).astype(dtype)


# --- bfloat16 -------------------------------------------------------------------------------------------------

#: unit roundoff of bfloat16 (8 significant bits) and float32 (24)
U_BF16 = 2.0 ** -8
U_F32 = 2.0 ** -24


def bf16_round(a):
    """float64 values of ``a`` rounded to bfloat16 (to nearest, ties to even), by integer arithmetic on float32
    bits: independent of ml_dtypes and of nbconv's conversion."""
    a32 = np.asarray(a, dtype=np.float64).astype(np.float32)
    bits = a32.view(np.uint32).astype(np.uint64)
    nan = np.isnan(a32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = (rounded & 0xFFFFFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
    return np.where(nan, np.nan, out)


def bf16_separable_bound(x, depthwise_kernel, pointwise_kernel, bias=None, *, depthwise_bias=None,
                         bf16_output=True, **conv):
    """Per-element error bound of a separable convolution with bfloat16 products, for operands already rounded
    to bfloat16.

    The depthwise result ``d`` is computed in float32 (error at most
    ``(kh*kw + 1) * U_F32 * |x|*|dk|`` summed), rounded to bfloat16 (``U_BF16 * |d|``),
    then multiplied in pairs and summed in float32 over the ``K`` channels
    (``(K + 1) * U_F32``).  With the depthwise abs-sums ``D = |x| * |dk| + |db|``
    and ``P = D @ |pk| + |b|``::

        |y - y_ref| <= (U_BF16 + (kh*kw + K + 2) * U_F32) * (1 + U_BF16) * P  (+ U_BF16 * |y_ref| for a bfloat16 result)

    ReLU and ReLU6 only shrink differences, so the bound holds after them.
    """
    absx = np.abs(np.asarray(x, np.float64))
    absdk = np.abs(np.asarray(depthwise_kernel, np.float64))
    abspk = np.abs(np.asarray(pointwise_kernel, np.float64))
    dbias = None if depthwise_bias is None else np.abs(np.asarray(depthwise_bias, np.float64))
    conv = {k: v for k, v in conv.items() if k not in ("activation", "depthwise_activation")}
    big_p = separable_ref(absx, absdk, abspk, None if bias is None else np.abs(np.asarray(bias, np.float64)),
                          depthwise_bias=dbias, **conv)
    taps = absdk.shape[0] * absdk.shape[1]
    k = abspk.shape[-2]
    return (U_BF16 + (taps + k + 2) * U_F32) * (1 + U_BF16) * big_p, bf16_output


def assert_within(actual, expected, bound, rel_out=0.0):
    """Assert ``|actual - expected| <= bound + rel_out * |expected|`` element-wise (NaN and Inf matching exactly)."""
    a64 = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, np.float64)
    assert a64.shape == expected.shape, (a64.shape, expected.shape)
    nan_e, nan_a = np.isnan(expected), np.isnan(a64)
    assert np.array_equal(nan_a, nan_e), f"NaN positions differ: {np.argwhere(nan_a != nan_e)[:10]}"
    inf_e = np.isinf(expected)
    assert np.array_equal(np.isinf(a64), inf_e), "Inf positions differ"
    assert np.array_equal(a64[inf_e], expected[inf_e]), "Inf signs differ"
    fin = np.isfinite(expected)
    err = np.abs(a64[fin] - expected[fin])
    limit = (np.broadcast_to(bound, expected.shape)[fin] + rel_out * np.abs(expected[fin])) * (1 + 1e-9) + 1e-300
    worst = np.argmax(err / limit) if err.size else 0
    assert np.all(err <= limit), (f"error {err[worst]:.3g} > bound {limit[worst]:.3g} "
                                  f"({int(np.sum(err > limit))} of {err.size} elements)")


# --- batch normalisation (training mode) ----------------------------------------------------------------------

def batch_norm_ref(x, gamma=None, beta=None, epsilon=1e-3, activation=None):
    """``(y, mean, variance)`` in float64: moments per channel (last axis) over all the other axes, the biased
    variance, ``y = act((x - mean) / sqrt(variance + epsilon) * gamma + beta)``."""
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axis=axes)
    variance = ((x - mean) ** 2).mean(axis=axes)
    y = (x - mean) / np.sqrt(variance + epsilon)
    if gamma is not None:
        y = y * np.asarray(gamma, dtype=np.float64)
    if beta is not None:
        y = y + np.asarray(beta, dtype=np.float64)
    return activate(y, activation), mean, variance


def batch_norm_grad_ref(grad_output, x, gamma=None, epsilon=1e-3, activation=None, beta=None):
    """``(dx, dgamma, dbeta)`` of :func:`batch_norm_ref` (the textbook formula, through the batch's moments), in
    float64; the activation's derivative read off the reference output (0 where it is 0 or 6)."""
    x = np.asarray(x, dtype=np.float64)
    c = x.shape[-1]
    y, mean, variance = batch_norm_ref(x, gamma, beta, epsilon, activation)
    g = np.asarray(grad_output, dtype=np.float64)
    if activation in ("relu", "relu6"):
        g = np.where((y > 0) & ((y < 6) if activation == "relu6" else True), g, 0.0)
    g2, x2 = g.reshape(-1, c), x.reshape(-1, c)
    m = x2.shape[0]
    rstd = 1.0 / np.sqrt(variance + epsilon)
    xhat = (x2 - mean) * rstd
    gam = np.ones(c) if gamma is None else np.asarray(gamma, dtype=np.float64)
    dbeta = g2.sum(axis=0)
    dgamma = (g2 * xhat).sum(axis=0)
    dxhat = g2 * gam
    dx = rstd / m * (m * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
    return dx.reshape(x.shape), dgamma, dbeta
