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
