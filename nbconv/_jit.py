"""JIT options shared by every kernel, defined once.

``fastmath`` allows reassociation and FMA contraction (what lets the channel
loops vectorise) but deliberately leaves out ``nnan``/``ninf``: NaN and Inf
must propagate exactly as in the float64 reference.  ``error_model="numpy"``
drops the ZeroDivision checks that block vectorisation.  ``nogil`` lets other
Python threads (data loaders, a JAX or TF host callback, nbconv's own helper
threads) run while a kernel computes.
"""
import functools

import numba

from . import _cache

_cache.install()  # before the first kernel is decorated: it picks the cache locator

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: every kernel and helper (the parallel ones share their chunks through :mod:`nbconv._threads`' pool)
jit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
