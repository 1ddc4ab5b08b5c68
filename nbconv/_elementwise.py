"""Serial element-wise helpers shared by the kernel families (bias + fused activation epilogues)."""

from ._jit import jit

#: activation codes (see ``_args.ACTIVATIONS``)
LINEAR, RELU, RELU6 = 0, 1, 2


@jit
def bias_act_inplace(v, bias_value, act):
    """``v[:] = act(v + bias_value)`` for a contiguous 1-D ``v``.

    ``v < 0`` is false for NaN, so NaN propagates through ReLU as with ``np.maximum``.
    """
    zero = v.dtype.type(0)
    six = v.dtype.type(6)
    if act == RELU:
        for i in range(v.shape[0]):
            t = v[i] + bias_value
            v[i] = zero if t < zero else t
    elif act == RELU6:
        for i in range(v.shape[0]):
            t = v[i] + bias_value
            v[i] = zero if t < zero else (six if t > six else t)
    else:
        for i in range(v.shape[0]):
            v[i] += bias_value


@jit
def vec_bias_act_inplace(v, bias, has_bias, act):
    """``v[:] = act(v + bias)`` for contiguous 1-D ``v`` and ``bias`` of the same length (bias used if ``has_bias``)."""
    zero = v.dtype.type(0)
    six = v.dtype.type(6)
    if has_bias:
        for i in range(v.shape[0]):
            v[i] += bias[i]
    if act == RELU:
        for i in range(v.shape[0]):
            t = v[i]
            v[i] = zero if t < zero else t
    elif act == RELU6:
        for i in range(v.shape[0]):
            t = v[i]
            v[i] = zero if t < zero else (six if t > six else t)
