"""Where nbconv's compiled kernels are cached on disk, keyed on the package's own source.

Numba keys each cached function on its own file only: after an upgrade or an
edit of a callee in another module it would load the old machine code.  Our
locator puts every nbconv kernel in one directory named after the package
version and a hash of the source files of its kernels (and what they import), and stamps each
entry with that hash, so any change to the kernels compiles afresh (and Numba's own index still
checks its version and the CPU).  The base directory, first that is writable:

1. ``NBCONV_CACHE_DIR``;
2. ``NUMBA_CACHE_DIR``/nbconv;
3. the package's ``__pycache__`` (a checkout or a user's own virtualenv);
4. the per-user cache directory (``$XDG_CACHE_HOME/nbconv``, ``~/.cache/nbconv`` on Linux), for read-only
   installs;
5. a directory in the system's temporary folder, so that import never fails.
"""
import functools
import hashlib
import os
import re
import shutil
import tempfile
import time

from numba.core import caching
from numba.misc.appdirs import AppDirs

__all__ = ["PACKAGE_DIR", "source_hash", "cache_dir", "install"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PREFIX = "kernels-"
#: environment variables that change the generated machine code
CODEGEN_ENV = ("NBCONV_BF16",)


_KERNEL_MARK = re.compile(r"^@\w*(jit|intrinsic|overload)\b", re.M)
_RELATIVE_IMPORT = re.compile(r"^\s*from \.(\w*) import ([\w, ]+)", re.M)


def kernel_sources(package_dir=None):
    """The package's modules that define kernels, and the modules they import, transitively (file names).

    Only these shape the machine code: editing the Python around the kernels
    (the public functions, the CLI) keeps the cache.
    """
    package_dir = package_dir or PACKAGE_DIR
    texts = {}
    for name in os.listdir(package_dir):
        if name.endswith(".py"):
            with open(os.path.join(package_dir, name), encoding="utf-8") as fh:
                texts[name] = fh.read()
    todo = [name for name, text in texts.items() if _KERNEL_MARK.search(text)]
    found = set()
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        for module, names in _RELATIVE_IMPORT.findall(texts[name]):
            targets = [module] if module else [n.strip() for n in names.split(",")]
            todo += [t + ".py" for t in targets if t + ".py" in texts]
    return sorted(found)


@functools.lru_cache(maxsize=None)
def source_hash():
    """Hex digest of the versions of nbconv, Numba, llvmlite and NumPy, of :data:`CODEGEN_ENV` and of
    :func:`kernel_sources`."""
    import llvmlite
    import numba
    import numpy

    from . import __version__

    h = hashlib.sha256(" ".join((__version__, numba.__version__, llvmlite.__version__, numpy.__version__)).encode())
    # settings read when the kernels are generated (the bfloat16 products' path, nbconv._simd)
    for var in CODEGEN_ENV:
        h.update(f"{var}={os.environ.get(var, '')}".encode())
    for name in kernel_sources():
        h.update(name.encode() + b"\0")
        with open(os.path.join(PACKAGE_DIR, name), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def _writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _bases():
    for var in ("NBCONV_CACHE_DIR", "NUMBA_CACHE_DIR"):
        value = os.environ.get(var)
        if value:
            yield os.path.abspath(value if var == "NBCONV_CACHE_DIR" else os.path.join(value, "nbconv")), False
    yield os.path.join(PACKAGE_DIR, "__pycache__"), True
    yield AppDirs(appname="nbconv", appauthor=False).user_cache_dir, False
    yield os.path.join(tempfile.gettempdir(), f"nbconv-{os.getuid() if hasattr(os, 'getuid') else 'user'}"), False


@functools.lru_cache(maxsize=None)
def cache_dir():
    """The directory holding this version's compiled kernels (created, writable)."""
    for base, private in _bases():
        path = os.path.join(base, _PREFIX + source_hash())
        if _writable(path):
            if private:
                _prune(base, keep=path)
            return path
    raise OSError("no writable directory for nbconv's kernel cache; set NBCONV_CACHE_DIR")


def holds_kernels():
    """Whether the cache directory holds any compiled kernel (an index file of Numba's)."""
    try:
        with os.scandir(cache_dir()) as entries:
            return any(e.name.endswith(".nbi") for e in entries)
    except OSError:
        return False


def _prune(base, keep, idle_s=24 * 3600):
    """Drop the kernels of other versions of this very source tree (its ``__pycache__`` is nobody else's)
    once unused for a day: a process of the old sources may still be compiling into them."""
    now = time.time()
    for name in os.listdir(base):
        path = os.path.join(base, name)
        try:
            idle = now - os.stat(path).st_mtime > idle_s
        except OSError:
            continue
        if name.startswith(_PREFIX) and path != keep and idle:
            shutil.rmtree(path, ignore_errors=True)


class _Locator(caching._CacheLocator):
    """Numba cache locator for nbconv's own functions (others fall through to Numba's locators)."""

    def __init__(self, py_func):
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self):
        return cache_dir()

    def ensure_cache_path(self):
        cache_dir()

    def get_source_stamp(self):
        return source_hash()

    def get_disambiguator(self):
        return str(self._lineno)

    @classmethod
    def from_function(cls, py_func, py_file):
        if os.path.dirname(os.path.abspath(py_file)) != PACKAGE_DIR:
            return None
        return cls(py_func)


def install():
    """Put the locator first in Numba's list (before any nbconv function is decorated)."""
    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl  # renamed in Numba 0.61
    classes = impl._locator_classes
    if _Locator not in classes:
        classes.insert(0, _Locator)
