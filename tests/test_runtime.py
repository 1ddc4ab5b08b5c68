"""Process-level behaviour: threading layer, concurrent calls from Python threads, fork()ed children.

Anything that could abort or hang the interpreter runs in a fresh ``python``
subprocess with a timeout, so a crash fails one test instead of killing pytest.
"""
import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import nbconv

TESTS = Path(__file__).resolve().parent
# the directory holding the nbconv this pytest imported (the checkout, or site-packages under tox)
PKG_PARENT = Path(nbconv.__file__).resolve().parents[1]
TIMEOUT = 300  # seconds; generous for a cold Numba cache on a busy 2-core machine


def run_script(code, env_extra=None, drop=("NUMBA_THREADING_LAYER",)):
    """Run ``code`` in a fresh interpreter that imports the same nbconv as this process, and tests/reference.py."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(PKG_PARENT), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(TESTS), env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    return proc


def check(proc, marker="ALL OK"):
    detail = f"exit code {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, detail
    assert marker in proc.stdout, detail


def test_subprocess_imports_the_same_nbconv():
    proc = run_script("import nbconv; print(nbconv.__file__); print('ALL OK')")
    check(proc)
    assert Path(proc.stdout.splitlines()[0]).resolve() == Path(nbconv.__file__).resolve()


def _tbb_installed():
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_threading_layer_is_tbb_when_tbb_installed():
    proc = run_script("""
        import numba, numpy as np, nbconv, nbconv._runtime as rt
        # nbconv's kernels run on its own threads; the thread count it sets and reads is Numba's pool's
        nbconv.separable_conv2d(np.ones((1, 96, 96, 8), np.float32), np.ones((3, 3, 8, 1), np.float32),
                                np.ones((1, 1, 8, 16), np.float32))
        print("LAYER", rt.THREADING_LAYER, numba.threading_layer())
        print("ALL OK")
    """)
    check(proc)
    layer_line = [line for line in proc.stdout.splitlines() if line.startswith("LAYER")][0]
    chosen, active = layer_line.split()[1:]
    if _tbb_installed():
        assert (chosen, active) == ("tbb", "tbb"), proc.stdout
    else:
        assert active in ("workqueue", "omp", "tbb"), proc.stdout


def test_in_process_layer_matches_installed_tbb():
    import nbconv._runtime as rt

    if _tbb_installed() and not os.environ.get("NUMBA_THREADING_LAYER"):
        assert rt.THREADING_LAYER == "tbb"


def test_user_threading_layer_wins():
    proc = run_script("""
        import numba, numpy as np, nbconv, nbconv._runtime as rt
        nbconv.depthwise_conv2d(np.ones((1, 96, 96, 8), np.float32), np.ones((3, 3, 8, 1), np.float32))
        print("LAYER", rt.THREADING_LAYER, numba.threading_layer())
        print("ALL OK")
    """, env_extra={"NUMBA_THREADING_LAYER": "workqueue"})
    check(proc)
    assert "LAYER workqueue workqueue" in proc.stdout, proc.stdout


CONCURRENT = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import nbconv
from reference import assert_close, depthwise_ref, pointwise_ref, separable_ref

rng = np.random.default_rng(7)
cases = []
for i, (shape, k, dm, f, strides, padding, df) in enumerate([
    ((1, 28, 28, 16), 3, 1, 32, 1, "same", "channels_last"),
    ((2, 15, 17, 8), 5, 2, 24, 2, "valid", "channels_last"),
    ((3, 8, 12, 4), 3, 1, 70, (1, 2), 1, "channels_first"),
    ((1, 33, 31, 12), 3, 3, 20, 2, "same", "channels_first"),
    ((4, 9, 9, 32), 7, 1, 64, 1, 3, "channels_last"),
]):
    n, h, w, c = shape
    x = rng.uniform(-1, 1, shape if df == "channels_last" else (n, c, h, w)).astype(np.float32)
    dk = rng.uniform(-1, 1, (k, k, c, dm)).astype(np.float32)
    pk = rng.uniform(-1, 1, (1, 1, c * dm, f)).astype(np.float32)
    b = rng.uniform(-1, 1, (f,)).astype(np.float32)
    kw = dict(strides=strides, padding=padding, data_format=df)
    cases.append(("separable", lambda x=x, dk=dk, pk=pk, b=b, kw=kw: nbconv.separable_conv2d(x, dk, pk, b, **kw),
                  lambda x=x, dk=dk, pk=pk, b=b, kw=kw: separable_ref(x, dk, pk, b, **kw)))
    cases.append(("depthwise", lambda x=x, dk=dk, kw=kw: nbconv.depthwise_conv2d(x, dk, activation="relu", **kw),
                  lambda x=x, dk=dk, kw=kw: depthwise_ref(x, dk, activation="relu", **kw)))
    pk1 = np.ascontiguousarray(pk[:, :, :c, :])
    cases.append(("pointwise", lambda x=x, pk1=pk1, df=df: nbconv.pointwise_conv2d(x, pk1, data_format=df),
                  lambda x=x, pk1=pk1, df=df: pointwise_ref(x, pk1, data_format=df)))

serial = [run() for _, run, _ in cases]
for (name, _, ref), y in zip(cases, serial):
    assert_close(y, ref())

N_THREADS, CALLS = 4, 20
barrier = threading.Barrier(N_THREADS)

def worker(t):
    barrier.wait()
    bad = []
    for i in range(CALLS):
        j = (t * 7 + i) % len(cases)
        y = cases[j][1]()
        if not np.array_equal(y, serial[j]):
            bad.append((cases[j][0], j, float(np.abs(y - serial[j]).max())))
    return bad

with ThreadPoolExecutor(N_THREADS) as pool:
    bad = [b for r in pool.map(worker, range(N_THREADS)) for b in r]
print("MISMATCHES", bad)
assert not bad
print("ALL OK")
"""


def test_concurrent_calls_from_python_threads():
    check(run_script(CONCURRENT))


def test_concurrent_calls_under_workqueue_layer():
    """With the user's choice of the workqueue layer (unsafe for concurrent Numba launches): nbconv's kernels do not
    launch on it, so concurrent calls stay safe."""
    check(run_script(CONCURRENT, env_extra={"NUMBA_THREADING_LAYER": "workqueue"}))


FORK = """
import multiprocessing as mp, os, sys
import numpy as np
import nbconv
from reference import assert_close, depthwise_ref, pointwise_ref, separable_ref

rng = np.random.default_rng(3)
x = rng.uniform(-1, 1, (4, 32, 32, 16)).astype(np.float32)
dk = rng.uniform(-1, 1, (3, 3, 16, 2)).astype(np.float32)
pk = rng.uniform(-1, 1, (1, 1, 32, 48)).astype(np.float32)
xc = np.ascontiguousarray(x.transpose(0, 3, 1, 2))

def compute():
    return (nbconv.separable_conv2d(x, dk, pk, padding="same"),
            nbconv.separable_conv2d(xc, dk, pk, strides=2, padding=1, data_format="channels_first"),
            nbconv.depthwise_conv2d(x, dk, strides=2),
            nbconv.pointwise_conv2d(xc, pk[:, :, :16], data_format="channels_first"))

def check(results):
    a, b, c, d = results
    assert_close(a, separable_ref(x, dk, pk, padding="same"))
    assert_close(b, separable_ref(xc, dk, pk, strides=2, padding=1, data_format="channels_first"))
    assert_close(c, depthwise_ref(x, dk, strides=2))
    assert_close(d, pointwise_ref(xc, pk[:, :, :16], data_format="channels_first"))

# the parent runs parallel kernels on every thread first
assert nbconv.get_num_threads() >= 1
parent = compute()
check(parent)

def child(queue):
    try:
        res = compute()
        check(res)
        queue.put(("ok", [np.array_equal(r, p) for r, p in zip(res, parent)]))
    except BaseException as e:
        queue.put(("error", repr(e)))

ctx = mp.get_context("fork")
queue = ctx.Queue()
proc = ctx.Process(target=child, args=(queue,))
proc.start()
import queue as queue_mod, time
deadline = time.monotonic() + 240
while True:  # a child killed at fork (as under GNU OpenMP) is reported at once, not after a timeout
    try:
        status, detail = queue.get(timeout=1)
        break
    except queue_mod.Empty:
        if not proc.is_alive():
            try:
                status, detail = queue.get(timeout=1)
            except queue_mod.Empty:
                status, detail = "died", proc.exitcode
            break
        if time.monotonic() > deadline:
            status, detail = "timeout", None
            break
proc.join(60)
print("MP CHILD", status, detail, proc.exitcode)
assert status == "ok" and all(detail) and proc.exitcode == 0

# and a bare os.fork(), reporting through the exit status
pid = os.fork()
if pid == 0:
    try:
        res = compute()
        check(res)
        ok = all(np.array_equal(r, p) for r, p in zip(res, parent))
        os._exit(0 if ok else 3)
    except BaseException:
        os._exit(4)
_, status = os.waitpid(pid, 0)
print("OS.FORK CHILD", os.waitstatus_to_exitcode(status))
assert os.waitstatus_to_exitcode(status) == 0
# the parent still works after its children
check(compute())
print("ALL OK")
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_forked_child_after_parallel_kernel():
    check(run_script(FORK))


def test_kernels_run_in_process_after_threads_used(rng):
    """Sanity in this process: a kernel call still works after the pool was used by another Python thread."""
    import threading

    from reference import assert_close, separable_ref

    x = rng.uniform(-1, 1, (2, 12, 12, 8)).astype(np.float32)
    dk = rng.uniform(-1, 1, (3, 3, 8, 1)).astype(np.float32)
    pk = rng.uniform(-1, 1, (1, 1, 8, 16)).astype(np.float32)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("y", nbconv.separable_conv2d(x, dk, pk, padding="same")))
    t.start()
    t.join()
    expected = separable_ref(x, dk, pk, padding="same")
    assert_close(out["y"], expected)
    assert_close(nbconv.separable_conv2d(x, dk, pk, padding="same"), expected)


def test_import_leaves_ml_dtypes_alone_until_bfloat16_is_used():
    """``import nbconv`` does not import ml_dtypes (about half a second here); a bfloat16 array made after it
    still takes the bfloat16 path, and float32 precision='bfloat16' imports it on demand."""
    proc = run_script("""
        import sys
        import numpy as np
        import nbconv
        from reference import separable_ref
        assert "ml_dtypes" not in sys.modules
        rng = np.random.default_rng(0)
        x = rng.uniform(-1, 1, (1, 9, 9, 8)).astype(np.float32)
        dk = rng.uniform(-1, 1, (3, 3, 8, 1)).astype(np.float32)
        pk = rng.uniform(-1, 1, (1, 1, 8, 16)).astype(np.float32)
        y = nbconv.separable_conv2d(x, dk, pk, padding="same")
        assert y.dtype == np.float32 and "ml_dtypes" not in sys.modules
        ref = separable_ref(x, dk, pk, padding="same")
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
        import ml_dtypes
        bf = ml_dtypes.bfloat16
        yb = nbconv.separable_conv2d(x.astype(bf), dk.astype(bf), pk.astype(bf), padding="same")
        assert yb.dtype == np.dtype(bf), yb.dtype
        refb = separable_ref(*(a.astype(bf).astype(np.float32) for a in (x, dk, pk)), padding="same")
        assert np.abs(yb.astype(np.float32) - refb).max() <= 3e-2 * np.abs(refb).max()
        print("ALL OK")
    """)
    check(proc)
    proc = run_script("""
        import sys
        import numpy as np
        import nbconv
        x = np.ones((1, 5, 5, 8), np.float32)
        y = nbconv.separable_conv2d(x, np.ones((3, 3, 8, 1), np.float32), np.ones((1, 1, 8, 4), np.float32),
                                    precision="bfloat16", output_dtype="float32")
        assert "ml_dtypes" in sys.modules and y.dtype == np.float32 and np.all(y == 72), y
        print("ALL OK")
    """)
    check(proc)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")
def test_fork_right_after_import_waits_for_the_warm_up():
    """The warm-up thread started at import may hold Numba's compile lock: a child forked at once still loads
    and runs kernels (the fork waits for the thread), and so does the parent."""
    proc = run_script("""
        import os
        import numpy as np
        import nbconv
        from nbconv import _runtime

        def compute():
            return nbconv.separable_conv2d(np.ones((1, 6, 6, 8), np.float32), np.ones((3, 3, 8, 1), np.float32),
                                           np.ones((1, 1, 8, 4), np.float32))

        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if np.all(compute() == 72) else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        print("CHILD", os.waitstatus_to_exitcode(status))
        assert os.waitstatus_to_exitcode(status) == 0
        assert np.all(compute() == 72) and not _runtime._WARMING
        print("ALL OK")
    """)
    check(proc)
