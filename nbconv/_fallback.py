"""NumPy versions of the public functions, for the calls made while their kernels compile in the background.

Same arguments, results and dtypes as :mod:`nbconv.forward` and
:mod:`nbconv.backward` (whose validation has already accepted the call): a
loop over the kernel taps of whole-array products, and BLAS for the pointwise
products.  Several times slower than the kernels on the depthwise part, but
they answer in milliseconds instead of waiting for a compile
(:mod:`nbconv._compile`).
"""
import numpy as np

from . import _args, _dtypes

__all__ = [
    "depthwise_conv2d", "pointwise_conv2d", "separable_conv2d",
    "depthwise_conv2d_backward", "pointwise_conv2d_backward", "separable_conv2d_backward",
]


def _activate(y, act):
    if act == 1:
        np.maximum(y, 0, out=y)
    elif act == 2:
        np.minimum(np.maximum(y, 0, out=y), 6, out=y)
    return y


def _act_grad(gc, y, act, compute):
    """``gc`` times the activation's derivative read off the output ``y`` (0 < y, and y < 6 for relu6)."""
    if act == 0:
        return gc
    y = np.asarray(y, dtype=compute)
    keep = (y > 0) & (y < 6) if act == 2 else y > 0
    return np.where(keep, gc, compute.type(0))


def _nhwc(a, channels_last, dtype):
    return np.asarray(a if channels_last else np.moveaxis(a, 1, 3), dtype=dtype)


def _from_nhwc(a, channels_last):
    return a if channels_last else np.moveaxis(a, 3, 1)


def _tap_windows(xp, g):
    """``(i, j, view)`` per tap: the ``(N, OH, OW, C)`` strided view of the padded input under tap ``(i, j)``."""
    for i in range(g.kh):
        for j in range(g.kw):
            r0, c0 = i * g.dh, j * g.dw
            yield i, j, xp[:, r0:r0 + g.sh * (g.oh - 1) + 1:g.sh, c0:c0 + g.sw * (g.ow - 1) + 1:g.sw, :]


def _padded_shape(g):
    rows = max(g.pt + g.h + g.pb, (g.oh - 1) * g.sh + (g.kh - 1) * g.dh + 1)
    cols = max(g.pl + g.w + g.pr, (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1)
    return rows, cols


def _pad(x, g):
    rows, cols = _padded_shape(g)
    xp = np.zeros((g.n, rows, cols, g.c), x.dtype)
    xp[:, g.pt:g.pt + g.h, g.pl:g.pl + g.w] = x
    return xp


def _depthwise_nhwc(x, k, g):
    """``x (N, H, W, C)``, ``k (kh, kw, C, dm)`` -> ``(N, OH, OW, C*dm)``."""
    y = np.zeros((g.n, g.oh, g.ow, g.c, g.dm), x.dtype)
    for i, j, win in _tap_windows(_pad(x, g), g):
        y += win[..., None] * k[i, j]
    return y.reshape(g.n, g.oh, g.ow, g.c * g.dm)


def _depthwise_grads(x, k, gd, g, want_dx, want_dk):
    """Input and kernel gradients of :func:`_depthwise_nhwc` for ``gd (N, OH, OW, C*dm)``."""
    gd = gd.reshape(g.n, g.oh, g.ow, g.c, g.dm)
    dk = np.empty(k.shape, x.dtype) if want_dk else None
    dxp = np.zeros((g.n, *_padded_shape(g), g.c), x.dtype) if want_dx else None
    wins = _tap_windows(_pad(x, g), g) if want_dk else ((i, j, None) for i in range(g.kh) for j in range(g.kw))
    for i, j, win in wins:
        if want_dk:
            dk[i, j] = np.einsum("nhwc,nhwcm->cm", win, gd)
        if want_dx:
            r0, c0 = i * g.dh, j * g.dw
            dxp[:, r0:r0 + g.sh * (g.oh - 1) + 1:g.sh, c0:c0 + g.sw * (g.ow - 1) + 1:g.sw, :] += np.einsum(
                "nhwcm,cm->nhwc", gd, k[i, j])
    dx = dxp[:, g.pt:g.pt + g.h, g.pl:g.pl + g.w] if want_dx else None
    return dx, dk


def _finish(y, result, out):
    if out is not None:
        out[...] = y.astype(out.dtype)
        return out
    return np.ascontiguousarray(y, dtype=result)


def _operand(a, dt):
    """``a`` in the arithmetic's dtype, rounded to bfloat16 first for bfloat16 products."""
    if dt.bf16:
        a = np.asarray(a).astype(_dtypes.bfloat16())
    return np.asarray(a, dtype=dt.act)


def depthwise_conv2d(x, kernel, bias=None, *, strides=_args.DEFAULT, padding="valid", dilation_rate=_args.DEFAULT,
                     data_format="channels_last", activation=None, out=None, precision=None, output_dtype=None,
                     **aliases):
    strides, dilation_rate = _args.resolve_aliases("depthwise_conv2d", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    x, kernel = _args.as_float_array(x, "x"), _args.as_float_array(kernel, "kernel")
    g = _args.depthwise_geometry(x, kernel, strides, padding, dilation_rate, channels_last)
    bias = _args.check_bias(bias, "bias", g.c * g.dm)
    dt = _args.dtypes_for(x, kernel, biases=(bias,), precision=precision, output_dtype=output_dtype)
    y = _depthwise_nhwc(_nhwc(_operand(x, dt), channels_last, dt.act), _operand(kernel, dt), g)
    if bias is not None:
        y += bias.astype(dt.act)
    return _finish(_from_nhwc(_activate(y, _args.normalize_activation(activation)), channels_last), dt.result, out)


def _pointwise_nhwc(x, wmat):
    return np.matmul(x.reshape(-1, x.shape[-1]), wmat).reshape(*x.shape[:-1], wmat.shape[1])


def pointwise_conv2d(x, kernel, bias=None, *, data_format="channels_last", activation=None, out=None,
                     precision=None, output_dtype=None):
    channels_last = _args.normalize_data_format(data_format)
    x, kernel = _args.as_float_array(x, "x"), _args.as_float_array(kernel, "kernel")
    wmat = _args.pointwise_matrix(kernel, x.shape[3] if channels_last else x.shape[1], "kernel")
    bias = _args.check_bias(bias, "bias", wmat.shape[1])
    dt = _args.dtypes_for(x, kernel, biases=(bias,), precision=precision, output_dtype=output_dtype)
    y = _pointwise_nhwc(_nhwc(_operand(x, dt), channels_last, dt.act), _operand(wmat, dt))
    if bias is not None:
        y += bias.astype(dt.act)
    return _finish(_from_nhwc(_activate(y, _args.normalize_activation(activation)), channels_last), dt.result, out)


def separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias=None, *, strides=_args.DEFAULT, padding="valid",
                     dilation_rate=_args.DEFAULT, data_format="channels_last", activation=None, depthwise_bias=None,
                     depthwise_activation=None, out=None, precision=None, output_dtype=None, **aliases):
    strides, dilation_rate = _args.resolve_aliases("separable_conv2d", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    x, dk, pk, g, wmat = _args.separable_operands(x, depthwise_kernel, pointwise_kernel, strides, padding,
                                                  dilation_rate, channels_last)
    bias = _args.check_bias(bias, "bias", wmat.shape[1])
    dbias = _args.check_bias(depthwise_bias, "depthwise_bias", wmat.shape[0])
    dt = _args.dtypes_for(x, dk, pk, biases=(bias, dbias), precision=precision, output_dtype=output_dtype)
    d = _depthwise_nhwc(_nhwc(_operand(x, dt), channels_last, dt.act), _operand(dk, dt), g)
    if dbias is not None:
        d += dbias.astype(dt.act)
    _activate(d, _args.normalize_activation(depthwise_activation, "depthwise_activation"))
    y = _pointwise_nhwc(_operand(d, dt), _operand(wmat, dt))
    if bias is not None:
        y += bias.astype(dt.act)
    return _finish(_from_nhwc(_activate(y, _args.normalize_activation(activation)), channels_last), dt.result, out)


def _cast(arr, result):
    return None if arr is None else np.ascontiguousarray(arr, dtype=result)


def depthwise_conv2d_backward(grad_output, x, kernel, *, strides=_args.DEFAULT, padding="valid",
                              dilation_rate=_args.DEFAULT, data_format="channels_last",
                              wrt=("x", "kernel", "bias"), activation=None, output=None, **aliases):
    from .backward import DepthwiseConv2DGrads

    strides, dilation_rate = _args.resolve_aliases("depthwise_conv2d_backward", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    wrt = {wrt} if isinstance(wrt, str) else set(wrt)
    x, kernel = _args.as_float_array(x, "x"), _args.as_float_array(kernel, "kernel")
    g = _args.depthwise_geometry(x, kernel, strides, padding, dilation_rate, channels_last)
    grad_output = _args.as_float_array(grad_output, "grad_output")
    compute, result = _args.dtypes_for(grad_output, x, kernel, precision="float32")
    gd = _act_grad(_nhwc(grad_output, channels_last, compute), _nhwc(output, channels_last, compute)
                   if output is not None else None, _args.normalize_activation(activation), compute)
    dx, dk = _depthwise_grads(_nhwc(x, channels_last, compute), kernel.astype(compute), gd, g, "x" in wrt,
                              "kernel" in wrt)
    db = gd.reshape(-1, gd.shape[-1]).sum(axis=0) if "bias" in wrt else None
    return DepthwiseConv2DGrads(_cast(dx if dx is None else _from_nhwc(dx, channels_last), result),
                                _cast(dk, result), _cast(db, result))


def _pointwise_grads(x, wmat, gc, want_dx, want_w):
    """``x (..., K)``, ``gc (..., F)``: ``(dx (..., K), dW (K, F))``."""
    x2, g2 = x.reshape(-1, x.shape[-1]), gc.reshape(-1, gc.shape[-1])
    dx = np.matmul(g2, wmat.T).reshape(x.shape) if want_dx else None
    dw = np.matmul(x2.T, g2) if want_w else None
    return dx, dw


def pointwise_conv2d_backward(grad_output, x, kernel, *, data_format="channels_last", wrt=("x", "kernel", "bias"),
                              activation=None, output=None):
    from .backward import PointwiseConv2DGrads

    channels_last = _args.normalize_data_format(data_format)
    wrt = {wrt} if isinstance(wrt, str) else set(wrt)
    x, kernel = _args.as_float_array(x, "x"), _args.as_float_array(kernel, "kernel")
    wmat = _args.pointwise_matrix(kernel, x.shape[3] if channels_last else x.shape[1], "kernel")
    grad_output = _args.as_float_array(grad_output, "grad_output")
    compute, result = _args.dtypes_for(grad_output, x, kernel, precision="float32")
    gc = _act_grad(_nhwc(grad_output, channels_last, compute), _nhwc(output, channels_last, compute)
                   if output is not None else None, _args.normalize_activation(activation), compute)
    dx, dw = _pointwise_grads(_nhwc(x, channels_last, compute), wmat.astype(compute), gc, "x" in wrt,
                              "kernel" in wrt)
    db = gc.reshape(-1, gc.shape[-1]).sum(axis=0) if "bias" in wrt else None
    return PointwiseConv2DGrads(_cast(dx if dx is None else _from_nhwc(dx, channels_last), result),
                                _cast(dw if dw is None else dw.reshape(kernel.shape), result), _cast(db, result))


def separable_conv2d_backward(grad_output, x, depthwise_kernel, pointwise_kernel, *, strides=_args.DEFAULT,
                              padding="valid", dilation_rate=_args.DEFAULT, data_format="channels_last",
                              wrt=("x", "depthwise_kernel", "pointwise_kernel", "bias"), activation=None,
                              output=None, **aliases):
    from .backward import SeparableConv2DGrads

    strides, dilation_rate = _args.resolve_aliases("separable_conv2d_backward", strides, dilation_rate, aliases)
    channels_last = _args.normalize_data_format(data_format)
    wrt = {wrt} if isinstance(wrt, str) else set(wrt)
    x, dk, pk, g, wmat = _args.separable_operands(x, depthwise_kernel, pointwise_kernel, strides, padding,
                                                  dilation_rate, channels_last)
    grad_output = _args.as_float_array(grad_output, "grad_output")
    compute, result = _args.dtypes_for(grad_output, x, dk, pk, precision="float32")
    gc = _act_grad(_nhwc(grad_output, channels_last, compute), _nhwc(output, channels_last, compute)
                   if output is not None else None, _args.normalize_activation(activation), compute)
    xn, dkc, wc = _nhwc(x, channels_last, compute), dk.astype(compute), wmat.astype(compute)
    d = _depthwise_nhwc(xn, dkc, g) if "pointwise_kernel" in wrt else None
    want_dd = "x" in wrt or "depthwise_kernel" in wrt
    dd = np.matmul(gc.reshape(-1, gc.shape[-1]), wc.T) if want_dd else None
    dpw = np.matmul(d.reshape(-1, d.shape[-1]).T, gc.reshape(-1, gc.shape[-1])) if d is not None else None
    dx, ddk = _depthwise_grads(xn, dkc, dd, g, "x" in wrt, "depthwise_kernel" in wrt) if want_dd else (None, None)
    db = gc.reshape(-1, gc.shape[-1]).sum(axis=0) if "bias" in wrt else None
    return SeparableConv2DGrads(_cast(dx if dx is None else _from_nhwc(dx, channels_last), result),
                                _cast(ddk, result), _cast(dpw if dpw is None else dpw.reshape(pk.shape), result),
                                _cast(db, result))


def _norm_compute(x):
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _norm_result(values, dtype, out):
    values = _dtypes.as_dtype(values, dtype)
    if out is None:
        return values
    out[...] = values
    return out


def batch_norm_train(x, gamma=None, beta=None, *, epsilon=1e-3, activation=None, out=None):
    x = np.asarray(x)
    compute = _norm_compute(x)
    xc = _dtypes.as_dtype(x, compute)
    axes = tuple(range(x.ndim - 1))
    mean = xc.mean(axis=axes, dtype=np.float64)
    var = np.square(xc - mean).mean(axis=axes)
    scale = 1.0 / np.sqrt(var + epsilon)
    if gamma is not None:
        scale = scale * _dtypes.as_dtype(np.asarray(gamma), compute)
    y = (xc - mean.astype(compute)) * scale.astype(compute)
    if beta is not None:
        y = y + _dtypes.as_dtype(np.asarray(beta), compute)
    y = _activate(y.astype(compute), _args.normalize_activation(activation))
    return _norm_result(y, x.dtype, out), mean.astype(compute), var.astype(compute)


def batch_norm_train_backward(grad_output, x, mean, variance, gamma=None, *, epsilon=1e-3, activation=None,
                              output=None, out=None):
    from .norm import BatchNormGrads

    x = np.asarray(x)
    compute = _norm_compute(x)
    xc = _dtypes.as_dtype(x, compute).reshape(-1, x.shape[-1])
    g = _dtypes.as_dtype(np.asarray(grad_output), compute).reshape(xc.shape)
    act = _args.normalize_activation(activation)
    if act:
        g = _act_grad(g, _dtypes.as_dtype(np.asarray(output), compute).reshape(xc.shape), act, compute)
    mean = _dtypes.as_dtype(np.asarray(mean), np.float64)
    rstd = 1.0 / np.sqrt(_dtypes.as_dtype(np.asarray(variance), np.float64) + epsilon)
    gam = np.ones_like(rstd) if gamma is None else _dtypes.as_dtype(np.asarray(gamma), np.float64)
    p = xc.shape[0]
    sg = g.sum(axis=0, dtype=np.float64)
    sgx = (g * (xc - mean.astype(compute))).sum(axis=0, dtype=np.float64)
    k1 = gam * rstd
    dx = k1.astype(compute) * g - (k1 * rstd * rstd * sgx / p).astype(compute) * (xc - mean.astype(compute)) \
        - (k1 * sg / p).astype(compute)
    return BatchNormGrads(_norm_result(dx.reshape(x.shape), x.dtype, out), (sgx * rstd).astype(compute),
                          sg.astype(compute))
