"""`piip6b plan`: the estimator's arithmetic, its replay of ZeRO-3's gathers, its choice, its CLI, and
its state, communication and peak-memory estimates against a real 2-rank ZeRO-3 run of
bench/cpu_sharding.py's mid-sized model."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from piip6b.cli import main as cli_main
from piip6b.engine.sharding import EngineConfig
from piip6b.models import build_from_spec, get_spec
from piip6b.plan import (ActivationFootprint, Cluster, Layout, ParamFootprint, ParamTrace, estimate, make_plan,
                         measure_activations, measure_params, state_memory, zero3_gathers)
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


def test_zero3_replay_keeps_what_is_reused_within_the_distance():
    # Modules 0, 1, 2 (1000, 10, 500 elements; module 1 persistent at threshold 10), called in order.
    trace = ParamTrace(modules=[0, 1, 2], numels=[(1000,), (10,), (500,)], units=[None, None, None])
    order, forward = trace.fetch_order(checkpointing=False)
    assert order == [0, 1, 2, 2, 1, 0] and forward == 3
    # Everything is reused within 1e9 elements: gathered once, in the forward, all whole at the end.
    kept = zero3_gathers(trace, 2, 10, 10**9, False)
    assert (kept.forward, kept.backward, kept.peak_live) == (1500, 0, 1500)
    # Distance 0: every module is released after use and gathered again for the backward.
    released = zero3_gathers(trace, 2, 10, 0, False)
    assert (released.forward, released.backward, released.peak_live) == (1500, 1500, 1000)
    # Module 2's backward follows its forward at once (distance 0 < 1); module 0's comes after
    # 10 + 500 + 500 + 10 = 1020 elements: kept at a distance of 1021, not at 1020.
    assert zero3_gathers(trace, 2, 10, 1, False).backward == 1000
    assert zero3_gathers(trace, 2, 10, 1020, False).backward == 1000
    assert zero3_gathers(trace, 2, 10, 1021, False).backward == 0
    # Padding: 3 ranks partition 1000 elements as 3 x 334, 500 as 3 x 167.
    assert zero3_gathers(trace, 3, 10, 10**9, False).forward == 1002 + 501


def test_checkpointed_units_run_forward_again_inside_the_backward():
    trace = ParamTrace(modules=[0, 1, 2, 3], numels=[(4,), (4,), (4,), (4,)], units=[None, 7, 7, None])
    assert trace.fetch_order(checkpointing=False) == ([0, 1, 2, 3, 3, 2, 1, 0], 4)
    assert trace.fetch_order(checkpointing=True) == ([0, 1, 2, 3, 3, 1, 2, 2, 1, 0], 4)
    released = zero3_gathers(trace, 1 + 1, 0, 0, True)
    assert released.backward == released.forward + 2 * 4  # the recomputed unit gathers once more


def test_trace_of_the_tiny_backbone_covers_every_parameter_once_per_module():
    spec = get_spec("piip_h6b_tiny")
    params = measure_params(spec, EngineConfig().param_persistence_threshold)
    trace = params.trace
    first_calls = {module: call for call, module in reversed(list(enumerate(trace.modules)))}
    assert sum(sum(trace.numels[call]) for call in first_calls.values()) == params.total == sum(params.numels)
    with torch.device("meta"):
        backbone = build_from_spec(spec)
    # The checkpointing units the replay recomputes are the modules regional compilation compiles.
    assert len({u for u in trace.units if u is not None}) == len(backbone.repeated_blocks()) > 0


@pytest.fixture(scope="module")
def two_rank_zero3(tmp_path_factory):
    """bench/cpu_sharding.py's mid-sized case, ZeRO-3 on 2 gloo ranks, 3 steps (2 steady)."""
    out = tmp_path_factory.mktemp("sharding") / "sharding.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "cpu_sharding.py"), "--worlds", "2", "--stages", "3",
                           "--steps", "3", "--no-extras", "--json", str(out)],
                          env=child_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())
    bench = _cpu_sharding_bench()
    params = measure_params(bench.mid_spec(), EngineConfig().param_persistence_threshold, 256)
    assert params.total == row["params"]
    return row, params


@pytest.mark.timeout(450)
def test_state_estimate_matches_two_rank_zero3_measurement(two_rank_zero3):
    row, params = two_rank_zero3
    estimated = state_memory(params, stage=3, world=2)
    assert abs(estimated["params"] - row["model_bytes"]) / row["model_bytes"] < 0.05
    assert abs(estimated["optimizer"] - row["optimizer_bytes"]) / row["optimizer_bytes"] < 0.05


@pytest.mark.timeout(450)
def test_communication_estimate_matches_two_rank_zero3_measurement(two_rank_zero3):
    """Bytes each rank all-gathers and reduce-scatters in a steady step, counted at torch.distributed,
    against the planner's replay of DeepSpeed's gathers (within 10 %; the bench prints both)."""
    row, _ = two_rank_zero3
    planned = row["planned"]["comm"]
    for kind in ("all_gather", "reduce_scatter"):
        assert row["comm"][kind] > 0
        assert abs(planned[kind] - row["comm"][kind]) / row["comm"][kind] < 0.10, (kind, planned, row["comm"])
    # The backward gathers nothing: the whole 67 M model is reused within DeepSpeed's 1e9 elements.
    assert row["comm"]["all_gather"] < 1.1 * 2 * row["params"]


@pytest.mark.timeout(450)
def test_peak_memory_estimate_matches_two_rank_zero3_measurement(two_rank_zero3):
    """The highest phase's RSS growth less the process's non-tensor growth (DeepSpeed's bookkeeping
    objects, library caches: measured at the end) against the planner's allocator peak, within 10 %."""
    row, _ = two_rank_zero3
    measured = row["peak"] - row["non_tensor_bytes"]
    planned = row["planned"]["peak_allocated_bytes"]
    assert abs(planned - measured) / measured < 0.10, (planned, measured, row["phase_peaks"])
