"""Every script in examples/ runs to completion as a user would run it (a subprocess), in its short mode
(NBCONV_EXAMPLES_QUICK=1: smaller model, fewer epochs/runs) so that CI stays fast.  The scripts check their own
results: the quickstart against the two-step computation, keras_model.py its predictions after save/load,
convert_mobilenet.py the converted models against the original Keras model."""
import functools
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
NEEDS = {"keras_model.py": ["keras"], "convert_mobilenet.py": ["keras"], "train_digits.py": ["keras", "sklearn"]}


@functools.lru_cache(maxsize=None)
def _installed(module):
    """Whether ``module`` is importable by a plain ``python`` run from outside the source tree."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT / "examples").returncode == 0


def test_the_four_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"numpy_quickstart.py", "keras_model.py", "convert_mobilenet.py",
                                          "train_digits.py"}


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script):
    for module in NEEDS.get(script.name, []):
        pytest.importorskip(module)
    env = dict(os.environ, NBCONV_EXAMPLES_QUICK="1")
    env.setdefault("KERAS_BACKEND", "jax")
    if not _installed("keras_layers"):
        # a development install that predates keras_layers: use the source tree.  Never when the packages are
        # installed (tox): a second copy of nbconv would compile its kernels into a second cache.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.strip()
    if script.name == "numpy_quickstart.py":
        assert "18,432" in proc.stdout and "2,336" in proc.stdout
    if script.name == "convert_mobilenet.py":
        assert "fused separable block" in proc.stdout and "fold_batchnorm=True" in proc.stdout
    if script.name == "train_digits.py":
        assert "test accuracy" in proc.stdout and "accuracy:" in proc.stdout  # Keras's progress bar
