"""``python -m benchmarks`` (``tox -e bench``): run every contender in its own process, then print the report.

Usage::

    python -m benchmarks                      # full run (about 15-20 minutes on 2 cores)
    python -m benchmarks --quick              # a couple of minutes: few shapes, few rounds
    python -m benchmarks --suite mobilenet,hard --contenders nbconv,onnxruntime
    python -m benchmarks --list               # suites, cases and contenders
    tox -e bench -- --quick                   # the same through tox

When the run finishes the report is printed, saved under ``benchmarks/results/`` and written as the markdown
page ``docs/benchmarks.md`` that the README links to (``--markdown none`` leaves the page as it is).

Any option the runner does not know is passed to every pytest-benchmark
process.  Each contender keeps its own pytest-benchmark storage
(``.benchmarks/<contender>/``), so nbconv can be tracked over time::

    tox -e bench -- --contenders nbconv --benchmark-autosave     # save this run
    tox -e bench -- --contenders nbconv --benchmark-compare      # compare with the last saved run
    tox -e bench -- --contenders nbconv --benchmark-compare=0001 --benchmark-compare-fail=median:10%

How contenders are kept apart: the runner starts one ``python -m pytest
benchmarks/test_bench.py`` process per contender, one after another, choosing
the contender with ``NBCONV_BENCH_CONTENDER``; a process imports only its own
library, so the thread pools of Numba, PyTorch, ONNX Runtime and XLA never
coexist.  The sgemm peak, the memory probe and the first-call probes also run
in processes of their own.  The ``models`` suite runs one process per
Keras backend (``models_jax``, ``models_tensorflow``, ``models_torch``), with
``KERAS_BACKEND`` set by the runner before Keras is imported; a backend that is
not installed is reported as absent, and a ``--quick`` run measures jax only.
A full run makes two passes over the contenders, alternating (``--passes``),
and per case keeps each contender's faster pass: the speed of a shared
machine drifts between spells, and one process per contender would rank a
contender by the spell it fell in.
Idle runs (``--idle``, default 0, 5 and 20 ms): real callers leave gaps between
calls (a model's other layers, a server between requests), and after a few ms
idle this machine's cores run the next call slower.  The MobileNetV1 + Xception
cases are timed again, with a sleep before every timed call (not timed), for
nbconv on the runner's threads and on one, nbconv with packed weights, PyTorch
and ONNX Runtime, one process each, after the main passes, in as many
alternating passes as those (per case the faster pass counts).
Environment variables such as ``OPENBLAS_CORETYPE``
are passed through unchanged and printed in the report.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from . import cases as _cases
from . import process_env
from . import report as _report
from .contenders import CONTENDERS

HERE = os.path.dirname(os.path.abspath(__file__))
#: order in which contenders run (the sgemm peak first)
ORDER = ("sgemm", "nbconv", "nbconv_2step", "nbconv_packed", "torch_nchw", "torch_nhwc", "onnxruntime", "keras",
         "numpy", "nbconv_layers", "keras_model", "nbconv_layers_tensorflow", "keras_model_tensorflow",
         "nbconv_layers_torch", "keras_model_torch", "models_jax", "models_tensorflow", "models_torch")
ENV_SHOWN = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
             "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR", "KERAS_BACKEND", "JAX_PLATFORMS",
             "XLA_FLAGS")
ROUNDS = {False: ["--benchmark-min-rounds=5", "--benchmark-max-time=0.4"],
          True: ["--benchmark-min-rounds=3", "--benchmark-max-time=0.1"]}
#: the idle runs: (tag, contender, threads or None for --threads)
IDLE_RUNS = (("nbconv.idle", "nbconv", None), ("nbconv.idle.t1", "nbconv", 1),
             ("nbconv_packed.idle", "nbconv_packed", None), ("torch_nchw.idle", "torch_nchw", None),
             ("torch_nhwc.idle", "torch_nhwc", None),
             ("onnxruntime.idle", "onnxruntime", None))


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark nbconv against Keras, PyTorch, ONNX Runtime and NumPy, one process per contender, "
                    "and print the report. Unknown options go to pytest-benchmark.",
        epilog="tracking nbconv over time: --contenders nbconv --benchmark-autosave, then "
               "--contenders nbconv --benchmark-compare")
    p.add_argument("--quick", action="store_true", help="few shapes, few rounds (a couple of minutes)")
    p.add_argument("--suite", action="append", default=[],
                   help=f"suite(s) to run, comma-separated or repeated; among {', '.join(_cases.SUITES)}")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated contenders (default all): {', '.join(n for n in ORDER if n != 'sgemm')}")
    p.add_argument("--threads", type=int, default=2, help="threads per contender (default 2)")
    p.add_argument("--no-peak", action="store_true", help="skip the sgemm peak measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    p.add_argument("--no-firstcall", action="store_true", help="skip the first-call probes")
    p.add_argument("--firstcall", action="store_true",
                   help="run the first-call probes in a --quick run too (a cold compile takes tens of seconds)")
    p.add_argument("--no-check", action="store_true", help="skip checking outputs against the float64 reference")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder (default benchmarks/results)")
    p.add_argument("--markdown", default=_report.MARKDOWN_PAGE,
                   help="markdown page of the run's report (default docs/benchmarks.md, linked from the README), or "
                        "'none'")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the rounds the report uses (default median; min resists a noisy machine)")
    p.add_argument("--show-output", action="store_true", help="print each pytest process's output")
    p.add_argument("--passes", type=int, default=None,
                   help="times each contender runs, alternating with the others (default 2, 1 with --quick); per "
                        "case the pass with the lowest time counts, as this machine's speed drifts between spells "
                        "(the models suite runs once)")
    p.add_argument("--idle", default="0,5,20",
                   help="idle gaps in ms, comma-separated (default 0,5,20), or 'none': the MobileNetV1 + Xception "
                        "cases are timed again sleeping that long before every call, for nbconv (also on 1 thread), "
                        "PyTorch and ONNX Runtime, each in its own process")
    p.add_argument("--idle-rounds", type=int, default=None,
                   help="timed calls per case and gap in the idle runs (default 25, 10 with --quick)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per process (default 1800)")
    p.add_argument("--list", action="store_true", help="list suites, cases and contenders, then exit")
    return p


def _list():
    for suite in _cases.SUITES:
        print(f"{suite}: {_cases.SUITE_TITLES[suite]}")
        for c in _cases.select([suite]):
            mac = sum(c.macs) / 1e6
            print(f"  {c.id:<40} {c.shape_label:<36} {mac:9.1f} M MAC{'  (quick)' if c.quick else ''}")
    print("contenders:")
    for name in ORDER:
        c = CONTENDERS[name]
        print(f"  {name:<14} {c.label}{'' if c.peer else '  (not a peer)'}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg():
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _run(cmd, env, log_path, timeout, show):
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=os.getcwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")) + \
                  f"\n*** killed after {timeout:.0f} s\n"
            rc = -9
        log.write(out)
    if show:
        sys.stdout.write(out)
    return rc, out, time.perf_counter() - t0


def _pytest_summary(out):
    for line in reversed(out.strip().splitlines()):
        if " in " in line and any(w in line for w in ("passed", "failed", "skipped", "error", "no tests")):
            return line.strip("= ")
    return "no pytest summary (see log)"


def _probe(args, env, timeout):
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.probes"] + args, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit code {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def _first_predict(args):
    """{backend: {variant: probe result}}: a MobileNet's first predict, Keras's layers vs converted, each in a new
    process with an empty kernel cache, on each installed Keras backend."""
    found = {}
    for backend, module in (("jax", "jax"), ("torch", "torch"), ("tensorflow", "tensorflow")):
        if importlib.util.find_spec(module) is None:
            continue
        found[backend] = {}
        for variant in ("keras", "converted"):
            cache = tempfile.mkdtemp(prefix="nbconv-kernel-cache-")
            try:
                env = process_env({"KERAS_BACKEND": backend, "NBCONV_CACHE_DIR": cache, "NBCONV_COMPILE": "background",
                                   "OMP_WAIT_POLICY": "PASSIVE", "NUMBA_NUM_THREADS": str(args.threads)})
                found[backend][variant] = res = _probe(["firstpredict", variant], env, max(args.timeout, 900))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            print(f"- first predict {backend:<10} {variant:<9} "
                  + (res.get("error") or f"{res['first_predict_s']:.3f} s"))
    return found


def _merge_passes(raw, name, passes, stat):
    """Fold ``<name>.passK.json`` into ``<name>.json``: per benchmark, the pass with the lowest ``stat`` time.

    This machine's speed drifts by up to 1.5x within seconds (measured: the
    same call at 2.85 ms, then 4.2-4.7 ms, in one process), so a contender
    whose single process fell in a slow spell would be ranked by the spell.
    Alternating passes give each contender more than one chance; the passes
    stay on disk, and the merged file records which pass each entry came from.
    """
    base_path = os.path.join(raw, f"{name}.json")
    try:
        with open(base_path) as fh:
            merged = json.load(fh)
    except (OSError, ValueError):
        return
    best = {b["fullname"]: b for b in merged.get("benchmarks", [])}
    for b in best.values():
        b.setdefault("extra_info", {})["pass"] = 1
    for p in range(2, passes + 1):
        try:
            with open(os.path.join(raw, f"{name}.pass{p}.json")) as fh:
                other = json.load(fh)
        except (OSError, ValueError):
            continue
        for b in other.get("benchmarks", []):
            b.setdefault("extra_info", {})["pass"] = p
            old = best.get(b["fullname"])
            if old is None or b["stats"][stat] < old["stats"][stat]:
                best[b["fullname"]] = b
    if passes > 1:
        merged["benchmarks"] = list(best.values())
        with open(base_path, "w") as fh:
            json.dump(merged, fh)


def _idle_gaps(text):
    if not text or text.strip().lower() == "none":
        return []
    try:
        gaps = [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        gaps = None
    if gaps is None or any(not 0 <= g <= 1000 for g in gaps):
        _parser().error(f"--idle expects gaps in ms between 0 and 1000, comma-separated, or 'none'. Received: {text!r}")
    return gaps


def _run_contender(args, raw, suites, passthrough, show, name, tag, label, extra_env):
    """One pytest-benchmark process for contender ``name``, results in ``<raw>/<tag>.json``; returns (rc, s)."""
    contender = CONTENDERS[name]
    extra = {"NBCONV_BENCH_CONTENDER": name, "NBCONV_BENCH_SUITES": ",".join(suites),
             "NBCONV_BENCH_QUICK": "1" if args.quick else "0", "NBCONV_BENCH_CHECK": "0" if args.no_check else "1",
             "NBCONV_BENCH_INFO": os.path.join(raw, f"{tag.split('.pass')[0]}.info.json"),
             "NBCONV_BENCH_THREADS": str(args.threads)}
    extra.update(getattr(contender, "env", {}))  # e.g. KERAS_BACKEND for the models suite's backends
    extra.update(extra_env)
    cmd = [sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench.py"), "-p", "no:cacheprovider",
           "-o", "addopts=", "-q", "-rfE", f"--benchmark-json={os.path.join(raw, tag + '.json')}",
           "--benchmark-disable-gc", "--benchmark-warmup=off", "--benchmark-sort=name",
           "--benchmark-columns=min,median,iqr,rounds"]
    cmd += ROUNDS[args.quick]
    if not any(a.startswith("--benchmark-storage") for a in passthrough):
        cmd.append(f"--benchmark-storage=file://{os.path.join(os.getcwd(), '.benchmarks', name)}")
    cmd += passthrough
    print(f"- {label:<19} ...", end="", flush=True)
    rc, out, secs = _run(cmd, process_env(extra), os.path.join(raw, f"{tag}.log"), args.timeout, show)
    print(f"\r- {label:<19} {secs:6.1f} s  {_pytest_summary(out)}" + ("" if rc in (0, 5) else
                                                                      f"  (exit code {rc}, log {tag}.log)"))
    return rc, secs


def _selection(args, passthrough):
    """``(suites, contender names, cases, passthrough)`` from the command line (errors exit through argparse)."""
    suites = [s for item in args.suite for s in item.split(",") if s]
    unknown = [s for s in suites if s not in _cases.SUITES]
    if unknown:
        _parser().error(f"unknown suite(s) {unknown}; expected among {list(_cases.SUITES)}")
    names = [n for n in (args.contenders.split(",") if args.contenders else ORDER) if n]
    bad = [n for n in names if n not in CONTENDERS]
    if bad:
        _parser().error(f"unknown contender(s) {bad}; expected among {[n for n in ORDER]}")
    if args.no_peak:
        names = [n for n in names if n != "sgemm"]
    elif "sgemm" not in names:
        names.insert(0, "sgemm")
    names = [n for n in ORDER if n in names]
    selected = _cases.select(suites, args.quick)
    if not selected:
        _parser().error("no case selected")
    if any(a.startswith("--benchmark-json") for a in passthrough):
        print("note: --benchmark-json is set by the runner for each contender; yours is ignored")
        passthrough = [a for a in passthrough if not a.startswith("--benchmark-json")]
    # contenders with no case in this selection do not run
    names = [n for n in names if n == "sgemm" or (
        not (args.quick and getattr(CONTENDERS[n], "full_only", False))
        and any(CONTENDERS[n].suites is None or c.suite in CONTENDERS[n].suites for c in selected))]
    return suites, names, selected, passthrough


def _meta(args, argv, suites, names, started):
    meta = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "stamp": started.strftime("%Y%m%d-%H%M%S"),
            "quick": args.quick, "suites": suites or list(_cases.SUITES), "contenders": list(names),
            "threads": args.threads, "python": platform.python_version(), "platform": platform.platform(terse=True),
            "cpu": _cpu_model(), "cpus": os.cpu_count(), "stat": args.stat,
            "argv": sys.argv[1:] if argv is None else list(argv), "env": {k: os.environ.get(k) for k in ENV_SHOWN},
            "returncodes": {}, "seconds": {}, "loadavg": {"start": _loadavg()}}
    meta["env"]["KERAS_BACKEND"] = os.environ.get("KERAS_BACKEND") or "jax (set by the runner)"
    return meta


def _main_passes(args, raw, suites, passthrough, show, names, meta):
    """Every contender in its own process, ``passes`` times in alternation; per case the faster pass counts."""
    passes = max(1, args.passes if args.passes is not None else (1 if args.quick else 2))
    meta["passes"] = passes
    runs = [(p, name) for p in range(passes) for name in names
            if p == 0 or not getattr(CONTENDERS[name], "single_pass", False)]
    for p, name in runs:
        tag = name if p == 0 else f"{name}.pass{p + 1}"
        label = name if passes == 1 else f"{name} [{p + 1}/{passes}]"
        rc, secs = _run_contender(args, raw, suites, passthrough, show, name, tag, label, {})
        if p == 0 or rc not in (0, 5):
            meta["returncodes"][name] = rc
        meta["seconds"][name] = meta["seconds"].get(name, 0.0) + secs
    for name in names:
        _merge_passes(raw, name, passes, args.stat)


def _idle_runs(args, raw, suites, passthrough, show, names, selected, meta):
    """The MobileNetV1 + Xception cases again, sleeping before every call, one process per run of IDLE_RUNS."""
    gaps = _idle_gaps(args.idle)
    idle_suites = [s for s in (suites or _cases.SUITES) if s in _cases.IDLE_SUITES]
    meta["idle"] = {"gaps_ms": gaps, "runs": {}}
    if not (gaps and idle_suites and any(c.suite in idle_suites for c in selected)):
        return
    rounds = args.idle_rounds or (10 if args.quick else 25)
    meta["idle"]["rounds"] = rounds
    # alternating passes, the faster per case, as the main runs: one process per contender would rank it by
    # the spell of drift it fell in
    passes = meta.get("passes") or 1
    meta["idle"]["passes"] = passes
    runs = [(tag, name, threads) for tag, name, threads in IDLE_RUNS if name in names]
    for p in range(passes):
        for tag, name, threads in runs:
            extra = {"NBCONV_BENCH_IDLE_MS": ",".join(f"{g:g}" for g in gaps),
                     "NBCONV_BENCH_IDLE_ROUNDS": str(rounds)}
            if threads:
                extra["NBCONV_BENCH_THREADS"] = str(threads)
            run_tag = tag if p == 0 else f"{tag}.pass{p + 1}"
            label = tag if passes == 1 else f"{tag} [{p + 1}/{passes}]"
            rc, secs = _run_contender(args, raw, idle_suites, passthrough, show, name, run_tag, label, extra)
            if p == 0 or rc not in (0, 5):
                meta["idle"]["runs"][tag] = {"contender": name, "threads": threads or args.threads, "returncode": rc}
            meta["seconds"][tag] = meta["seconds"].get(tag, 0.0) + secs
    for tag, _, _ in runs:
        _merge_passes(raw, tag, passes, args.stat)


def _memory_probes(args):
    out = {}
    for mode in ("fused", "two_step"):
        t0 = time.perf_counter()
        out[mode] = _probe(["memory", mode], process_env({"NUMBA_NUM_THREADS": str(args.threads)}), args.timeout)
        print(f"- memory {mode:<8} {time.perf_counter() - t0:5.1f} s  "
              + (out[mode].get("error") or f"peak +{out[mode]['peak_increase_mib']:.0f} MiB"))
    return out


def _first_call_probes(args):
    """Cold (empty kernel cache) and warm first calls in fresh processes, background and sync compile modes."""
    out = {}
    caches = [tempfile.mkdtemp(prefix="nbconv-kernel-cache-") for _ in range(2)]
    try:
        for kind, cache, mode in (("cold", caches[0], "background"), ("warm", caches[0], "background"),
                                  ("cold_sync", caches[1], "sync")):
            t0 = time.perf_counter()
            env = process_env({"NBCONV_CACHE_DIR": cache, "NBCONV_COMPILE": mode,
                               "NUMBA_NUM_THREADS": str(args.threads)})
            res = _probe(["firstcall"] + (["--only-first"] if mode == "sync" else []), env, max(args.timeout, 900))
            res["process_s"] = time.perf_counter() - t0
            out[kind] = res
            print(f"- first call {kind:<9} {res['process_s']:5.1f} s  "
                  + (res.get("error") or f"import + first call {res['import_plus_first_call_s']:.2f} s, all "
                                         f"{len(res['calls'])} first calls {res['all_first_calls_s']:.2f} s, "
                                         f"compiled after {res['compiled_after_s']:.0f} s"))
    finally:
        for cache in caches:
            shutil.rmtree(cache, ignore_errors=True)
    return out


def _probes(args, meta):
    probes = {}
    if "nbconv" not in meta["contenders"]:
        return probes
    if not args.no_memory:
        probes["memory"] = _memory_probes(args)
    if args.quick and not args.firstcall and not args.no_firstcall:
        print("- first call    skipped in a --quick run (add --firstcall)")
    elif not args.no_firstcall:
        probes["first_call"] = _first_call_probes(args)
        probes["first_predict"] = _first_predict(args)
    return probes


def main(argv=None):
    args, passthrough = _parser().parse_known_args(argv)
    if args.list:
        _list()
        return 0
    suites, names, selected, passthrough = _selection(args, passthrough)
    show = args.show_output or any(a.startswith("--benchmark-compare") for a in passthrough)
    started = datetime.datetime.now(datetime.timezone.utc)
    meta = _meta(args, argv, suites, names, started)
    raw = os.path.join(args.out, f"raw-{meta['stamp']}")
    os.makedirs(raw, exist_ok=True)
    t_start = time.perf_counter()
    print(f"nbconv benchmarks: {len(selected)} cases x {len(names)} contenders, one process each "
          f"({'quick' if args.quick else 'full'} run); raw results in {raw}")
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(k):
            print(f"  note: {k}={os.environ[k]} is set (OpenBLAS runs slower than it could; see the report)")

    _main_passes(args, raw, suites, passthrough, show, names, meta)
    _idle_runs(args, raw, suites, passthrough, show, names, selected, meta)
    probes = _probes(args, meta)
    with open(os.path.join(raw, "probes.json"), "w") as fh:
        json.dump(probes, fh, indent=1)
    meta["elapsed_s"] = time.perf_counter() - t_start
    meta["loadavg"]["end"] = _loadavg()
    with open(os.path.join(raw, "meta.json"), "w") as fh:
        json.dump(meta, fh, indent=1)

    report = _report.build(raw)
    markdown = None if args.markdown.lower() == "none" else args.markdown
    text, paths = _report.save(report, args.out, f"report-{meta['stamp']}", markdown)
    print()
    sys.stdout.write(text)
    print(f"\nsaved {paths['txt']}\n      {paths['json']}" + (f"\n      {paths['png']}" if paths["png"] else "")
          + f"\n      (also as latest.*; raw pytest-benchmark JSON and logs in {raw})"
          + (f"\n      {paths['md']} (the page the README links to)" if paths["md"] else ""))
    failed = [n for n, rc in meta["returncodes"].items() if rc not in (0, 5)]
    return 1 if any(n == "nbconv" or n.startswith("models_") for n in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
