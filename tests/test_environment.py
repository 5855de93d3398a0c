"""`piip6b env` on this machine: versions, no GPU, the kernels the models' own rules pick on the
CPU, and the state of DeepSpeed's JIT op in the build cache TORCH_EXTENSIONS_DIR names."""

from __future__ import annotations

import json
import re

import pytest
import torch

from piip6b.cli import main
from piip6b.models.attention import flash_attn_available

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU reports")


def env_report(capsys, *args: str) -> str:
    assert main(["env", *args]) == 0
    return capsys.readouterr().out


@needs_cpu_only
def test_json_report_on_a_cpu_machine(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    report = json.loads(env_report(capsys, "--json"))
    versions = report["versions"]
    assert versions["torch"] == torch.__version__ and versions["cuda"] == torch.version.cuda
    assert {"python", "cudnn", "nccl", "deepspeed", "triton", "flash-attn", "flash-attn-4"} <= set(versions)
    assert versions["deepspeed"]  # a dependency: always installed
    assert report["gpus"] == []
    kernels = report["kernels"]
    assert (kernels["device"], kernels["attention"], kernels["deformable_attention"]) == ("cpu", "sdpa", "pytorch")
    assert kernels["flash_attn_importable"] is flash_attn_available()
    op = report["deepspeed_jit_op"]
    assert (op["accelerator"], op["op"], op["state"], op["cache"]) == ("cpu", "deepspeed_shm_comm", "not built",
                                                                        str(tmp_path))


@needs_cpu_only
def test_a_built_op_in_the_cache_reads_as_warm(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    text = env_report(capsys)
    assert "gpus: none" in text
    importable = "yes" if flash_attn_available() else "no"
    assert f"  attention             sdpa (flash-attn importable: {importable})" in text
    assert "  deformable attention  pytorch" in text
    assert f"  deepspeed_shm_comm  built (warm) in {tmp_path}" in text
    assert re.search(rf"^  torch +{re.escape(torch.__version__)}$", text, re.M)
