"""Parameters and FLOPs of every preset, both conventions, against the PIIP README's tables.

Counts come from `piip6b.models.counting` on the meta device (nothing is allocated). The README
rows are the released-model tables of OpenGVLab/PIIP's README (COCO Mask R-CNN 1x, ADE20K UperNet;
resolutions written largest first there, branch 1 first here) plus the H6B speedup row of docs/SPEC.md
§7. README parameters are rounded to 1 M, so a count within 0.5 M of the printed figure reproduces
it; FLOPs are multiply-accumulates at the largest input, square, compared relative to the README.

    OMP_NUM_THREADS=1 .venv/bin/python bench/fidelity.py [--json out.json] [--only piip_h6b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from piip6b.models import get_spec, list_presets  # noqa: E402
from piip6b.models.counting import count_flops, count_params  # noqa: E402


@dataclass(frozen=True)
class ReadmeRow:
    preset: str
    img_sizes: tuple[int, ...]  # branch 1 (largest model, smallest image) first
    task: str
    params_m: float  # README "#Param", millions (rounded there to 1 M)
    gflops: float  # README "#FLOPs", G multiply-accumulates at the largest input


README_ROWS = (
    ReadmeRow("piip_tsb", (448, 896, 1120), "det", 146, 243),
    ReadmeRow("piip_tsb", (448, 896, 1568), "det", 147, 287),
    ReadmeRow("piip_tsb", (672, 1120, 1568), "det", 149, 453),
    ReadmeRow("piip_sbl", (448, 672, 1120), "det", 493, 727),
    ReadmeRow("piip_sbl", (448, 896, 1344), "det", 495, 1002),
    ReadmeRow("piip_sbl", (672, 896, 1568), "det", 497, 1464),
    # The README's TSBL figures are the paper's model (ViT-T branch 4), not the released one (ViT-S).
    ReadmeRow("piip_tsbl_vit_t", (448, 672, 896, 1344), "det", 506, 755),
    ReadmeRow("piip_tsbl_vit_t", (448, 672, 1120, 1568), "det", 507, 861),
    ReadmeRow("piip_tsbl_vit_t", (448, 1120, 1568, 1792), "det", 512, 1535),
    ReadmeRow("internvit6b_baseline", (1024,), "det", 5919, 29323),
    ReadmeRow("piip_h6b", (512, 1024), "det", 6872, 11080),
    ReadmeRow("piip_h6b_speedup", (512, 1024), "det", 6752, 10692),  # docs/SPEC.md §7 (paper), not the README
    # ADE20K: the mmseg configs' models, position tables at the input grids (docs/PRESETS.md).
    ReadmeRow("internvit6b_baseline_ade20k", (512,), "seg", 5910, 6364),
    # The reference's ADE20K H6B configs set interaction_proj=False and norm_layer='none' (the
    # speedup interaction, whatever their name says: piip_h6b here is 121 M and 2-6 % FLOPs over).
    ReadmeRow("piip_h6b_ade20k", (192, 512), "seg", 6745, 1663),
    ReadmeRow("piip_h6b_ade20k", (256, 512), "seg", 6745, 2354),
    ReadmeRow("piip_h6b_ade20k", (384, 512), "seg", 6746, 4374),
    ReadmeRow("piip_h6b_ade20k", (512, 512), "seg", 6747, 7308),
)


def measure(preset: str, img_sizes: tuple[int, ...] | None) -> dict:
    sizes = list(img_sizes) if img_sizes is not None else None
    params = count_params(preset, sizes)
    flops = count_flops(preset, img_sizes=sizes)
    return {"params_full": params.total, "params_readme": params.readme_total, "input": flops.input_size,
            "gflops_readme": flops.gflops_readme, "gflops_full": flops.gflops_full}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--only", help="measure only this preset")
    args = parser.parse_args()
    started = time.time()
    rows = []
    # 1. every registered full-size preset at its own sizes (tiny twins are test fixtures)
    presets = [p for p in list_presets() if not p.endswith("_tiny") and (args.only in (None, p))]
    for preset in presets:
        rows.append({"preset": preset, "img_sizes": list(get_spec(preset).img_sizes), "task": "preset",
                     **measure(preset, None)})
    # 2. every README row
    for ref in README_ROWS:
        if args.only not in (None, ref.preset):
            continue
        got = measure(ref.preset, ref.img_sizes)
        rows.append({"preset": ref.preset, "img_sizes": list(ref.img_sizes), "task": ref.task, **got,
                     "readme_params_m": ref.params_m, "readme_gflops": ref.gflops,
                     "params_diff_m": got["params_readme"] / 1e6 - ref.params_m,
                     "gflops_rel_diff": got["gflops_readme"] / ref.gflops - 1})

    header = (f"{'preset':<29}{'sizes (b1 first)':<22}{'task':<7}{'params full':>15}{'params README':>15}"
              f"{'README':>8}{'Δ M':>7}{'GMACs full':>12}{'GMACs README':>14}{'README':>8}{'Δ %':>7}")
    print(header)
    for r in rows:
        sizes = "/".join(map(str, r["img_sizes"]))
        line = (f"{r['preset']:<29}{sizes:<22}{r['task']:<7}{r['params_full']:>15,}{r['params_readme']:>15,}")
        if "readme_params_m" in r:
            line += (f"{r['readme_params_m']:>7.0f}M{r['params_diff_m']:>+7.2f}{r['gflops_full']:>12,.0f}"
                     f"{r['gflops_readme']:>14,.0f}{r['readme_gflops']:>7.0f}G{100 * r['gflops_rel_diff']:>+7.1f}")
        else:
            line += f"{'':>15}{r['gflops_full']:>12,.0f}{r['gflops_readme']:>14,.0f}"
        print(line, flush=True)
    compared = [r for r in rows if "readme_params_m" in r]
    if compared:
        params_ok = sum(abs(r["params_diff_m"]) < 0.5 for r in compared)
        flops_ok = sum(abs(r["gflops_rel_diff"]) < 0.01 for r in compared)
        worst = max(compared, key=lambda r: abs(r["gflops_rel_diff"]))
        print(f"\nparams within 0.5 M of the README: {params_ok}/{len(compared)}; FLOPs within 1 %: "
              f"{flops_ok}/{len(compared)} (worst {worst['preset']} {'/'.join(map(str, worst['img_sizes']))}: "
              f"{100 * worst['gflops_rel_diff']:+.1f} %); wall {time.time() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
