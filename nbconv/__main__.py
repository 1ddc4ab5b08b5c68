"""``python -m nbconv info`` / ``python -m nbconv bench --quick`` (see :mod:`nbconv._cli`)."""
import sys

from ._cli import main

sys.exit(main())
