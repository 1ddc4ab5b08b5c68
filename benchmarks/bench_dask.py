"""Dask scale-out benchmark: ``nbconv.dask.separable_conv2d`` on a LocalCluster against the in-memory call.

A 1x4096x4096x32 float32 image (2 GiB in; memory-bound), 3x3 depthwise,
'same' padding, then a 1x1 convolution to 32 or 64 filters, computed

- in memory: ``nbconv.separable_conv2d`` on all cores, in this process;
- on a ``distributed.LocalCluster`` (worker processes, one Numba thread per
  task): the input is generated and persisted on the workers, the timed part
  is building the graph and persisting the output there (``persist`` +
  ``wait``), as a pipeline that keeps or writes its result on the cluster
  would; the result is not gathered to the client.

Throughput: ``MB/s`` counts the bytes read and written (input + output, in
10^6 bytes), ``Mpixel/s`` the input pixels (N*H*W / 10^6) per second.

Run it standalone (prints a table; medians of ``--rounds`` runs)::

    python -m benchmarks.bench_dask                 # the full 4096x4096 image, 32 and 64 filters
    python -m benchmarks.bench_dask --quick         # 1024x1024, 32 filters, a few seconds
    python -m benchmarks.bench_dask --size 2048 --chunks 512,1024 --workers 2x1,1x2

or as a pytest-benchmark module, in a process of its own (the cluster and the
in-memory call must not share a process with other libraries' thread pools)::

    python -m pytest benchmarks/bench_dask.py -p no:cacheprovider --benchmark-json=dask.json

Environment (pytest mode): ``NBCONV_BENCH_QUICK=1`` (the --quick sizes) and
``NBCONV_BENCH_DASK_SIZE``, ``NBCONV_BENCH_DASK_FILTERS``,
``NBCONV_BENCH_DASK_CHUNKS``, ``NBCONV_BENCH_DASK_WORKERS`` (as the options).
Memory: the full run needs about 2 GiB (input) + 4 GiB (64-filter output)
in the client, then the same on the workers, plus one output in flight.
"""
import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np

import nbconv

C = 32
KERNEL = 3
DTYPE = np.float32


def _ints(text):
    return [int(v) for v in str(text).split(",") if v]


def _workers(text):
    """'2x1,1x2' -> [(2, 1), (1, 2)]: worker processes x threads per worker."""
    out = []
    for item in str(text).split(","):
        if item:
            n, t = item.lower().split("x")
            out.append((int(n), int(t)))
    return out


def config(quick=None, size=None, filters=None, chunks=None, workers=None):
    """The run's sizes, from the arguments, else the environment, else the defaults."""
    env = os.environ.get
    if quick is None:
        quick = env("NBCONV_BENCH_QUICK", "0") == "1"
    cores = os.cpu_count() or 1
    return {
        "size": int(size or env("NBCONV_BENCH_DASK_SIZE") or (1024 if quick else 4096)),
        "filters": _ints(filters or env("NBCONV_BENCH_DASK_FILTERS") or ("32" if quick else "32,64")),
        "chunks": _ints(chunks or env("NBCONV_BENCH_DASK_CHUNKS") or ("512" if quick else "1024")),
        "workers": _workers(workers or env("NBCONV_BENCH_DASK_WORKERS") or f"{cores}x1"),
    }


def weights(filters, seed=0):
    rng = np.random.default_rng(seed)
    dk = rng.standard_normal((KERNEL, KERNEL, C, 1)).astype(DTYPE) / KERNEL
    pk = rng.standard_normal((1, 1, C, filters)).astype(DTYPE) / np.sqrt(C)
    return dk, pk


def rates(seconds, size, filters):
    """Throughput of one call: MB/s (input + output bytes) and Mpixel/s (input pixels)."""
    itemsize = np.dtype(DTYPE).itemsize
    pixels = size * size
    moved = pixels * (C + filters) * itemsize
    return {"MB/s": moved / seconds / 1e6, "Mpixel/s": pixels / seconds / 1e6}


# --- in memory ------------------------------------------------------------------------------------------------------

def inmemory_setup(size, filters):
    """(call, release): the in-memory separable convolution of a fresh (1, size, size, 32) image."""
    x = np.random.default_rng(1).random((1, size, size, C), dtype=DTYPE)
    dk, pk = weights(filters)
    nbconv.separable_conv2d(x[:, :64, :64], dk, pk, padding="same")  # compile / load the kernel

    def call():
        return nbconv.separable_conv2d(x, dk, pk, padding="same")

    return call


# --- on a LocalCluster ----------------------------------------------------------------------------------------------

def start_cluster(n_workers, threads_per_worker):
    """A LocalCluster of worker processes and its Client (memory limits off: the benchmark sizes them)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                           dashboard_address=None, memory_limit=0)
    return cluster, Client(cluster)


def check_on_cluster(client, filters):
    """Warm the workers' kernels and check the tiled result against the in-memory one on a small image."""
    import dask.array as da

    import nbconv.dask as nd

    x = np.random.default_rng(2).random((1, 150, 130, C), dtype=DTYPE)  # small: no large-graph warning
    dk, pk = weights(filters)
    got = client.compute(nd.separable_conv2d(da.from_array(x, chunks=(1, 48, 40, C)), dk, pk,
                                             padding="same")).result()
    expected = nbconv.separable_conv2d(x, dk, pk, padding="same")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()))


def cluster_setup(client, size, filters, chunk):
    """(call, input): persist a (1, size, size, 32) image on the workers; call() persists the output there."""
    import dask.array as da
    from distributed import wait

    import nbconv.dask as nd

    x = da.random.default_rng(1).random((1, size, size, C), dtype=DTYPE, chunks=(1, chunk, chunk, C)).persist()
    wait(x)
    dk, pk = weights(filters)

    def call():
        y = nd.separable_conv2d(x, dk, pk, padding="same").persist()
        wait(y)
        return y

    return call, x


def _time(call, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        del result
        gc.collect()
    return times


# --- pytest-benchmark -----------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover  (standalone use without pytest)
    pytest = None

if pytest is not None:
    _CFG = config()

    def _record(benchmark, size, filters):
        median = benchmark.stats.stats.median
        benchmark.extra_info.update({k: round(v, 1) for k, v in rates(median, size, filters).items()})
        benchmark.extra_info["shape"] = f"1x{size}x{size}x{C} -> {filters}"

    @pytest.fixture(scope="module", params=_CFG["workers"], ids=lambda w: f"{w[0]}procx{w[1]}thr")
    def dask_client(request):
        cluster, client = start_cluster(*request.param)
        try:
            yield client
        finally:
            client.close()
            cluster.close()

    @pytest.mark.parametrize("filters", _CFG["filters"])
    def test_inmemory(benchmark, filters):
        size = _CFG["size"]
        call = inmemory_setup(size, filters)
        benchmark.group = f"dask scale-out 1x{size}x{size}x{C} -> {filters}"
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
        _record(benchmark, size, filters)

    @pytest.mark.parametrize("chunk", _CFG["chunks"])
    @pytest.mark.parametrize("filters", _CFG["filters"])
    def test_dask_localcluster(benchmark, dask_client, filters, chunk):
        size = _CFG["size"]
        check_on_cluster(dask_client, filters)
        call, x = cluster_setup(dask_client, size, filters, chunk)
        benchmark.group = f"dask scale-out 1x{size}x{size}x{C} -> {filters}"
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
        _record(benchmark, size, filters)
        del x


# --- standalone -----------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_dask", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1024x1024, 32 filters, 512x512 chunks")
    p.add_argument("--size", type=int, help="image height = width (default 4096)")
    p.add_argument("--filters", help="comma-separated filter counts (default 32,64)")
    p.add_argument("--chunks", help="comma-separated spatial chunk sizes (default 1024)")
    p.add_argument("--workers", help="comma-separated PROCSxTHREADS cluster shapes (default <cores>x1)")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per measurement (default 3; median shown)")
    args = p.parse_args(argv)
    cfg = config(args.quick or None, args.size, args.filters, args.chunks, args.workers)
    size = cfg["size"]
    print(f"nbconv.dask benchmark: 1x{size}x{size}x{C} float32, 3x3 same, -> {cfg['filters']} filters; "
          f"{args.rounds} rounds, medians; {os.cpu_count()} cores, nbconv {nbconv.__version__}")
    rows = []
    base = {}
    for f in cfg["filters"]:
        call = inmemory_setup(size, f)
        _time(call, 1)  # warm-up: the first touch of fresh memory is slow (page faults), as on the cluster
        t = statistics.median(_time(call, args.rounds))
        base[f] = t
        rows.append(("in memory", f"{nbconv.get_num_threads()} threads", "-", f, t))
        del call
        gc.collect()
    for n, tpw in cfg["workers"]:
        cluster, client = start_cluster(n, tpw)
        try:
            for f in cfg["filters"]:
                check_on_cluster(client, f)
                for chunk in cfg["chunks"]:
                    call, x = cluster_setup(client, size, f, chunk)
                    _time(call, 1)  # warm-up
                    t = statistics.median(_time(call, args.rounds))
                    rows.append(("LocalCluster", f"{n} procs x {tpw} thr", f"{chunk}x{chunk}", f, t))
                    del call, x
        finally:
            client.close()
            cluster.close()
    print(f"{'how':<13} {'workers':<16} {'chunks':<10} {'F':>3} {'median s':>9} {'MB/s':>8} {'Mpixel/s':>9} "
          f"{'vs in-memory':>12}")
    for how, workers, chunks, f, t in rows:
        r = rates(t, size, f)
        print(f"{how:<13} {workers:<16} {chunks:<10} {f:>3} {t:9.3f} {r['MB/s']:8.0f} {r['Mpixel/s']:9.1f} "
              f"{base[f] / t:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
