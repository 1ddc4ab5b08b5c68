"""Command line: ``python -m nbconv info``, ``warmup`` and ``bench``.

``info`` describes the installation (versions, threading layer, SIMD features,
BLAS, kernel cache); ``warmup`` compiles every kernel into the cache
(:mod:`nbconv._warmup`).  ``bench`` in a checkout runs the benchmark suite's
own contenders and cases (:mod:`benchmarks.cli`: every contender in its own
process, outputs checked against the float64 reference) with a plain timing
loop; an installed wheel has no ``benchmarks/``, so there it times nbconv
alone and points to ``tox -e bench``, the full benchmark.
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time

__all__ = ["main"]


# --- info ---------------------------------------------------------------------------------------------------

def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _simd_features():
    """Host SIMD features as LLVM sees them (what Numba compiles for), else /proc/cpuinfo's flags."""
    wanted = ("sse", "ssse", "avx", "fma", "f16c", "amx", "neon", "sve", "vsx", "altivec")
    try:
        import llvmlite.binding as llvm

        cpu = llvm.get_host_cpu_name()
        feats = sorted(f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
        return cpu, [f for f in feats if f.startswith(wanted)]
    except Exception:  # noqa: BLE001  (older llvmlite, unusual platforms)
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return platform.processor() or "?", sorted(
                        f for f in line.split(":", 1)[1].split() if f.startswith(wanted))
    except OSError:
        pass
    return platform.processor() or "?", []


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [d for d in threadpool_info() if d.get("user_api") == "blas"]


def _cache_info():
    """The kernel cache directory, its number of cached kernels (.nbi index files) and compiled entries (.nbc)."""
    from . import _cache

    where = _cache.cache_dir()
    return where, len(glob.glob(os.path.join(where, "*.nbi"))), len(glob.glob(os.path.join(where, "*.nbc")))


def _native_status():
    """``(available, {"ffi": built, "tf": built}, number of built jobs)`` of :mod:`nbconv._native`."""
    from . import _cache, _native

    try:
        jobs = sum(1 for f in os.listdir(os.path.join(_cache.cache_dir(), "native"))
                   if f.startswith("job_") and f.endswith(".built"))
    except OSError:
        jobs = 0
    return _native.available(), {name: _native.entry_built(name) for name in ("ffi", "tf")}, jobs


def info(out=sys.stdout):
    """Print the installation report."""
    import numba

    import nbconv
    from nbconv import _runtime, _threads

    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"nbconv {nbconv.__version__}  ({os.path.dirname(os.path.abspath(nbconv.__file__))})")
    p(f"python {platform.python_version()}  {platform.system()} {platform.machine()}")
    p("versions:")
    for dist in ("numba", "numpy", "scipy", "llvmlite", "threadpoolctl", "tbb"):
        p(f"  {dist:<14} {_version(dist) or 'not installed'}")
    for dist in ("keras", "jax", "jaxlib", "torch", "tensorflow", "onnxruntime"):
        if importlib.util.find_spec(dist.replace("-", "_")) is not None:
            p(f"  {dist:<14} {_version(dist) or 'importable'}")
    p("threads:")
    layer = _runtime.THREADING_LAYER
    p(f"  numba threading layer  {layer}  (nbconv's kernels run on its own helper threads; they spin "
      f"{_threads.SPIN_MS:g} ms after a call, {_threads.SPIN_ENV})")
    p(f"  numba threads          {nbconv.get_num_threads()} of a pool of {numba.config.NUMBA_NUM_THREADS}"
      f"  (cpu count {os.cpu_count()})")
    cpu, feats = _simd_features()
    p(f"cpu: {cpu}")
    p(f"  SIMD features  {' '.join(feats) if feats else 'unknown'}")
    if any(f.startswith("avx512") for f in feats):
        p("  widest vectors  AVX-512 (512-bit)")
    elif "avx2" in feats:
        p("  widest vectors  AVX2 (256-bit)")
    from . import _simd
    p(f"  micro-kernels  {_simd.VECTOR_BYTES * 8}-bit vectors (forward GEMM and NHWC depthwise)")
    if _simd.NATIVE_BF16:
        bf16 = "VDPBF16PS (AVX512_BF16): two bfloat16 multiply-adds per float32 lane and instruction"
    else:
        why = (f"{_simd.BF16_ENV}=emulate" if _simd.AVX512 and _simd._has("avx512bf16") else
               "this CPU has no AVX512_BF16")
        bf16 = f"float32 FMAs on the bfloat16 operands ({why}): the same results, no speed-up over float32"
    p(f"  bfloat16       {bf16}")
    blas = _blas_info()
    p("BLAS (threadpoolctl; the channels_first backward's weight-gradient products use SciPy's):")
    if blas is None:
        p("  threadpoolctl is not installed")
    elif not blas:
        p("  no BLAS library loaded")
    for d in blas or []:
        p(f"  {d.get('internal_api')} {d.get('version')}  architecture={d.get('architecture')}  "
          f"threads={d.get('num_threads')}  threading={d.get('threading_layer')}")
        p(f"    {d.get('filepath')}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER"):
        if os.environ.get(var):
            extra = ("  (forces that core type on every OpenBLAS in the process; unset it for benchmarks)"
                     if var == "OPENBLAS_CORETYPE" else "")
            p(f"  {var}={os.environ[var]}{extra}")
    from . import _compile

    where, n_index, n_data = _cache_info()
    p("kernel cache (keyed on this nbconv's source and its Numba, llvmlite and NumPy versions):")
    p(f"  directory  {where}")
    p(f"  contents   {n_index} kernels, {n_data} compiled entries" if n_index else
      "  contents   empty: a kernel's first call compiles it (python -m nbconv warmup compiles them all)")
    mode = _compile.get_mode()
    p(f"  compile    {mode}" + ("  (a call whose kernels are not cached yet is computed by NumPy while a "
                                 "low-priority child process compiles them)" if mode == "background" else
                                 "  (a call whose kernels are not cached yet waits for them to compile)")
      + "; set by NBCONV_COMPILE={background,sync}")
    ok, entries, jobs = _native_status()
    p("native calls (the Keras layers' forward called by XLA (jax) or TensorFlow without Python):")
    if not ok:
        p("  unavailable on this platform (the helpers' futex is Linux-only): the layers use host callbacks")
        return 0
    for name, label, env in (("ffi", "jax FFI handler   ", "NBCONV_JAX_FFI"),
                             ("tf", "tensorflow kernel ", "NBCONV_TF_NATIVE")):
        state = "built (in the cache)" if entries[name] else "not built yet (the first traced call builds it)"
        p(f"  {label}{state}; {env}=0 turns it off")
    p(f"  jobs              {jobs} built (one per layer configuration and shape)")
    return 0


# --- bench --------------------------------------------------------------------------------------------------

#: nbconv alone, where the benchmark suite is not there (an installed wheel): (label, N, H, W, C, F) of
#: MobileNetV1 layers, 3x3 'same', float32, NHWC
STANDALONE_SHAPES = (
    ("b1 56x56x128->128", 1, 56, 56, 128, 128),
    ("b1 14x14x512->512", 1, 14, 14, 512, 512),
    ("b1 7x7x1024->1024", 1, 7, 7, 1024, 1024),
)
#: seconds of timed calls per shape (quick, full) when nbconv is timed alone
STANDALONE_BUDGET_S = {True: 0.2, False: 1.0}


def _checkout():
    """The root of the nbconv checkout that holds the benchmark suite (``benchmarks/``), else None: the one this
    nbconv runs from, or else the working directory (nbconv installed from a clone, as tox does, and run in it).
    An installed wheel ships ``nbconv`` and ``keras_layers`` only."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        if all(os.path.isfile(os.path.join(root, *path)) for path in (("benchmarks", "cli.py"),
                                                                      ("nbconv", "__init__.py"))):
            return root
    return None


def _harness(root):
    """:mod:`benchmarks.cli` of the checkout at ``root``, or None when another ``benchmarks`` is imported."""
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import benchmarks.cli
    except ImportError:  # another package named benchmarks came first
        return None
    where = os.path.dirname(os.path.abspath(benchmarks.cli.__file__))
    return benchmarks.cli if where == os.path.join(root, "benchmarks") else None


def _median_ms(fn, budget_s, warmup_s=0.2):
    end = time.perf_counter() + warmup_s
    while True:  # at least one untimed call: compilation, allocation, thread start
        fn()
        if time.perf_counter() >= end:
            break
    times = []
    end = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < end and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _bench_alone(quick, contenders, suites, out):
    """Time nbconv alone, in this process, on :data:`STANDALONE_SHAPES`; point to the full benchmark."""
    import numpy as np

    import nbconv

    from . import _compile

    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    others = [c for c in contenders or () if c != "nbconv"]
    p(f"nbconv bench: this installation has no benchmark suite (benchmarks/), so nbconv is timed alone, in this "
      f"process: separable 3x3 'same', float32, NHWC, median ms per call, {nbconv.get_num_threads()} threads")
    if others or suites:
        p(f"  note: {', '.join(others + list(suites or ()))} need the benchmark suite of a checkout")
    width = max(len(s[0]) for s in STANDALONE_SHAPES) + 2
    p(f"{'case':<{width}}{'nbconv ms':>10}")
    p("-" * (width + 10))
    rng = np.random.default_rng(0)
    with _compile.compile_mode("sync"):  # time the kernels, not the NumPy answers of a cold start
        for label, n, h, w, c, f in STANDALONE_SHAPES:
            x = rng.standard_normal((n, h, w, c), dtype=np.float32)
            dk = rng.standard_normal((3, 3, c, 1), dtype=np.float32)
            pk = rng.standard_normal((1, 1, c, f), dtype=np.float32)
            t = _median_ms(lambda: nbconv.separable_conv2d(x, dk, pk, padding="same"), STANDALONE_BUDGET_S[quick])
            p(f"{label:<{width}}{t:>10.3f}")
    p("against PyTorch, ONNX Runtime and Keras, on every suite: tox -e bench in a clone of nbconv's repository")
    return 0


def bench(quick=True, contenders=None, suites=None, threads=None, timeout=600.0, out=sys.stdout):
    """Time nbconv (and the installed peers) and print a table; returns the exit status.

    In a checkout this runs the benchmark suite's own contenders and cases (:mod:`benchmarks.cli`: each
    contender in its own process, every output checked against the float64 reference); elsewhere it times
    nbconv alone and points to ``tox -e bench``.  Raises ValueError for an unknown contender or suite.
    """
    root = _checkout()
    harness = _harness(root) if root else None
    if harness is None:
        return _bench_alone(quick, contenders, suites, out)
    return harness.run(contenders, suites, quick, threads, timeout, out)


# --- entry point --------------------------------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(prog="python -m nbconv",
                                     description="nbconv: fast depthwise-separable convolution on the CPU.")
    sub = parser.add_subparsers(dest="command", metavar="{info,warmup,bench}")
    sub.required = True
    sub.add_parser("info", help="versions, threading layer, SIMD features, BLAS, kernel cache")
    w = sub.add_parser("warmup", help="compile every kernel into the cache ahead of time (for images, CI)")
    w.add_argument("--jobs", type=int, default=None,
                   help="processes compiling side by side (default: 2, or 1 on a one-core machine)")
    b = sub.add_parser("bench", help="time nbconv against the installed peers (the benchmark suite's contenders and "
                                     "cases, in a checkout)")
    b.add_argument("--quick", action="store_true", help="the quick cases only (seconds per contender)")
    b.add_argument("--contenders", nargs="+", default=None,
                   help="contenders of the benchmark suite (default: nbconv torch_nchw torch_nhwc onnxruntime keras; "
                        "those not installed are listed as skipped)")
    b.add_argument("--suite", action="append", default=None,
                   help="a suite of the benchmark (default: mobilenet, xception and classic); repeat for more")
    b.add_argument("--threads", type=int, default=None, help="threads per contender (default: every core)")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per contender (default 600)")
    return parser


def main(argv=None):
    """Run the command line; returns the exit status (argparse exits with 2 on a usage error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "warmup":
        from ._warmup import warmup

        return warmup(args.jobs)
    try:
        return bench(quick=args.quick, contenders=args.contenders, suites=args.suite, threads=args.threads,
                     timeout=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
