"""Per-rank model + optimizer state, peak RSS and step time under ZeRO-1/2/3 on gloo CPU ranks.

A mid-sized PIIP-H6B look-alike (`mid_spec`: a 640-wide, 8-block 6B-flavour branch 1 and a
256-wide, 6-block ViT-H-flavour branch 2, ~55 M parameters) goes through the trainer's own engine
assembly (`piip6b.engine.build.build_engine`: zero.Init for stage 3, the bf16 cast, the project's
AdamW groups, `deepspeed.initialize`) on the feature task (`piip6b.testing`), with bf16 steps. Each configuration runs in
fresh processes, so peak RSS (ru_maxrss) belongs to it alone. Reported per configuration (mean over
ranks, RSS: the largest rank): parameter + optimizer bytes (`sharding.state_bytes_per_rank`), construction peak RSS above the
pre-construction peak, whole-run peak RSS, and the mean time of the steps after the first.

Extras (ZeRO-3, 2 ranks): construction without zero.Init, and a persistence threshold that keeps
the whole ViT-H-like branch resident on every rank (PERSIST_H_BRANCH) against the default.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_sharding.py [--worlds 1 2 4] [--stages 1 2 3]
        [--steps 4] [--no-extras] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from piip6b.models import PIIPSpec  # noqa: E402
from piip6b.models.interaction import InteractionSpec  # noqa: E402
from piip6b.models.presets import INTERNVIT_6B, VIT_H  # noqa: E402


# Largest ViT-H-like tensor is fc1/fc2 (256 × 1024 = 262,144 elements); the smallest 6B-like matrix
# is attn.proj (640 × 640 = 409,600). A threshold between them persists exactly the small branch
# (and the interaction tensors of that size), nothing of the big one.
PERSIST_H_BRANCH = 300_000


def mid_spec() -> PIIPSpec:
    """PIIP-H6B's topology at CPU scale: same block flavours, uneven groups, cls slots."""
    six_b = dataclasses.replace(INTERNVIT_6B, name="internvit_6b_mid", embed_dim=640, depth=8, num_heads=10,
                                mlp_dim=2560, drop_path_rate=0.0)
    vit_h = dataclasses.replace(VIT_H, name="vit_h_mae_mid", embed_dim=256, depth=6, num_heads=4, mlp_dim=1024,
                                drop_path_rate=0.0)
    return PIIPSpec(branches=(six_b, vit_h), img_sizes=(128, 256),
                    groups=(((0, 1), (2, 3), (4, 5), (6, 7)), ((0, 0), (1, 2), (3, 3), (4, 5))),
                    interaction=InteractionSpec(heads=8, drop_path_rate=0.0))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank_main(run: dict, out_dir: str) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    from piip6b import dist
    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.engine import distributed, sharding
    from piip6b.engine.build import build_engine
    from piip6b.models import build_from_spec
    from piip6b.testing import FeatureTask, tiny_experiment

    env = distributed.init_distributed()
    size = mid_spec().img_sizes[-1]
    cfg = build_dataclass(ExperimentConfig, tiny_experiment(
        out_dir, data={"batch_size": 1}, optim={"lr": 1e-4, "layer_decay": 1.0, "clip_grad_norm": 0.0},
        engine={"zero_stage": run["stage"], "bf16": True, "zero_init": run["zero_init"],
                "param_persistence_threshold": run["threshold"]}, seed=0))
    construction: dict[str, int] = {}

    def build_backbone() -> torch.nn.Module:
        construction["before"] = _peak_rss()
        backbone = build_from_spec(mid_spec(), attn_backend="sdpa")
        construction["after"] = _peak_rss()
        return backbone

    built = build_engine(cfg, FeatureTask(size=size), env, build_backbone=build_backbone)
    engine = built.engine
    generator = torch.Generator().manual_seed(env.rank)
    times, losses = [], []
    for _ in range(run["steps"]):
        images = torch.randn(1, 3, size, size, generator=generator)
        start = time.perf_counter()
        loss = sum(engine({"images": images}).values())
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    state = sharding.state_bytes_per_rank(engine)
    result = {"rank": env.rank, **state, "construction_peak_rss": construction["after"] - construction["before"],
              "peak_rss": _peak_rss(), "step_s": times[1:] or times, "losses": losses,
              "params": sum(dist.full_numel(p) for p in built.backbone.parameters())}
    Path(out_dir, f"rank{env.rank}.json").write_text(json.dumps(result))
    distributed.teardown(engine)
    return 0


def measure(run: dict) -> dict:
    """Run one configuration in `run["world"]` fresh local ranks; aggregate the ranks' figures."""
    from piip6b.engine.distributed import spawn_local

    with tempfile.TemporaryDirectory(prefix="bench_sharding_") as out_dir:
        code = spawn_local(run["world"], _rank_main, (run, out_dir))
        ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    if code != 0 or len(ranks) != run["world"]:
        raise RuntimeError(f"configuration {run} failed (exit code {code}, {len(ranks)} rank results)")
    return {**run,
            "params": ranks[0]["params"],
            **{key: int(statistics.mean(r[key] for r in ranks))
               for key in ("model_bytes", "optimizer_bytes", "total_bytes")},
            "construction_peak_rss": max(r["construction_peak_rss"] for r in ranks),
            "peak_rss": max(r["peak_rss"] for r in ranks),
            "step_s": statistics.mean(t for r in ranks for t in r["step_s"]),
            "first_loss": ranks[0]["losses"][0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (first untimed)")
    parser.add_argument("--no-extras", action="store_true", help="skip the zero.Init-off and persistence runs")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from piip6b.engine.sharding import EngineConfig

    default_threshold = EngineConfig().param_persistence_threshold
    runs = [{"label": f"ZeRO-{stage}", "stage": stage, "world": world, "zero_init": True,
             "threshold": default_threshold, "steps": args.steps}
            for stage in args.stages for world in args.worlds]
    if not args.no_extras:
        base = {"stage": 3, "world": 2, "steps": args.steps}
        runs += [{**base, "label": "ZeRO-3, no zero.Init", "zero_init": False, "threshold": default_threshold},
                 {**base, "label": "ZeRO-3, H branch persistent", "zero_init": True, "threshold": PERSIST_H_BRANCH}]
    started = time.time()
    rows = []
    mib = 2**20
    print(f"{'configuration':<30}{'ranks':>6}{'model MiB':>11}{'optim MiB':>11}{'state MiB':>11}"
          f"{'construct MiB':>15}{'peak RSS MiB':>14}{'step s':>8}", flush=True)
    for run in runs:
        row = measure(run)
        rows.append(row)
        print(f"{row['label']:<30}{row['world']:>6}{row['model_bytes'] / mib:>11.1f}{row['optimizer_bytes'] / mib:>11.1f}"
              f"{row['total_bytes'] / mib:>11.1f}{row['construction_peak_rss'] / mib:>15.1f}"
              f"{row['peak_rss'] / mib:>14.1f}{row['step_s']:>8.2f}", flush=True)
    print(f"parameters: {rows[0]['params']:,}; wall {time.time() - started:.0f} s")
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
