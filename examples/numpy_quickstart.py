"""The classic depthwise-separable block with NumPy arrays, and what it saves over a standard convolution.

Input (8, 32, 56, 56) in channels-first layout (as in the PyTorch tutorials), a 3x3 depthwise convolution with
``padding=1`` then a 1x1 convolution to 64 channels.  Run: ``python examples/numpy_quickstart.py``.
"""
import time

import numpy as np

import nbconv
from nbconv import cost

rng = np.random.default_rng(0)
x = rng.standard_normal((8, 32, 56, 56), dtype=np.float32)                # N, C, H, W
depthwise_kernel = rng.standard_normal((3, 3, 32, 1), dtype=np.float32)   # kh, kw, C, depth_multiplier (Keras layout)
pointwise_kernel = rng.standard_normal((1, 1, 32, 64), dtype=np.float32)  # 1, 1, C*depth_multiplier, filters
bias = np.zeros(64, np.float32)

# PyTorch spellings (stride=, padding=1) work as well as Keras's (strides=, padding="same")
y = nbconv.separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias, stride=1, padding=1,
                            data_format="channels_first", activation="relu")
print(f"output shape {y.shape} {y.dtype}")

# the same thing in two steps (the fused kernel never stores the depthwise result)
d = nbconv.depthwise_conv2d(x, depthwise_kernel, padding=1, data_format="channels_first")
z = nbconv.pointwise_conv2d(d, pointwise_kernel, bias, data_format="channels_first", activation="relu")
print(f"fused vs two steps: max |difference| = {np.abs(y - z).max():.2e}")

# parameters and multiply-adds against a standard 3x3 convolution 32 -> 64
comparison = cost.compare(x.shape, filters=64, kernel_size=3, padding=1, data_format="channels_first")
print()
print(comparison)
print(f"1/filters + 1/k^2 = 1/64 + 1/9 = {cost.separable_ratio(64, 3):.4f}")

times = []
for _ in range(10):
    t0 = time.perf_counter()
    nbconv.separable_conv2d(x, depthwise_kernel, pointwise_kernel, bias, padding=1, data_format="channels_first",
                            activation="relu")
    times.append(time.perf_counter() - t0)
median = sorted(times)[len(times) // 2]
print(f"\nnbconv: {1e3 * median:.2f} ms per call (median of 10, {nbconv.get_num_threads()} threads), "
      f"{comparison.separable.flops / median / 1e9:.1f} GFLOP/s")
