"""The TensorFlow bridge (``keras_layers/backend/tensorflow.py``): the forward as nbconv's own op, registered
through TensorFlow's C kernel API, and ``numpy_function`` where that cannot be.  Results against the float64
reference."""
import threading

import numpy as np
import pytest

from helpers import BACKEND, concurrent_separable_cases, separable_config, separable_operands
from reference import assert_close, separable_ref

pytestmark = pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow bridge runs on tensorflow only")

if BACKEND == "tensorflow":
    import tensorflow as tf

    from keras_layers.backend import _common
    from keras_layers.backend import tensorflow as bridge




def _ref(arrays, **kw):
    return separable_ref(*[a.astype(np.float64) for a in arrays], **kw)


@pytest.fixture
def native():
    if not bridge.native_ready():
        pytest.skip("no native TensorFlow op here (not Linux)")


def _ops(fn, *args):
    return [n.op for n in fn.get_concrete_function(*args).graph.as_graph_def().node]


def test_forward_is_the_native_op(rng, native):
    """In a tf.function the forward is one NbconvForward op (no py_func), eagerly too, with the right result;
    later calls with other values are right as well."""
    cfg = separable_config()
    fn = tf.function(lambda *a: bridge._op(cfg, None)(*a))
    arrays = separable_operands(rng)
    ops = _ops(fn, *[tf.constant(a) for a in arrays])
    assert bridge.OP_NAME in ops and not any("PyFunc" in op for op in ops)
    for _ in range(2):
        arrays = separable_operands(rng)
        ref = _ref(arrays, padding="same", activation="relu")
        assert_close(fn(*[tf.constant(a) for a in arrays]).numpy(), ref)
        assert_close(bridge._op(cfg, None)(*[tf.constant(a) for a in arrays]).numpy(), ref)


def test_unknown_shapes_use_numpy_function(rng, native):
    """A graph traced for an unknown batch cannot be captured: numpy_function runs it, with the same result."""
    cfg = separable_config(strides=(2, 2), activation="linear")
    arrays = separable_operands(rng, (3, 16, 18, 8), 16)
    spec = [tf.TensorSpec((None,) + arrays[0].shape[1:], tf.float32)] + [
        tf.TensorSpec(a.shape, tf.float32) for a in arrays[1:]]
    fn = tf.function(lambda *a: bridge._op(cfg, None)(*a), input_signature=spec)
    ops = _ops(fn)
    assert bridge.OP_NAME not in ops and any("PyFunc" in op for op in ops)
    assert_close(fn(*[tf.constant(a) for a in arrays]).numpy(), _ref(arrays, strides=2, padding="same"))


def test_gradient_around_the_native_op(rng, native):
    """The backward (numpy_function) sees the native forward's inputs and output: relu mask from ``y``; checked
    against central differences of the float64 reference."""
    cfg = separable_config(activation="relu")
    arrays = separable_operands(rng, (1, 10, 12, 8), 8)
    ts = [tf.constant(a) for a in arrays]

    @tf.function
    def grad(*args):
        with tf.GradientTape() as tape:
            tape.watch(args[0])
            y = bridge._op(cfg, (True, False, False, False))(*args)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, args[0])

    gx = grad(*ts).numpy()
    f64 = [a.astype(np.float64) for a in arrays]
    for idx in [(0, 0, 0, 0), (0, 4, 6, 3), (0, 9, 11, 7)]:
        h = 1e-3
        plus, minus = f64[0].copy(), f64[0].copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (np.sum(separable_ref(plus, *f64[1:], padding="same", activation="relu") ** 2)
              - np.sum(separable_ref(minus, *f64[1:], padding="same", activation="relu") ** 2)) / (2 * h)
        assert abs(gx[idx] - fd) <= 2e-3 * max(1.0, abs(fd)), (idx, gx[idx], fd)


def test_concurrent_graph_calls(rng, native):
    """Four Python threads running native ops at once (TensorFlow's executor calls them without the GIL)."""
    cases = concurrent_separable_cases(rng)
    fns, refs = [], []
    for cfg, arrays in cases:
        fns.append(tf.function(lambda *a, cfg=cfg: bridge._op(cfg, None)(*a)))
        refs.append(_ref(arrays, strides=cfg.strides, padding="same",
                         activation=None if cfg.activation == "linear" else cfg.activation))
    inputs = [[tf.constant(a) for a in arrays] for _, arrays in cases]
    for fn, args in zip(fns, inputs):
        fn(*args)
    failures = []

    def caller(i):
        for _ in range(10):
            try:
                assert_close(fns[i](*inputs[i]).numpy(), refs[i])
            except AssertionError as e:  # pragma: no cover  (reported below)
                failures.append((i, str(e)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_mismatched_inputs_raise(rng, native):
    """The op run on inputs of another shape than its template's: TensorFlow raises nbconv's message."""
    from tensorflow.python.eager import context, execute

    cfg = separable_config()
    arrays = separable_operands(rng)
    call = _common.native_call(cfg, tuple(a.shape for a in arrays), tuple(a.dtype for a in arrays),
                               __import__("nbconv").get_num_threads())
    other = [tf.constant(a) for a in separable_operands(rng, (2, 19, 20, 24))]
    attrs = ("Tin", [tf.float32.as_datatype_enum] * 4, "Tout", tf.float32.as_datatype_enum)
    with pytest.raises(tf.errors.InvalidArgumentError, match="nbconv: .*shape"):
        execute.execute(bridge.OP_NAME.encode(), 2, inputs=other + [tf.constant(call.template)], attrs=attrs,
                        ctx=context.context())


def test_a_refused_registration_warns_and_keeps_numpy_function(monkeypatch):
    """TensorFlow refusing the op (another version's C API): a RuntimeWarning with its message, and
    numpy_function for the forward."""
    def refuse(lib, compute):
        raise RuntimeError("op rejected for the test")

    monkeypatch.setattr(bridge, "_register_op", refuse)
    monkeypatch.setattr(bridge, "_REGISTERED", [])
    monkeypatch.setattr(bridge, "_OFF", [])
    with pytest.warns(RuntimeWarning, match="cannot register the native TensorFlow op.*rejected for the test"):
        assert bridge.native_ready() is False
    assert bridge.native_ready() is False  # decided once


def test_background_mode_builds_the_kernel_in_a_child(monkeypatch):
    """In the background compile mode a compute function not in the disk cache is handed to a child, and graphs
    keep numpy_function until it is there."""
    from nbconv import _compile, _native

    built = []
    monkeypatch.setattr(bridge, "_REGISTERED", [])
    monkeypatch.setattr(bridge, "_OFF", [])
    monkeypatch.setattr(bridge, "_register_op", lambda lib, compute: None)
    monkeypatch.setattr(_compile, "get_mode", lambda: "background")
    monkeypatch.setattr(_native, "entry_built", lambda name: False)
    monkeypatch.setattr(_native, "build_in_background", built.append)
    assert bridge.native_ready() is False and built == ["tf"]
    monkeypatch.setattr(_native, "entry_built", lambda name: True)
    assert bridge.native_ready() is True
