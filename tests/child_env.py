"""The environment of the child processes that multi-rank tests start."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra: str) -> dict[str, str]:
    """os.environ for a CPU child: one thread per process (ranks share 2 cores), DeepSpeed's CPU
    accelerator with this checkout's op cache, the repo and tests/ importable, and no env:// rank
    variables inherited from the caller (`extra` may set them, and anything else)."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    paths = [str(REPO), str(REPO / "tests")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(paths))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env.update(extra)
    return env
