"""`piip6b eval CONFIG [key=value ...] --weights PATH [--nproc N] [--out metrics.json]
[--out-predictions predictions.json]`

Evaluates a finished model on the config's validation split (see `piip6b.evaluate`). PATH is an
exported model file (`piip6b export RUN_DIR --out model.safetensors`), a checkpoint folder
(`.../checkpoints/step_N`), or a run dir (its newest complete checkpoint). `--out` gets the summary
metrics with the per-class values under "per_class" (null: not applicable); `--out-predictions`
(detection) gets every prediction as a COCO results file (boxes, scores, category ids, RLE masks).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML the model was trained with (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. data.root=/data/coco")
    parser.add_argument("--weights", required=True, metavar="PATH",
                        help="exported .safetensors, a checkpoint folder, or a run dir")
    parser.add_argument("--nproc", type=int, default=None, help="start this many local ranks")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--out-predictions", type=Path, default=None, metavar="FILE",
                        help="detection: write the predictions to FILE as COCO results JSON")


def run(args: argparse.Namespace) -> int:
    from piip6b.evaluate import start

    return start(args.config, args.overrides, args.weights, args.nproc, args.out, args.out_predictions)
