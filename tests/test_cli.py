"""``python -m nbconv info`` / ``bench``: run as a user would, in a subprocess (the output is compared with what
the libraries themselves report, not with our own code)."""
import importlib.util
import io
import os
import subprocess
import sys

import numba
import numpy as np
import pytest
import scipy

from nbconv import _cli


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "nbconv", *args], capture_output=True, text=True, timeout=timeout)


def test_info():
    proc = run("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for dist, version in (("numpy", np.__version__), ("numba", numba.__version__), ("scipy", scipy.__version__)):
        assert any(line.split()[:2] == [dist, version] for line in out.splitlines()), (dist, out)
    assert "llvmlite" in out
    layer_line = next(line for line in out.splitlines() if "numba threading layer" in line)
    assert layer_line.split()[3] in ("tbb", "omp", "workqueue")
    threads_line = next(line for line in out.splitlines() if "numba threads" in line)
    assert f"of a pool of {numba.config.NUMBA_NUM_THREADS}" in threads_line
    assert "SIMD features" in out
    assert "BLAS (threadpoolctl" in out
    assert "micro-kernels" in out
    assert "kernel cache" in out
    native = out[out.index("native calls"):].splitlines()
    if sys.platform.startswith("linux"):  # the helpers' futex: native calls are possible
        assert native[1].split()[:3] == ["jax", "FFI", "handler"] and "NBCONV_JAX_FFI=0" in native[1]
        assert native[2].split()[:2] == ["tensorflow", "kernel"] and "NBCONV_TF_NATIVE=0" in native[2]
    else:
        assert "unavailable" in native[1]
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib["user_api"] == "blas":  # the BLAS numpy itself loads is listed with its version
            assert lib["version"] in out or lib["filepath"] not in out
    if importlib.util.find_spec("keras") is not None:
        assert "keras" in out


def test_info_names_the_cache(tmp_path):
    env = dict(os.environ, NBCONV_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "nbconv", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"directory  {tmp_path}{os.sep}kernels-" in proc.stdout
    assert "compile    sync" in proc.stdout
    if sys.platform.startswith("linux"):  # an empty cache holds no native entry points
        assert proc.stdout.count("not built yet") == 2 and "jobs              0 built" in proc.stdout


def test_info_reports_openblas_environment():
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell", OPENBLAS_L2_SIZE="512")
    proc = subprocess.run([sys.executable, "-m", "nbconv", "info"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0
    assert "OPENBLAS_CORETYPE=Haswell" in proc.stdout and "OPENBLAS_L2_SIZE=512" in proc.stdout


def test_unknown_subcommand_exits_2():
    proc = run("frobnicate")
    assert proc.returncode == 2
    assert "usage: python -m nbconv" in proc.stderr and "frobnicate" in proc.stderr


@pytest.mark.parametrize("args", [[], ["bench", "--no-such-flag"], ["info", "extra"]])
def test_usage_errors_exit_2_in_process(args, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(args)
    assert exc.value.code == 2
    assert "usage: python -m nbconv" in capsys.readouterr().err


def test_bench_runs_the_benchmark_suites_cases_in_a_subprocess():
    """In a checkout, ``bench`` times the benchmark suite's own cases (here the quick overhead case, a tiny call)
    in a process per contender and checks the output against the float64 reference."""
    from benchmarks import cases

    proc = run("bench", "--quick", "--contenders", "nbconv", "--suite", "overhead", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("case"))
    assert lines[header].split() == ["case", "nbconv"]
    expected = cases.select(["overhead"], quick=True)
    rows = lines[header + 2: header + 2 + len(expected)]
    for case, row in zip(expected, rows):
        assert row.startswith(case.shape_label)
        assert 0 < float(row[len(case.shape_label):]) < 1000
    assert "checks: 1 outputs compared with the float64 reference (tests/reference.py): all within 0.0001" in \
        proc.stdout
    assert lines[-1].endswith("tox -e bench")


def test_bench_lists_missing_peers_as_skipped(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "onnx") else
                        real(name, *a))
    out = io.StringIO()
    assert _cli.bench(quick=True, contenders=["torch_nchw", "onnxruntime"], suites=["overhead"], out=out) == 0
    text = out.getvalue()
    assert "skipped torch_nchw: not installed (torch)" in text
    assert "skipped onnxruntime: not installed (onnx" in text
    assert "no contender ran" in text


@pytest.mark.parametrize("args, message", [
    (["--contenders", "pytorch"], "Expected contenders among"),
    (["--suite", "models"], "Expected suites among"),
])
def test_bench_rejects_unknown_contenders_and_suites(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli.main(["bench", "--quick", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m nbconv" in err and message in err


def test_bench_without_the_benchmark_suite_times_nbconv_alone(monkeypatch):
    """An installed wheel has no benchmarks/: nbconv alone, in process, and a pointer to the full benchmark."""
    monkeypatch.setattr(_cli, "_checkout", lambda: None)
    monkeypatch.setattr(_cli, "STANDALONE_SHAPES", (("b1 6x6x8->16", 1, 6, 6, 8, 16),))
    monkeypatch.setattr(_cli, "STANDALONE_BUDGET_S", {True: 0.01, False: 0.01})
    out = io.StringIO()
    assert _cli.bench(quick=True, contenders=["nbconv", "onnxruntime"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert "no benchmark suite (benchmarks/), so nbconv is timed alone" in lines[0]
    assert "onnxruntime need the benchmark suite of a checkout" in lines[1]
    row = next(line for line in lines if line.startswith("b1 6x6x8->16"))
    assert float(row.split()[-1]) > 0
    assert "tox -e bench" in lines[-1]


def test_checkout_is_found(monkeypatch):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    assert _cli._checkout() == root


def test_checkout_is_found_from_an_installed_nbconv_run_in_a_clone(monkeypatch, tmp_path):
    """tox installs nbconv into site-packages and runs in the clone: the working directory is the checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = tmp_path / "site-packages" / "nbconv"
    site.mkdir(parents=True)
    monkeypatch.setattr(_cli, "__file__", str(site / "_cli.py"))
    monkeypatch.chdir(root)
    assert _cli._checkout() == root
    monkeypatch.chdir(tmp_path)  # anywhere else: no benchmark suite
    assert _cli._checkout() is None
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "cli.py").write_text("")
    assert _cli._checkout() is None  # somebody else's benchmarks/, not nbconv's checkout
