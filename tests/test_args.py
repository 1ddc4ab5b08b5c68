"""Argument handling of the public functions: errors, aliases, input kinds, empty batches, NaN/Inf.

Every error must name the argument and the value received, and must be raised
before any kernel runs (checked by replacing the kernels with functions that fail).
"""
import re

import numpy as np
import pytest

import nbconv
import nbconv.forward
from nbconv import _args
from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref

FORMATS = ["channels_last", "channels_first"]


class KernelCalled(AssertionError):
    pass


def _kernel_names():
    """Every compiled (Numba) function the public forward functions can call."""
    from numba.core.dispatcher import Dispatcher

    names = [k for k, v in vars(nbconv.forward).items() if isinstance(v, Dispatcher)]
    assert names, "no Numba kernels found in nbconv.forward"
    return names


@pytest.fixture
def no_kernels(monkeypatch):
    """Replace every kernel the public functions call with one that fails the test."""
    for name in _kernel_names():

        def fail(*args, _name=name, **kwargs):
            raise KernelCalled(f"kernel {_name} ran before the argument error")

        monkeypatch.setattr(nbconv.forward, name, fail)


def test_no_kernels_fixture_is_effective(no_kernels):
    x = np.ones((1, 4, 4, 2), np.float32)
    with pytest.raises(KernelCalled):
        nbconv.depthwise_conv2d(x, np.ones((3, 3, 2, 1), np.float32))
    with pytest.raises(KernelCalled):
        nbconv.pointwise_conv2d(x, np.ones((1, 1, 2, 3), np.float32))
    with pytest.raises(KernelCalled):
        nbconv.separable_conv2d(x, np.ones((3, 3, 2, 1), np.float32), np.ones((1, 1, 2, 3), np.float32))


# --- valid baseline calls that each error case alters in one place -------------------

X = np.zeros((2, 6, 6, 3), np.float32)
DK = np.zeros((3, 3, 3, 2), np.float32)
PK = np.zeros((1, 1, 6, 4), np.float32)
F32 = np.float32


def sep(**over):
    args = dict(x=X, depthwise_kernel=DK, pointwise_kernel=PK)
    args.update(over)
    return lambda: nbconv.separable_conv2d(**args)


def dw(**over):
    args = dict(x=X, kernel=DK)
    args.update(over)
    return lambda: nbconv.depthwise_conv2d(**args)


def pw(**over):
    args = dict(x=X, kernel=PK[:, :, :3])
    args.update(over)
    return lambda: nbconv.pointwise_conv2d(**args)


def r(text):
    """Regex for literal text."""
    return re.escape(text)


ERRORS = [
    # wrong ndim of x or kernels
    ("x 3-D", sep(x=X[0]), ValueError, r("`x`") + ".*" + r("Received: x with shape (6, 6, 3)")),
    ("x 5-D", dw(x=X[None]), ValueError, r("Received: x with shape (1, 2, 6, 6, 3)")),
    ("x 3-D pw", pw(x=X[0]), ValueError, r("Received: x with shape (6, 6, 3)")),
    ("dk 3-D", sep(depthwise_kernel=DK[0]), ValueError, r("Received: depthwise_kernel with shape (3, 3, 2)")),
    ("kernel 2-D dw", dw(kernel=DK[0, 0]), ValueError, r("Received: kernel with shape (3, 2)")),
    ("pk 3-D", sep(pointwise_kernel=PK[0]), ValueError, r("Received: pointwise_kernel with shape (1, 6, 4)")),
    ("pk 1-D", sep(pointwise_kernel=PK[0, 0, 0]), ValueError, r("Received: pointwise_kernel with shape (4,)")),
    ("pw kernel 3-D", pw(kernel=np.zeros((3, 4, 5), F32)), ValueError, r("Received: kernel with shape (3, 4, 5)")),
    # channel mismatches
    ("x vs dk", sep(depthwise_kernel=np.zeros((3, 3, 4, 2), F32)), ValueError,
     r("depthwise_kernel") + ".*3 input channels.*" + r("Received: depthwise_kernel with shape (3, 3, 4, 2)")),
    ("x vs kernel dw", dw(kernel=np.zeros((3, 3, 6, 1), F32)), ValueError,
     r("Received: kernel with shape (3, 3, 6, 1)")),
    ("x vs dk channels_first", sep(data_format="channels_first"), ValueError,
     r("channels_first") + ".*" + r("Received: depthwise_kernel with shape (3, 3, 3, 2)")),
    ("C*dm vs pk", sep(pointwise_kernel=np.zeros((1, 1, 3, 4), F32)), ValueError,
     r("`pointwise_kernel`") + ".*6 input channels.*" + r("Received: pointwise_kernel with shape (1, 1, 3, 4)")),
    ("C*dm vs 2-D pk", sep(pointwise_kernel=np.zeros((5, 4), F32)), ValueError,
     r("Received: pointwise_kernel with shape (5, 4)")),
    ("x vs pw kernel", pw(kernel=np.zeros((1, 1, 4, 2), F32)), ValueError,
     r("`kernel`") + ".*3 input channels.*" + r("Received: kernel with shape (1, 1, 4, 2)")),
    # pointwise kernel not 1x1
    ("pk 3x3", sep(pointwise_kernel=np.zeros((3, 3, 6, 4), F32)), ValueError,
     r("1x1") + ".*" + r("Received: pointwise_kernel with shape (3, 3, 6, 4)")),
    ("pw kernel 1x3", pw(kernel=np.zeros((1, 3, 3, 4), F32)), ValueError,
     r("1x1") + ".*" + r("Received: kernel with shape (1, 3, 3, 4)")),
    # zero-size kernels and depth multiplier 0
    ("dk kh=0", sep(depthwise_kernel=np.zeros((0, 3, 3, 2), F32)), ValueError,
     r("Received: depthwise_kernel with shape (0, 3, 3, 2)")),
    ("kernel kw=0", dw(kernel=np.zeros((3, 0, 3, 1), F32)), ValueError, r("Received: kernel with shape (3, 0, 3, 1)")),
    ("dm=0 sep", sep(depthwise_kernel=np.zeros((3, 3, 3, 0), F32), pointwise_kernel=np.zeros((1, 1, 0, 4), F32)),
     ValueError, r("Received: depthwise_kernel with shape (3, 3, 3, 0)")),
    ("dm=0 dw", dw(kernel=np.zeros((3, 3, 3, 0), F32)), ValueError, r("Received: kernel with shape (3, 3, 3, 0)")),
    ("pk 0 filters", sep(pointwise_kernel=np.zeros((1, 1, 6, 0), F32)), ValueError,
     r("Received: pointwise_kernel with shape (1, 1, 6, 0)")),
    ("pw kernel 0 filters", pw(kernel=np.zeros((3, 0), F32)), ValueError, r("Received: kernel with shape (3, 0)")),
    # bias of the wrong size
    ("bias size", sep(bias=np.zeros(5, F32)), ValueError, r("`bias`") + ".*" + r("Received: bias with shape (5,)")),
    ("bias 2-D", sep(bias=np.zeros((4, 1), F32)), ValueError, r("Received: bias with shape (4, 1)")),
    ("bias size dw", dw(bias=np.zeros(4, F32)), ValueError, r("(6,)") + ".*" + r("Received: bias with shape (4,)")),
    ("bias size pw", pw(bias=np.zeros(3, F32)), ValueError, r("(4,)") + ".*" + r("Received: bias with shape (3,)")),
    ("depthwise_bias size", sep(depthwise_bias=np.zeros(4, F32)), ValueError,
     r("`depthwise_bias`") + ".*" + r("(6,)") + ".*" + r("Received: depthwise_bias with shape (4,)")),
    ("depthwise_bias scalar", sep(depthwise_bias=np.float32(1)), ValueError,
     r("Received: depthwise_bias with shape ()")),
    # unknown padding strings, negative or malformed explicit padding
    *[(f"padding={p!r}", sep(padding=p), ValueError, r("`padding`") + ".*" + r(f"Received: padding={p!r}"))
      for p in ["full", "causal", "1", -1, (1, -1), ((0, 1), (-1, 0)), (1, 2, 3), ((1, 2), (3,)), 1.5, None,
                (1.0, 2), ((1, 2), 3), True, (1, 2, 3, 4)]],
    ("padding dw", dw(padding="SAMEE"), ValueError, r("Received: padding='SAMEE'")),
    # unknown data_format / activation
    *[(f"data_format={d!r}", f(data_format=d), ValueError,
       r("`data_format`") + ".*" + r(f"Received: data_format={d!r}"))
      for d in ["NHWC", "channels_middle", 1] for f in (sep, dw, pw)],
    *[(f"activation={a!r}", f(activation=a), ValueError, r("`activation`") + ".*" + r(f"Received: activation={a!r}"))
      for a in ["sigmoid", "gelu", 1] for f in (sep, dw, pw)],
    ("depthwise_activation", sep(depthwise_activation="tanh"), ValueError,
     r("`depthwise_activation`") + ".*" + r("Received: depthwise_activation='tanh'")),
    # 'valid' (or explicit) output that would be empty
    ("empty valid", sep(x=X[:, :2, :2]), ValueError, r("positive size") + ".*" + r("(2, 2)")),
    ("empty valid dw", dw(x=X[:, :6, :2]), ValueError, r("positive size") + ".*" + r("(6, 2)")),
    ("empty by dilation", sep(dilation_rate=3), ValueError, r("positive size") + ".*" + r("dilation_rate=(3, 3)")),
    ("empty explicit", sep(x=X[:, :1, :1], padding=((0, 1), (0, 0))), ValueError, r("positive size")),
    # unknown keyword arguments; both spellings of an aliased argument
    ("unknown kw sep", sep(padding_mode="zeros"), TypeError, r("unexpected keyword argument 'padding_mode'")),
    ("unknown kw dw", dw(groups=3), TypeError, r("unexpected keyword argument 'groups'")),
    ("unknown kw pw", pw(strides=2), TypeError, r("unexpected keyword argument 'strides'")),
    ("strides+stride", sep(strides=1, stride=2), TypeError,
     r("`strides`") + ".*" + r("`stride`") + ".*" + r("strides=1, stride=2")),
    ("strides+stride dw", dw(strides=(2, 2), stride=2), TypeError, r("strides=(2, 2), stride=2")),
    ("dilation_rate+dilation", sep(dilation_rate=1, dilation=2), TypeError,
     r("`dilation_rate`") + ".*" + r("`dilation`") + ".*" + r("dilation_rate=1, dilation=2")),
    ("dilation_rate+dilation dw", dw(dilation_rate=2, dilation=2), TypeError, r("dilation_rate=2, dilation=2")),
]

BAD_PAIRS = [0, -1, 1.5, (1, 2, 3), "2", True, (1, 0), (2, 2.0), (1,), None, np.int64(0), (True, 1)]
for _name in ("strides", "dilation_rate"):
    for _v in BAD_PAIRS:
        for _f in (sep, dw):
            ERRORS.append((f"{_name}={_v!r}", _f(**{_name: _v}), ValueError,
                           r(f"`{_name}`") + ".*positive.*" + r(f"Received: {_name}={_v!r}")))
for _alias in ("stride", "dilation"):
    for _v in (0, -2, 1.5, (1, 2, 3), "2", True):
        for _f in (sep, dw):
            ERRORS.append((f"{_alias}={_v!r}", _f(**{_alias: _v}), ValueError,
                           r(f"`{_alias}`") + ".*positive.*" + r(f"Received: {_alias}={_v!r}")))

NON_FLOAT = {
    "int": lambda a: a.astype(np.int64),
    "int8": lambda a: a.astype(np.int8),
    "bool": lambda a: a.astype(bool),
    "complex": lambda a: a.astype(np.complex64),
    "object": lambda a: a.astype(object),
}
for _kind, _conv in NON_FLOAT.items():
    _dtype = str(_conv(np.zeros(1)).dtype)
    for _arg, _base, _f in [("x", X, sep), ("depthwise_kernel", DK, sep), ("pointwise_kernel", PK, sep),
                            ("bias", np.zeros(4, F32), sep), ("depthwise_bias", np.zeros(6, F32), sep),
                            ("x", X, dw), ("kernel", DK, dw), ("bias", np.zeros(6, F32), dw),
                            ("x", X, pw), ("kernel", PK[:, :, :3], pw), ("bias", np.zeros(4, F32), pw)]:
        ERRORS.append((f"{_f.__name__} {_arg} {_kind}", _f(**{_arg: _conv(_base)}), TypeError,
                       r(f"`{_arg}`") + ".*" + r(f"Received: {_arg} with dtype {_dtype}")))
ERRORS.append(("x strings", dw(x=[[[["a"]]]]), TypeError, r("Received: x with dtype <U1")))
ERRORS.append(("x list of ints", dw(x=np.zeros((2, 6, 6, 3), int).tolist()), TypeError,
               r("Received: x with dtype int")))


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_error(no_kernels, case):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call()


def test_error_messages_follow_keras_style(no_kernels):
    with pytest.raises(ValueError) as info:
        sep(strides=0)()
    assert str(info.value).startswith("Expected `strides`") and "Received: strides=0" in str(info.value)


def test_classic_pytorch_call_without_data_format_names_the_mismatch(no_kernels):
    """The classic NCHW input under the default channels_last: the error says which layout it assumed."""
    x = np.zeros((8, 32, 56, 56), F32)
    with pytest.raises(ValueError, match=r("channels_last") + ".*" + r("(3, 3, 32, 1)")):
        nbconv.separable_conv2d(x, np.zeros((3, 3, 32, 1), F32), np.zeros((1, 1, 32, 64), F32), padding=1)


# --- accepted spellings -------------------------------------------------------------------

def test_integer_like_values_accepted(rng):
    x = random_array(rng, (1, 7, 8, 2))
    dk = random_array(rng, (3, 3, 2, 1))
    pk = random_array(rng, (1, 1, 2, 3))
    kwargs = dict(strides=(2, 1), padding=((1, 0), (0, 2)), dilation_rate=(1, 2))
    expected = separable_ref(x, dk, pk, **kwargs)
    for strides, padding, dilation in [
        (np.array([2, 1]), [[1, 0], [0, 2]], [1, 2]),
        ((np.int64(2), np.int32(1)), ((np.int8(1), 0), (0, np.uint8(2))), (np.int16(1), 2)),
    ]:
        y = nbconv.separable_conv2d(x, dk, pk, strides=strides, padding=padding, dilation_rate=dilation)
        assert_close(y, expected)


def test_strings_case_insensitive(rng):
    x = random_array(rng, (1, 3, 5, 4))
    dk = random_array(rng, (3, 3, 3, 1))
    pk = random_array(rng, (1, 1, 3, 2))
    y = nbconv.separable_conv2d(x, dk, pk, padding="SAME", data_format="Channels_First", activation="ReLU")
    assert_close(y, separable_ref(x, dk, pk, padding="same", data_format="channels_first", activation="relu"))


def test_data_format_none_is_channels_last(rng):
    """Keras passes data_format=None for its default image_data_format, channels_last."""
    x = random_array(rng, (1, 5, 4, 3))
    dk = random_array(rng, (3, 3, 3, 1))
    pk = random_array(rng, (1, 1, 3, 2))
    assert_close(nbconv.separable_conv2d(x, dk, pk, data_format=None), separable_ref(x, dk, pk))
    assert_close(nbconv.depthwise_conv2d(x, dk, data_format=None), depthwise_ref(x, dk))
    assert_close(nbconv.pointwise_conv2d(x, pk, data_format=None), pointwise_ref(x, pk))


# --- aliases ----------------------------------------------------------------------------

@pytest.mark.parametrize("stride", [2, (1, 2), (3, 1)])
def test_stride_alias(rng, stride):
    x = random_array(rng, (2, 9, 8, 3))
    dk = random_array(rng, (3, 3, 3, 2))
    pk = random_array(rng, (1, 1, 6, 5))
    y = nbconv.separable_conv2d(x, dk, pk, stride=stride, padding="same")
    assert np.array_equal(y, nbconv.separable_conv2d(x, dk, pk, strides=stride, padding="same"))
    assert_close(y, separable_ref(x, dk, pk, strides=stride, padding="same"))
    y = nbconv.depthwise_conv2d(x, dk, stride=stride, padding=1)
    assert_close(y, depthwise_ref(x, dk, strides=stride, padding=1))


@pytest.mark.parametrize("dilation", [2, (2, 1), (1, 3)])
def test_dilation_alias(rng, dilation):
    x = random_array(rng, (2, 9, 8, 3))
    dk = random_array(rng, (3, 3, 3, 2))
    pk = random_array(rng, (1, 1, 6, 5))
    y = nbconv.separable_conv2d(x, dk, pk, dilation=dilation, padding="same")
    assert np.array_equal(y, nbconv.separable_conv2d(x, dk, pk, dilation_rate=dilation, padding="same"))
    assert_close(y, separable_ref(x, dk, pk, dilation_rate=dilation, padding="same"))
    y = nbconv.depthwise_conv2d(x, dk, dilation=dilation, stride=2, padding="valid")
    assert_close(y, depthwise_ref(x, dk, dilation_rate=dilation, strides=2))


def test_classic_pytorch_example(rng):
    """NCHW (8, 32, 56, 56), 3x3 depthwise with padding=1, stride=1, pointwise to 64 -> (8, 64, 56, 56)."""
    x = random_array(rng, (8, 32, 56, 56))
    dk = random_array(rng, (3, 3, 32, 1))
    pk = random_array(rng, (1, 1, 32, 64))
    y = nbconv.separable_conv2d(x, dk, pk, stride=1, padding=1, data_format="channels_first")
    assert y.shape == (8, 64, 56, 56) and y.dtype == np.float32
    assert_close(y, separable_ref(x, dk, pk, padding=1, data_format="channels_first"))
    d = nbconv.depthwise_conv2d(x, dk, stride=1, padding=1, dilation=1, data_format="channels_first")
    assert d.shape == (8, 32, 56, 56)
    assert_close(d, depthwise_ref(x, dk, padding=1, data_format="channels_first"))


# --- input kinds --------------------------------------------------------------------------

def _case(rng, data_format, dtype=np.float32):
    shape = (2, 7, 6, 3) if data_format == "channels_last" else (2, 3, 7, 6)
    return dict(
        x=random_array(rng, shape, dtype),
        dk=random_array(rng, (3, 3, 3, 2), dtype),
        pk=random_array(rng, (1, 1, 6, 4), dtype),
        pk3=random_array(rng, (3, 4), dtype),  # pointwise kernel for x itself, in the 2-D form
        bias=random_array(rng, (4,), dtype),
        dbias=random_array(rng, (6,), dtype),
    )


def _run_all(a, data_format, **kw):
    """The three functions on the same inputs, each with its reference."""
    kw = dict(kw, data_format=data_format)
    geo = dict(strides=(2, 1), padding="same")
    x, dk, pk, pk3, bias, dbias = a["x"], a["dk"], a["pk"], a["pk3"], a["bias"], a["dbias"]
    return [
        (nbconv.separable_conv2d(x, dk, pk, bias, depthwise_bias=dbias, activation="relu", **geo, **kw),
         separable_ref(x, dk, pk, bias, depthwise_bias=dbias, activation="relu", **geo, **kw)),
        (nbconv.depthwise_conv2d(x, dk, dbias, padding=1, **kw), depthwise_ref(x, dk, dbias, padding=1, **kw)),
        (nbconv.pointwise_conv2d(x, pk3, bias, **kw), pointwise_ref(x, pk3, bias, **kw)),
    ]


def _check_unmodified(inputs, copies):
    for key in copies:
        assert np.array_equal(np.asarray(inputs[key]), copies[key]), f"{key} was modified"


@pytest.mark.parametrize("data_format", FORMATS)
def test_array_likes(rng, data_format):
    a = _case(rng, data_format, np.float64)
    lists = {k: v.tolist() for k, v in a.items()}
    for got, expected in _run_all(lists, data_format):
        assert isinstance(got, np.ndarray) and got.dtype == np.float64
        assert_close(got, expected)
    # and the same numbers as arrays give the same results
    for (got, _), (ref_arr, _) in zip(_run_all(lists, data_format), _run_all(a, data_format)):
        assert np.array_equal(got, ref_arr)


@pytest.mark.parametrize("data_format", FORMATS)
def test_read_only_inputs(rng, data_format):
    a = _case(rng, data_format)
    copies = {k: v.copy() for k, v in a.items()}
    for v in a.values():
        v.flags.writeable = False
    for got, expected in _run_all(a, data_format):
        assert got.flags.writeable
        assert_close(got, expected)
    _check_unmodified(a, copies)


@pytest.mark.parametrize("data_format", FORMATS)
def test_non_contiguous_and_fortran_inputs(rng, data_format):
    a = _case(rng, data_format)
    big = {k: np.repeat(v, 3, axis=-1) for k, v in a.items()}
    strided = {  # every input a non-contiguous view of a larger array
        "x": np.repeat(np.repeat(a["x"], 2, axis=0), 2, axis=2)[::2, :, ::2],
        "dk": big["dk"][..., ::3],
        "pk": big["pk"][..., ::3],
        "pk3": big["pk3"][..., ::3],
        "bias": big["bias"][::3],
        "dbias": big["dbias"][::3],
    }
    for key, view in strided.items():
        assert np.array_equal(view, a[key]) and not view.flags.c_contiguous, key
    fortran = {k: np.asfortranarray(v) for k, v in a.items()}
    # a channels_last array that is a transposed view of channels_first memory, and vice versa
    perm, inv = ((0, 3, 1, 2), (0, 2, 3, 1)) if data_format == "channels_last" else ((0, 2, 3, 1), (0, 3, 1, 2))
    transposed = dict(a, x=np.ascontiguousarray(a["x"].transpose(perm)).transpose(inv),
                      pk=np.ascontiguousarray(a["pk"][0, 0].T).T[None, None], pk3=np.ascontiguousarray(a["pk3"].T).T)
    assert not transposed["pk"].flags.c_contiguous and not transposed["pk3"].flags.c_contiguous
    assert not transposed["x"].flags.c_contiguous
    expected = [e for _, e in _run_all(a, data_format)]
    for inputs in (strided, fortran, transposed):
        copies = {k: v.copy() for k, v in inputs.items()}
        for (got, _), e in zip(_run_all(inputs, data_format), expected):
            assert_close(got, e)
        _check_unmodified(inputs, copies)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_inputs_never_modified(rng, data_format, dtype):
    a = _case(rng, data_format, dtype)
    copies = {k: v.copy() for k, v in a.items()}
    ids = {k: v.ctypes.data for k, v in a.items()}
    results = _run_all(a, data_format)
    _check_unmodified(a, copies)
    for got, expected in results:
        assert got.ctypes.data not in ids.values()
        assert_close(got, expected)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_batch(rng, data_format, dtype):
    cl = data_format == "channels_last"
    x = np.zeros((0, 9, 7, 3) if cl else (0, 3, 9, 7), dtype)
    dk = random_array(rng, (3, 3, 3, 2), dtype)
    pk = random_array(rng, (1, 1, 6, 5), dtype)

    def shape(oh, ow, ch):
        return (0, oh, ow, ch) if cl else (0, ch, oh, ow)

    cases = [
        (nbconv.separable_conv2d(x, dk, pk, data_format=data_format), shape(7, 5, 5)),
        (nbconv.separable_conv2d(x, dk, pk, strides=2, padding="same", data_format=data_format), shape(5, 4, 5)),
        (nbconv.separable_conv2d(x, dk, pk, padding=((1, 0), (2, 3)), stride=(1, 2), data_format=data_format),
         shape(8, 5, 5)),
        (nbconv.depthwise_conv2d(x, dk, dilation_rate=2, data_format=data_format), shape(5, 3, 6)),
        (nbconv.pointwise_conv2d(x, pk[:, :, :3], data_format=data_format), shape(9, 7, 5)),
    ]
    for y, expected_shape in cases:
        assert isinstance(y, np.ndarray) and y.shape == expected_shape and y.dtype == dtype
    # the reference agrees on the shapes
    assert separable_ref(x, dk, pk, strides=2, padding="same", data_format=data_format).shape == shape(5, 4, 5)


def test_empty_batch_still_validates(no_kernels):
    x = np.zeros((0, 6, 6, 3), F32)
    with pytest.raises(ValueError, match=r("Received: pointwise_kernel with shape (1, 1, 5, 4)")):
        nbconv.separable_conv2d(x, DK, np.zeros((1, 1, 5, 4), F32))
    with pytest.raises(ValueError, match=r("positive size")):
        nbconv.depthwise_conv2d(np.zeros((0, 2, 2, 3), F32), DK)


# --- NaN / Inf ------------------------------------------------------------------------------

def _weights(rng, shape, dtype):
    """Non-zero weights of both signs (so 0 * Inf never hides an Inf)."""
    return (rng.uniform(0.5, 1.0, shape) * rng.choice([-1.0, 1.0], shape)).astype(dtype)


@pytest.mark.parametrize("data_format", FORMATS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_nan_inf_propagate(rng, data_format, dtype, activation):
    cl = data_format == "channels_last"
    x = random_array(rng, (2, 11, 10, 3) if cl else (2, 3, 11, 10), dtype)
    flat = x.reshape(-1)
    idx = rng.choice(flat.size, 12, replace=False)
    flat[idx[:4]] = np.nan
    flat[idx[4:8]] = np.inf
    flat[idx[8:]] = -np.inf
    dk = _weights(rng, (3, 3, 3, 2), dtype)
    pk = _weights(rng, (1, 1, 6, 4), dtype)
    dbias = _weights(rng, (6,), dtype)
    kw = dict(data_format=data_format, activation=activation)
    for strides, padding in [(1, "same"), (2, "valid"), ((1, 2), 1)]:
        geo = dict(strides=strides, padding=padding)
        y = nbconv.separable_conv2d(x, dk, pk, depthwise_bias=dbias, depthwise_activation=activation, **geo, **kw)
        e = separable_ref(x, dk, pk, depthwise_bias=dbias, depthwise_activation=activation, **geo, **kw)
        assert np.isnan(e).any() and np.isfinite(e).any()
        assert_close(y, e)
        y = nbconv.depthwise_conv2d(x, dk, dbias, **geo, **kw)
        e = depthwise_ref(x, dk, dbias, **geo, **kw)
        assert np.isnan(e).any() and (np.isinf(e).any() or activation == "relu6")
        assert_close(y, e)
    y = nbconv.pointwise_conv2d(x, pk[:, :, :3], **kw)
    assert_close(y, pointwise_ref(x, pk[:, :, :3], **kw))


@pytest.mark.parametrize("size", [1, 7, 8, 9, None])
@pytest.mark.parametrize("padding", ["valid", "same", 1, (2, 0), ((0, 2), (1, 3))])
@pytest.mark.parametrize("k,s,d", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (2, 3, 2)])
def test_conv_output_hw_against_the_reference(size, padding, k, s, d):
    from reference import output_size, resolve_padding

    got = _args.conv_output_hw(size, 10, (k, k), s, padding, d)
    (pt, pb), (pl, pr) = resolve_padding(padding, size or 1, 10, k, k, (s, s), (d, d))
    assert got[1] == output_size(10, k, s, d, pl, pr)
    assert got[0] == (None if size is None else output_size(size, k, s, d, pt, pb))
