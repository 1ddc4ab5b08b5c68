"""TensorFlow bridge: ``tf.custom_gradient`` around ``tf.numpy_function`` calls into nbconv.

Runs eagerly and inside ``tf.function`` (Keras's default ``fit``/``predict``).
XLA cannot compile a Python call, so the layers set ``supports_jit = False`` on
this backend and Keras falls back to a non-XLA ``tf.function``.  For the same
reason a SavedModel written by ``model.export()`` (or a TFLite conversion) does
not carry the kernel: it only runs in a Python process that can import nbconv.

``numpy_function`` loses static shapes; they are restored with ``set_shape``.
The gradient is split into two stateless calls, one for ``x`` and one for the
weights, so that graph pruning drops the ``x`` gradient when nothing uses it
(the first layer of a model).  Eager ``GradientTape`` computes both.
"""
import functools

import tensorflow as tf

from . import _common


def _grads(cfg, wrt, inputs, like):
    """One stateless host call computing the gradients named in ``wrt``, shaped like the tensors ``like``."""
    if len(wrt) == 1:  # a one-element Tout list would come back as a bare tensor
        def fn(*arrays):
            return _common.backward(cfg, wrt, *arrays)[0]

        outs = [tf.numpy_function(fn, inputs, Tout=like[0].dtype, stateful=False)]
    else:
        outs = tf.numpy_function(functools.partial(_common.backward, cfg, wrt), inputs,
                                 Tout=[t.dtype for t in like], stateful=False)
    for out, t in zip(outs, like):
        out.set_shape(t.shape)
    return list(outs)


@functools.lru_cache(maxsize=None)
def _op(cfg):
    names = cfg.names

    @tf.custom_gradient
    def op(*args):
        x = args[0]
        y = tf.numpy_function(functools.partial(_common.forward, cfg), list(args), Tout=x.dtype, stateful=False)
        filters = _common.filters_of(cfg, [a.shape for a in args[1:]])
        y.set_shape(_common.output_shape(cfg, x.shape, args[1].shape, filters))

        def grad(g):
            y_or_g = y if cfg.activation != "linear" else g
            inputs = [g, y_or_g, *args]
            return _grads(cfg, names[:1], inputs, args[:1]) + _grads(cfg, names[1:], inputs, args[1:])

        return y, grad

    return op


def apply(cfg, *tensors):
    """Run the op described by ``cfg`` on ``tensors`` (x, kernel(s)[, bias]) as float32/float64 TF tensors."""
    return _op(cfg)(*[tf.convert_to_tensor(t) for t in tensors])
