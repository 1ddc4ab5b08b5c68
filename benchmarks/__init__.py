"""nbconv's benchmark suites and report (``tox -e bench`` = ``python -m benchmarks``).

- :mod:`benchmarks.cases`: the one table of cases (MobileNetV1, Xception, the classic example, cases peers handle
  poorly, depthwise/pointwise alone, fused vs two-step, per-call overhead, forward+backward, a Keras model of
  MobileNetV1's blocks, and keras.applications models converted with ``keras_layers.convert`` per Keras backend).
- :mod:`benchmarks.contenders`: one adapter per library (nbconv, Keras's op, PyTorch NCHW and channels_last,
  ONNX Runtime, NumPy, and the sgemm peak), all ``setup(case) -> callable``.
- :mod:`benchmarks.test_bench`: the pytest-benchmark suite, run once per contender in its own process.
- :mod:`benchmarks.probes`: peak memory of one call and first-call times, each in a fresh process.
- :mod:`benchmarks.report`: tables, the summary against the targets, JSON and PNG chart under
  ``benchmarks/results/``, and the markdown page ``docs/benchmarks.md``.
- :mod:`benchmarks.cli`: ``python -m nbconv bench`` in a checkout: the same contenders and cases, timed by a plain
  loop (no pytest-benchmark), one process per contender.
"""
import os

#: the checkout's root (what benchmark processes put on ``PYTHONPATH``)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(extra=None):
    """The environment of a benchmark process: this one's, the checkout first on ``PYTHONPATH``, Keras on jax
    and jax on the CPU unless set, compiled kernels (``NBCONV_COMPILE=sync`` unless set), then ``extra``."""
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "jax")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("NBCONV_COMPILE", "sync")  # time compiled kernels, never the NumPy answers of a cold start
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env
