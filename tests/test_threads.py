"""Thread control: get_num_threads / set_num_threads / num_threads, and results independent of the count."""
import threading

import numba
import numpy as np
import pytest

import nbconv
from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref

LIMIT = numba.config.NUMBA_NUM_THREADS


@pytest.fixture(autouse=True)
def restore_threads():
    before = nbconv.get_num_threads()
    yield
    numba.set_num_threads(before)


def test_get_num_threads_default():
    n = nbconv.get_num_threads()
    assert isinstance(n, int) and 1 <= n <= LIMIT
    assert n == numba.get_num_threads()


@pytest.mark.parametrize("n", sorted({1, LIMIT}))
def test_set_num_threads(n):
    nbconv.set_num_threads(n)
    assert nbconv.get_num_threads() == n
    assert numba.get_num_threads() == n


def test_set_num_threads_accepts_numpy_int():
    nbconv.set_num_threads(np.int64(1))
    assert nbconv.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, LIMIT + 1, 1.5, True, False, "2", None, 2.0])
def test_set_num_threads_rejects(bad):
    before = nbconv.get_num_threads()
    with pytest.raises(ValueError, match=r"`n`.*Received: n=" + repr(bad).replace(".", r"\.")):
        nbconv.set_num_threads(bad)
    assert nbconv.get_num_threads() == before


def test_num_threads_context_restores():
    nbconv.set_num_threads(LIMIT)
    with nbconv.num_threads(1):
        assert nbconv.get_num_threads() == 1
        with nbconv.num_threads(LIMIT):
            assert nbconv.get_num_threads() == LIMIT
        assert nbconv.get_num_threads() == 1
    assert nbconv.get_num_threads() == LIMIT


def test_num_threads_context_restores_when_block_raises():
    nbconv.set_num_threads(LIMIT)

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with nbconv.num_threads(1):
            assert nbconv.get_num_threads() == 1
            raise Boom
    assert nbconv.get_num_threads() == LIMIT
    # and when a kernel call inside the block raises an argument error
    with pytest.raises(ValueError, match="strides"):
        with nbconv.num_threads(1):
            nbconv.depthwise_conv2d(np.ones((1, 4, 4, 1), np.float32), np.ones((3, 3, 1, 1), np.float32), strides=0)
    assert nbconv.get_num_threads() == LIMIT


@pytest.mark.parametrize("bad", [0, LIMIT + 1, 1.5, True])
def test_num_threads_context_rejects_and_keeps_count(bad):
    before = nbconv.get_num_threads()
    with pytest.raises(ValueError, match=r"Received: n="):
        with nbconv.num_threads(bad):
            pass  # pragma: no cover
    assert nbconv.get_num_threads() == before


def test_thread_count_is_per_python_thread():
    """Numba's count is thread-local: setting it in one Python thread leaves the others alone."""
    nbconv.set_num_threads(LIMIT)
    seen = {}

    def worker():
        nbconv.set_num_threads(1)
        seen["worker"] = nbconv.get_num_threads()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["worker"] == 1
    assert nbconv.get_num_threads() == LIMIT


CASES = [
    # (x shape NHWC, k, dm, F, strides, padding): small and larger work so both thread plans differ
    ((1, 9, 7, 3), 3, 2, 5, 1, "same"),
    ((1, 32, 32, 16), 3, 1, 40, 2, "same"),
    ((4, 17, 19, 8), 5, 1, 70, (1, 2), 2),
    ((2, 56, 56, 32), 3, 1, 64, 1, 1),
]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CASES, ids=[str(c[0]) for c in CASES])
def test_results_identical_for_1_and_2_threads(rng, case, data_format):
    if LIMIT < 2:
        pytest.skip("Numba's pool has a single thread on this machine")
    shape, k, dm, f, strides, padding = case
    n, h, w, c = shape
    x = random_array(rng, shape if data_format == "channels_last" else (n, c, h, w))
    dk = random_array(rng, (k, k, c, dm))
    pk = random_array(rng, (1, 1, c * dm, f))
    pk1 = random_array(rng, (c, f))
    bias = random_array(rng, (f,))
    kw = dict(strides=strides, padding=padding, data_format=data_format)
    results = {}
    for threads in (1, 2):
        with nbconv.num_threads(threads):
            results[threads] = (
                nbconv.separable_conv2d(x, dk, pk, bias, activation="relu", **kw),
                nbconv.depthwise_conv2d(x, dk, **kw),
                nbconv.pointwise_conv2d(x, pk1, bias, data_format=data_format),
            )
    sep, dep, pw = results[2]
    assert_close(sep, separable_ref(x, dk, pk, bias, activation="relu", **kw))
    assert_close(dep, depthwise_ref(x, dk, **kw))
    assert_close(pw, pointwise_ref(x, pk1, bias, data_format=data_format))
    # bitwise: the thread count must not change the summation order
    for name, one, two in zip(("separable", "depthwise", "pointwise"), results[1], results[2]):
        assert np.array_equal(one, two), (
            f"{name}: 1 and 2 threads differ in {(one != two).sum()} of {one.size} values "
            f"(max {np.abs(one - two).max():.3g})"
        )


# --- the helper threads of the forward kernels (nbconv._threads.POOL) ----------------------------------------

needs_two = pytest.mark.skipif(LIMIT < 2, reason="Numba's pool has a single thread on this machine")


def _separable_case(rng, shape=(2, 28, 28, 32), f=48):
    x = random_array(rng, shape)
    dk = random_array(rng, (3, 3, shape[-1], 1))
    pk = random_array(rng, (1, 1, shape[-1], f))
    return (x, dk, pk), separable_ref(x, dk, pk, padding="same")


def _run_python(code, **env):
    """``code`` in a fresh interpreter (this environment plus ``env``); returns its completed process."""
    import os
    import subprocess
    import sys
    import textwrap

    env = dict(os.environ, NBCONV_COMPILE="sync", **env)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=600)


@needs_two
def test_concurrent_callers_each_get_their_result(rng):
    """Calls from four Python threads at once (one leads the helpers, the others run alone): every result right."""
    cases = [_separable_case(rng, (1 + i % 2, 20 + 4 * i, 24, 16 + 8 * i), 24 + 8 * i) for i in range(4)]
    failures = []

    def caller(i):
        args, expected = cases[i]
        for _ in range(6):
            try:
                assert_close(nbconv.separable_conv2d(*args, padding="same"), expected)
            except AssertionError as e:  # pragma: no cover  (reported below)
                failures.append((i, str(e)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@needs_two
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # jax, imported by other tests, warns; unused here
def test_forked_child_calls_with_its_own_helpers(rng, in_fork):
    """A child forked after the helpers started (they do not survive fork) computes right, without hanging."""
    args, expected = _separable_case(rng)
    assert_close(nbconv.separable_conv2d(*args, padding="same"), expected)  # the parent's helpers are running

    def child():
        with nbconv.num_threads(2):
            ok = all(np.allclose(nbconv.separable_conv2d(*args, padding="same"), expected, rtol=1e-4, atol=1e-4)
                     for _ in range(3))
        return b"ok" if ok else b"wrong"

    assert in_fork(child) == b"ok"


@needs_two
def test_helpers_spin_only_for_the_spin_window():
    """After a call the helper spins NBCONV_SPIN_MS (here 300 ms), then sleeps: the process's CPU time over the
    next 0.2 s is mostly the spinning helper's, over the second after that almost nothing."""
    proc = _run_python("""
        import json, time
        import numpy as np
        import nbconv
        x = np.ones((2, 28, 28, 32), np.float32); dk = np.ones((3, 3, 32, 1), np.float32)
        pk = np.ones((1, 1, 32, 64), np.float32)
        for _ in range(3):
            nbconv.separable_conv2d(x, dk, pk, padding="same")
        c0 = time.process_time(); time.sleep(0.2); c1 = time.process_time()
        time.sleep(0.2); c2 = time.process_time(); time.sleep(1.0); c3 = time.process_time()
        print(json.dumps({"spinning": c1 - c0, "asleep": c3 - c2}))
    """, NBCONV_SPIN_MS="300")
    assert proc.returncode == 0, proc.stderr
    import json

    cpu = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cpu["spinning"] > 0.1, cpu
    assert cpu["asleep"] < 0.1, cpu


@needs_two
def test_calls_that_wake_sleeping_helpers_are_right():
    """NBCONV_SPIN_MS=0: helpers sleep after every call and each call wakes them; results as on one thread."""
    proc = _run_python("""
        import time
        import numpy as np
        import nbconv
        from reference import assert_close, random_array, separable_ref
        rng = np.random.default_rng(0)
        x = random_array(rng, (2, 28, 28, 32)); dk = random_array(rng, (3, 3, 32, 1))
        pk = random_array(rng, (1, 1, 32, 64))
        expected = separable_ref(x, dk, pk, padding="same")
        with nbconv.num_threads(1):
            one = nbconv.separable_conv2d(x, dk, pk, padding="same")
        for i in range(20):
            time.sleep(0.002 * (i % 3))
            y = nbconv.separable_conv2d(x, dk, pk, padding="same")
            assert_close(y, expected)
            assert np.array_equal(y, one)
        print("done")
    """, NBCONV_SPIN_MS="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("done")


@pytest.mark.parametrize("bad", ["abc", "-1", "1001", "nan"])
def test_bad_spin_setting_is_refused_at_import(bad):
    proc = _run_python("import nbconv", NBCONV_SPIN_MS=bad)
    assert proc.returncode != 0
    assert (f"Expected the environment variable NBCONV_SPIN_MS to be a number of milliseconds from 0 to 1000. "
            f"Received: {bad!r}") in proc.stderr
