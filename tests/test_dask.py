"""nbconv.dask on a real distributed LocalCluster (2 worker processes) against the in-memory API and the reference.

The chunked results must equal the in-memory ``nbconv`` call on the whole
array (the same kernels on different tiles, so to a few ulps) and the float64
reference in ``reference.py`` (which shares no code with either).
"""
import pickle
import subprocess
import sys

import dask.array as da
import numba
import numpy as np
import pytest
from dask.array.core import PerformanceWarning
from hypothesis import given, settings
from hypothesis import strategies as st

import nbconv
import nbconv.dask as nd
from reference import assert_close, depthwise_ref, pointwise_ref, random_array, separable_ref

FORMATS = ["channels_last", "channels_first"]
# every padding form; 7 is wider than the dilated kernel, so some tiles read nothing but padding
PADDINGS = ["valid", "same", 1, (2, 0), ((1, 2), (0, 3)), 7]
STRIDE_DILATION = [(s, d) for s in (1, 2, 3) for d in (1, 2)]

# N, H, W chunks: uneven, several smaller than the kernel's reach ((3-1)*2+1 = 5 rows with dilation 2)
N, H, W, C, DM, F = 3, 13, 11, 3, 2, 4
NHW_CHUNKS = ((2, 1), (2, 5, 1, 5), (3, 3, 1, 4))


def _chunks(data_format, nhw=NHW_CHUNKS, c=-1):
    n, h, w = nhw
    return (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)


def _shape(data_format, n=N, h=H, w=W, c=C):
    return (n, h, w, c) if data_format == "channels_last" else (n, c, h, w)


def _exact(actual, expected):
    """The chunked result against the in-memory one: same dtype and shape, equal to a few ulps."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=4 * np.finfo(expected.dtype).eps,
                               atol=4 * np.finfo(expected.dtype).eps * float(np.abs(expected).max()))


@pytest.fixture(scope="module")
def client():
    """A real cluster: 2 worker processes of 1 thread each (every worker loads the kernels from the disk cache)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      memory_limit="2GiB") as cluster, Client(cluster) as c:
        yield c


def _compute_all(client, lazies):
    # Tests compute the in-memory result first: a kernel compiled in this process is then loaded from Numba's
    # disk cache by both workers instead of being compiled by each of them.
    return client.gather(client.compute(lazies))


@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("data_format", FORMATS)
def test_separable_spatial_chunks(client, rng, data_format, padding):
    """Chunks over N, H and W (uneven, smaller than the kernel's reach); strides 1-3 x dilations 1-2."""
    x = random_array(rng, _shape(data_format), np.float64)
    dk = random_array(rng, (3, 2, C, DM), np.float64)  # an even kernel width: uneven 'same' padding
    pk = random_array(rng, (1, 1, C * DM, F), np.float64)
    bias = random_array(rng, (F,), np.float64)
    dbias = random_array(rng, (C * DM,), np.float64)
    xd = da.from_array(x, chunks=_chunks(data_format))
    cases, lazies = [], []
    for s, d in STRIDE_DILATION:
        kw = dict(strides=s, dilation_rate=d, padding=padding, data_format=data_format, activation="relu",
                  depthwise_bias=dbias, depthwise_activation="relu6")
        cases.append(kw)
        lazies.append(nd.separable_conv2d(xd, dk, pk, bias, **kw))
    expected = [nbconv.separable_conv2d(x, dk, pk, bias, **kw) for kw in cases]
    for kw, lazy, got, want in zip(cases, lazies, _compute_all(client, lazies), expected):
        assert lazy.shape == got.shape and lazy.dtype == got.dtype, kw
        _exact(got, want)
        assert_close(got, separable_ref(x, dk, pk, bias, **kw))


@pytest.mark.parametrize("data_format", FORMATS)
def test_separable_batch_chunks_is_map_blocks(client, rng, data_format):
    """Chunks over the batch only: one task per input block, no halo tasks."""
    x = random_array(rng, _shape(data_format, n=5), np.float32)
    dk = random_array(rng, (3, 3, C, DM), np.float32)
    pk = random_array(rng, (C * DM, F), np.float32)
    xd = da.from_array(x, chunks=_chunks(data_format, nhw=((2, 2, 1), -1, -1)))
    cases = [dict(padding=p, strides=s, dilation_rate=d, data_format=data_format)
             for p, s, d in [("same", 2, 1), ("valid", 1, 2), (((0, 2), (1, 0)), 3, 1)]]
    lazies = [nd.separable_conv2d(xd, dk, pk, **kw) for kw in cases]
    for lazy in lazies:
        graph = dict(lazy.__dask_graph__())
        assert not any(str(k[0] if isinstance(k, tuple) else k).startswith("nbconv-halo") for k in graph)
        assert lazy.numblocks[0] == 3 and lazy.npartitions == 3
    expected = [nbconv.separable_conv2d(x, dk, pk, **kw) for kw in cases]
    for kw, got, want in zip(cases, _compute_all(client, lazies), expected):
        _exact(got, want)
        assert_close(got, separable_ref(x, dk, pk, **kw))


@pytest.mark.parametrize("data_format", FORMATS)
def test_depthwise_spatial_chunks(client, rng, data_format):
    x = random_array(rng, _shape(data_format), np.float64)
    k = random_array(rng, (2, 3, C, DM), np.float64)
    b = random_array(rng, (C * DM,), np.float64)
    xd = da.from_array(x, chunks=_chunks(data_format))
    cases = [dict(padding=p, strides=s, dilation_rate=d, data_format=data_format, activation="relu6")
             for p in ("valid", "same", (1, 3)) for s, d in [(1, 1), (2, 2), (3, 1)]]
    lazies = [nd.depthwise_conv2d(xd, k, b, **kw) for kw in cases]
    expected = [nbconv.depthwise_conv2d(x, k, b, **kw) for kw in cases]
    for kw, got, want in zip(cases, _compute_all(client, lazies), expected):
        _exact(got, want)
        assert_close(got, depthwise_ref(x, k, b, **kw))


@pytest.mark.parametrize("data_format", FORMATS)
def test_pointwise_chunks_everywhere(client, rng, data_format):
    x = random_array(rng, _shape(data_format, c=6), np.float64)
    k = random_array(rng, (1, 1, 6, 5), np.float64)
    b = random_array(rng, (5,), np.float64)
    xd = da.from_array(x, chunks=_chunks(data_format))
    kw = dict(data_format=data_format, activation="relu")
    lazy = nd.pointwise_conv2d(xd, k, b, **kw)
    assert lazy.chunks == _chunks(data_format, c=(5,))
    expected = nbconv.pointwise_conv2d(x, k, b, **kw)
    got = client.compute(lazy).result()
    _exact(got, expected)
    assert_close(got, pointwise_ref(x, k, b, **kw))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_spatial_chunks(client, rng, dtype):
    x = random_array(rng, (2, 17, 15, 8), dtype)
    dk = random_array(rng, (3, 3, 8, 1), dtype)
    pk = random_array(rng, (8, 16), dtype)
    xd = da.from_array(x, chunks=(1, 4, 6, 8))
    kw = dict(padding="same", strides=2)
    lazy = nd.separable_conv2d(xd, dk, pk, **kw)
    assert lazy.dtype == dtype
    expected = nbconv.separable_conv2d(x, dk, pk, **kw)
    got = client.compute(lazy).result()
    _exact(got, expected)
    assert_close(got, separable_ref(x, dk, pk, **kw), dtype=dtype)


def test_channel_chunks_are_rechunked_with_a_warning(client, rng):
    """Chunked in every dimension, channels included: rechunked (PerformanceWarning), same result."""
    x = random_array(rng, (N, H, W, 6), np.float64)
    dk = random_array(rng, (3, 3, 6, 1), np.float64)
    pk = random_array(rng, (6, 4), np.float64)
    xd = da.from_array(x, chunks=NHW_CHUNKS + ((2, 4),))
    with pytest.warns(PerformanceWarning, match="channel axis"):
        lazy = nd.separable_conv2d(xd, dk, pk, padding="same", dilation_rate=2)
    expected = nbconv.separable_conv2d(x, dk, pk, padding="same", dilation_rate=2)
    got = client.compute(lazy).result()
    _exact(got, expected)


@pytest.mark.parametrize("data_format", FORMATS)
def test_channel_chunks_with_rechunk_false_raise(data_format):
    x = da.zeros(_shape(data_format, c=4), chunks=_chunks(data_format, c=2))
    cax = 3 if data_format == "channels_last" else 1
    dk, pk = np.ones((3, 3, 4, 1)), np.ones((4, 2))
    for call in (lambda: nd.separable_conv2d(x, dk, pk, data_format=data_format, rechunk=False),
                 lambda: nd.depthwise_conv2d(x, dk, data_format=data_format, rechunk=False),
                 lambda: nd.pointwise_conv2d(x, pk, data_format=data_format, rechunk=False)):
        with pytest.raises(ValueError, match=rf"channel axis \(axis {cax}\) in one chunk.*rechunk=False"):
            call()


def test_wrong_ndim_type_dtype_and_unknown_chunks():
    dk, pk = np.ones((3, 3, 4, 1)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"Expected `x` to be a 4-D array .*Received: x with shape \(8, 8, 4\)"):
        nd.separable_conv2d(da.zeros((8, 8, 4)), dk, pk)
    with pytest.raises(ValueError, match="4-D array"):
        nd.depthwise_conv2d(da.zeros((1, 1, 8, 8, 4)), dk)
    with pytest.raises(ValueError, match="4-D array"):
        nd.pointwise_conv2d(da.zeros((8, 4)), pk)
    with pytest.raises(TypeError, match=r"dask.array.Array.*Received: x of type numpy.ndarray"):
        nd.separable_conv2d(np.zeros((1, 8, 8, 4)), dk, pk)
    with pytest.raises(TypeError, match="floating-point.*int64"):
        nd.separable_conv2d(da.zeros((1, 8, 8, 4), dtype=np.int64), dk, pk)
    x = da.zeros((4, 8, 8, 4), chunks=(2, 4, 4, 4))
    with pytest.raises(ValueError, match="known chunk sizes"):
        nd.separable_conv2d(x[x[:, 0, 0, 0] > 0], dk, pk)


BAD_ARGS = [
    dict(padding="full"),
    dict(padding=(1, 2, 3)),
    dict(strides=0),
    dict(dilation_rate=(1, -1)),
    dict(data_format="NCHW"),
    dict(activation="gelu"),
    dict(depthwise_activation="tanh"),
    dict(bias=np.ones(3)),
    dict(depthwise_bias=np.ones(5)),
    dict(padding="valid", dilation_rate=5),  # no output left
    dict(stride=2, strides=2),
    dict(groups=2),
]


@pytest.mark.parametrize("bad", BAD_ARGS, ids=str)
def test_bad_arguments_raise_like_the_numpy_api_before_any_graph(bad):
    x = np.zeros((1, 8, 8, 4))
    dk, pk = np.ones((3, 3, 4, 1)), np.ones((4, 2))
    with pytest.raises((ValueError, TypeError)) as expected:
        nbconv.separable_conv2d(x, dk, pk, **bad)
    with pytest.raises(expected.type) as got:
        nd.separable_conv2d(da.from_array(x, chunks=(1, 4, 4, 4)), dk, pk, **bad)
    assert str(got.value) == str(expected.value)


def test_bad_kernels_and_num_threads():
    x = da.zeros((1, 8, 8, 4), chunks=(1, 4, 4, 4))
    with pytest.raises(ValueError, match="depthwise_kernel"):
        nd.separable_conv2d(x, np.ones((3, 3, 5, 1)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="pointwise_kernel"):
        nd.separable_conv2d(x, np.ones((3, 3, 4, 1)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="kernel"):
        nd.pointwise_conv2d(x, np.ones((2, 2, 4, 2)))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"Expected `num_threads` to be None or a positive int"):
            nd.separable_conv2d(x, np.ones((3, 3, 4, 1)), np.ones((4, 2)), num_threads=bad)
    for bad in ("no", 0, None):
        with pytest.raises(ValueError, match=r"Expected `rechunk` to be True or False"):
            nd.depthwise_conv2d(x, np.ones((3, 3, 4, 1)), rechunk=bad)


@pytest.mark.parametrize("threads", [1, None])
def test_kernels_run_with_the_requested_thread_count(monkeypatch, rng, threads):
    """Inside each task the in-memory call sees ``num_threads`` Numba threads (None: the caller's setting)."""
    seen = []
    original = nbconv.forward.separable_conv2d

    def spy(*args, **kwargs):
        seen.append(numba.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(nbconv.forward, "separable_conv2d", spy)
    x = random_array(rng, (2, 9, 9, 3), np.float32)
    dk, pk = random_array(rng, (3, 3, 3, 1), np.float32), random_array(rng, (3, 4), np.float32)
    outer = numba.config.NUMBA_NUM_THREADS
    with nbconv.num_threads(outer):
        lazy = nd.separable_conv2d(da.from_array(x, chunks=(1, 5, 5, 3)), dk, pk, padding="same",
                                   num_threads=threads)
        got = lazy.compute(scheduler="sync")
        assert numba.get_num_threads() == outer
    assert len(seen) == 8
    assert set(seen) == {1 if threads == 1 else outer}
    _exact(got, original(x, dk, pk, padding="same"))


@pytest.mark.parametrize("nhw_chunks", [((1, 1), -1, -1), ((1, 1), (4, 4, 4), (3, 3, 3, 3))], ids=["batch", "tiles"])
def test_weights_enter_the_graph_once(rng, nhw_chunks):
    """Every task refers to one weights key; no task carries its own copy (distributed ships tasks one by one)."""
    x = da.zeros((2, 12, 12, 64), chunks=nhw_chunks + (-1,))
    dk = random_array(rng, (3, 3, 64, 1), np.float64)
    pk = random_array(rng, (64, 256), np.float64)
    lazy = nd.separable_conv2d(x, dk, pk, padding="same")
    graph = dict(lazy.__dask_graph__())
    sizes = {k: len(pickle.dumps(v)) for k, v in graph.items()}
    weight_bytes = dk.nbytes + pk.nbytes
    big = [k for k, s in sizes.items() if s >= weight_bytes]
    assert len(big) == 1, big
    assert sum(sizes.values()) < weight_bytes + 2000 * len(graph)
    assert lazy.npartitions >= 2


def test_empty_output():
    x = da.zeros((2, 0, 5, 3), chunks=(1, -1, 2, -1))
    lazy = nd.separable_conv2d(x, np.ones((3, 3, 3, 1)), np.ones((3, 4)), padding="same")
    expected = nbconv.separable_conv2d(np.zeros((2, 0, 5, 3)), np.ones((3, 3, 3, 1)), np.ones((3, 4)), padding="same")
    assert lazy.shape == expected.shape == (2, 0, 5, 4)
    assert lazy.compute(scheduler="sync").shape == expected.shape


def _chunking(draw, size):
    """Up to 5 chunks along an axis of ``size``, some of them possibly empty (Dask allows zero-size chunks)."""
    cuts = sorted(draw(st.lists(st.integers(0, size), max_size=4)))
    bounds = [0] + cuts + [size]
    return tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]))


@st.composite
def _cases(draw):
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 14)), draw(st.integers(1, 14))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = draw(st.one_of(
        st.sampled_from(["valid", "same"]),
        st.integers(0, 4),
        st.tuples(st.integers(0, 3), st.integers(0, 3)),
        st.tuples(st.tuples(st.integers(0, 3), st.integers(0, 3)), st.tuples(st.integers(0, 3), st.integers(0, 3))),
    ))
    chunks = (_chunking(draw, n), _chunking(draw, h), _chunking(draw, w))
    data_format = draw(st.sampled_from(FORMATS))
    return n, h, w, kh, kw, s, d, padding, chunks, data_format


@settings(max_examples=60)
@given(case=_cases(), seed=st.integers(0, 2**32 - 1))
def test_any_chunking_equals_in_memory(case, seed):
    """Property: any chunking, kernel, stride, dilation and padding gives the in-memory result (sync scheduler)."""
    n, h, w, kh, kw, s, d, padding, chunks, data_format = case
    rng = np.random.default_rng(seed)
    c, dm, f = 2, 2, 3
    x = random_array(rng, _shape(data_format, n, h, w, c), np.float64)
    dk, pk = random_array(rng, (kh, kw, c, dm), np.float64), random_array(rng, (c * dm, f), np.float64)
    kwargs = dict(strides=s, dilation_rate=d, padding=padding, data_format=data_format)
    try:
        expected = nbconv.separable_conv2d(x, dk, pk, **kwargs)
    except ValueError as err:  # no output left: the Dask call must refuse the same way
        with pytest.raises(ValueError) as got:
            nd.separable_conv2d(da.from_array(x, chunks=_chunks(data_format, chunks)), dk, pk, **kwargs)
        assert str(got.value) == str(err)
        return
    lazy = nd.separable_conv2d(da.from_array(x, chunks=_chunks(data_format, chunks)), dk, pk, **kwargs)
    got = lazy.compute(scheduler="sync")
    _exact(got, expected)
    assert_close(got, separable_ref(x, dk, pk, **kwargs))


def test_importing_nbconv_does_not_import_dask():
    code = (
        "import sys, nbconv; "
        "assert not [m for m in sys.modules if m == 'dask' or m.startswith(('dask.', 'distributed'))], "
        "sorted(m for m in sys.modules if 'dask' in m); "
        "import nbconv.dask; assert 'dask.array' in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
