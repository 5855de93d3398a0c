"""A streamed load of a few-hundred-MB file must not hold a second copy of it (peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from piip6b.testing import REPO



@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_streamed_load_peak_rss(fmt):
    cmd = [sys.executable, str(REPO / "bench" / "weights_rss.py"), "--size-mb", "300", "--format", fmt, "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["file_mb"] > 250
    # One copy (the model itself) is the floor; a second copy of the file would read ~2.0.
    assert result["peak_ratio_to_file"] < 1.3, result
