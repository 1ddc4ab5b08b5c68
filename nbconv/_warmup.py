"""Compile every kernel the public API can reach, ahead of time (``python -m nbconv warmup``).

The signatures come from replaying a grid of public calls in record mode
(:func:`nbconv._compile.record_calls`: no kernel runs), so they follow the
code: both dtypes, both layouts, one and several threads (the serial and
parallel builds), strides, depth multipliers, packed weights, each backward
path.  They compile in ``jobs`` processes side by side, split by dtype (the
two share no compiled callee), into the disk cache (:mod:`nbconv._cache`).
"""
import os
import sys
import time

import numpy as np

from . import _cache, _compile, _fallback

__all__ = ["signatures", "warmup"]

#: (N, H, W, C, F): one task (one thread), many tasks (parallel), and few pixels with many channels
#: (the backward's whole-intermediate path)
_SHAPES = ((1, 6, 6, 8, 16), (2, 40, 40, 64, 128), (1, 7, 7, 512, 512))


def _bf16_calls():
    """bfloat16 products: NHWC and NCHW, plain and packed weights, bfloat16 and float32 results."""
    import nbconv

    bf16 = nbconv.as_bfloat16(np.zeros(1, np.float32)).dtype
    for channels_last in (True, False):
        fmt = "channels_last" if channels_last else "channels_first"
        for n, h, w, c, f in _SHAPES:
            for strides, dm in ((1, 1), (2, 2)):
                x = np.zeros((n, h, w, c) if channels_last else (n, c, h, w), bf16)
                dk = np.zeros((3, 3, c, dm), bf16)
                pk = np.zeros((1, 1, c * dm, f), bf16)
                pw = np.zeros((1, 1, c, f), bf16)
                conv = dict(strides=strides, padding="same", data_format=fmt)
                for out in (None, np.float32):
                    for weights in (pk, nbconv.pack_pointwise_kernel(pk)):
                        yield nbconv.separable_conv2d, (x, dk, weights, np.zeros(f, np.float32)), dict(
                            conv, output_dtype=out)
                    for weights in (pw, nbconv.pack_pointwise_kernel(pw)):
                        yield nbconv.pointwise_conv2d, (x, weights), dict(data_format=fmt, output_dtype=out)
                    yield nbconv.depthwise_conv2d, (x, dk), dict(conv, output_dtype=out)
                # bfloat16 biases (a bfloat16 model's own), read as bits by the kernels
                for weights in (pk, nbconv.pack_pointwise_kernel(pk)):
                    yield nbconv.separable_conv2d, (x, dk, weights, np.zeros(f, bf16)), conv
                for weights in (pw, nbconv.pack_pointwise_kernel(pw)):
                    yield nbconv.pointwise_conv2d, (x, weights, np.zeros(f, bf16)), dict(data_format=fmt)
                if n == 1 and h == 6:
                    # float32 rounded to bfloat16, and the backward (float32 on the widened operands)
                    x32 = np.zeros(x.shape, np.float32)
                    yield nbconv.separable_conv2d, (x32, np.zeros(dk.shape, np.float32), pk), dict(
                        conv, precision="bfloat16")
                if (n == 1 and h == 6) or (c == 512 and channels_last):
                    # the backward: float32 on the widened operands, or (NHWC, large weights) bfloat16 products
                    y = _fallback.separable_conv2d(x, dk, pk, **conv)
                    yield nbconv.separable_conv2d_backward, (y, x, dk, pk), conv
                    # a mixed policy's calls (keras_layers under mixed_bfloat16): float32 weights and bias
                    dk32, pk32 = np.zeros(dk.shape, np.float32), np.zeros(pk.shape, np.float32)
                    yield nbconv.separable_conv2d, (x, dk32, pk32, np.zeros(f, np.float32)), dict(
                        conv, precision="bfloat16", output_dtype=bf16)
                    yield nbconv.separable_conv2d_backward, (y, x, dk32, pk32), conv


def _norm_calls():
    """The training-mode batch norm (keras_layers' BatchNormalization on jax): float32 and bfloat16, linear and
    with an activation, on one thread and several."""
    import nbconv

    for dtype in (np.float32, nbconv.as_bfloat16(np.zeros(1, np.float32)).dtype):
        for shape in ((2, 6, 6, 8), (8, 40, 40, 64)):
            x = np.zeros(shape, dtype)
            gamma, beta = np.ones(shape[-1], np.float32), np.zeros(shape[-1], np.float32)
            y, mean, var = _fallback.batch_norm_train(x, gamma, beta)
            for act in (None, "relu"):
                yield nbconv.batch_norm_train, (x, gamma, beta), dict(activation=act)
                yield nbconv.batch_norm_train_backward, (x, x, mean, var, gamma), dict(activation=act, output=y)


def _calls():
    import nbconv

    yield from _norm_calls()
    yield from _bf16_calls()
    for dtype in (np.float32, np.float64):
        for channels_last in (True, False):
            fmt = "channels_last" if channels_last else "channels_first"
            for n, h, w, c, f in _SHAPES:
                for strides, dm in ((1, 1), (2, 2)):
                    x = np.zeros((n, h, w, c) if channels_last else (n, c, h, w), dtype)
                    dk = np.zeros((3, 3, c, dm), dtype)
                    pk = np.zeros((1, 1, c * dm, f), dtype)
                    pw = np.zeros((1, 1, c, f), dtype)
                    conv = dict(strides=strides, padding="same", data_format=fmt)
                    y = _fallback.separable_conv2d(x, dk, pk, **conv)
                    d = _fallback.depthwise_conv2d(x, dk, **conv)
                    p = _fallback.pointwise_conv2d(x, pw, data_format=fmt)
                    for act in (None, "relu"):
                        yield nbconv.separable_conv2d, (x, dk, pk, np.zeros(f, dtype)), dict(conv, activation=act)
                        yield nbconv.depthwise_conv2d, (x, dk, np.zeros(c * dm, dtype)), dict(conv, activation=act)
                        yield nbconv.pointwise_conv2d, (x, pw, np.zeros(f, dtype)), dict(data_format=fmt,
                                                                                          activation=act)
                        out = dict(activation=act, output=None if act is None else y)
                        yield nbconv.separable_conv2d_backward, (y, x, dk, pk), dict(conv, **out)
                        yield nbconv.depthwise_conv2d_backward, (d, x, dk), dict(
                            conv, activation=act, output=None if act is None else d)
                        yield nbconv.pointwise_conv2d_backward, (p, x, pw), dict(
                            data_format=fmt, activation=act, output=None if act is None else p)
                    if channels_last:
                        packed = nbconv.pack_pointwise_kernel(pk)
                        yield nbconv.separable_conv2d, (x, dk, packed), conv
                        yield nbconv.pointwise_conv2d, (x, nbconv.pack_pointwise_kernel(pw)), {}
                    for wrt in (("x",), ("kernel",), ("depthwise_kernel",), ("pointwise_kernel", "bias")):
                        if "kernel" in wrt:
                            yield nbconv.depthwise_conv2d_backward, (d, x, dk), dict(conv, wrt=wrt)
                            yield nbconv.pointwise_conv2d_backward, (p, x, pw), dict(data_format=fmt, wrt=wrt)
                        else:
                            yield nbconv.separable_conv2d_backward, (y, x, dk, pk), dict(conv, wrt=wrt)


def signatures():
    """Unique ``(kernel name, signature)`` pairs the grid of public calls reaches, and the pool's companions."""
    found = dict.fromkeys(_compile._COMPANIONS)
    for fn, args, kwargs in _calls():
        for key in _compile.record_calls(fn, args, kwargs, strict=True):
            found.setdefault(key, None)
    return list(found)


def _dtype_of(sig):
    dtypes = [str(t.dtype) for t in sig if hasattr(t, "dtype")]
    if "uint16" in dtypes:  # bfloat16 bits: its kernels share no compiled callee with the float ones
        return "bfloat16"
    return next((d for d in dtypes if d.startswith("float")), "")


def warmup(jobs=None, out=sys.stdout):
    """Compile (or find in the cache) every signature, in ``jobs`` processes; returns the exit status."""
    jobs = max(1, jobs or min(2, os.cpu_count() or 1))
    items = signatures()
    groups = {}
    for item in items:
        groups.setdefault(_dtype_of(item[1]), []).append(item)
    shares = [[] for _ in range(jobs)]
    if len(groups) >= jobs:
        for i, group in enumerate(sorted(groups.values(), key=len, reverse=True)):
            min(shares, key=len).extend(group) if i >= jobs else shares[i].extend(group)
    else:
        for i, item in enumerate(items):
            shares[i % jobs].append(item)
    print(f"nbconv warmup: {len(items)} kernel signatures in {jobs} process(es), cache {_cache.cache_dir()}",
          file=out, flush=True)
    t0 = time.perf_counter()
    procs = [_compile._spawn(["--no-lock", _compile.write_todo(share)], stdout=None, stderr=None)
             for share in shares if share]
    status = 0
    for proc in procs:
        status |= proc.wait()
    from . import _native

    if _native.available():
        _native.ffi_handler()  # jax's native forward (XLA's FFI handler): 2 s to compile, once
    print(f"nbconv warmup: done in {time.perf_counter() - t0:.0f} s" + (" (some failed: see above)" if status else ""),
          file=out, flush=True)
    return 1 if status else 0
