"""Shared fixtures of the Keras layer tests (the backend comes from KERAS_BACKEND, as tox sets it)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
