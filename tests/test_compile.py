"""Compile modes, the background compiler, kernel operands and warmup's coverage.

The background tests run as a user's fresh process would: a new interpreter
with an empty cache directory (``NBCONV_CACHE_DIR``), results compared with the
float64 reference."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import numpy as np

import nbconv
from nbconv import _compile, _warmup

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(code, tmp_path, **env):
    env = dict(os.environ, NBCONV_CACHE_DIR=str(tmp_path / "cache"), NBCONV_COMPILE="background", **env)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cold_call_answers_from_numpy_and_submits_its_kernels(tmp_path):
    """Every public function, nothing cached: correct results (the NumPy versions) at once, inputs untouched,
    and the kernels each needs, both builds, handed to the compiler; no child is started here."""
    res = _run("""
        import json, time
        import numpy as np
        from nbconv import _compile
        submitted = []
        _compile._SCHEDULER._start = lambda: submitted.extend(_compile._SCHEDULER._queue)
        import nbconv
        from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref
        rng = np.random.default_rng(0)
        x = random_array(rng, (2, 12, 11, 6)); x0 = x.copy()
        dk = random_array(rng, (3, 3, 6, 2)); pk = random_array(rng, (1, 1, 12, 7)); b = random_array(rng, (7,))
        t0 = time.perf_counter()
        y = nbconv.separable_conv2d(x, dk, pk, b, strides=2, padding="same", activation="relu")
        first = time.perf_counter() - t0
        assert_close(y, separable_ref(x, dk, pk, b, strides=2, padding="same", activation="relu"), np.float32)
        d = nbconv.depthwise_conv2d(x, dk, dilation_rate=2)
        assert_close(d, depthwise_ref(x, dk, dilation_rate=2), np.float32)
        xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        p = nbconv.pointwise_conv2d(xt, pk[:, :, :6], data_format="channels_first")
        assert_close(p, pointwise_ref(xt, pk[:, :, :6], data_format="channels_first"), np.float32)
        g = nbconv.separable_conv2d_backward(y, x, dk, pk, strides=2, padding="same", activation="relu", output=y)
        assert g.x.shape == x.shape and g.pointwise_kernel.shape == pk.shape
        assert np.array_equal(x, x0)
        print(json.dumps({"first_s": first, "pending": _compile.pending(), "names": sorted({n for n, _ in submitted})}))
    """, tmp_path)
    assert res["first_s"] < 5
    names = set(res["names"])
    assert "nbconv._separable.separable" in names
    assert {"nbconv._depthwise.depthwise_packed", "nbconv._pointwise.pointwise_nchw"} <= names
    assert any(n.startswith("nbconv._backward.dwsep_backward") for n in names)


def test_background_compile_then_the_kernel_runs_and_the_next_process_loads_it(tmp_path):
    """The child compiles the kernel and the pool's own functions (called from Python around the kernels): the
    calls after it, on two threads, load both and compile nothing in this process."""
    code = """
        import json, time
        import numpy as np
        import nbconv
        from nbconv import _compile, _threads
        from nbconv.forward import pointwise_nhwc
        from reference import assert_close, pointwise_ref, random_array
        nbconv.set_num_threads(2)
        rng = np.random.default_rng(0)
        x = random_array(rng, (1, 5, 5, 8)); w = random_array(rng, (8, 16))
        big = random_array(rng, (2, 48, 48, 8))
        y = nbconv.pointwise_conv2d(x, w, activation="relu6")
        pending = _compile.pending()
        assert _compile.wait(timeout=500)
        z = nbconv.pointwise_conv2d(x, w, activation="relu6")
        for r in (y, z):
            assert_close(r, pointwise_ref(x, w, activation="relu6"), np.float32)
        for _ in range(3):
            assert_close(nbconv.pointwise_conv2d(big, w), pointwise_ref(big, w), np.float32)
        pool = [_compile._REGISTRY[name] for name, _ in _compile._COMPANIONS]
        print(json.dumps({"pending": pending, "companions": len(pool), "loaded": len(pointwise_nhwc.signatures),
                          "pool_ready": _threads.POOL._ready,
                          "pool_loaded": all(len(d.overloads) == 1 for d in pool),
                          "compiled_here": sum(sum(d.stats.cache_misses.values()) for d in pool)}))
    """
    first = _run(code, tmp_path)
    # compiled in the child, then loaded
    assert first["pending"] == 1 + first["companions"] and first["loaded"] == 1
    assert first["pool_ready"] and first["pool_loaded"] and first["compiled_here"] == 0
    second = _run(code, tmp_path)
    assert second["pending"] == 0 and second["loaded"] == 1
    assert second["pool_ready"] and second["pool_loaded"] and second["compiled_here"] == 0
    assert len([f for f in os.listdir(_cache_dir_of(tmp_path)) if f.startswith("_pointwise.pointwise_nhwc")]) >= 2


def _cache_dir_of(tmp_path):
    (path,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("kernels-")]
    return path


def test_sync_mode_and_bad_mode(tmp_path):
    env = dict(os.environ, NBCONV_COMPILE="eager")
    proc = subprocess.run([sys.executable, "-c", "import nbconv"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "NBCONV_COMPILE" in proc.stderr and "'eager'" in proc.stderr
    with pytest.raises(ValueError, match="Expected `mode` to be one of"):
        _compile.set_mode("later")
    assert _compile.get_mode() == "sync"  # conftest: the tests compile in process


def test_warmup_covers_every_kernel_called_from_python():
    found = _warmup.signatures()
    assert {name for name, _ in found} == set(_compile._REGISTRY)
    assert set(_compile._COMPANIONS) <= set(found)  # the pool's own functions, called from Python
    dtypes = {_warmup._dtype_of(sig) for key in found if key not in _compile._COMPANIONS for sig in [key[1]]}
    assert dtypes == {"float32", "float64", "bfloat16"}


def test_read_only_operands_reuse_the_writeable_build(rng):
    """jax and TensorFlow hand over read-only buffers: same result, inputs untouched, no second compiled build."""
    from reference import separable_ref

    x = rng.standard_normal((1, 9, 9, 24)).astype(np.float32)
    dk = rng.standard_normal((3, 3, 24, 1)).astype(np.float32)
    pk = rng.standard_normal((1, 1, 24, 40)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    want = nbconv.separable_conv2d(x, dk, pk, b, padding="same")
    builds = {name: len(d.overloads) for name, d in _compile._REGISTRY.items()}
    frozen = [a.copy() for a in (x, dk, pk, b)]
    for a in frozen:
        a.flags.writeable = False
    got = nbconv.separable_conv2d(*frozen, padding="same")
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, separable_ref(x, dk, pk, b, padding="same"), rtol=1e-4, atol=1e-4)
    for a, orig in zip(frozen, (x, dk, pk, b)):
        np.testing.assert_array_equal(a, orig)
    assert {name: len(d.overloads) for name, d in _compile._REGISTRY.items()} == builds
    assert _compile.typed(frozen[0]).flags.writeable and np.shares_memory(_compile.typed(frozen[0]), frozen[0])


def test_a_miss_does_not_start_numbas_target_context(tmp_path):
    """On a cold cache the miss is told from the index alone: Numba's target context (~0.3 s of imports and
    registries, what ``load_overload`` starts with) is not initialised for a call that NumPy answers; a hit loads."""
    res = _run("""
        import json, sys
        import numpy as np
        from nbconv import _compile
        _compile._SCHEDULER._start = lambda: None
        import nbconv
        from nbconv import forward
        x, w = np.ones((1, 2, 2, 8), np.float32), np.ones((8, 4), np.float32)
        ok = bool(np.allclose(nbconv.pointwise_conv2d(x, w), 8.0))
        started = "numba.cpython.heapq" in sys.modules
        d = forward.pointwise_nhwc
        (sig,) = {s for n, s in _compile._SCHEDULER._queue if n == _compile._name(d)}
        miss = _compile._in_index(d, sig)
        _compile.compile_all([(_compile._name(d), sig)])
        print(json.dumps({"ok": ok, "started": started, "miss": miss, "hit": _compile._in_index(d, sig)}))
    """, tmp_path)
    assert res == {"ok": True, "started": False, "miss": False, "hit": True}
