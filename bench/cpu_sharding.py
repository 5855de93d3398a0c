"""Per-rank state, communication, peak memory and step time under ZeRO-1/2/3 on gloo CPU ranks,
side by side with what `piip6b.plan` estimates for the same run.

A mid-sized PIIP-H6B look-alike (`mid_spec`: a 640-wide, 8-block 6B-flavour branch 1 and a
256-wide, 6-block ViT-H-flavour branch 2, 67 M parameters; `--width/--depth` widen branch 1) goes
through the trainer's own engine assembly (`piip6b.engine.build.build_engine`: zero.Init for stage
3, the bf16 cast, the project's AdamW groups, `deepspeed.initialize`) on the feature task
(`piip6b.testing`), batch 1, bf16 steps. Each configuration runs in fresh processes. Reported per
configuration (mean over ranks; memory: the largest rank):
- state: parameter + optimizer bytes (`sharding.state_bytes_per_rank`);
- communication: payload bytes per collective kind of one steady-state step (the first step
  records DeepSpeed's module trace and gathers differently), counted at torch.distributed
  (`piip6b.testing.CollectiveCounter`);
- memory (`piip6b.testing.RSSSampler`, 2 ms sampling): RSS growth over the RSS before the model
  is built, peak of the construction and of each phase of the steady steps (forward, backward,
  optimizer step), and the part of the final RSS that is not tensor storage (Python objects,
  DeepSpeed's per-parameter bookkeeping, library caches), so the peak can be set against the
  planner's tensor bytes. The ranks run with `MALLOC_MMAP_THRESHOLD_=131072` unless
  `--glibc-default`: glibc otherwise serves blocks below its adaptive threshold (up to 32 MiB)
  from the heap and keeps them after they are freed, so RSS would not follow the tensors.

Extras (ZeRO-3, 2 ranks): construction without zero.Init, and a persistence threshold that keeps
the whole ViT-H-like branch resident on every rank (PERSIST_H_BRANCH) against the default.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_sharding.py [--worlds 1 2 4] [--stages 1 2 3]
        [--steps 3] [--no-extras] [--width 640 --depth 8] [--glibc-default] [--set engine.KEY=VALUE]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from piip6b.models import PIIPSpec  # noqa: E402
from piip6b.models.interaction import InteractionSpec  # noqa: E402
from piip6b.models.presets import INTERNVIT_6B, VIT_H  # noqa: E402


# Largest ViT-H-like tensor is fc1/fc2 (256 × 1024 = 262,144 elements); the smallest 6B-like matrix
# is attn.proj (640 × 640 = 409,600). A threshold between them persists exactly the small branch
# (and the interaction tensors of that size), nothing of the big one.
PERSIST_H_BRANCH = 300_000


def mid_spec(width: int = 640, depth: int = 8) -> PIIPSpec:
    """PIIP-H6B's topology at CPU scale: same block flavours, uneven groups, cls slots. `width` and
    `depth` (a multiple of 4) size the 6B-flavour branch (the 622 M look-alike: 1600, 16)."""
    if depth % 4:
        raise ValueError(f"depth must be a multiple of 4 (four interaction groups), got {depth}")
    six_b = dataclasses.replace(INTERNVIT_6B, name="internvit_6b_mid", embed_dim=width, depth=depth,
                                num_heads=width // 64, mlp_dim=4 * width, drop_path_rate=0.0)
    vit_h = dataclasses.replace(VIT_H, name="vit_h_mae_mid", embed_dim=256, depth=6, num_heads=4, mlp_dim=1024,
                                drop_path_rate=0.0)
    per_group = depth // 4
    groups_6b = tuple((g * per_group, (g + 1) * per_group - 1) for g in range(4))
    return PIIPSpec(branches=(six_b, vit_h), img_sizes=(128, 256),
                    groups=(groups_6b, ((0, 0), (1, 2), (3, 3), (4, 5))),
                    interaction=InteractionSpec(heads=8, drop_path_rate=0.0))


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage the garbage collector can reach."""
    import gc

    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if storage.data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _rank_main(run: dict, out_dir: str) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    from piip6b.testing import CollectiveCounter, RSSSampler

    counter = CollectiveCounter().install()  # before DeepSpeed's backend keeps torch's functions
    sampler = RSSSampler().start()
    from piip6b import dist
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.engine import distributed, sharding
    from piip6b.engine.build import build_engine
    from piip6b.models import build_from_spec
    from piip6b.testing import FeatureTask, tiny_experiment

    env = distributed.init_distributed()
    spec = mid_spec(run["width"], run["depth"])
    size = spec.img_sizes[-1]
    cfg = build_dataclass(ExperimentConfig, tiny_experiment(
        out_dir, data={"batch_size": 1},
        optim={"lr": 1e-4, "layer_decay": 1.0, "clip_grad_norm": 0.0, **run["optim"]},
        engine={"zero_stage": run["stage"], "bf16": True, "zero_init": run["zero_init"],
                "param_persistence_threshold": run["threshold"], **run["engine"]}, seed=0))
    before_build, live_before = sampler.rss(), _live_tensor_bytes()

    def build_backbone() -> torch.nn.Module:
        sampler.phase("construct")
        backbone = build_from_spec(spec, attn_backend="sdpa")
        sampler.phase("engine")
        return backbone

    built = build_engine(cfg, FeatureTask(size=size), env, build_backbone=build_backbone)
    engine = built.engine
    generator = torch.Generator().manual_seed(env.rank)
    times, losses, comm = [], [], []
    for step in range(run["steps"]):
        images = torch.randn(1, 3, size, size, generator=generator)
        sent = counter.snapshot()
        start = time.perf_counter()
        sampler.phase(f"forward{step}")
        loss = sum(engine({"images": images}).values())
        sampler.phase(f"backward{step}")
        engine.backward(loss)
        sampler.phase(f"step{step}")
        engine.step()
        times.append(time.perf_counter() - start)
        sampler.phase("after")
        losses.append(float(loss.detach()))
        comm.append({kind: value - sent.get(kind, 0) for kind, value in counter.snapshot().items()})
    peaks = sampler.stop()
    end_rss = sampler.rss()
    live = _live_tensor_bytes()
    steady = range(1, run["steps"]) if run["steps"] > 1 else range(run["steps"])
    state = sharding.state_bytes_per_rank(engine)
    result = {"rank": env.rank, **state, "losses": losses, "step_s": [times[i] for i in steady],
              "params": sum(dist.full_numel(p) for p in built.backbone.parameters()),
              "comm": {kind: statistics.mean(comm[i].get(kind, 0) for i in steady)
                       for kind in sorted({k for c in comm for k in c})},
              "construction_peak": peaks.get("construct", 0) - before_build,
              "phase_peaks": {phase: max(peaks.get(f"{phase}{i}", 0) for i in steady) - before_build
                              for phase in ("forward", "backward", "step")},
              "non_tensor_bytes": (end_rss - before_build) - (live - live_before)}
    result["peak"] = max(result["phase_peaks"].values())
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    distributed.teardown(engine)
    return 0


def planned(run: dict) -> dict:
    """What `piip6b.plan` estimates for this run's model, stage, ranks and engine settings."""
    from piip6b.engine.sharding import EngineConfig
    from piip6b.plan import Cluster, Layout, estimate, measure_activations, measure_params

    spec = mid_spec(run["width"], run["depth"])
    size = spec.img_sizes[-1]
    engine = EngineConfig(zero_stage=run["stage"], param_persistence_threshold=run["threshold"], **run["engine"])
    params = measure_params(spec, run["threshold"], size)
    result = estimate(params, measure_activations(spec, size), 0.0, Layout(run["stage"]),
                      Cluster(gpus=run["world"], gpu_mem_gib=1024), batch_per_gpu=1, engine=engine,
                      fused_optimizer=run["optim"].get("fused", True) is not False)
    return {"state_bytes": result.state_bytes, "memory": result.memory,
            "peak_allocated_bytes": result.peak_allocated_bytes,
            "comm": {"all_gather": result.comm.all_gather, "reduce_scatter": result.comm.reduce_scatter,
                     "all_reduce": result.comm.all_reduce}}


def measure(run: dict) -> dict:
    """Run one configuration in `run["world"]` fresh local ranks; aggregate the ranks' figures."""
    from piip6b.engine.distributed import spawn_local

    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as out_dir:
        code = spawn_local(run["world"], _rank_main, (run, out_dir))
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    if code != 0 or len(ranks) != run["world"]:
        raise RuntimeError(f"configuration {run} failed (exit code {code}, {len(ranks)} rank results)")
    kinds = sorted({k for r in ranks for k in r["comm"]})
    return {**run,
            "params": ranks[0]["params"],
            **{key: int(statistics.mean(r[key] for r in ranks))
               for key in ("model_bytes", "optimizer_bytes", "total_bytes")},
            "comm": {k: statistics.mean(r["comm"].get(k, 0) for r in ranks) for k in kinds},
            "construction_peak": max(r["construction_peak"] for r in ranks),
            "phase_peaks": {p: max(r["phase_peaks"][p] for r in ranks) for p in ranks[0]["phase_peaks"]},
            "peak": max(r["peak"] for r in ranks),
            "non_tensor_bytes": max(r["non_tensor_bytes"] for r in ranks),
            "step_s": statistics.median(t for r in ranks for t in r["step_s"]),
            "first_loss": ranks[0]["losses"][0],
            "planned": planned(run)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (first untimed)")
    parser.add_argument("--width", type=int, default=640, help="width of the 6B-flavour branch")
    parser.add_argument("--depth", type=int, default=8, help="blocks of the 6B-flavour branch (multiple of 4)")
    parser.add_argument("--no-extras", action="store_true", help="skip the zero.Init-off and persistence runs")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds alone")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an engine.* or optim.* setting for every run, e.g. engine.sub_group_size=1e9")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.glibc_default:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # read by the ranks' glibc at start
    from piip6b.engine.sharding import EngineConfig

    default_threshold = EngineConfig().param_persistence_threshold
    settings: dict[str, dict] = {"engine": {}, "optim": {}}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in settings or not name or not _:
            parser.error(f"--set {item!r}: expected engine.KEY=VALUE or optim.KEY=VALUE")
        settings[section][name] = yaml.safe_load(value)
    model = {"width": args.width, "depth": args.depth, "steps": args.steps, **settings}
    runs = [{"label": f"ZeRO-{stage}", "stage": stage, "world": world, "zero_init": True,
             "threshold": default_threshold, **model}
            for stage in args.stages for world in args.worlds]
    if not args.no_extras:
        base = {"stage": 3, "world": 2, **model}
        runs += [{**base, "label": "ZeRO-3, no zero.Init", "zero_init": False, "threshold": default_threshold},
                 {**base, "label": "ZeRO-3, H branch persistent", "zero_init": True, "threshold": PERSIST_H_BRANCH}]
    started = time.time()
    rows = []
    mib = 2**20
    print(f"{'configuration':<28}{'ranks':>6}{'state':>8}{'plan':>8}{'constr':>8}{'fwd':>7}{'bwd':>7}{'step':>7}"
          f"{'other':>7}{'peak-oth':>9}{'plan':>7}  {'AG MB':>8}{'plan':>8}{'RS MB':>8}{'plan':>8}"
          f"{'AR MB':>8}{'plan':>8}{'step s':>8}", flush=True)
    for run in runs:
        row = measure(run)
        rows.append(row)
        plan, phases, comm = row["planned"], row["phase_peaks"], row["comm"]
        print(f"{row['label']:<28}{row['world']:>6}{row['total_bytes'] / mib:>8.0f}{plan['state_bytes'] / mib:>8.0f}"
              f"{row['construction_peak'] / mib:>8.0f}{phases['forward'] / mib:>7.0f}{phases['backward'] / mib:>7.0f}"
              f"{phases['step'] / mib:>7.0f}{row['non_tensor_bytes'] / mib:>7.0f}"
              f"{(row['peak'] - row['non_tensor_bytes']) / mib:>9.0f}{plan['peak_allocated_bytes'] / mib:>7.0f}  "
              + "".join(f"{comm.get(k, 0) / 1e6:>8.1f}{plan['comm'][k] / 1e6:>8.1f}"
                        for k in ("all_gather", "reduce_scatter", "all_reduce"))
              + f"{row['step_s']:>8.2f}", flush=True)
    print(f"parameters: {rows[0]['params']:,}; wall {time.time() - started:.0f} s")
    print("(MiB per rank: state = parameters + optimizer; constr/fwd/bwd/step = peak RSS growth over the RSS "
          "before the model was built; other = the part of the final RSS growth that is not tensors; "
          "peak-oth = the highest phase less other, against the planner's allocated peak. MB per rank and "
          "steady step: payload of all-gathers, reduce-scatters, all-reduces)")
    for stage in args.stages:
        single = next((r for r in rows if r["label"] == f"ZeRO-{stage}" and r["world"] == 1), None)
        double = next((r for r in rows if r["label"] == f"ZeRO-{stage}" and r["world"] == 2), None)
        if single and double:
            ratio = double["total_bytes"] / single["total_bytes"]
            print(f"ZeRO-{stage}: state per rank at 2 ranks / 1 rank = {ratio:.3f} (goal <= 0.55)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
