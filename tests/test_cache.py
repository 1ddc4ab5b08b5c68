"""The kernel cache: its key follows the kernel sources, its directory the install's permissions."""
import os

from nbconv import _cache


def test_source_hash_follows_every_file(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "nbconv"
    shutil.copytree(_cache.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_cache, "PACKAGE_DIR", str(copy))
    before = _cache.source_hash.__wrapped__()
    assert before == _cache.source_hash()  # same sources, same key
    with open(copy / "_cli.py", "a") as fh:  # no kernel in it, none imports it: the compiled code stands
        fh.write("\n# edited\n")
    assert _cache.source_hash.__wrapped__() == before
    with open(copy / "_gemm.py", "a") as fh:  # a callee's module, not the calling kernel's own
        fh.write("\n# edited\n")
    assert _cache.source_hash.__wrapped__() != before
    assert {"_gemm.py", "_separable.py", "_jit.py", "_cache.py"} <= set(_cache.kernel_sources())
    assert "forward.py" not in _cache.kernel_sources()


def test_cache_directory_choice(tmp_path, monkeypatch):
    key = "kernels-" + _cache.source_hash()
    monkeypatch.delenv("NBCONV_CACHE_DIR", raising=False)
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert _cache.cache_dir.__wrapped__() == str(tmp_path / "numba" / "nbconv" / key)
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    package_cache = os.path.join(_cache.PACKAGE_DIR, "__pycache__")
    real = _cache._writable
    monkeypatch.setattr(_cache, "_writable", lambda p: not p.startswith(package_cache) and real(p))
    assert _cache.cache_dir.__wrapped__() == str(tmp_path / "xdg" / "nbconv" / key)  # read-only install
    monkeypatch.setenv("NBCONV_CACHE_DIR", str(tmp_path / "mine"))
    assert _cache.cache_dir.__wrapped__() == str(tmp_path / "mine" / key)
