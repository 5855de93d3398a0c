"""Regional compilation under ZeRO-3 on CPU ranks: same losses and gradients as eager? How many
graphs, graph breaks, recompiles, and how long?

The tiny PIIP-H6B on the feature task (`piip6b.testing`), built by `build_engine` with ZeRO-3, bf16
and activation checkpointing of every block and injector (the recipes' settings), runs `--steps`
optimizer steps on 2 gloo ranks, once eagerly and once with `performance.compile: blocks`. Input
sides cycle through `--sizes` (the detection recipe's inputs vary in size). Printed: per step the
loss and global gradient norm of both runs and their largest difference, dynamo's counters
(graphs after each step, graph breaks by reason), the first step's time (compilation) and the
median of the later steps. Timings on a shared CPU say nothing about a GPU; bench/gpu_step.py
--compile measures that.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_compile.py [--backend inductor|aot_eager]
        [--steps 4] [--sizes 64 96] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rank_main(compile_mode: str, backend: str, steps: int, sizes: list[int], run_dir: str) -> dict:
    """One rank (a `piip6b.testing.run_ranks` target): build, train `steps` steps, report."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch
    from torch._dynamo.utils import counters

    from piip6b.config import ExperimentConfig, build_dataclass
    from piip6b.engine import distributed
    from piip6b.engine.build import build_engine
    from piip6b.testing import FeatureTask, tiny_experiment

    env = distributed.init_distributed()
    cfg = build_dataclass(ExperimentConfig, tiny_experiment(
        run_dir, model={"preset": "piip_h6b_tiny", "img_sizes": [32, 64], "grad_checkpointing": 1,
                        "checkpoint_interactions": True},
        performance={"compile": compile_mode, "compile_backend": backend}))
    counters.clear()
    built = build_engine(cfg, FeatureTask(size=max(sizes)), env)
    engine = built.engine
    generator = torch.Generator().manual_seed(100 + env.rank)
    losses, norms, times, graphs = [], [], [], []
    for step in range(steps):
        size = sizes[step % len(sizes)]
        images = torch.randn(cfg.data.batch_size, 3, size, size, generator=generator)
        start = time.perf_counter()
        loss = sum(engine({"images": images}).values())
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
        norms.append(float(engine.get_global_grad_norm()))
        graphs.append(counters["stats"].get("unique_graphs", 0))
    # Graphs compiled after the first step are recompilations (a new input size, a new grad mode).
    result = {"losses": losses, "grad_norms": norms, "step_s": times, "graphs_after_step": graphs,
              "unique_graphs": graphs[-1], "graph_breaks": dict(counters["graph_break"]),
              "recompiles": graphs[-1] - graphs[0]}
    distributed.teardown(engine)
    return result


def run(compile_mode: str, backend: str, steps: int, sizes: list[int], timeout: float = 1500) -> list[dict]:
    """Both ranks' reports of one run."""
    import importlib

    from piip6b.testing import run_ranks

    # The ranks import `rank_main` by module name (from this file's folder), never as __main__.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    target = importlib.import_module(Path(__file__).stem).rank_main
    with tempfile.TemporaryDirectory(prefix="bench_compile_") as run_dir:
        result = run_ranks(target, compile_mode, backend, steps, sizes, run_dir, nproc=2, timeout=timeout)
    return result.check()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    started = time.time()
    eager = run("none", args.backend, args.steps, args.sizes)
    compiled = run("blocks", args.backend, args.steps, args.sizes)
    report = {"backend": args.backend, "sizes": args.sizes, "eager": eager, "compiled": compiled}
    print(f"{'step':>4}{'size':>6}{'loss eager':>14}{'loss compiled':>15}{'norm eager':>12}{'norm compiled':>15}")
    worst = 0.0
    for rank, (e, c) in enumerate(zip(eager, compiled)):
        for step in range(args.steps):
            size = args.sizes[step % len(args.sizes)]
            worst = max(worst, abs(e["losses"][step] - c["losses"][step]) / abs(e["losses"][step]),
                        abs(e["grad_norms"][step] - c["grad_norms"][step]) / abs(e["grad_norms"][step]))
            if rank == 0:
                print(f"{step:>4}{size:>6}{e['losses'][step]:>14.7g}{c['losses'][step]:>15.7g}"
                      f"{e['grad_norms'][step]:>12.6g}{c['grad_norms'][step]:>15.6g}")
    c0, e0 = compiled[0], eager[0]
    report["worst_relative_difference"] = worst
    print(f"largest relative difference over ranks and steps (loss, grad norm): {worst:.3g}")
    print(f"compiled: {c0['unique_graphs']} graphs (after each step: {c0['graphs_after_step']}), graph breaks "
          f"{c0['graph_breaks'] or 'none'}, {c0['recompiles']} recompiled after the first step; first step {c0['step_s'][0]:.1f} s (eager {e0['step_s'][0]:.1f} s), "
          f"later steps median {statistics.median(c0['step_s'][1:]):.2f} s (eager "
          f"{statistics.median(e0['step_s'][1:]):.2f} s); wall {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
