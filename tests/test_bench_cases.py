"""The benchmark's output check: every contender's first result is compared with ``tests/reference.py`` (the
project's one float64 reference), with the padding the contender says it used.

The NumPy baseline contender (plain float32 NumPy, no nbconv code) stands in for a contender here.
"""

import numpy as np
import pytest

import reference
from benchmarks import cases, contenders

CASES = [
    cases.Case("t", "s2", 1, 9, 9, 8, 16, stride=2),
    cases.Case("t", "dm2-d2-pad1-nchw", 2, 8, 7, 8, 16, dm=2, dilation=2, padding=1, data_format="channels_first"),
    cases.Case("t", "dw-dm2", 1, 6, 6, 8, 16, op="depthwise", dm=2),
    cases.Case("t", "pw", 1, 5, 5, 8, 16, op="pointwise"),
    cases.Case("t", "k5-valid", 1, 10, 10, 8, 16, k=5, padding="valid"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_is_tests_reference(case):
    x, dk, pk = cases.make_arrays(case)
    conv = dict(strides=case.stride, padding=case.pads, dilation_rate=case.dilation)
    if case.op == "pointwise":
        expected = reference.pointwise_ref(x, pk)
    elif case.op == "depthwise":
        expected = reference.depthwise_ref(x, dk, **conv)
    else:
        expected = reference.separable_ref(x, dk, pk, **conv)
    got = cases.reference_nhwc(case, x, dk, pk)
    assert got.dtype == np.float64 and got.shape == (case.n, *case.out_hw, case.f if case.op != "depthwise"
                                                     else case.cm)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_output_check_passes_a_correct_result(case):
    bench = contenders.get("numpy").setup(case)
    assert contenders.output_error(case, bench, bench()) < 1e-5


def test_output_check_catches_a_wrong_result():
    case = CASES[0]
    bench = contenders.get("numpy").setup(case)
    out = bench()
    out[0, 0, 0, 0] += 0.5 * np.abs(out).max()
    assert contenders.output_error(case, bench, out) == pytest.approx(0.5, rel=1e-6)


def test_output_check_uses_the_contenders_padding():
    """A contender that padded symmetrically (as PyTorch does for stride 2) is checked against that padding."""
    case = cases.Case("t", "s2-even", 1, 8, 8, 8, 16, stride=2)
    assert case.pads == ((0, 1), (0, 1))
    bench = contenders.get("numpy").setup(case)
    out = bench()
    bench.pads = ((1, 1), (1, 1))  # same output shape, another padding: the check must see the difference
    assert contenders.output_error(case, bench, out) > 0.1
    assert cases.reference_nhwc(case, *cases.make_arrays(case), bench.pads).shape == out.shape


def test_unchecked_contenders_report_their_own_error():
    bench = contenders.Bench(lambda: None, check=False, rel_err=3e-6)
    assert contenders.output_error(CASES[0], bench, None) == 3e-6
    assert contenders.output_error(CASES[0], contenders.Bench(lambda: None, check=False), None) is None
