"""Keras 3 front-end of nbconv: drop-in ``SeparableConv2D`` and ``DepthwiseConv2D``.

>>> import keras, keras_layers
>>> layer = keras_layers.SeparableConv2D(64, 3, padding="same", activation="relu")

Importing this package registers the layers (package "nbconv") so that
``keras.saving.load_model`` finds them.
"""
from .layers import Activation, BatchNormalization, DepthwiseConv2D, ReLU, SeparableConv2D
from .convert import FusedSeparableConv2D, convert

__all__ = ["SeparableConv2D", "DepthwiseConv2D", "FusedSeparableConv2D", "convert", "BatchNormalization", "ReLU",
           "Activation"]
