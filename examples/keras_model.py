"""A small Keras model built with nbconv's layers: predict, save, load, predict again.

``keras_layers.SeparableConv2D`` / ``DepthwiseConv2D`` take exactly the arguments of Keras's own layers and
save the same weights; importing ``keras_layers`` registers them, so ``keras.saving.load_model`` finds them.
Run: ``KERAS_BACKEND=jax python examples/keras_model.py`` (any Keras backend works).
"""
import os
import tempfile

import keras
import numpy as np

import keras_layers


def build(num_classes=10):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras_layers.DepthwiseConv2D(3, padding="same", activation="relu6")(x)
    x = keras_layers.SeparableConv2D(32, 3, padding="same", activation="relu")(x)
    x = keras_layers.SeparableConv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="small_separable_cnn")


def main():
    model = build()
    model.summary()
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype("float32")
    before = model.predict(x, verbose=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    after = loaded.predict(x, verbose=0)
    print("layer classes after loading:",
          sorted({type(layer).__module__ + "." + type(layer).__name__ for layer in loaded.layers
                  if "Conv" in type(layer).__name__}))
    print(f"predictions before and after save/load: max |difference| = {np.abs(before - after).max():.2e}")
    assert np.allclose(before, after, atol=1e-6)
    print(f"predicted classes: {after.argmax(axis=1).tolist()} (backend {keras.backend.backend()})")


if __name__ == "__main__":
    main()
