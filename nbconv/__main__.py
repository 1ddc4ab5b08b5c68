"""``python -m nbconv info|warmup|bench`` (see :mod:`nbconv._cli`)."""
import sys

from ._cli import main

sys.exit(main())
