"""`launch/rank.py` as a module for the tests: it is a script run by its path, not a package."""

from __future__ import annotations

import importlib.util
import sys

from piip6b.testing import REPO

LAUNCHER = REPO / "launch" / "rank.py"


def _load():
    spec = importlib.util.spec_from_file_location("piip6b_launch_rank", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


rank = _load()
