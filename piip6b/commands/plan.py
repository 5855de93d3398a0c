"""`piip6b plan --preset P --gpus N --gpu-mem GB [--nodes M] [--split]`: per-GPU memory, communication
per step and a recommended layout as config overrides, estimated on the meta device (no GPU needed).
`piip6b check CONFIG --world-size N --gpu-mem GB` plans a whole config's run the same way."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from piip6b.models import list_presets

    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(list_presets())}")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs (data-parallel ranks)")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    parser.add_argument("--img-sizes", type=int, nargs="+", help="per-branch input sizes, branch 1 first")
    parser.add_argument("--input", type=int, help="square training input side (default: the largest branch size)")
    parser.add_argument("--batch", type=int, default=2, help="images per GPU per micro-batch (default 2)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--split", action="store_true",
                        help="choose the micro-batch too: each layout at the largest divisor of "
                             "batch x grad-accum images that fits")
    parser.add_argument("--persistence-threshold", type=int,
                        help="ZeRO-3 param persistence threshold (default: engine config's)")
    parser.add_argument("--inter-node-gbs", type=float, default=25.0, help="GB/s per GPU between nodes")
    parser.add_argument("--intra-node-gbs", type=float, default=150.0, help="GB/s per GPU inside a node")
    parser.add_argument("--tflops", type=float, default=300.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from piip6b.plan import Cluster, format_plan, plan_preset

    cluster = Cluster(args.gpus, args.gpu_mem, args.nodes, args.inter_node_gbs, args.intra_node_gbs, args.tflops)
    plan = plan_preset(args.preset, cluster, img_sizes=args.img_sizes, batch_per_gpu=args.batch,
                       input_size=args.input, grad_accum=args.grad_accum,
                       persistence_threshold=args.persistence_threshold, split=args.split)
    print(json.dumps({"preset": args.preset, **plan.to_dict()}) if args.json else format_plan(plan))
    return 0 if plan.recommended is not None else 1
