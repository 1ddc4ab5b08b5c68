"""Public thread control: how many threads nbconv's parallel kernels use."""
import contextlib
import numbers

import numba

__all__ = ["get_num_threads", "set_num_threads", "num_threads", "planning_threads"]


def get_num_threads():
    """Return the number of threads the kernels use in the calling thread."""
    return numba.get_num_threads()


def set_num_threads(n):
    """Set the number of threads the kernels use (in the calling Python thread).

    Parameters
    ----------
    n : int
        Between 1 and ``numba.config.NUMBA_NUM_THREADS`` (the size of the pool,
        by default the number of cores).
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= limit:
        raise ValueError(
            f"Expected `n` to be an int between 1 and {limit} (the size of Numba's thread pool). "
            f"Received: n={n!r}"
        )
    numba.set_num_threads(int(n))


@contextlib.contextmanager
def num_threads(n):
    """Context manager running the enclosed calls on ``n`` threads.

    The previous setting is restored on exit, also when the block raises.

    Examples
    --------
    >>> with nbconv.num_threads(1):
    ...     y = nbconv.separable_conv2d(x, dk, pk)
    """
    previous = get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def planning_threads():
    """Thread count that work is split for: the size of Numba's pool, not the current setting.

    Tiling from the pool size keeps every result bit-identical whatever
    ``set_num_threads`` says (BLAS sums each tile in an order fixed by its
    shape); a smaller setting just runs the same tasks on fewer threads.
    """
    return numba.config.NUMBA_NUM_THREADS
