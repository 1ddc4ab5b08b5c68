"""Command line: ``python -m nbconv info`` and ``python -m nbconv bench --quick``.

``info`` describes the installation (versions, threading layer, SIMD features,
BLAS, kernel cache).  ``bench`` times the separable convolution on a few
shapes with nbconv and each installed peer (PyTorch, ONNX Runtime, Keras on
jax), every contender in its own subprocess: thread pools of different
libraries spin against each other in one process (DEVELOPERS.md).  The full,
side-by-side benchmark is ``tox -e bench``.
"""
import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time

__all__ = ["main"]

#: (label, batch, H, W, C, filters, data_format of the problem) -- 3x3, stride 1, 'same', float32
QUICK_SHAPES = (
    ("classic b8 56x56 32->64 NCHW", 8, 56, 56, 32, 64, "channels_first"),
    ("mobilenet b1 112x112 32->64", 1, 112, 112, 32, 64, "channels_last"),
    ("mobilenet b1 14x14 512->512", 1, 14, 14, 512, 512, "channels_last"),
)
FULL_SHAPES = QUICK_SHAPES + (
    ("mobilenet b8 28x28 256->256", 8, 28, 28, 256, 256, "channels_last"),
    ("xception b1 19x19 728->728", 1, 19, 19, 728, 728, "channels_last"),
)

#: contender -> the distribution it needs (None: nbconv itself)
CONTENDERS = {"nbconv": None, "torch": "torch", "onnxruntime": "onnxruntime", "keras-jax": "keras"}
_NEEDS = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx"), "keras-jax": ("keras", "jax")}


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


def info(out=sys.stdout):
    """Print the installation report."""
    import numba

    import nbconv
    from nbconv import _runtime

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
    p(f"  numba threading layer  {layer}" + ("" if layer == "tbb" else
                                             "  (not tbb: concurrent launches are serialised by a lock)"))
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
    return 0


# --- bench --------------------------------------------------------------------------------------------------

def _median_ms(fn, budget_s, min_runs=3, max_runs=200):
    fn()
    fn()  # warm-up: compilation, allocation, thread start
    times = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _arrays(shape):
    import numpy as np

    _, n, h, w, c, f, df = shape
    rng = np.random.default_rng(0)
    xshape = (n, h, w, c) if df == "channels_last" else (n, c, h, w)
    x = rng.standard_normal(xshape, dtype=np.float32)
    dk = rng.standard_normal((3, 3, c, 1), dtype=np.float32)
    pk = rng.standard_normal((1, 1, c, f), dtype=np.float32)
    return x, dk, pk


def _setup_nbconv(shape):
    import nbconv

    x, dk, pk = _arrays(shape)
    df = shape[-1]
    return lambda: nbconv.separable_conv2d(x, dk, pk, padding="same", data_format=df)


def _setup_torch(shape):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    x, dk, pk = _arrays(shape)
    c, f = dk.shape[2], pk.shape[3]
    xt = torch.from_numpy(x)
    if shape[-1] == "channels_last":  # torch's native NHWC: channels_last memory format
        xt = xt.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    wd = torch.from_numpy(dk.transpose(2, 3, 0, 1).copy())  # (C, 1, 3, 3)
    wp = torch.from_numpy(pk.reshape(c, f).T.reshape(f, c, 1, 1).copy())

    def run():
        with torch.inference_mode():
            return F.conv2d(F.conv2d(xt, wd, padding=1, groups=c), wp)

    return run


def _setup_onnxruntime(shape):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x, dk, pk = _arrays(shape)
    c, f = dk.shape[2], pk.shape[3]
    if shape[-1] == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # ONNX Conv is NCHW only
    wd = numpy_helper.from_array(np.ascontiguousarray(dk.transpose(2, 3, 0, 1)), "wd")
    wp = numpy_helper.from_array(np.ascontiguousarray(pk.reshape(c, f).T.reshape(f, c, 1, 1)), "wp")
    nodes = [helper.make_node("Conv", ["x", "wd"], ["d"], group=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "wp"], ["y"], kernel_shape=[1, 1])]
    graph = helper.make_graph(nodes, "sep", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [wd, wp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda: sess.run(None, {"x": x})


def _setup_keras_jax(shape):
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras

    x, dk, pk = _arrays(shape)
    df = shape[-1]
    fn = jax.jit(lambda x, dk, pk: keras.ops.separable_conv(x, dk, pk, padding="same", data_format=df))
    xj, dkj, pkj = jax.device_put(x), jax.device_put(dk), jax.device_put(pk)
    return lambda: fn(xj, dkj, pkj).block_until_ready()


_SETUPS = {"nbconv": _setup_nbconv, "torch": _setup_torch, "onnxruntime": _setup_onnxruntime,
           "keras-jax": _setup_keras_jax}


def _worker(name, full):
    """Run in a subprocess: time one contender on every shape, print one JSON line."""
    shapes = FULL_SHAPES if full else QUICK_SHAPES
    budget = 1.0 if full else 0.2
    results = {}
    for shape in shapes:
        try:
            results[shape[0]] = _median_ms(_SETUPS[name](shape), budget)
        except Exception as exc:  # noqa: BLE001  (reported in the table, not fatal)
            results[shape[0]] = f"{type(exc).__name__}: {exc}"[:80]
    print(json.dumps({"name": name, "results": results}))
    return 0


def _missing(name):
    return [m for m in _NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]


def bench(quick=True, contenders=None, timeout=120, out=sys.stdout):
    """Time each contender in its own subprocess and print a table of median milliseconds per call."""
    names = list(contenders or CONTENDERS)
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    p = lambda *a: print(*a, file=out, flush=True)  # noqa: E731
    p(f"separable 3x3 'same' convolution, float32, median ms per call ({os.cpu_count()} cores; "
      f"each contender in its own process, in its native layout){'  [quick]' if quick else ''}")
    columns, skipped = {}, {}
    env = dict(os.environ)
    for name in names:
        missing = _missing(name)
        if missing:
            skipped[name] = f"not installed ({', '.join(missing)})"
            continue
        cmd = [sys.executable, "-m", "nbconv._cli", "--worker", name] + ([] if quick else ["--full"])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            skipped[name] = f"timed out after {timeout} s"
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            skipped[name] = f"failed (exit {proc.returncode}): {tail[:100]}"
            continue
        columns[name] = json.loads(lines[-1])["results"]
    width = max(len(s[0]) for s in shapes) + 2
    header = f"{'shape':<{width}}" + "".join(f"{n:>13}" for n in columns)
    p(header)
    p("-" * len(header))
    notes = []
    for shape in shapes:
        row = f"{shape[0]:<{width}}"
        for name, res in columns.items():
            v = res.get(shape[0])
            if isinstance(v, (int, float)):
                row += f"{v:>13.3f}"
            else:
                row += f"{'error':>13}"
                notes.append(f"{name} on {shape[0]}: {v}")
        p(row)
    for note in notes:
        p(f"  {note}")
    if "nbconv" in columns and len(columns) > 1:
        for name in columns:
            if name == "nbconv":
                continue
            ratios = [columns[name][s[0]] / columns["nbconv"][s[0]] for s in shapes
                      if isinstance(columns[name].get(s[0]), (int, float))
                      and isinstance(columns["nbconv"].get(s[0]), (int, float))]
            if ratios:
                ratios.sort()
                p(f"{name}: median time ratio {name}/nbconv = {ratios[len(ratios) // 2]:.2f}")
    for name, why in skipped.items():
        p(f"skipped {name}: {why}")
    if not quick:
        p("(the full benchmark, with memory and first-call probes: tox -e bench)")
    return 0


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
    b = sub.add_parser("bench", help="time nbconv against the installed peers on a few shapes")
    b.add_argument("--quick", action="store_true", help="three shapes, about ten seconds")
    b.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=None,
                   help="which contenders to run (default: all; those not installed are listed as skipped)")
    b.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per contender (default 120)")
    return parser


def main(argv=None):
    """Run the command line; returns the exit status (argparse exits with 2 on a usage error)."""
    args = _parser().parse_args(argv)
    if args.command == "info":
        return info()
    if args.command == "warmup":
        from ._warmup import warmup

        return warmup(args.jobs)
    return bench(quick=args.quick, contenders=args.contenders, timeout=args.timeout)


if __name__ == "__main__":  # the benchmark subprocesses: python -m nbconv._cli --worker NAME [--full]
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker" and sys.argv[2] in _SETUPS:
        sys.exit(_worker(sys.argv[2], full="--full" in sys.argv[3:]))
    sys.exit(main())
