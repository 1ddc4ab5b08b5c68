"""pytest-benchmark suite: one contender per process.

``python -m benchmarks`` (``tox -e bench``) runs this file once per contender,
each in a fresh process, choosing the contender with environment variables, so
the thread pools of Numba, PyTorch, ONNX Runtime and XLA never share a process.
Run directly, it benchmarks nbconv alone, which is what tracking nbconv over
time needs::

    pytest benchmarks/test_bench.py --benchmark-autosave
    pytest benchmarks/test_bench.py --benchmark-compare

Environment (set by the runner):

NBCONV_BENCH_CONTENDER   contender name (default ``nbconv``; see ``benchmarks.contenders``)
NBCONV_BENCH_SUITES      comma-separated suites (default: all)
NBCONV_BENCH_QUICK       ``1``: only the cases marked quick
NBCONV_BENCH_CHECK       ``0``: skip the check of each output against the float64 reference
NBCONV_BENCH_CHECK_TOL   tolerance of that check, relative to the output's scale (default 1e-4)
NBCONV_BENCH_INFO        path of a JSON file receiving versions, thread pools, skips and checks
"""
import json
import os
import platform

import pytest

from benchmarks import cases as _cases
from benchmarks import contenders as _contenders

CONTENDER = _contenders.get(os.environ.get("NBCONV_BENCH_CONTENDER", "nbconv"))
SUITES = [s for s in os.environ.get("NBCONV_BENCH_SUITES", "").split(",") if s]
QUICK = os.environ.get("NBCONV_BENCH_QUICK", "0") == "1"
CHECK = os.environ.get("NBCONV_BENCH_CHECK", "1") != "0"
INFO_PATH = os.environ.get("NBCONV_BENCH_INFO")
CHECK_TOL = float(os.environ.get("NBCONV_BENCH_CHECK_TOL", "1e-4"))


def _pin_cpus(n):
    """Pin this process to ``n`` CPUs when the machine has more, so every library's pool sees ``n`` cores."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if 0 < n < len(cpus):
        os.sched_setaffinity(0, cpus[:n])
        return cpus[:n]
    return None


# e.g. KERAS_BACKEND of the models suite's contenders, when this file is run directly (the runner sets them)
for _k, _v in getattr(CONTENDER, "env", {}).items():
    os.environ.setdefault(_k, _v)
PINNED = _pin_cpus(_contenders.THREADS)
NOTE = CONTENDER.available()
INFO = {"contender": CONTENDER.name, "label": CONTENDER.label, "available": NOTE is None, "note": NOTE,
        "pid": os.getpid(), "python": platform.python_version(), "pinned_cpus": PINNED, "skips": {}, "checks": {},
        "check_tol": CHECK_TOL, "errors": {}}


def _threadpools():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: v for k, v in d.items() if k in ("user_api", "internal_api", "prefix", "version", "num_threads",
                                                   "architecture", "threading_layer", "filepath")}
            for d in threadpool_info()]


def _write_info():
    if INFO_PATH:
        with open(INFO_PATH, "w") as fh:
            json.dump(INFO, fh, indent=1, default=str)


if NOTE is None:
    CONTENDER.init_process()
    INFO["version"] = CONTENDER.version()
    INFO["info"] = CONTENDER.info()

if CONTENDER.name == "sgemm":
    CASES = ["sgemm-4096"]
else:
    CASES = [c for c in _cases.select(SUITES, QUICK)
             if CONTENDER.suites is None or c.suite in CONTENDER.suites]


def _case_id(case):
    return case if isinstance(case, str) else case.id


def _run(benchmark, case):
    if NOTE is not None:
        INFO["skips"][_case_id(case)] = NOTE
        _write_info()
        pytest.skip(NOTE)
    try:
        bench = CONTENDER.setup(case)
    except _contenders.Unsupported as exc:
        INFO["skips"][_case_id(case)] = str(exc)
        _write_info()
        pytest.skip(str(exc))
    try:
        # compile / jit / first-touch, outside the timing (unless the contender's setup already made that call)
        out = None if bench.warmed else bench()
        if bench.check and CHECK and not isinstance(case, str):
            x, dk, pk = _cases.make_arrays(case)
            ref = _cases.reference_nhwc(case, x, dk, pk, bench.pads)
            err = _contenders.rel_error(bench.to_nhwc(out), ref)
            INFO["checks"][case.id] = err
            benchmark.extra_info["check_rel_err"] = err
        elif bench.rel_err is not None and CHECK:
            # the contender compared against its own reference (e.g. a converted model against the original)
            INFO["checks"][case.id] = bench.rel_err
            benchmark.extra_info["check_rel_err"] = bench.rel_err
        del out
        if not isinstance(case, str) and not bench.warmed:
            bench()  # a second untimed call: some libraries finish their set-up on it
    except Exception as exc:
        INFO["errors"][_case_id(case)] = f"{type(exc).__name__}: {exc}"
        _write_info()
        raise
    benchmark.group = _case_id(case)
    benchmark.extra_info.update(contender=CONTENDER.name, case=_case_id(case))
    if not isinstance(case, str):
        benchmark.extra_info.update(flops=case.flops, shape=case.shape_label, suite=case.suite)
    else:
        benchmark.extra_info.update(flops=CONTENDER.flops)
    if bench.rounds:
        benchmark.pedantic(bench, rounds=bench.rounds, iterations=1)
    else:
        benchmark(bench)
    if bench.extra is not None:
        benchmark.extra_info.update(bench.extra())
    if "threadpools" not in INFO:
        INFO["threadpools"] = _threadpools()  # after a call, so lazily loaded pools are listed
    _write_info()
    if benchmark.extra_info.get("check_rel_err", 0) > CHECK_TOL:
        INFO["errors"][case.id] = (f"output differs from the float64 reference (relative error "
                                   f"{benchmark.extra_info['check_rel_err']:.3g})")
        _write_info()
        pytest.fail(f"output differs from the float64 reference: relative error "
                    f"{benchmark.extra_info['check_rel_err']:.3g} > {CHECK_TOL}")


def _make_test(name):
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test(benchmark, case):
        _run(benchmark, case)
    test.__name__ = f"test_{name}"
    return test


globals()[f"test_{CONTENDER.name}"] = _make_test(CONTENDER.name)
_write_info()
