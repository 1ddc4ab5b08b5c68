"""The torch bridge (``keras_layers/backend/torch.py``): when the custom op is dispatched and when it is not.

Eager inference on CPU tensors skips torch's dispatcher; everything that needs
the op (autograd, torch.compile, fake and meta tensors, dispatch modes,
functorch transforms, the profiler) must still get it.  Results are compared
with the float64 reference.
"""
import gc

import numpy as np
import pytest

from helpers import BACKEND
from reference import U_BF16, assert_close, assert_within, bf16_round, bf16_separable_bound, separable_ref

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


# --- pointwise weights packed once for bfloat16 inference ----------------------------------------------------

@pytest.fixture
def packs(monkeypatch):
    """The pointwise kernels the bridge packed (one entry per packing)."""
    calls = []
    real = bridge.packing.pack_view

    def counting(kernel, *args, **kwargs):
        calls.append(np.array(kernel, np.float64))
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(bridge.packing, "pack_view", counting)
    return calls


def _apply_bf16(tensors):
    cfg = _common.make_config(CFG["kind"], CFG["has_bias"], CFG["strides"], CFG["padding"], CFG["dilation_rate"],
                              CFG["data_format"], CFG["activation"], precision="bfloat16")
    return bridge.apply(cfg, tensors[0].to(torch.bfloat16), *tensors[1:])


def _assert_bf16_result(y, tensors):
    """``y`` within the bfloat16 bound of the float64 reference of the tensors' current values."""
    x, dk, pk, b = [t.detach().double().numpy() for t in tensors]
    xr, pkr = bf16_round(x), bf16_round(pk)
    conv = dict(strides=CFG["strides"], padding="same")
    bound, _ = bf16_separable_bound(xr, dk, pkr, b, **conv)
    assert_within(y.float().numpy(), separable_ref(xr, dk, pkr, b, activation="relu", **conv), bound, U_BF16)


def test_bfloat16_inference_packs_the_pointwise_weights_once(packs):
    _, tensors = _operands(np.random.default_rng(7), requires_grad=True)
    with torch.no_grad():
        ys = [_apply_bf16(tensors) for _ in range(3)]
    assert len(packs) == 1
    for y in ys:
        _assert_bf16_result(y, tensors)


def test_packed_weights_follow_every_change_of_the_tensor(packs):
    rng = np.random.default_rng(8)
    _, tensors = _operands(rng, requires_grad=True)
    pk = tensors[2]
    with torch.no_grad():
        _apply_bf16(tensors)
        pk.copy_(torch.tensor(rng.standard_normal(tuple(pk.shape)).astype(np.float32)))  # Keras's assign
        _assert_bf16_result(_apply_bf16(tensors), tensors)
        pk.mul_(-0.5)  # an optimizer's in-place step
        _assert_bf16_result(_apply_bf16(tensors), tensors)
        pk[0, 0, 3, 1] = 7.0  # a write through a view
        _assert_bf16_result(_apply_bf16(tensors), tensors)
    assert len(packs) == 4


def test_packed_weights_go_with_their_tensor(packs):
    _, tensors = _operands(np.random.default_rng(9))
    with torch.no_grad():
        _apply_bf16(tensors)
    key = id(tensors[2])
    assert key in bridge._PACKED
    del tensors
    gc.collect()
    assert key not in bridge._PACKED


def test_float32_and_recorded_calls_use_the_weights_as_they_are(packs):
    arrays, tensors = _operands(np.random.default_rng(10), requires_grad=True)
    with torch.no_grad():
        assert_close(_apply(tensors).numpy(), _expected(arrays))
    y = _apply_bf16(tensors)  # autograd records it: the custom op, weights read on every call
    assert y.requires_grad
    _assert_bf16_result(y.detach(), tensors)
    assert not packs
