"""Measurements that need a fresh process each: peak memory of one call, and first-call times.

Run by the runner (``python -m benchmarks``); each probe prints one JSON line.

``python -m benchmarks.probes memory fused|two_step [--batch 32]``
    Peak RSS of one batch-32 112x112x64->128 3x3 'same' separable call
    (``fused``: ``nbconv.separable_conv2d``; ``two_step``: ``depthwise_conv2d``
    then ``pointwise_conv2d``, which materialises the depthwise intermediate).
    The kernels are compiled on a tiny shape first; the process's peak RSS
    counter (VmHWM) is then reset (``/proc/self/clear_refs``), so the figure
    is what the call itself adds on top of the inputs already in memory.

``python -m benchmarks.probes firstcall``
    What a user of a fresh install waits for, in this new process: ``import
    nbconv``, the first ``separable_conv2d`` (1x56x56x32->64, float32, NHWC,
    'same', relu), then the first call of each other function and variant
    (depthwise, pointwise, stride 2, channels_first, float64, each backward),
    then how long until the background compile is done and a call runs
    compiled.  The runner runs it with ``NBCONV_CACHE_DIR`` set to an empty
    temporary directory, cold in the default ``background`` mode, then warm
    (the cache the cold run filled), then cold again with ``NBCONV_COMPILE=sync``
    (the first separable call only, which waits for its compile, as with Numba alone).

``python -m benchmarks.probes firstpredict keras|converted``
    The first ``predict_on_batch`` of keras.applications.MobileNet (96x96,
    batch 2) with Keras's own layers or converted to nbconv's, on
    ``KERAS_BACKEND``; the runner gives each an empty kernel cache.
"""
import argparse
import json
import resource
import sys
import time

import numpy as np

__all__ = ["memory", "firstcall", "firstpredict", "MEMORY_SHAPE"]

#: (N, H, W, C, F) of the memory benchmark
MEMORY_SHAPE = (32, 112, 112, 64, 128)


def _status_kb(field):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak():
    """Reset the kernel's peak-RSS counter of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory(mode="fused", batch=MEMORY_SHAPE[0]):
    import nbconv

    _, h, w, c, f = MEMORY_SHAPE
    rng = np.random.default_rng(0)
    dk = rng.standard_normal((3, 3, c, 1), dtype=np.float32)
    pk = rng.standard_normal((1, 1, c, f), dtype=np.float32)

    def call(x):
        if mode == "fused":
            return nbconv.separable_conv2d(x, dk, pk, padding="same")
        y = nbconv.depthwise_conv2d(x, dk, padding="same")
        return nbconv.pointwise_conv2d(y, pk)

    call(rng.standard_normal((1, 9, 9, c), dtype=np.float32))  # compile outside the measurement
    x = rng.standard_normal((batch, h, w, c), dtype=np.float32)
    rss_before = _status_kb("VmRSS")
    exact = _reset_peak()
    rss_start = _status_kb("VmRSS")
    t0 = time.perf_counter()
    out = call(x)
    elapsed = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mib = 1024 * 1024
    res = {
        "mode": mode,
        "shape": [batch, h, w, c, f],
        "input_mib": x.nbytes / mib,
        "output_mib": out.nbytes / mib,
        "intermediate_mib": batch * h * w * c * 4 / mib,
        "weights_mib": (dk.nbytes + pk.nbytes) / mib,
        "rss_before_call_mib": rss_before / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_increase_mib": (peak - (rss_start if exact else rss_before)) / 1024,
        "peak_exact": exact,
        "seconds": elapsed,
        "num_threads": nbconv.get_num_threads(),
    }
    res["scratch_mib"] = res["peak_increase_mib"] - res["output_mib"]
    return res


def _firstcall_cases(nbconv):
    """``(label, thunk)``: the first separable call, then one of each other function and variant."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 56, 56, 32), dtype=np.float32)
    dk = rng.standard_normal((3, 3, 32, 1), dtype=np.float32)
    pk = rng.standard_normal((1, 1, 32, 64), dtype=np.float32)
    xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    x64, dk64, pk64 = (a.astype(np.float64) for a in (x, dk, pk))
    kw = dict(padding="same", activation="relu")
    y = {}
    return [
        ("separable", lambda: y.setdefault("y", nbconv.separable_conv2d(x, dk, pk, **kw))),
        ("depthwise", lambda: nbconv.depthwise_conv2d(x, dk, padding="same")),
        ("pointwise", lambda: nbconv.pointwise_conv2d(x, pk)),
        ("separable stride 2", lambda: nbconv.separable_conv2d(x, dk, pk, strides=2, **kw)),
        ("separable channels_first", lambda: nbconv.separable_conv2d(xt, dk, pk, data_format="channels_first",
                                                                     **kw)),
        ("separable float64", lambda: nbconv.separable_conv2d(x64, dk64, pk64, **kw)),
        ("separable backward", lambda: nbconv.separable_conv2d_backward(y["y"], x, dk, pk, output=y["y"], **kw)),
        ("depthwise backward", lambda: nbconv.depthwise_conv2d_backward(x, x, dk, padding="same")),
        ("pointwise backward", lambda: nbconv.pointwise_conv2d_backward(y["y"], x, pk)),
    ]


def firstcall(only_first=False):
    t0 = time.perf_counter()
    import nbconv
    from nbconv import _compile

    t1 = time.perf_counter()
    res = {"import_s": t1 - t0, "mode": _compile.get_mode(), "cache_dir": nbconv._cache.cache_dir(), "calls": {}}
    cases = _firstcall_cases(nbconv)[:1 if only_first else None]
    t_start = time.perf_counter()
    for label, thunk in cases:
        t = time.perf_counter()
        thunk()
        res["calls"][label] = time.perf_counter() - t
    res["first_call_s"] = res["calls"]["separable"]
    res["import_plus_first_call_s"] = res["import_s"] + res["first_call_s"]
    res["all_first_calls_s"] = sum(res["calls"].values())
    res["pending_kernels"] = _compile.pending()
    _compile.wait()
    res["compiled_after_s"] = time.perf_counter() - t_start  # from the first call until every kernel is cached
    t = time.perf_counter()
    cases[0][1]()
    res["compiled_call_s"] = time.perf_counter() - t  # loads the cached kernel, then runs it
    res["loaded"] = bool(nbconv.forward.separable.signatures)
    return res


def firstpredict(variant):
    """The first ``predict_on_batch`` of keras.applications.MobileNet (96x96, batch 2), Keras's own layers or
    ``keras_layers.convert``-ed, on the backend in ``KERAS_BACKEND``; then waits for any background compile."""
    import keras
    import keras_layers
    from nbconv import _compile

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNet(input_shape=(96, 96, 3), weights=None)
    if variant == "converted":
        model = keras_layers.convert(model)
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype("float32")
    t = time.perf_counter()
    model.predict_on_batch(x)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.predict_on_batch(x)
    res = {"backend": keras.backend.backend(), "variant": variant, "first_predict_s": first,
           "second_predict_s": time.perf_counter() - t, "pending_kernels": _compile.pending()}
    _compile.wait()
    return res


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes")
    sub = p.add_subparsers(dest="probe", required=True)
    m = sub.add_parser("memory")
    m.add_argument("mode", choices=("fused", "two_step"))
    m.add_argument("--batch", type=int, default=MEMORY_SHAPE[0])
    f = sub.add_parser("firstcall")
    f.add_argument("--only-first", action="store_true", help="the first separable call only")
    fp = sub.add_parser("firstpredict")
    fp.add_argument("variant", choices=("keras", "converted"))
    a = p.parse_args(argv)
    if a.probe == "memory":
        res = memory(a.mode, a.batch)
    elif a.probe == "firstpredict":
        res = firstpredict(a.variant)
    else:
        res = firstcall(a.only_first)
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
