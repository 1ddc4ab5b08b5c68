"""Backend dispatch: the bridge module for ``keras.backend.backend()``.

Each bridge exposes ``apply(cfg, x, *weights)`` running the op described by a
:class:`~keras_layers.backend._common.Config` on float32, float64 or bfloat16 tensors of
that backend, differentiable where the backend is.  The bridge is imported
here, once (Keras fixes its backend at import), so that nothing in ``call``
imports a module: ``torch.compile`` cannot trace ``importlib``.
"""
import importlib

import keras

from ._common import FUSED, Config, make_config  # noqa: F401

_BRIDGES = {"jax": "jax", "tensorflow": "tensorflow", "torch": "torch", "numpy": "numpy"}


def _load():
    name = keras.backend.backend()
    if name not in _BRIDGES:
        return None
    return importlib.import_module(f"{__name__}.{_BRIDGES[name]}")


_BRIDGE = _load()


def bridge():
    """Return the bridge module of the active Keras backend."""
    if _BRIDGE is None:
        raise ValueError(
            f"Expected a Keras backend among {sorted(_BRIDGES)} for nbconv's layers. "
            f"Received: backend={keras.backend.backend()!r}"
        )
    return _BRIDGE
