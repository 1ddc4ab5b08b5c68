"""Shared fixtures for nbconv's tests.

Keras is compared on the jax backend (Keras's default, tensorflow, is not a
test dependency), so the backend is chosen before anything imports keras.
"""
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the tests time nothing and check compiled kernels: compile in process (nbconv._compile), as before
os.environ.setdefault("NBCONV_COMPILE", "sync")

# `from reference import ...` works whatever pytest's import mode or rootdir.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
# the checkout's benchmarks package, found last: nbconv itself stays the installed one (tox installs the sdist)
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:
    from hypothesis import HealthCheck, settings  # noqa: E402

    settings.register_profile(
        "nbconv",
        deadline=None,  # a new signature triggers a Numba compile of a few seconds
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "nbconv"))
except ImportError:  # pragma: no cover
    pass


@pytest.fixture
def rng():
    """A fresh, seeded generator per test (reproducible failures)."""
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def keras_ops():
    """``keras.ops`` (jax backend unless KERAS_BACKEND says otherwise), imported lazily: jax takes seconds to load."""
    import keras

    return keras.ops


@pytest.fixture
def plan_override():
    """``plan_override(name=value, ...)`` changes the planner's tunables (``nbconv._plan.override``) until the
    test ends."""
    import contextlib

    from nbconv import _plan

    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(_plan.override(**changes))


@pytest.fixture
def in_fork():
    """``in_fork(child)`` runs ``child()`` (returning bytes) in a forked child process and returns those bytes;
    the test fails if the child hangs for two minutes.  Skips where there is no ``fork()``."""
    import time

    if not hasattr(os, "fork"):
        pytest.skip("no fork() on this platform")

    def run(child):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child reports through the pipe)
            try:
                os.write(write, child())
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 120
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                pytest.fail("the forked child hung")
            time.sleep(0.05)
        try:
            return os.read(read, 64)
        finally:
            os.close(read)

    return run
