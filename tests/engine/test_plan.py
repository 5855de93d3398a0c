"""`piip6b plan`: the estimator's arithmetic, its choice, its CLI, and its state estimate against a
real 2-rank ZeRO-3 run of bench/cpu_sharding.py's mid-sized model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from piip6b.cli import main as cli_main
from piip6b.engine.sharding import EngineConfig
from piip6b.models import get_spec
from piip6b.plan import (ActivationFootprint, Cluster, Layout, ParamFootprint, estimate, make_plan,
                         measure_activations, measure_params, state_memory)
from piip6b.testing import REPO, child_env


def _cpu_sharding_bench():
    spec = importlib.util.spec_from_file_location("cpu_sharding", REPO / "bench" / "cpu_sharding.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zero_stages_shrink_state_and_zero3_halves_at_2_ranks():
    params = ParamFootprint(total=10_000_000, persistent=20_000, largest_module=1_000_000)
    per_stage = {s: sum(state_memory(params, s, world=8).values()) for s in (1, 2, 3)}
    assert per_stage[1] > per_stage[2] > per_stage[3]
    one, two = (state_memory(params, 3, world=w) for w in (1, 2))
    ratio = (two["params"] + two["optimizer"]) / (one["params"] + one["optimizer"])
    assert ratio <= 0.55  # the goal for per-rank state at 2 ranks
    hpz = state_memory(params, 3, world=16, hpz_group=8)
    assert hpz["params"] - state_memory(params, 3, world=16)["params"] == 2 * params.total // 8


def test_checkpointing_keeps_fewer_activations_and_batch_scales_them():
    acts = measure_activations(get_spec("piip_h6b_tiny"))
    assert acts.unit_saved and all(v > 0 for v in acts.unit_saved.values())
    assert acts.outside_units > 0
    assert acts.checkpointed() < acts.checkpointed(interactions=False) < acts.total
    params = measure_params(get_spec("piip_h6b_tiny"), EngineConfig().param_persistence_threshold)
    cluster = Cluster(gpus=2, gpu_mem_gib=80)
    one, four = (estimate(params, acts, 1e9, Layout(3), cluster, batch) for batch in (1, 4))
    assert four.memory["activations"] == 4 * one.memory["activations"]


def test_hpz_moves_the_backward_gather_inside_the_node():
    params = ParamFootprint(total=7_000_000_000, persistent=4_000_000, largest_module=41_000_000)
    acts = ActivationFootprint(total=10**9, outside_units=10**8, unit_saved={}, unit_inputs={})
    cluster = Cluster(gpus=32, gpu_mem_gib=80, nodes=4)
    plain, hpz = (estimate(params, acts, 1e13, Layout(3, hpz=h), cluster, 2) for h in (False, True))
    assert hpz.comm_inter_bytes < plain.comm_inter_bytes and hpz.comm_intra_bytes > 0
    assert hpz.comm_s < plain.comm_s
    assert hpz.memory["params"] > plain.memory["params"]


def test_recommendation_fits_and_is_fastest_of_those_that_fit():
    plan = make_plan(get_spec("piip_h6b_tiny"), Cluster(gpus=4, gpu_mem_gib=4, nodes=2))
    assert {e.layout.name for e in plan.estimates} >= {"ZeRO-1", "ZeRO-3+hpZ", "ZeRO-3, ckpt"}
    assert plan.recommended is not None and plan.recommended.fits
    fastest = min(e.step_s for e in plan.estimates if e.fits)
    assert plan.recommended.step_s <= fastest * 1.001
    tight = make_plan(get_spec("piip_h6b_tiny"), Cluster(gpus=1, gpu_mem_gib=1))  # under the fixed overhead
    assert tight.recommended is None


def test_cli_prints_json_and_rejects_bad_cluster(capsys):
    assert cli_main(["plan", "--preset", "piip_h6b_tiny", "--gpus", "2", "--gpu-mem", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] and out["params"] > 0
    assert {e["stage"] for e in out["estimates"]} == {1, 2, 3}
    assert cli_main(["plan", "--preset", "piip_h6b_tiny", "--gpus", "3", "--gpu-mem", "8", "--nodes", "2"]) == 2
    assert "do not split evenly over 2 nodes" in capsys.readouterr().err
    assert cli_main(["plan", "--preset", "piip_h6x", "--gpus", "2", "--gpu-mem", "8"]) == 2
    assert "unknown backbone preset" in capsys.readouterr().err


@pytest.mark.timeout(240)
def test_state_estimate_matches_two_rank_zero3_measurement(tmp_path):
    """bench/cpu_sharding.py's mid-sized case, ZeRO-3 on 2 gloo ranks: the estimator's parameters +
    optimizer state per rank against what the real engine holds."""
    out = tmp_path / "sharding.json"
    env = child_env()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_sharding.py"), "--worlds", "2", "--stages", "3",
                           "--steps", "1", "--no-extras", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    bench = _cpu_sharding_bench()
    params = measure_params(bench.mid_spec(), EngineConfig().param_persistence_threshold)
    assert params.total == row["params"]
    estimated = state_memory(params, stage=3, world=2)
    assert abs(estimated["params"] - row["model_bytes"]) / row["model_bytes"] < 0.05
    assert abs(estimated["optimizer"] - row["optimizer_bytes"]) / row["optimizer_bytes"] < 0.05
