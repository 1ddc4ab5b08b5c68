"""nbconv.cost against hand-derived arithmetic (no value here comes from the code under test)."""
import math

import pytest

from nbconv import cost


def test_classic_example_standard_vs_separable():
    # input (8, 32, 56, 56) NCHW, 3x3, padding=1, 32 -> 64; output 56x56
    c = cost.compare((8, 32, 56, 56), 64, 3, padding=1, data_format="channels_first")
    assert c.standard.params == 3 * 3 * 32 * 64 == 18_432
    assert c.standard.macs == 8 * 56 * 56 * 18_432 == 462_422_016
    assert c.depthwise.params == 288 and c.depthwise.macs == 8 * 56 * 56 * 288
    assert c.pointwise.params == 2_048 and c.pointwise.macs == 8 * 56 * 56 * 2_048
    assert c.separable.params == 2_336
    assert c.separable.macs == 58_605_568
    assert round(c.standard.macs / 1e6, 1) == 462.4 and round(c.separable.macs / 1e6, 1) == 58.6
    assert c.standard.output_shape == c.separable.output_shape == (8, 64, 56, 56)
    assert c.params_ratio == pytest.approx(1 / 64 + 1 / 9)
    assert c.macs_ratio == pytest.approx(1 / 64 + 1 / 9)
    assert cost.separable_ratio(64, 3) == pytest.approx(0.126736, abs=1e-6)
    assert c.separable.flops == 2 * 58_605_568


def test_comparison_prints_a_table():
    text = str(cost.compare((8, 32, 56, 56), 64, 3, padding=1, data_format="channels_first"))
    assert "18,432" in text and "2,336" in text and "462.4 M" in text and "58.6 M" in text
    assert "12.7%" in text


@pytest.mark.parametrize("padding, out", [("valid", 54), ("same", 56), (1, 56), (((0, 1), (2, 3)), None)])
def test_output_size_follows_padding(padding, out):
    c = cost.conv2d_cost((2, 56, 56, 16), 8, 3, padding=padding)
    if out is None:  # explicit: H 56+0+1-2 = 55, W 56+2+3-2 = 59
        assert c.output_shape == (2, 55, 59, 8)
    else:
        assert c.output_shape == (2, out, out, 8)
    oh, ow = c.output_shape[1:3]
    assert c.macs == 2 * oh * ow * 3 * 3 * 16 * 8


def test_strides_dilation_and_bias():
    # 'same', stride 2 on 15 -> ceil(15/2) = 8; valid, dilation 2 (effective 5) on 15 -> 11
    c = cost.separable_conv2d_cost((1, 15, 15, 4), 6, 3, strides=2, padding="same", use_bias=True,
                                   depth_multiplier=2)
    assert c.output_shape == (1, 8, 8, 6)
    assert c.params == 3 * 3 * 4 * 2 + 8 * 6 + 6
    assert c.macs == 8 * 8 * (3 * 3 * 8 + 8 * 6)
    d = cost.depthwise_conv2d_cost((1, 15, 15, 4), 3, dilation_rate=2, use_bias=True)
    assert d.output_shape == (1, 11, 11, 4)
    assert d.params == 36 + 4 and d.macs == 11 * 11 * 36
    f = cost.separable_conv2d_cost((1, 4, 5, 5), 7, (1, 3), data_format="channels_first", depthwise_bias=True)
    assert f.output_shape == (1, 7, 5, 3) and f.params == 1 * 3 * 4 + 4 + 4 * 7


def test_ratio_with_depth_multiplier():
    c = cost.compare((1, 10, 10, 8), 16, 5, depth_multiplier=2, padding="same")
    assert c.separable.params == 5 * 5 * 8 * 2 + 16 * 16
    assert c.macs_ratio == pytest.approx(cost.separable_ratio(16, 5, depth_multiplier=2))
    assert cost.separable_ratio(16, 5, 2) == pytest.approx(2 / 16 + 2 / 25)


def test_grouped_conv():
    c = cost.conv2d_cost((1, 4, 4, 8), 4, 1, groups=2, use_bias=True)
    assert c.params == 4 * 4 + 4 and c.macs == 16 * 4 * 4


@pytest.mark.parametrize("kwargs, word", [
    (dict(input_shape=(8, 32, 56), filters=4, kernel_size=3), "input_shape"),
    (dict(input_shape=(1, 8, 8, 3), filters=0, kernel_size=3), "filters"),
    (dict(input_shape=(1, 8, 8, 3), filters=2, kernel_size=0), "kernel_size"),
    (dict(input_shape=(1, 8, 8, 3), filters=2, kernel_size=3, padding="full"), "padding"),
    (dict(input_shape=(1, 8, 8, 3), filters=2, kernel_size=3, data_format="NHWC"), "data_format"),
    (dict(input_shape=(1, 2, 2, 3), filters=2, kernel_size=3), "output"),
    (dict(input_shape=(1, 8, 8, 3), filters=2, kernel_size=3, groups=2), "groups"),
])
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        cost.conv2d_cost(**kwargs)


def test_keras_model_cost():
    keras = pytest.importorskip("keras")
    z = "zeros"  # cheap initializers (jax compiles a random one per shape); only shapes matter here
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, kernel_initializer=z)(inputs)  # 6x6x8
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, depthwise_initializer=z)(x)  # 6x6x8
    x = keras.layers.Conv2D(16, 1, use_bias=False, kernel_initializer=z)(x)  # 6x6x16
    x = keras.layers.SeparableConv2D(4, 3, padding="valid", depthwise_initializer=z, pointwise_initializer=z)(x)  # 4x4
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, kernel_initializer=z)(x)
    model = keras.Model(inputs, outputs)
    mc = cost.model_cost(model, batch=2)
    expected = {
        "conv": 2 * 6 * 6 * 27 * 8,
        "depthwise": 2 * 6 * 6 * 9 * 8,
        "pointwise": 2 * 6 * 6 * 8 * 16,
        "separable": 2 * 4 * 4 * (9 * 16 + 16 * 4),
        "dense": 2 * 4 * 10,
    }
    assert mc.by_kind() == expected
    assert mc.macs == sum(expected.values())
    assert mc.params == 27 * 8 + 4 * 8 + 9 * 8 + 8 * 16 + (9 * 16 + 16 * 4 + 4) + (4 * 10 + 10)
    assert [row.kind for row in mc.layers] == ["conv", "depthwise", "pointwise", "separable", "dense"]
    assert "total (batch 2)" in str(mc)
    assert math.isclose(mc.flops, 2 * mc.macs)
