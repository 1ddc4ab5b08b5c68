"""Shared fixtures of the Keras layer tests (the backend comes from KERAS_BACKEND, as tox sets it)."""
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_configure(config):
    config.addinivalue_line("markers", "own_kernel_policy: run with keras_layers.layers.OWN_KERNEL as shipped")


@pytest.fixture(autouse=True)
def nbconv_kernels_everywhere(request, monkeypatch):
    """The layers run nbconv's kernels in every test (the comparisons with Keras's layers test nbconv), except
    in tests marked ``own_kernel_policy``, which test the shipped choice of the backend's own kernel."""
    if request.node.get_closest_marker("own_kernel_policy") is None:
        import keras_layers.layers

        monkeypatch.setattr(keras_layers.layers, "OWN_KERNEL", {})
        monkeypatch.setattr(keras_layers.layers, "OWN_KERNEL_WITHOUT_NATIVE", {})
