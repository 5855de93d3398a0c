"""Peak RSS of a streamed load: does loading a weight file need a second copy of it in memory?

Writes a synthetic InternViT-style release file (torch zip, patch-14 kernel and 16x16 position
grid, so both bicubic resizes run) of about --size-mb, builds the matching branch, and measures
in a fresh process the peak RSS while the (uninitialised) branch is allocated and loaded,
relative to the RSS before allocation. One copy of the weights (the model) is the floor: the figure is ~1.0x when
the loader streams, ~2.0x when file pages pile up next to the model.

    python bench/weights_rss.py --size-mb 300 [--format torch|safetensors] [--keep-pages]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _branch_spec(size_mb: float):
    from piip6b.models.vit import ViTSpec

    dim = 768
    per_block = (12 * dim * dim + 13 * dim) * 4  # qkv, proj, fc1, fc2 (+ small vectors), fp32
    depth = max(1, round(size_mb * 2**20 / per_block))
    return ViTSpec("bench_6b_flavour", dim, depth, 6, 4 * dim, norm="rms", qkv_bias=False, qk_norm=True,
                   layer_scale=0.1, cls_slot=True, pretrain_img_size=224, patch_size=16)


def write_file(path: Path, size_mb: float, fmt: str) -> int:
    import torch

    from piip6b.models.vit import ViTBranch
    from piip6b.weights import save_state_dict

    spec = _branch_spec(size_mb)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ViTBranch(spec).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in shapes.items():
        if name == "pos_embed":
            shape = (1, 1 + 16 * 16, spec.embed_dim)
        elif name == "patch_embed.proj.weight":
            shape = (spec.embed_dim, 3, 14, 14)
        state[name] = torch.randn(shape, generator=gen)
    state["cls_token"] = torch.zeros(1, 1, spec.embed_dim)
    if fmt == "torch":
        torch.save({"module": state}, path)
    else:
        save_state_dict(path, state, {"note": "bench"})
    return path.stat().st_size


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def measure(path: Path, size_mb: float, fmt: str, keep_pages: bool) -> dict:
    """Runs in the child process: allocate the branch, load the file, report RSS figures."""
    import torch

    import piip6b.weights.formats as formats
    from piip6b.models.vit import ViTBranch
    from piip6b.weights import load_pretrained

    if keep_pages:  # the naive behaviour, for contrast: leave every copied page resident
        formats.WeightSource.release = lambda self, tensor: None
    torch.set_num_threads(1)
    spec = _branch_spec(size_mb)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = _rss_bytes()
    # Allocate without initialising (init temporaries would be the model's cost, not the
    # loader's): the destination's pages become resident as the load writes them.
    with torch.device("meta"):
        model = ViTBranch(spec)
    model = model.to_empty(device="cpu")
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    after_alloc = _rss_bytes()
    alloc_peak = _peak_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    load_pretrained(model, path, format="internvit_release", log=None)
    peak = max(_peak_bytes(), alloc_peak)
    load_peak = _peak_bytes()
    # Again into the now-resident model: what a load costs beyond its destination, once the
    # process is warm (lazy imports, allocator arenas): about one tensor.
    settled = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    load_pretrained(model, path, format="internvit_release", log=None)
    warm_transient = _peak_bytes() - settled
    file_bytes = path.stat().st_size
    return {
        "format": fmt, "file_mb": file_bytes / 2**20, "model_mb": model_bytes / 2**20,
        "alloc_mb": (after_alloc - before) / 2**20, "alloc_peak_mb": (alloc_peak - before) / 2**20,
        "load_peak_over_alloc_mb": (load_peak - after_alloc) / 2**20, "peak_over_start_mb": (peak - before) / 2**20,
        "peak_ratio_to_file": (peak - before) / file_bytes, "keep_pages": keep_pages,
        "warm_reload_transient_mb": warm_transient / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=300)
    parser.add_argument("--format", choices=["torch", "safetensors"], default="torch")
    parser.add_argument("--keep-pages", action="store_true", help="disable page dropping (contrast run)")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    parser.add_argument("--_child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        print(json.dumps(measure(args._child, args.size_mb, args.format, args.keep_pages)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("weights.pth" if args.format == "torch" else "weights.safetensors")
        write_file(path, args.size_mb, args.format)
        cmd = [sys.executable, __file__, "--size-mb", str(args.size_mb), "--format", args.format, "--_child", str(path)]
        if args.keep_pages:
            cmd.append("--keep-pages")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"streamed load of a {result['file_mb']:.0f} MiB {result['format']} file "
              f"({'pages kept' if result['keep_pages'] else 'pages dropped'}): model {result['model_mb']:.0f} MiB, "
              f"peak RSS over start {result['peak_over_start_mb']:.0f} MiB = {result['peak_ratio_to_file']:.3f}x file size; "
              f"a reload into the warm model peaks {result['warm_reload_transient_mb']:.1f} MiB over its RSS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
