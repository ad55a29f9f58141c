"""The hot loops compiled from hindsight_py/_speedups.c, or None.

The extension is optional: pip builds it when a C compiler is at hand. Without it, or with
HINDSIGHT_PY_PURE=1 in the environment, the Python code each loop comes from runs instead and
gives the same results (tests/test_speedups.py), only slower. Callers look up ``speedups`` when
they run, not at import, so that tests can switch between the two.
"""

from __future__ import annotations

import os
from types import ModuleType

speedups: ModuleType | None = None
if not os.environ.get("HINDSIGHT_PY_PURE"):
    try:
        from hindsight_py import _speedups as speedups
    except ImportError:  # not built: the Python twins run
        speedups = None
