"""nbconv: fast depthwise-separable convolution on the CPU, as parallel Numba kernels on NumPy arrays.

Public API
----------
depthwise_conv2d, pointwise_conv2d, separable_conv2d
    Forward convolutions (Keras weight layouts, NHWC or NCHW).
depthwise_conv2d_backward, pointwise_conv2d_backward, separable_conv2d_backward
    Their gradients (named tuples DepthwiseConv2DGrads, PointwiseConv2DGrads, SeparableConv2DGrads).
batch_norm_train, batch_norm_train_backward
    Training-mode batch normalisation over the channels (the layer after a convolution) and its gradient.
pack_pointwise_kernel, PackedPointwiseKernel
    Pointwise weights packed once for many forward calls (inference with fixed weights).
get_num_threads, set_num_threads, num_threads
    Thread control for the kernels.
as_bfloat16
    bfloat16 bits (a torch tensor's int16 view) or floats as an ``ml_dtypes.bfloat16`` array.
"""
__version__ = "0.1.0"  # first: the kernel cache is keyed on it (nbconv._cache)

from . import _runtime  # (threading layer and BLAS symbols, before any kernel compiles)
from . import _cache
from ._dtypes import as_bfloat16
from ._threads import get_num_threads, num_threads, set_num_threads
from .backward import (
    DepthwiseConv2DGrads,
    PointwiseConv2DGrads,
    SeparableConv2DGrads,
    depthwise_conv2d_backward,
    pointwise_conv2d_backward,
    separable_conv2d_backward,
)
from .forward import depthwise_conv2d, pointwise_conv2d, separable_conv2d
from .norm import BatchNormGrads, batch_norm_train, batch_norm_train_backward
from .packing import PackedPointwiseKernel, pack_pointwise_kernel

if _cache.holds_kernels():
    # Numba's start-up before the first kernel it loads, overlapped with what the caller does next (a cold cache's
    # first calls are NumPy's, which the thread would only slow down)
    _runtime.warm_up(_runtime.fill_target_context)

__all__ = [
    "depthwise_conv2d",
    "pointwise_conv2d",
    "separable_conv2d",
    "depthwise_conv2d_backward",
    "pointwise_conv2d_backward",
    "separable_conv2d_backward",
    "DepthwiseConv2DGrads",
    "PointwiseConv2DGrads",
    "SeparableConv2DGrads",
    "batch_norm_train",
    "batch_norm_train_backward",
    "BatchNormGrads",
    "pack_pointwise_kernel",
    "PackedPointwiseKernel",
    "get_num_threads",
    "set_num_threads",
    "num_threads",
    "as_bfloat16",
]
