"""NumPy bridge: a direct call (Keras's numpy backend is inference only, so there is no gradient)."""
import numpy as np

from . import _common

#: nbconv's results otherwise page-fault in on every call (see keep_freed_memory)
MALLOC_TUNED = _common.keep_freed_memory()


def apply(cfg, *tensors):
    """Run the op described by ``cfg`` on ``tensors`` (x, kernel(s)[, bias]) as float32, float64 or bfloat16 arrays."""
    return _common.forward(cfg, *[np.asarray(t) for t in tensors])


def needs_gradient(tensors):
    """Always False: Keras's numpy backend has no autodiff."""
    return False
