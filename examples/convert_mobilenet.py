"""Convert ``keras.applications.MobileNet`` to nbconv's layers, check its predictions, time both.

``weights=None`` (random weights, no download); the batch norms get random statistics so that folding them is
actually tested.  ``fold_batchnorm=True`` (inference only) fuses each DepthwiseConv2D -> BN -> ReLU6 -> Conv2D 1x1
-> BN -> ReLU6 block into one nbconv call.
Run: ``KERAS_BACKEND=jax python examples/convert_mobilenet.py`` (``--quick``: a small MobileNet, fewer runs).
"""
import os
import sys
import time

import keras
import numpy as np

import keras_layers
from nbconv import cost

QUICK = "--quick" in sys.argv[1:] or os.environ.get("NBCONV_EXAMPLES_QUICK") == "1"


def randomize_batchnorm(model, rng):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                               rng.normal(0, 0.1, beta.shape).astype("float32"),
                               rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.5, 1.5, var.shape).astype("float32")])


def median_ms(model, x, runs):
    model.predict(x, verbose=0, batch_size=len(x))  # compile / warm up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.predict(x, verbose=0, batch_size=len(x))
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main():
    size, alpha, batch, runs = (96, 0.25, 2, 3) if QUICK else (224, 1.0, 8, 10)
    rng = np.random.default_rng(0)
    model = keras.applications.MobileNet(input_shape=(size, size, 3), alpha=alpha, weights=None,
                                         classifier_activation=None)
    randomize_batchnorm(model, rng)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    reference = model.predict(x, verbose=0, batch_size=batch)

    results = {"original (Keras layers)": model}
    results["converted"] = keras_layers.convert(model)
    results["converted, fold_batchnorm=True"] = keras_layers.convert(model, fold_batchnorm=True, verbose=True)

    macs = cost.model_cost(model, batch=batch).macs
    print(f"\nMobileNet alpha={alpha} {size}x{size}, batch {batch}: {macs / 1e9:.2f} G multiply-adds per batch "
          f"(backend {keras.backend.backend()})")
    base = None
    for name, m in results.items():
        got = m.predict(x, verbose=0, batch_size=batch)
        err = np.abs(got - reference).max() / np.abs(reference).max()
        assert err < 1e-4, (name, err)
        ms = median_ms(m, x, runs)
        base = base or ms
        print(f"  {name:<34} {ms:9.1f} ms  ({base / ms:4.1f}x)   max relative difference {err:.1e}")


if __name__ == "__main__":
    main()
