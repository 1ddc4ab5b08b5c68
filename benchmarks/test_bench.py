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
NBCONV_BENCH_IDLE_MS     comma-separated idle gaps in ms (e.g. ``0,5,20``): time each case of the idle suites once
                         per gap, sleeping that long before every timed call (the sleep is not timed)
NBCONV_BENCH_IDLE_ROUNDS timed calls per case and gap in that mode (default 25)
NBCONV_BENCH_WARMUP_S    seconds of untimed back-to-back calls before a case is timed (default 0.2; five times
                         that before the process's first timed case)
"""
import json
import os
import platform
import time

import pytest

from benchmarks import cases as _cases
from benchmarks import contenders as _contenders

CONTENDER = _contenders.get(os.environ.get("NBCONV_BENCH_CONTENDER", "nbconv"))
SUITES = [s for s in os.environ.get("NBCONV_BENCH_SUITES", "").split(",") if s]
QUICK = os.environ.get("NBCONV_BENCH_QUICK", "0") == "1"
CHECK = os.environ.get("NBCONV_BENCH_CHECK", "1") != "0"
INFO_PATH = os.environ.get("NBCONV_BENCH_INFO")
CHECK_TOL = float(os.environ.get("NBCONV_BENCH_CHECK_TOL", "1e-4"))
IDLE_MS = [float(g) for g in os.environ.get("NBCONV_BENCH_IDLE_MS", "").split(",") if g.strip()]
IDLE_ROUNDS = int(os.environ.get("NBCONV_BENCH_IDLE_ROUNDS", "25"))
WARMUP_S = float(os.environ.get("NBCONV_BENCH_WARMUP_S", "0.2"))


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
if IDLE_MS:
    CASES = [_cases.IdleCase(c, gap) for c in CASES if not isinstance(c, str) and c.suite in _cases.IDLE_SUITES
             for gap in IDLE_MS]


def _case_id(case):
    return case if isinstance(case, str) else case.id


_WARMED = []


def _warm_up(bench, seconds):
    """Back-to-back untimed calls for ``seconds`` (at least two): caches, thread pools and lazily built state
    settle before the timing, so a run of few rounds measures what a long one does.  The process's first case
    gets five times as long (thread pools start, scratch buffers grow and fault in)."""
    if not _WARMED:
        seconds *= 5
        _WARMED.append(True)
    end = time.perf_counter() + seconds
    calls = 0
    while calls < 2 or time.perf_counter() < end:
        bench()
        calls += 1


def _run(benchmark, case):
    cid = _case_id(case)  # an idle case's id names its gap
    if NOTE is not None:
        INFO["skips"][cid] = NOTE
        _write_info()
        pytest.skip(NOTE)
    gap_ms = case.gap_ms if isinstance(case, _cases.IdleCase) else None
    if gap_ms is not None:
        case = case.case
    try:
        bench = CONTENDER.setup(case)
    except _contenders.Unsupported as exc:
        INFO["skips"][cid] = str(exc)
        _write_info()
        pytest.skip(str(exc))
    try:
        # compile / jit / first-touch, outside the timing (unless the contender's setup already made that call)
        out = None if bench.warmed else bench()
        # an idle run times the same set-up as the main run, which checked its output
        err = _contenders.output_error(case, bench, out) if CHECK and not isinstance(case, str) and gap_ms is None \
            else None
        if err is not None:
            INFO["checks"][case.id] = err
            benchmark.extra_info["check_rel_err"] = err
        del out
        if not isinstance(case, str) and not bench.warmed:
            # a slow whole-model call (fixed rounds) gets one more call, as some libraries finish set-up on it
            _warm_up(bench, 0 if bench.rounds else WARMUP_S)
    except Exception as exc:
        INFO["errors"][cid] = f"{type(exc).__name__}: {exc}"
        _write_info()
        raise
    benchmark.group = _case_id(case)
    benchmark.extra_info.update(contender=CONTENDER.name, case=_case_id(case))
    if not isinstance(case, str):
        benchmark.extra_info.update(flops=case.flops, shape=case.shape_label, suite=case.suite)
    else:
        benchmark.extra_info.update(flops=CONTENDER.flops)
    if gap_ms is not None:
        benchmark.group = cid
        benchmark.extra_info["idle_ms"] = gap_ms
        benchmark.pedantic(bench, setup=lambda: time.sleep(gap_ms / 1e3), rounds=IDLE_ROUNDS, iterations=1)
    elif bench.rounds:
        benchmark.pedantic(bench, rounds=bench.rounds, iterations=1)
    else:
        benchmark(bench)
    if bench.extra is not None:
        benchmark.extra_info.update(bench.extra())
    if "threadpools" not in INFO:
        INFO["threadpools"] = _threadpools()  # after a call, so lazily loaded pools are listed
    _write_info()
    tol = _cases.BF16_CHECK_TOL if getattr(case, "bf16", False) else CHECK_TOL
    if benchmark.extra_info.get("check_rel_err", 0) > tol:
        INFO["errors"][case.id] = (f"output differs from the float64 reference (relative error "
                                   f"{benchmark.extra_info['check_rel_err']:.3g})")
        _write_info()
        pytest.fail(f"output differs from the float64 reference: relative error "
                    f"{benchmark.extra_info['check_rel_err']:.3g} > {tol}")


def _make_test(name):
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test(benchmark, case):
        _run(benchmark, case)
    test.__name__ = f"test_{name}"
    return test


globals()[f"test_{CONTENDER.name}"] = _make_test(CONTENDER.name)
_write_info()
