"""nbconv's benchmark suites and report (``tox -e bench`` = ``python -m benchmarks``).

- :mod:`benchmarks.cases`: the one table of cases (MobileNetV1, Xception, the classic example, cases peers handle
  poorly, depthwise/pointwise alone, fused vs two-step, per-call overhead, forward+backward, a Keras model of
  MobileNetV1's blocks, and keras.applications models converted with ``keras_layers.convert`` per Keras backend).
- :mod:`benchmarks.contenders`: one adapter per library (nbconv, Keras's op, PyTorch NCHW and channels_last,
  ONNX Runtime, NumPy, and the sgemm peak), all ``setup(case) -> callable``.
- :mod:`benchmarks.test_bench`: the pytest-benchmark suite, run once per contender in its own process.
- :mod:`benchmarks.probes`: peak memory of one call and first-call times, each in a fresh process.
- :mod:`benchmarks.report`: tables, target summary, JSON and PNG chart under ``benchmarks/results/``.
"""
