"""``python -m nbconv bench`` in a checkout: the benchmark's own contenders and cases, timed by a plain loop.

``tox -e bench`` (:mod:`benchmarks.__main__`) times every suite with pytest-benchmark in alternating passes and
writes the full report.  ``python -m nbconv bench`` answers in seconds to minutes without pytest-benchmark, on
the same :mod:`benchmarks.cases` and :mod:`benchmarks.contenders` (the same arrays, layouts, torch set-ups and
ONNX graphs, and the same check of every output against the float64 reference): each contender runs in a
process of its own (the thread pools of different libraries spin against each other in one process), and one
table comes back.

The parent (:func:`run`) starts ``python -m benchmarks.cli --worker NAME ...`` per contender; a worker prints
one JSON line.
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time

from . import cases as _cases
from . import process_env
from .report import format_ms, text_table

__all__ = ["SUITES", "CONTENDERS", "DEFAULT_CONTENDERS", "select", "run"]

#: suites timed unless ``suites`` says otherwise
SUITES = ("mobilenet", "xception", "classic")
#: contenders that can be timed this way: those of the single-operation suites (not the Keras models')
CONTENDERS = ("nbconv", "nbconv_packed", "nbconv_2step", "torch_nchw", "torch_nhwc", "onnxruntime", "keras", "numpy")
#: contenders timed unless ``contenders`` says otherwise
DEFAULT_CONTENDERS = ("nbconv", "torch_nchw", "torch_nhwc", "onnxruntime", "keras")
#: seconds of timed calls per case (quick, full), after the warm-up
BUDGET_S = {True: 0.2, False: 0.5}
#: seconds of untimed calls before each case is timed (five times that before a process's first case: pools
#: start, scratch buffers grow and fault in)
WARMUP_S = 0.1
#: output check tolerance, relative to the output's scale (as the benchmark's default)
CHECK_TOL = 1e-4


def select(suites=None, quick=True):
    """The cases timed: those of ``suites`` (default :data:`SUITES`), only the quick ones if ``quick``."""
    from .contenders import OP_SUITES

    suites = list(suites or SUITES)
    bad = [s for s in suites if s not in OP_SUITES]
    if bad:
        raise ValueError(f"Expected suites among {list(OP_SUITES)}. Received: {bad}")
    return _cases.select(suites, quick)


# --- worker (one contender, in its own process) -----------------------------------------------------------------

def _time(bench, budget_s, warmup_s):
    """Median seconds of one call of ``bench``: ``warmup_s`` of untimed calls, then at least 3 timed ones."""
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        bench()
    times = []
    end = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 1000):
        t0 = time.perf_counter()
        bench()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(name, case_ids, budget_s):
    """Time contender ``name`` on ``case_ids``; return what the parent reads (one JSON object)."""
    from . import contenders as _contenders

    contender = _contenders.get(name)
    note = contender.available()
    if note is not None:
        return {"name": name, "note": note}
    contender.init_process()
    by_id = {c.id: c for c in _cases.CASES}
    ms, errors, skips = {}, {}, {}
    warmup = 5 * WARMUP_S
    for cid in case_ids:
        case = by_id[cid]
        if contender.suites is not None and case.suite not in contender.suites:
            skips[cid] = f"{contender.label} does not run the {case.suite} suite"
            continue
        try:
            bench = contender.setup(case)
            out = None if bench.warmed else bench()  # compile / jit / first touch, outside the timing
            err = _contenders.output_error(case, bench, out)
            del out
            if err is not None:
                errors[cid] = err
            ms[cid] = 1e3 * _time(bench, budget_s, warmup)
            warmup = WARMUP_S
        except _contenders.Unsupported as exc:
            skips[cid] = str(exc)
        except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal)
            skips[cid] = f"error: {type(exc).__name__}: {exc}"[:160]
    return {"name": name, "version": contender.version(), "ms": ms, "errors": errors, "skips": skips}


# --- parent -----------------------------------------------------------------------------------------------------

def _missing(contender):
    return [m for m in contender.modules if importlib.util.find_spec(m) is None]


def _launch(name, selected, quick, threads, timeout):
    """Run contender ``name``'s worker; its JSON result, or ``{"note": why}`` when it produced none."""
    cmd = [sys.executable, "-m", "benchmarks.cli", "--worker", name, "--budget", str(BUDGET_S[quick])]
    cmd += [c.id for c in selected]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=process_env({"NBCONV_BENCH_THREADS": str(threads), "NBCONV_COMPILE": "sync"}))
    except subprocess.TimeoutExpired:
        return {"name": name, "note": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"name": name, "note": f"failed (exit code {proc.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


def run(contenders=None, suites=None, quick=True, threads=None, timeout=600.0, out=sys.stdout):
    """Time ``contenders`` (default :data:`DEFAULT_CONTENDERS`) on the cases of ``suites``, each contender in its
    own process with ``threads`` threads (default: every core), and print one table; returns the exit status (1
    when an output differs from the float64 reference)."""
    from .contenders import CONTENDERS as _ALL

    names = list(contenders or DEFAULT_CONTENDERS)
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        raise ValueError(f"Expected contenders among {list(CONTENDERS)}. Received: {bad}")
    selected = select(suites, quick)
    threads = threads or os.cpu_count() or 1
    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    p(f"nbconv bench: the {'quick ' if quick else ''}cases of the benchmark suites {', '.join(suites or SUITES)} "
      f"({len(selected)}; float32, median ms per call), {threads} thread(s) per contender, each contender in its "
      f"own process; kernels not in the cache compile first (python -m nbconv warmup)")
    results, skipped = {}, {}
    for name in names:
        missing = _missing(_ALL[name])
        res = ({"name": name, "note": f"not installed ({', '.join(missing)})"} if missing
               else _launch(name, selected, quick, threads, timeout))
        if "note" in res:
            skipped[name] = res["note"]
        else:
            results[name] = res
    labels = {n: _ALL[n].label for n in results}
    if results:
        head = ["case"] + [labels[n] for n in results]
        body = [[c.shape_label] + [_cell(results, n, c.id) for n in results] for c in selected]
        for line in text_table(head, body):
            p(line)
        for line in _ratios(results, labels, selected):
            p(line)
    else:
        p("no contender ran")
    failed = [(n, cid, e) for n, r in results.items() for cid, e in r["errors"].items() if e > CHECK_TOL]
    nchecks = sum(len(r["errors"]) for r in results.values())
    if nchecks:
        p(f"checks: {nchecks} outputs compared with the float64 reference (tests/reference.py): "
          + (f"{len(failed)} MISMATCH(ES), marked '!': " + ", ".join(f"{labels[n]} {cid} ({e:.1e})"
                                                                      for n, cid, e in failed)
             if failed else f"all within {CHECK_TOL:g} of the output's scale"))
    notes = sorted({why for r in results.values() for why in r["skips"].values()})
    for note in notes:
        p(f"  note: {note}")
    for name, why in skipped.items():
        p(f"skipped {name}: {why}")
    p("the full benchmark (every suite, alternating passes, memory and first-call probes, the report and "
      "docs/benchmarks.md): tox -e bench")
    return 1 if failed else 0


def _cell(results, name, cid):
    r = results[name]
    if cid not in r["ms"]:
        return "error" if r["skips"].get(cid, "").startswith("error") else "skip"
    t = r["ms"][cid]
    nb = results.get("nbconv", {}).get("ms", {}).get(cid)
    bad = "!" if r["errors"].get(cid, 0) > CHECK_TOL else ""
    return format_ms(t) + bad + (f" ({t / nb:.2f}x)" if nb and name != "nbconv" else "")


def _ratios(results, labels, selected):
    """Per contender, the geomean of t(contender)/t(nbconv) over the cases both ran."""
    nb = (results.get("nbconv") or {}).get("ms") or {}
    out = []
    for name, r in results.items():
        pairs = [r["ms"][c.id] / nb[c.id] for c in selected if name != "nbconv" and c.id in r["ms"] and c.id in nb]
        if pairs:
            g = math.exp(sum(math.log(x) for x in pairs) / len(pairs))
            out.append(f"{labels[name]}: geomean t({labels[name]})/t(nbconv) = {g:.2f} over {len(pairs)} cases "
                       f"(above 1: nbconv is faster)")
    return out


def main(argv=None):
    """The worker's entry point: ``python -m benchmarks.cli --worker NAME --budget S CASE_ID ...``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli",
                                     description="one contender's process of python -m nbconv bench")
    parser.add_argument("--worker", required=True, choices=CONTENDERS)
    parser.add_argument("--budget", type=float, default=BUDGET_S[True])
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args(argv)
    print(json.dumps(_worker(args.worker, args.cases, args.budget)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
