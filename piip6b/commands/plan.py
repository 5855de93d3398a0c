"""`piip6b plan --preset P --gpus N --gpu-mem GB [--nodes M]`: per-GPU memory, communication per
step and a recommended ZeRO layout, estimated on the meta device (no GPU needed)."""

from __future__ import annotations

import argparse
import json

from piip6b.models import get_spec, list_presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, help=f"one of: {', '.join(list_presets())}")
    parser.add_argument("--gpus", type=int, required=True, help="total GPUs (data-parallel ranks)")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB, e.g. 80")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    parser.add_argument("--img-sizes", type=int, nargs="+", help="per-branch input sizes, branch 1 first")
    parser.add_argument("--input", type=int, help="square training input side (default: the largest branch size)")
    parser.add_argument("--batch", type=int, default=2, help="images per GPU per micro-batch (default 2)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--persistence-threshold", type=int,
                        help="ZeRO-3 param persistence threshold (default: engine config's)")
    parser.add_argument("--inter-node-gbs", type=float, default=25.0, help="GB/s per GPU between nodes")
    parser.add_argument("--intra-node-gbs", type=float, default=150.0, help="GB/s per GPU inside a node")
    parser.add_argument("--tflops", type=float, default=300.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from piip6b.engine.plan import Cluster, format_plan, make_plan
    from piip6b.engine.sharding import EngineConfig

    for name in ("gpus", "batch", "grad_accum"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        spec = get_spec(args.preset, args.img_sizes)
        cluster = Cluster(args.gpus, args.gpu_mem, args.nodes, args.inter_node_gbs, args.intra_node_gbs, args.tflops)
    except (KeyError, ValueError) as error:
        raise SystemExit(f"piip6b plan: {error.args[0]}") from None
    if args.input is not None and args.input % spec.size_divisor:
        raise SystemExit(f"--input {args.input} must be a multiple of {spec.size_divisor} for {args.preset}")
    engine = EngineConfig()
    if args.persistence_threshold is not None:
        engine = EngineConfig(param_persistence_threshold=args.persistence_threshold)
    plan = make_plan(spec, cluster, args.batch, args.input, args.grad_accum, engine)
    if args.json:
        print(json.dumps({
            "preset": args.preset, "params": plan.params.total, "persistent_params": plan.params.persistent,
            "activation_bytes_per_image": plan.activations.total,
            "activation_bytes_per_image_checkpointed": plan.activations.checkpointed(),
            "estimates": [{"layout": e.layout.name, "stage": e.layout.stage, "hpz": e.layout.hpz,
                           "checkpointing": e.layout.checkpointing, "memory_bytes": e.memory,
                           "total_bytes": e.total_bytes, "fits": e.fits, "comm_inter_bytes": e.comm_inter_bytes,
                           "comm_intra_bytes": e.comm_intra_bytes, "comm_s": e.comm_s, "step_s": e.step_s}
                          for e in plan.estimates],
            "recommended": plan.recommended.layout.name if plan.recommended else None,
        }))
    else:
        print(format_plan(plan))
    return 0 if plan.recommended is not None else 1
