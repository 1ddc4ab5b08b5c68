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

import numba

FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

#: serial kernels and helpers
jit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
#: parallel kernels (``prange`` over a flat task index)
pjit = functools.partial(jit, parallel=True)
