"""Set-up shared by the whole suite: it runs on the CPU whatever the machine, one intra-op thread
per process (multi-rank tests run one process per core), DeepSpeed's JIT op cache kept per checkout.

Set before anything imports torch or DeepSpeed (both read these at import); `make test` exports
the same values, so a plain `pytest` run behaves the same way.

Tests are packages (`tests/<area>/`), so pytest puts the repository root on `sys.path`: tests
import shared helpers as `piip6b.testing` and `tests.<area>.<module>`, never by editing `sys.path`.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
