"""Local evidence from the backbone's feature maps against the local statistic's pixel descriptors.

Issue 31, item 3 asks whether the backbone's stride-4 and stride-8 feature maps, used as patch
descriptors (PatchCore's recipe: Roth et al., CVPR 2022), find small defects better than the
hand-made pixel descriptors of `local.py`. This measures both on the same images, in memory (no
CLI, no decision): per material of `defect_images.py`, `--normal` normal images (the first
`--bank-images` train the banks, the rest are the clean incoming), `--per-cell` defective images per
kind at 2, 5 and 10% of the area, all of `--side` px.

- pixels: `local.fit` on the training images at the working size (128 px: what a backbone model
  uses; 48 px: a pixel model's), one fold, its coreset bank; statistic and maps as `score` computes
  them on the whole image (tiles off).
- backbone: each image resized whole to `--input` px, EfficientNet-Lite0's stage maps at strides 4
  and 8, each 3x3-averaged, the stride-4 one 2x2-averaged onto the stride-8 grid, concatenated (64
  values per cell); a bank of BANK descriptors chosen by the same greedy k-center coreset from the
  training images' cells; a cell's distance is to its nearest bank member, an image's statistic the
  largest over its cells.

Image level: ROC-AUC of each statistic, defective against clean, per kind (mean over materials).
Pixel level: ROC-AUC of each map (bilinearly stretched to `--side`) against the defect masks, over
the defective and the clean images' pixels.

    python benchmarks/local_backbone.py [--side 256] [--input 128] [--out benchmarks/results/local_backbone]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defect_images import KINDS, MATERIALS, defect, foreign_material, material, normal_image
from provenance import provenance, write_results

from vae_anomaly.local import patches as local
from vae_anomaly.model import backbone

AREAS = (0.02, 0.05, 0.10)
BANK = 16_384  # backbone cells per bank (of 256 per image at 128 px)


def resize(images: list[np.ndarray], side: int) -> np.ndarray:
    """uint8 (N, C, side, side), each image stretched whole (LANCZOS), grey kept grey."""
    out = [np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.LANCZOS)) for a in images]
    stacked = np.stack(out)
    return stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)


def cells(net: backbone.EfficientNetLite0, images: np.ndarray) -> np.ndarray:
    """(N, G, G, 64) descriptors of uint8 (N, C, S, S) images on the stride-8 grid."""
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 32):
            x = torch.from_numpy(images[i : i + 32]).float()
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            s4, s8 = net.stages(x)[:2]
            s4 = F.avg_pool2d(F.avg_pool2d(s4, 3, 1, 1, count_include_pad=False), 2)
            s8 = F.avg_pool2d(s8, 3, 1, 1, count_include_pad=False)
            out.append(torch.cat([s4, s8], 1).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out).astype(np.float32)


def stretch(grids: np.ndarray, side: int) -> np.ndarray:
    """(N, g, g) -> (N, side, side), bilinear."""
    t = torch.from_numpy(np.asarray(grids, np.float32))[:, None]
    return F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()


def material_run(name: str, args: argparse.Namespace, net: backbone.EfficientNetLite0) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    src, foreign_src = material(name), material(foreign_material(name))
    normal = [normal_image(src, args.side, rng) for _ in range(args.normal)]
    train, clean = normal[: args.bank_images], normal[args.bank_images :]
    bad, masks, kinds = [], [], []
    for kind in KINDS:
        for area in AREAS:
            for _ in range(args.per_cell):
                a, m = defect(normal_image(src, args.side, rng), kind, area, rng, foreign_src)
                bad.append(a)
                masks.append(m)
                kinds.append(kind)
    incoming = clean + bad
    truth = np.r_[np.zeros(len(clean)), np.ones(len(bad))]
    pixel_truth = np.concatenate([np.zeros((len(clean), args.side, args.side), bool), np.stack(masks)])
    stats: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for size in (128, 48):
        t0 = time.perf_counter()
        fitted = resize(train, size)
        folds = [(np.arange(len(fitted)), np.zeros(0, np.int64))]
        bank, _ = local.fit(fitted, folds, np.random.default_rng(args.seed))
        bank = replace(bank, bound=1.0)
        grid = bank.distances(resize(incoming, size), fold=0)
        stats[f"pixels {size} px"] = grid.reshape(len(grid), -1).max(1)
        maps[f"pixels {size} px"] = stretch(grid, args.side)
        seconds[f"pixels {size} px"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    phi = cells(net, resize(train, args.input)).reshape(-1, 64)
    bank_b = phi[local.coreset(phi, min(BANK, len(phi)), np.random.default_rng(args.seed))]
    grid_in = cells(net, resize(incoming, args.input))
    g = grid_in.shape[1]
    d = local._nearest(grid_in.reshape(-1, 64), bank_b).reshape(len(incoming), g, g)
    stats[f"backbone {args.input} px"] = d.reshape(len(d), -1).max(1)
    maps[f"backbone {args.input} px"] = stretch(d, args.side)
    seconds[f"backbone {args.input} px"] = time.perf_counter() - t0
    kinds_arr = np.array(["clean"] * len(clean) + kinds)
    out: dict[str, Any] = {"image": {}, "pixel": {}, "seconds": seconds}
    for method, s in stats.items():
        out["image"][method] = {
            k: float(roc_auc_score(truth[(kinds_arr == k) | (truth == 0)], s[(kinds_arr == k) | (truth == 0)]))
            for k in KINDS
        }
        out["image"][method]["all"] = float(roc_auc_score(truth, s))
        out["pixel"][method] = float(roc_auc_score(pixel_truth.ravel(), maps[method].ravel()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--input", type=int, default=128, help="the backbone's input side")
    parser.add_argument("--normal", type=int, default=300)
    parser.add_argument("--bank-images", type=int, default=200)
    parser.add_argument("--per-cell", type=int, default=10)
    parser.add_argument("--materials", default=",".join(MATERIALS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "local_backbone"))
    args = parser.parse_args()
    net = backbone.load_network()
    per = {m: material_run(m, args, net) for m in args.materials.split(",")}
    methods = list(next(iter(per.values()))["image"])
    rows = []
    for method in methods:
        cells_ = [float(np.mean([per[m]["image"][method][k] for m in per])) for k in (*KINDS, "all")]
        pixel = float(np.mean([per[m]["pixel"][method] for m in per]))
        worst = min(per, key=lambda m: per[m]["image"][method]["all"])
        rows.append(
            [method, *(f"{c:.3f}" for c in cells_), f"{pixel:.3f}", f"{worst} {per[worst]['image'][method]['all']:.3f}"]
        )
    header = ["local descriptor", *KINDS, "all kinds", "pixel ROC-AUC", "worst material"]
    prov = provenance()
    lines = [
        f"Local evidence, backbone feature maps against pixel descriptors, {prov['date']}, {prov['machine']}, "
        f"commit {prov['commit']}",
        "",
        "    python benchmarks/local_backbone.py " + " ".join(sys.argv[1:]),
        "",
        f"Materials {', '.join(per)}; {args.side}-px images; bank from {args.bank_images} normal images, "
        f"{args.normal - args.bank_images} clean incoming, {args.per_cell} defective per kind and area "
        f"({', '.join(f'{a:.0%}' for a in AREAS)} of the area). Image ROC-AUC (defective against clean, "
        "mean over materials) and pixel ROC-AUC (maps against masks):",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
        "Per material, all kinds: "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v['all']:.3f}" for k, v in per[m]["image"].items()) for m in per),
        "",
        "Seconds per material (fit the bank and measure every incoming image): "
        + "; ".join(f"{m}: " + ", ".join(f"{k} {v:.1f}" for k, v in per[m]["seconds"].items()) for m in per),
    ]
    write_results(Path(args.out), {**prov, "args": vars(args), "materials": per}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
