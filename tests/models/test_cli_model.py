"""`piip6b params` / `piip6b flops` output formats."""

from __future__ import annotations

import json

from piip6b.cli import main


def test_params_json(capsys):
    assert main(["params", "piip_h6b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 7_293_644_290
    assert set(out) >= {"total", "readme_total", "by_part"}
    assert out["by_part"]["branch1"] == 5_903_174_400


def test_params_keys_format(capsys):
    assert main(["params", "internvit6b_baseline_tiny", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    key, shape, numel = lines[0].split("\t")
    assert key == "pos_embed" and shape.startswith("[1, ") and int(numel) > 0


def test_flops_json(capsys):
    assert main(["flops", "internvit6b_baseline", "--input", "1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert abs(out["gflops_readme"] - 29_323) < 293
    assert out["gflops_full"] > out["gflops_readme"]


def test_unknown_preset_is_one_clear_line(capsys):
    assert main(["params", "piip_h7b"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone preset 'piip_h7b'" in err and "piip_h6b" in err and "Traceback" not in err
