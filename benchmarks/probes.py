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
    Time of ``import nbconv`` and of the first ``separable_conv2d`` call
    (56x56x128->128, batch 1) in this process.  The runner runs it twice with
    ``NUMBA_CACHE_DIR`` set to the same empty temporary directory: the first
    run is cold (compiles the kernels and fills the cache), the second warm
    (loads them from the cache).
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

__all__ = ["memory", "firstcall", "MEMORY_SHAPE"]

#: (N, H, W, C, F) of the memory benchmark (issue 2)
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


def firstcall():
    t0 = time.perf_counter()
    import nbconv
    t1 = time.perf_counter()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 56, 56, 128), dtype=np.float32)
    dk = rng.standard_normal((3, 3, 128, 1), dtype=np.float32)
    pk = rng.standard_normal((1, 1, 128, 128), dtype=np.float32)
    t2 = time.perf_counter()
    nbconv.separable_conv2d(x, dk, pk, padding="same")
    t3 = time.perf_counter()
    nbconv.separable_conv2d(x, dk, pk, padding="same")
    t4 = time.perf_counter()
    return {"import_s": t1 - t0, "first_call_s": t3 - t2, "import_plus_first_call_s": (t1 - t0) + (t3 - t2),
            "second_call_s": t4 - t3, "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR")}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.probes")
    sub = p.add_subparsers(dest="probe", required=True)
    m = sub.add_parser("memory")
    m.add_argument("mode", choices=("fused", "two_step"))
    m.add_argument("--batch", type=int, default=MEMORY_SHAPE[0])
    sub.add_parser("firstcall")
    a = p.parse_args(argv)
    res = memory(a.mode, a.batch) if a.probe == "memory" else firstcall()
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
