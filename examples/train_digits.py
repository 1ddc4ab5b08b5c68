"""Train a small separable CNN (nbconv's layers) on scikit-learn's bundled digits (8x8 images, no download).

Reaches >= 95% test accuracy in a few epochs; Keras prints its progress bar per epoch.
Run: ``KERAS_BACKEND=jax python examples/train_digits.py`` (``--quick``: fewer epochs, no accuracy target).
"""
import os
import sys

import keras
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import keras_layers

QUICK = "--quick" in sys.argv[1:] or os.environ.get("NBCONV_EXAMPLES_QUICK") == "1"


def main():
    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras_layers.SeparableConv2D(32, 3, padding="same", activation="relu"),
        keras_layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        keras_layers.SeparableConv2D(64, 3, strides=2, padding="same", activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ], name="digits_separable_cnn")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    epochs = 2 if QUICK else 30
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, validation_split=0.1, verbose=1)
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy {accuracy:.3f} ({len(x_test)} images, {epochs} epochs, backend {keras.backend.backend()})")
    if not QUICK:
        assert accuracy >= 0.95, f"expected >= 95% test accuracy, got {accuracy:.3f}"


if __name__ == "__main__":
    main()
