"""Backend dispatch: the bridge module for ``keras.backend.backend()``.

Each bridge exposes ``apply(cfg, x, *weights)`` running the op described by a
:class:`~keras_layers.backend._common.Config` on float32, float64 or bfloat16 tensors of
that backend, differentiable where the backend is.  The bridge is imported
here, once (Keras fixes its backend at import), so that nothing in ``call``
imports a module: ``torch.compile`` cannot trace ``importlib``.
"""
import importlib

import keras

import functools

from ._common import FUSED, Config  # noqa: F401
from ._common import make_config as _make_config

_BRIDGES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch", "numpy": "numpy"}


def _load():
    name = keras.backend.backend()
    if name not in _BRIDGES:
        return None
    return importlib.import_module(f"{__name__}.{_BRIDGES[name]}")


_BRIDGE = _load()


@functools.lru_cache(maxsize=1024)
def _cached_config(*args):
    return _make_config(*args)


def make_config(*args):
    """:func:`keras_layers.backend._common.make_config`, cached: layers build their config on every call."""
    try:
        return _cached_config(*args)
    except TypeError:  # an unhashable spelling (a list): validated and normalised all the same
        return _make_config(*args)


def bridge():
    """Return the bridge module of the active Keras backend."""
    if _BRIDGE is None:
        raise ValueError(
            f"Expected a Keras backend among {sorted(_BRIDGES)} for nbconv's layers. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    return _BRIDGE
