"""The jax bridge (``keras_layers/backend/jax.py``): the forward as an XLA FFI call into nbconv's compiled
handler, and the host callback where that cannot be.  Results against the float64 reference."""
import threading

import numpy as np
import pytest

from helpers import BACKEND, concurrent_separable_cases, separable_config, separable_operands
from reference import assert_close, separable_ref

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="the jax bridge runs on the jax backend only")

if BACKEND == "jax":
    import jax
    import jax.numpy as jnp

    from keras_layers.backend import jax as bridge

    from nbconv import _native




def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


@pytest.fixture
def native():
    if not bridge.ffi_ready():
        pytest.skip("no XLA FFI here (not Linux, or jax without jax.ffi)")


def test_forward_is_an_ffi_call(rng, native):
    """Traced under jit, the forward is one custom call to nbconv's FFI target (no host callback), and right."""
    cfg = separable_config()
    arrays = separable_operands(rng)
    op = bridge._op(cfg)
    text = _hlo(op, *arrays)
    assert bridge.FFI_TARGET in text
    assert "callback" not in text
    got = np.asarray(jax.jit(op)(*arrays))
    assert_close(got, separable_ref(*[a.astype(np.float64) for a in arrays], padding="same", activation="relu"))


def test_new_values_and_eager_calls(rng, native):
    """The template holds no values: later calls with other inputs, eager and jitted, are right."""
    cfg = separable_config(strides=(2, 2), padding="valid", activation="linear")
    op = bridge._op(cfg)
    jitted = jax.jit(op)
    for _ in range(3):
        arrays = separable_operands(rng, (1, 33, 31, 16), 24)
        ref = separable_ref(*[a.astype(np.float64) for a in arrays], strides=2, padding="valid")
        assert_close(np.asarray(jitted(*arrays)), ref)
        assert_close(np.asarray(op(*[jnp.asarray(a) for a in arrays])), ref)


def test_vmap_and_grad_around_the_ffi_call(rng, native):
    """vmap runs the call per mapped element; the gradient (a host callback) still sees the forward."""
    cfg = separable_config(activation="linear")
    arrays = separable_operands(rng, (1, 12, 14, 8), 16)
    op = bridge._op(cfg)
    xs = np.stack([arrays[0], 2 * arrays[0]])
    got = np.asarray(jax.jit(jax.vmap(op, in_axes=(0, None, None, None)))(xs, *arrays[1:]))
    for i, x in enumerate(xs):
        ref = separable_ref(x.astype(np.float64), *[a.astype(np.float64) for a in arrays[1:]], padding="same")
        assert_close(got[i], ref)

    def loss(x, dk, pk, b):
        return jnp.sum(op(x, dk, pk, b) ** 2)

    gx = np.asarray(jax.jit(jax.grad(loss))(*arrays))
    # central differences of the float64 reference at a few entries
    f64 = [a.astype(np.float64) for a in arrays]
    for idx in [(0, 0, 0, 0), (0, 5, 7, 3), (0, 11, 13, 7)]:
        h = 1e-3
        plus, minus = f64[0].copy(), f64[0].copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np.sum(separable_ref(plus, *f64[1:], padding="same") ** 2)
              - np.sum(separable_ref(minus, *f64[1:], padding="same") ** 2)) / (2 * h)
        assert abs(gx[idx] - fd) <= 2e-3 * max(1.0, abs(fd)), (idx, gx[idx], fd)


def test_concurrent_jitted_calls(rng, native):
    """Four Python threads calling jitted ops at once: the native calls share the helpers or run alone."""
    cases = concurrent_separable_cases(rng)
    fns = [jax.jit(bridge._op(cfg)) for cfg, _ in cases]
    refs = []
    for cfg, arrays in cases:
        f64 = [a.astype(np.float64) for a in arrays]
        refs.append(separable_ref(*f64, strides=cfg.strides, padding="same",
                                  activation=None if cfg.activation == "linear" else cfg.activation))
    for fn, (_, arrays) in zip(fns, cases):
        fn(*arrays).block_until_ready()
    failures = []

    def caller(i):
        for _ in range(10):
            try:
                assert_close(np.asarray(fns[i](*cases[i][1])), refs[i])
            except AssertionError as e:  # pragma: no cover  (reported below)
                failures.append((i, str(e)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_falls_back_to_the_callback(rng, monkeypatch, native):
    """An op that cannot be captured (here: refused) is traced as a host callback, with the same result."""
    def refuse(*args, **kwargs):
        raise _native.Unsupported("refused for the test")

    monkeypatch.setattr(_native, "capture", refuse)  # a config and shape no other test traces: not cached
    cfg = separable_config(activation="relu6")
    arrays = separable_operands(rng, (1, 10, 11, 8), 8)
    op = bridge._op(cfg)
    text = _hlo(op, *arrays)
    assert bridge.FFI_TARGET not in text and "callback" in text
    ref = separable_ref(*[a.astype(np.float64) for a in arrays], padding="same", activation="relu6")
    assert_close(np.asarray(jax.jit(op)(*arrays)), ref)


def test_a_refused_handler_warns_and_keeps_the_callback(monkeypatch):
    """An XLA that refuses the handler at registration: a RuntimeWarning naming the error, and the callback."""
    def refuse(*args, **kwargs):
        raise RuntimeError("handler rejected for the test")

    monkeypatch.setattr(jax.ffi, "register_ffi_target", refuse)
    monkeypatch.setattr(bridge, "_REGISTERED", [])
    monkeypatch.setattr(bridge, "_OFF", [])
    with pytest.warns(RuntimeWarning, match="XLA refused the native forward.*rejected for the test"):
        assert bridge.ffi_ready() is False
    assert bridge.ffi_ready() is False  # decided once


def test_background_mode_builds_the_handler_in_a_child(monkeypatch):
    """In the background compile mode a handler not in the disk cache is handed to a child, and traces keep the
    callback until it is there."""
    from nbconv import _compile

    built = []
    monkeypatch.setattr(bridge, "_REGISTERED", [])
    monkeypatch.setattr(bridge, "_OFF", [])
    monkeypatch.setattr(_compile, "get_mode", lambda: "background")
    monkeypatch.setattr(_native, "entry_built", lambda name: False)
    monkeypatch.setattr(_native, "build_in_background", built.append)
    assert bridge.ffi_ready() is False and built == ["ffi"]
    monkeypatch.setattr(_native, "entry_built", lambda name: True)
    assert bridge.ffi_ready() is True
