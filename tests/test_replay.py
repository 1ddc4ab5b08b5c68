"""Replayed forward calls (nbconv._replay): repeated calls with new data against the float64 reference."""
import threading

import numpy as np
import pytest

import nbconv
from nbconv import _replay
from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref

pytestmark = pytest.mark.skipif(not _replay._ENABLED, reason="replay needs native calls (Linux futex)")

CALLS = _replay.AFTER + 3  # the Python calls, the capture, then replays


@pytest.fixture(autouse=True)
def fresh_table():
    _replay.clear()
    yield
    _replay.clear()


def _entry(fn, *args, **kwargs):
    key, _ = _replay._key(fn.__wrapped__.__wrapped__, args, kwargs)
    return _replay._TABLE.get(key)


def _separable_case(rng, n=1, h=9, c=24, f=40, dtype=np.float32):
    return (random_array(rng, (n, h, h, c), dtype), random_array(rng, (3, 3, c, 1), dtype),
            random_array(rng, (1, 1, c, f), dtype), random_array(rng, (f,), dtype))


@pytest.mark.parametrize("strides, activation", [(1, None), (2, "relu")])
def test_separable_replays_new_data(rng, strides, activation):
    shapes = _separable_case(rng)
    kw = dict(strides=strides, padding="same", activation=activation)
    for i in range(CALLS):
        # new values every call, same shapes: a replay must read this call's arrays
        x, dk, pk, b = (random_array(rng, a.shape) for a in shapes)
        originals = [a.copy() for a in (x, dk, pk, b)]
        y = nbconv.separable_conv2d(x, dk, pk, b, **kw)
        assert_close(y, separable_ref(x, dk, pk, b, **kw))
        for a, o in zip((x, dk, pk, b), originals):
            np.testing.assert_array_equal(a, o)  # inputs are never modified
    entry = _entry(nbconv.separable_conv2d, x, dk, pk, b, **kw)
    assert entry is not None and entry.call is not None and entry.seen == _replay.AFTER + 1


def test_depthwise_and_pointwise_replay(rng):
    x = random_array(rng, (2, 11, 11, 16))
    k = random_array(rng, (3, 3, 16, 1))
    w = random_array(rng, (1, 1, 16, 24))
    for _ in range(CALLS):
        x = random_array(rng, x.shape)
        assert_close(nbconv.depthwise_conv2d(x, k, padding="same"), depthwise_ref(x, k, padding="same"))
        assert_close(nbconv.pointwise_conv2d(x, w, activation="relu6"),
                     pointwise_ref(x, w, activation="relu6"))
    assert _entry(nbconv.depthwise_conv2d, x, k, padding="same").call is not None
    assert _entry(nbconv.pointwise_conv2d, x, w, activation="relu6").call is not None


def test_large_output_replays_aligned(rng):
    # an output large enough for non-temporal stores: the replay allocates it 64-byte aligned too
    x, dk, pk, _ = _separable_case(rng, n=4, h=56, c=32, f=256)
    for _ in range(CALLS):
        x = random_array(rng, x.shape)
        y = nbconv.separable_conv2d(x, dk, pk, padding="same", out=None)  # an explicit out=None replays too
        assert_close(y, separable_ref(x, dk, pk, padding="same"))
    assert _entry(nbconv.separable_conv2d, x, dk, pk, padding="same", out=None).call is not None
    assert y.__array_interface__["data"][0] % 64 == 0


def test_bfloat16_calls_give_the_python_result(rng):
    # a repeated bfloat16 call returns the Python call's result bit for bit, replayed or not: float32 depthwise
    # weights make it a float32 call on the input widened first (two launches: not replayed); a bfloat16 model's
    # own operands are read as bits by one kernel, and replay
    bf16 = nbconv.as_bfloat16(np.zeros(1, np.float32)).dtype
    x, dk, pk, b = _separable_case(rng, c=32, f=64)
    pk = pk.astype(bf16)
    python_path = nbconv.separable_conv2d.__wrapped__.__wrapped__
    for depthwise, bias in ((dk, None), (dk.astype(bf16), None), (dk.astype(bf16), b.astype(bf16))):
        for _ in range(CALLS):
            x = random_array(rng, x.shape).astype(bf16)
            y = nbconv.separable_conv2d(x, depthwise, pk, bias, padding="same")
            expected = python_path(x, depthwise, pk, bias, padding="same")
            assert y.dtype == expected.dtype
            np.testing.assert_array_equal(y.view(np.uint8), expected.view(np.uint8))
        entry = _entry(nbconv.separable_conv2d, x, depthwise, pk, bias, padding="same")
        assert (entry.call is not None) == (depthwise.dtype == bf16)
    dkb, bb = dk.astype(bf16), b[:32].astype(bf16)
    for _ in range(CALLS):
        x = random_array(rng, x.shape).astype(bf16)
        y = nbconv.depthwise_conv2d(x, dkb, bb, padding="same")
        np.testing.assert_array_equal(y.view(np.uint8),
                                      nbconv.depthwise_conv2d.__wrapped__.__wrapped__(x, dkb, bb, padding="same")
                                      .view(np.uint8))
    assert _entry(nbconv.depthwise_conv2d, x, dkb, bb, padding="same").call is not None


def test_thread_count_is_part_of_the_key(rng):
    x, dk, pk, _ = _separable_case(rng, h=20, c=32, f=64)
    expected = separable_ref(x, dk, pk, padding="same")
    for threads in (1, nbconv.get_num_threads(), 1):
        with nbconv.num_threads(threads):
            for _ in range(CALLS):
                assert_close(nbconv.separable_conv2d(x, dk, pk, padding="same"), expected)


def test_out_replays_into_the_callers_array(rng):
    """``out=`` calls replay into the given array (returned as is), new data and a new array each call."""
    x, dk, pk, b = _separable_case(rng)
    for _ in range(CALLS):
        x = random_array(rng, x.shape)
        out = np.full((1, 9, 9, 40), np.nan, np.float32)
        assert nbconv.separable_conv2d(x, dk, pk, b, padding="same", activation="relu", out=out) is out
        assert_close(out, separable_ref(x, dk, pk, b, padding="same", activation="relu"))
        d = np.full((1, 9, 9, 24), np.nan, np.float32)
        assert nbconv.depthwise_conv2d(x, dk, strides=1, padding="same", out=d) is d
        assert_close(d, depthwise_ref(x, dk, padding="same"))
    assert _entry(nbconv.separable_conv2d, x, dk, pk, b, padding="same", activation="relu", out=out).call is not None
    assert _entry(nbconv.depthwise_conv2d, x, dk, strides=1, padding="same", out=d).call is not None


def test_out_checks_still_apply_after_replays(rng):
    """A replayed key's ``out=`` is still refused when it is an input's own memory (same shape, dtype and
    strides as the replayed one), read-only, or of another shape: the Python path's errors."""
    x, dk, pk, _ = _separable_case(rng, c=40)
    original = x.copy()
    out = np.empty((1, 9, 9, 40), np.float32)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x, dk, pk, padding="same", out=out)
    assert _entry(nbconv.separable_conv2d, x, dk, pk, padding="same", out=out).call is not None
    # the same key (shape, dtype, strides, writeable) as the replayed out, but the input's own memory
    with pytest.raises(ValueError, match="out"):
        nbconv.separable_conv2d(x, dk, pk, padding="same", out=x)
    frozen = np.empty_like(out)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        nbconv.separable_conv2d(x, dk, pk, padding="same", out=frozen)
    with pytest.raises(ValueError, match="out"):
        nbconv.separable_conv2d(x, dk, pk, padding="same", out=np.empty((1, 9, 9, 41), np.float32))
    np.testing.assert_array_equal(x, original)  # the refused out=x wrote nothing


@pytest.mark.parametrize("bf16", [False, True])
def test_packed_weights_replay(rng, bf16):
    """Packed pointwise weights are keyed by their arrays like plain ones: another packed kernel of the same
    shape replays with its own weights, bit for bit the plain weights' result."""
    def arr(shape):
        a = random_array(rng, shape)
        return nbconv.as_bfloat16(a) if bf16 else a

    x, dk, pk, b = (arr(a.shape) for a in _separable_case(rng, c=32, f=48))
    for _ in range(CALLS):
        x, w = arr(x.shape), arr(pk.shape)
        packed = nbconv.pack_pointwise_kernel(w)
        y = nbconv.separable_conv2d(x, dk, packed, b, padding="same")
        z = nbconv.pointwise_conv2d(x, packed)
        np.testing.assert_array_equal(y, nbconv.separable_conv2d(x, dk, w, b, padding="same"))
        np.testing.assert_array_equal(z, nbconv.pointwise_conv2d(x, w))
        if not bf16:
            assert_close(y, separable_ref(x, dk, w, b, padding="same"))
            assert_close(z, pointwise_ref(x, w))
    assert _entry(nbconv.separable_conv2d, x, dk, packed, b, padding="same").call is not None
    assert _entry(nbconv.pointwise_conv2d, x, packed).call is not None


def test_calls_that_keep_the_python_path(rng):
    x, dk, pk, _ = _separable_case(rng)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x.tolist(), dk, pk, padding="same")  # a list: no key
        nbconv.separable_conv2d(x, dk, pk, padding="same", strides=[1, 1])  # an unhashable option
    assert len(_replay._TABLE) == 0
    # float16 input is computed in float32, cast in Python first: the capture refuses it
    x16 = x.astype(np.float16)
    for _ in range(CALLS):
        assert_close(nbconv.separable_conv2d(x16, dk, pk, padding="same"), separable_ref(x16, dk, pk, padding="same"))
    entry = _entry(nbconv.separable_conv2d, x16, dk, pk, padding="same")
    assert entry.call is None and entry.dead


def test_channels_first_replays(rng):
    x, dk, pk, b = _separable_case(rng, n=2)
    kw = dict(padding="same", data_format="channels_first")
    for _ in range(CALLS):
        xt = random_array(rng, (2, 24, 9, 9))
        assert_close(nbconv.separable_conv2d(xt, dk, pk, b, **kw), separable_ref(xt, dk, pk, b, **kw))
    assert _entry(nbconv.separable_conv2d, xt, dk, pk, b, **kw).call is not None


def test_bad_input_still_raises_after_replays(rng):
    x, dk, pk, _ = _separable_case(rng)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x, dk, pk, padding="same", strides=(1, 1))
    # equal to the replayed call's arguments in Python's eyes (1.0 == 1), but not valid ones
    with pytest.raises((TypeError, ValueError), match="strides"):
        nbconv.separable_conv2d(x, dk, pk, padding="same", strides=(1.0, 1.0))
    with pytest.raises(ValueError, match="pointwise_kernel"):
        nbconv.separable_conv2d(x, dk, pk[:, :, :-1], padding="same")
    for _ in range(CALLS):  # a key whose calls raise is never captured
        with pytest.raises(ValueError, match="padding"):
            nbconv.separable_conv2d(x, dk, pk, padding="full")


def test_concurrent_replays(rng):
    x, dk, pk, b = _separable_case(rng, h=28, c=32, f=64)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x, dk, pk, b, padding="same")
    inputs = [random_array(np.random.default_rng(i), x.shape) for i in range(4)]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(10):
            results[i] = nbconv.separable_conv2d(inputs[i], dk, pk, b, padding="same")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for xi, y in zip(inputs, results):
        assert_close(y, separable_ref(xi, dk, pk, b, padding="same"))


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # jax, imported by other tests, warns; unused here
def test_forked_child_replays(rng, in_fork):
    """A call replayed in the parent replays in a forked child (whose helpers start anew), right and without
    hanging."""
    x, dk, pk, b = _separable_case(rng, h=28, c=32, f=64)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x, dk, pk, b, padding="same")
    assert _entry(nbconv.separable_conv2d, x, dk, pk, b, padding="same").call is not None
    inputs = [random_array(rng, x.shape) for _ in range(3)]
    expected = [separable_ref(xi, dk, pk, b, padding="same") for xi in inputs]

    def child():
        ok = all(np.allclose(nbconv.separable_conv2d(xi, dk, pk, b, padding="same"), e, rtol=1e-4, atol=1e-4)
                 for xi, e in zip(inputs, expected))
        return b"ok" if ok else b"wrong"

    assert in_fork(child) == b"ok"


def test_a_template_that_refuses_to_run_falls_back(rng):
    """A replay whose template refuses to run (here: the pool's nonce changed, as in a process that did not make
    it) gives the Python call's result and stops replaying its key."""
    from nbconv._sync import NONCE_SLOT
    from nbconv._threads import POOL

    x, dk, pk, _ = _separable_case(rng)
    for _ in range(CALLS):
        nbconv.separable_conv2d(x, dk, pk, padding="same")
    entry = _entry(nbconv.separable_conv2d, x, dk, pk, padding="same")
    assert entry.call is not None
    nonce = int(POOL.sig[NONCE_SLOT])
    POOL.sig[NONCE_SLOT] = nonce + 1
    try:
        x = random_array(rng, x.shape)
        y = nbconv.separable_conv2d(x, dk, pk, padding="same")
    finally:
        POOL.sig[NONCE_SLOT] = nonce
    assert_close(y, separable_ref(x, dk, pk, padding="same"))
    assert entry.call is None and entry.dead
