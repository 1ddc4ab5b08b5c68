"""The torch bridge (``keras_layers/backend/torch.py``): when the custom op is dispatched and when it is not.

Eager inference on CPU tensors skips torch's dispatcher; everything that needs
the op (autograd, torch.compile, fake and meta tensors, dispatch modes,
functorch transforms, the profiler) must still get it.  Results are compared
with the float64 reference.
"""
import numpy as np
import pytest

from helpers import BACKEND
from reference import assert_close, separable_ref

pytestmark = pytest.mark.skipif(BACKEND != "torch", reason="the torch bridge runs on the torch backend only")

if BACKEND == "torch":
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from keras_layers.backend import _common
    from keras_layers.backend import torch as bridge

    class _PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

CFG = dict(kind="separable", has_bias=True, strides=(2, 1), padding="same", dilation_rate=(1, 1),
           data_format="channels_last", activation="relu")


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the bridge dispatched its custom forward op."""
    calls = []
    real = bridge.separable_conv2d

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(bridge, "separable_conv2d", counting)
    return calls


def _operands(rng, requires_grad=False):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in ((2, 9, 8, 6), (3, 3, 6, 2), (1, 1, 12, 5), (5,))]
    tensors = [torch.tensor(a) for a in arrays]
    for t in tensors[1:]:
        t.requires_grad_(requires_grad)
    return arrays, tensors


def _expected(arrays):
    x, dk, pk, b = arrays
    return separable_ref(x, dk, pk, b, strides=CFG["strides"], padding="same", activation="relu")


def _apply(tensors):
    return bridge.apply(_common.make_config(CFG["kind"], CFG["has_bias"], CFG["strides"], CFG["padding"],
                                            CFG["dilation_rate"], CFG["data_format"], CFG["activation"]), *tensors)


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "weights_without_grad"])
def test_eager_inference_skips_the_dispatcher(op_calls, context):
    arrays, tensors = _operands(np.random.default_rng(0), requires_grad=context != "weights_without_grad")
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with ctx():
        y = _apply(tensors)
    assert not op_calls
    assert_close(y.numpy(), _expected(arrays))


def test_autograd_gets_the_op(op_calls):
    arrays, tensors = _operands(np.random.default_rng(1), requires_grad=True)
    y = _apply(tensors)
    assert len(op_calls) == 1 and y.requires_grad
    y.sum().backward()
    assert all(t.grad is not None for t in tensors[1:])
    assert_close(y.detach().numpy(), _expected(arrays))


def test_dispatch_modes_get_the_op(op_calls):
    arrays, tensors = _operands(np.random.default_rng(2))
    with torch.no_grad(), _PassThrough():
        y = _apply(tensors)
    assert len(op_calls) == 1
    assert_close(y.numpy(), _expected(arrays))


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_fake_and_meta_tensors_get_the_op(op_calls, where):
    _, tensors = _operands(np.random.default_rng(3))
    with torch.no_grad():
        if where == "meta":
            y = _apply([t.to("meta") for t in tensors])
        else:
            with FakeTensorMode() as mode:
                y = _apply([mode.from_tensor(t) for t in tensors])
    assert len(op_calls) == 1
    assert tuple(y.shape) == (2, 5, 8, 5)


def test_profiler_sees_the_op():
    _, tensors = _operands(np.random.default_rng(4))
    with torch.no_grad(), torch.profiler.profile() as prof:
        _apply(tensors)
    assert any(e.name == "nbconv::separable_conv2d" for e in prof.events())


def test_vmap_gets_the_op(op_calls):
    arrays, tensors = _operands(np.random.default_rng(5))
    with torch.no_grad():
        y = torch.vmap(lambda x: _apply([x[None]] + tensors[1:])[0])(tensors[0])
    assert op_calls
    assert_close(y.numpy(), _expected(arrays))


def test_compile_without_grad_has_no_graph_break():
    arrays, tensors = _operands(np.random.default_rng(6))
    compiled = torch.compile(lambda *t: _apply(t), fullgraph=True)
    with torch.no_grad():
        y = compiled(*tensors)
    assert_close(y.numpy(), _expected(arrays))
