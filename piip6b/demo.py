"""The embedded default job: Mask R-CNN on a tiny PIIP-H6B, trained on the synthetic shapes data.

Writes the shapes data set if it is not there yet, then trains through `piip6b.train` itself (N local
ranks, ZeRO-3, bf16, periodic checkpoints, TensorBoard) and evaluates box and mask AP at the end.
Nothing here is demo-only machinery: the config is `configs/tiny/shapes_demo.yaml`, and
`piip6b train` with that file does the same run. Running it again on the same `out` resumes that
run (or, when it has finished, says so and prints its summary again).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path("configs") / "tiny" / "shapes_demo.yaml"
DEFAULT_DATA = Path("data") / "shapes"
DEFAULT_OUT = Path("runs") / "demo"


def _default_config() -> Path:
    # The configs ship beside the package in the repository (editable install), not inside it.
    import piip6b

    for root in (Path(piip6b.__file__).resolve().parents[1], Path.cwd()):
        if (root / DEMO_CONFIG).is_file():
            path = root / DEMO_CONFIG
            return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    raise FileNotFoundError(f"cannot find {DEMO_CONFIG} next to the piip6b package or in the current "
                            "folder; run from the repository root or pass --config PATH")


def _ensure_dataset(folder: Path) -> Path:
    """Reuse any complete shapes data set in `folder` (whatever its size); write the default one
    into a missing or empty folder; refuse to touch a folder holding anything else."""
    from piip6b.tasks.data.shapes import ShapesSpec, is_complete, write_shapes_dataset

    if is_complete(folder):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"--data {folder} is not empty and holds no complete shapes data set; "
                              f"point --data at another folder (or remove this one)")
    spec = ShapesSpec()
    print(f"writing the shapes data set ({spec.num_train} train + {spec.num_val} val images) to {folder} ...",
          flush=True)
    return write_shapes_dataset(folder, spec)


def _final_metrics(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(last training row, last evaluation row) from the run's metrics.jsonl."""
    train_row: dict[str, float] = {}
    eval_row: dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("eval/") for k in row):
                eval_row = row
            elif "loss" in row:
                train_row = row
    return train_row, eval_row


def _summary(run_dir: Path, config: Path, data_root: Path, wall_s: float, train_row: dict, eval_row: dict) -> str:
    from piip6b.engine.checkpoint import CheckpointManager

    checkpoints = [p.name for p in CheckpointManager(run_dir).complete_checkpoints()]
    events = sorted((run_dir / "tb").glob("events.out.tfevents.*")) if (run_dir / "tb").is_dir() else []
    lines = [
        "",
        f"demo finished in {wall_s / 60:.1f} min; run dir {run_dir}",
        f"  training:    step {int(train_row.get('step', 0))}, loss {train_row.get('loss', float('nan')):.3f}",
    ]
    if eval_row:
        lines.append(
            f"  evaluation:  box AP {eval_row['eval/bbox/AP']:.1f} (AP50 {eval_row['eval/bbox/AP50']:.1f}), "
            f"mask AP {eval_row['eval/segm/AP']:.1f} (AP50 {eval_row['eval/segm/AP50']:.1f}) "
            f"on {int(eval_row.get('eval/num_images', 0))} val images"
        )
    lines += [
        f"  checkpoints: {', '.join(checkpoints) or 'none'} in {run_dir / 'checkpoints'}",
        f"  TensorBoard: {len(events)} event file(s); open with  tensorboard --logdir {run_dir / 'tb'}",
        f"  evaluate again:  piip6b eval {config} data.root={data_root} --weights {run_dir}",
        f"  export weights:  piip6b export {run_dir} --out {run_dir / 'model.safetensors'}",
    ]
    return "\n".join(lines)


def run_demo(out: Path = DEFAULT_OUT, *, steps: int | None = None, nproc: int = 2, data: Path = DEFAULT_DATA,
             config: Path | None = None, overrides: list[str] = ()) -> int:
    """Write the data if needed, train, print a summary; returns the exit code."""
    from piip6b.train import start

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    config = config or _default_config()
    data = _ensure_dataset(data)
    run_overrides = [f"run_dir={out}", f"data.root={data / 'coco'}"]
    if steps is not None:
        run_overrides.append(f"schedule.max_iters={steps}")
    run_overrides += list(overrides)  # the user's own overrides win

    started = time.perf_counter()
    code = start(str(config), run_overrides, nproc)
    wall_s = time.perf_counter() - started
    if code != 0:
        print(f"piip6b demo: training exited with code {code}; its log is above, and whatever it saved "
              f"is in {out}", file=sys.stderr)
        return code
    train_row, eval_row = _final_metrics(out)
    print(_summary(out, config, data / "coco", wall_s, train_row, eval_row), flush=True)
    if not eval_row:
        print(f"piip6b demo: no evaluation result in {out / 'metrics.jsonl'}", file=sys.stderr)
        return 1
    return 0
