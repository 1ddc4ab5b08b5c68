"""JIT options shared by every kernel, defined once.

``fastmath`` allows reassociation and FMA contraction (what lets the channel
loops vectorise) but deliberately leaves out ``nnan``/``ninf``: NaN and Inf
must propagate exactly as in the float64 reference.  ``error_model="numpy"``
drops the ZeroDivision checks that block vectorisation.  ``nogil`` lets other
Python threads (data loaders, a JAX or TF host callback) run while a kernel
computes; concurrent launches are safe with the TBB threading layer chosen in
:mod:`nbconv._runtime`.
"""
import functools
import types

import numba

from . import _cache

_cache.install()  # before the first kernel is decorated: it picks the cache locator

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: serial kernels and helpers
jit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
#: parallel kernels (``prange`` over a flat task index)
pjit = functools.partial(jit, parallel=True)


def serial_twin(kernel):
    """The serial compilation of a parallel kernel (``prange`` runs as ``range``), cached under its own name.

    Calls planned for one thread run it: a parallel launch costs more than
    a whole tiny kernel even for one task (Numba's TBB pool enters an arena
    and wakes a worker).  The twin is a copy of the
    Python function with its own ``__qualname__``: Numba keys its on-disk
    cache by qualified name, and would otherwise load the parallel build.
    """
    f = kernel.py_func
    twin = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = f.__qualname__ + "_serial"
    twin.__module__, twin.__doc__ = f.__module__, f.__doc__
    return jit(twin)
