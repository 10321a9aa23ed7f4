"""Small, local defects with known masks: image-level detection and pixel-level localisation.

Normal material and defects: benchmarks/defect_images.py (brick, grass, gravel textures and an
immunohistochemistry slide, all bundled with scikit-image; scratches, stains, holes, colour spots,
blur patches and foreign patches over 1-10% of the area). Per material, as a user runs it:
`vae-anomaly fit normal -o model.vae` with defaults, then `vae-anomaly score incoming` (JSON) with
the default decision, and again with `--no-checks` (our global model's statistics alone). Files are
JPEG (quality 95) of `--side` px.

In one run, per defect kind and area, each figure the mean over the four materials (each has its
own model):
- image level: ROC-AUC against the clean incoming images and detection at each method's threshold
  (ours: the default `auto` decision, --fpr 0.01; baselines: the 99th percentile of held-out normal
  images), with the false-positive rate on clean images; for our default decision, our global
  statistics alone, the local statistic alone (its value: both scales, the whole image and its tiles,
  tiles.py), the same on the whole image only (ranked, not flagged), PCA reconstruction error and kNN
  distance (k = 5) on the working-size pixels;
- pixel level, on the defective images and the clean ones, at 256 px (masks of 1,024-px images are
  area-averaged to 256 and kept where >= 0.5): ROC-AUC of each map against the masks, and PRO, the
  per-region overlap averaged over defects and integrated up to a 30% false-positive rate of normal
  pixels, divided by 0.3 (Bergmann et al., MVTec AD, 2021); for the local statistic's map
  (`tiles.maps_batch`, both scales), its whole-image scale alone (`PatchBank.maps`), the VAE's
  per-pixel -log p(x|z) map (`Detector.heatmap`) and the PCA residual.
- `fit` seconds (the whole command) and `score` images/s (the whole command, start-up included).

    python benchmarks/defects.py [--side 256] [--normal 300] [--clean 100] [--per-cell 10]
        [--materials brick,grass,gravel,ihc] [--device cpu] [--work DIR] [--out benchmarks/results/defects_256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from defect_images import AREAS, KINDS, MATERIALS, defect, foreign_material, material, normal_image
from photos import cli, run
from provenance import provenance, write_results

from vae_anomaly.images.listing import display_path
from vae_anomaly.local.tiles import maps_batch, measure_batch

RESULTS = Path(__file__).resolve().parent / "results"
EVAL = 256  # pixel-level figures are computed at this side
METHODS = (
    "default decision",
    "global model alone",
    "local statistic alone",
    "local, whole image only",
    "PCA (90% var)",
    "kNN (k=5)",
)
RANKED_ONLY = ("local, whole image only",)  # no threshold of its own: its ROC-AUC only
MAPS = ("local statistic", "local, whole image only", "VAE -log p(x|z)", "PCA residual")


def build(folder: Path, name: str, side: int, n_normal: int, n_clean: int, per_cell: int, seed: int) -> dict[str, Any]:
    """Write one material's files; returns the file lists, each incoming file's kind and area, and masks."""
    rng = np.random.default_rng(seed)
    src, other = material(name), material(foreign_material(name))
    normal_dir, incoming = folder / "normal", folder / "incoming"
    normal_dir.mkdir(parents=True)
    incoming.mkdir()
    normal = []
    for i in range(n_normal):
        path = normal_dir / f"n{i:04d}.jpg"
        Image.fromarray(normal_image(src, side, rng)).save(path, quality=95)
        normal.append(path)
    files, kinds, areas, masks = [], [], [], []

    def add(a: np.ndarray, kind: str, area: float, mask: np.ndarray) -> None:
        path = incoming / f"{kind.replace(' ', '_')}_{int(area * 100):02d}_{len(files):04d}.jpg"
        Image.fromarray(a).save(path, quality=95)
        files.append(path)
        kinds.append(kind)
        areas.append(area)
        small = np.asarray(Image.fromarray(mask.astype(np.float32)).resize((EVAL, EVAL), Image.Resampling.BOX))
        masks.append(small >= 0.5)

    for _ in range(n_clean):
        add(normal_image(src, side, rng), "clean", 0.0, np.zeros((side, side), bool))
    for kind in KINDS:
        for area in AREAS:
            for _ in range(per_cell):
                a, mask = defect(normal_image(src, side, rng), kind, area, rng, other)
                add(a, kind, area, mask)
    return {"normal": normal, "incoming": files, "kinds": np.array(kinds), "areas": np.array(areas), "masks": masks}


def working(files: list[Path], size: int, channels: int) -> np.ndarray:
    from vae_anomaly.images.batching import read_images
    from vae_anomaly.images.decoding import Preprocessing

    batch = read_images(files, Preprocessing(channels, size))
    assert not batch.errors, batch.errors[:3]
    return batch.pixels


def stretch(maps: np.ndarray) -> np.ndarray:
    """Working-size maps to the evaluation side (bilinear, as the working size stretches the file)."""
    return np.stack(
        [
            np.asarray(Image.fromarray(m.astype(np.float32)).resize((EVAL, EVAL), Image.Resampling.BILINEAR))
            for m in maps
        ]
    )


def pro_score(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Area under the per-region overlap curve up to `limit` false-positive rate of normal pixels, / limit."""
    normal = np.sort(maps[~masks])
    fprs = np.linspace(0.0, limit, 61)
    cuts = np.quantile(normal, 1.0 - fprs)
    regions = []
    for m, mask in zip(maps, masks, strict=True):
        labels, n = ndimage.label(mask)
        regions += [np.sort(m[labels == k]) for k in range(1, n + 1)]
    if not regions:
        return float("nan")
    overlap = [np.mean([1.0 - np.searchsorted(r, c, side="left") / len(r) for r in regions]) for c in cuts]
    return float(np.trapezoid(overlap, fprs) / limit)


def pixel_figures(maps: np.ndarray, masks: np.ndarray, seed: int) -> dict[str, float]:
    """ROC-AUC (on at most 2 million pixels drawn at random) and PRO of maps against masks."""
    flat_m, flat_y = maps.ravel(), masks.ravel()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(flat_m), min(len(flat_m), 2_000_000), replace=False)
    return {"roc_auc": float(roc_auc_score(flat_y[pick], flat_m[pick])), "pro": pro_score(maps, masks)}


def one_material(work: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    from vae_anomaly import Detector

    sets = build(work / name, name, args.side, args.normal, args.clean, args.per_cell, args.seed)
    model = work / name / "model.vae"
    fit_cmd = [*cli(), "fit", str(work / name / "normal"), "-o", str(model), "--device", args.device]
    fit_s, _ = run(fit_cmd)
    incoming = sets["incoming"]
    order = {p.name: i for i, p in enumerate(incoming)}
    score: dict[str, Any] = {}
    score_s = 0.0
    for method, extra in (("default decision", []), ("global model alone", ["--no-checks"])):
        cmd = [
            *cli(),
            "score",
            str(work / name / "incoming"),
            "-m",
            str(model),
            "--format",
            "json",
            "--device",
            args.device,
        ]
        seconds, proc = run([*cmd, *extra])
        score_s = score_s or seconds
        recs = [r for r in json.loads(proc.stdout)["records"] if r["error"] is None]
        p, flags = np.ones(len(incoming)), np.zeros(len(incoming), bool)
        for r in recs:
            i = order[Path(r["path"]).name]
            p[i], flags[i] = r["p_value"], r["flagged"]
        score[method] = {"ranking": -p, "flags": flags}
    det = Detector.load(model, device=args.device)
    prep, bank = det.preprocessing_, det.patches_
    assert prep is not None and bank is not None
    px_in = working(incoming, prep.size, prep.channels)
    shown = [display_path(p) for p in incoming]
    sources = [(args.side, args.side, prep.channels == 3, "JPEG")] * len(incoming)
    local_values = measure_batch(bank, det.tiles_, px_in, shown, sources)[0]
    cal = det.calibration_["property:local"]
    score["local statistic alone"] = {"ranking": local_values, "flags": local_values > np.quantile(cal, 0.99)}
    # The whole-image scale alone (what the statistic was before tiles); its threshold from the same
    # calibration images would need their whole-image values, so it is ranked, not flagged.
    whole = bank.statistic(px_in)[0]
    score["local, whole image only"] = {"ranking": whole, "flags": np.zeros(len(whole), bool)}
    # Pixel baselines on the same working-size pixels, fitted on 80% of the normal images.
    px_norm = working(sets["normal"], prep.size, prep.channels).reshape(len(sets["normal"]), -1) / 255.0
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(px_norm))
    held, fitted = px_norm[perm[: len(perm) // 5]], px_norm[perm[len(perm) // 5 :]]
    x_in = px_in.reshape(len(px_in), -1) / 255.0
    pca = PCA(n_components=0.9, random_state=args.seed).fit(fitted)
    nn = NearestNeighbors(n_neighbors=5).fit(fitted)

    def pca_err(x: np.ndarray) -> np.ndarray:
        return np.asarray(((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(1))

    def knn(x: np.ndarray) -> np.ndarray:
        return np.asarray(nn.kneighbors(x)[0].mean(1))

    for method, fn in (("PCA (90% var)", pca_err), ("kNN (k=5)", knn)):
        values = fn(x_in)
        score[method] = {"ranking": values, "flags": values > np.quantile(fn(held), 0.99)}
    # Pixel level: maps at the working size, stretched to the evaluation side.
    residual = (x_in - pca.inverse_transform(pca.transform(x_in))).reshape(px_in.shape) ** 2
    maps = {
        "local statistic": stretch(maps_batch(bank, det.tiles_, px_in, shown, sources)[0]),
        "local, whole image only": stretch(bank.maps(px_in)[0]),
        "VAE -log p(x|z)": stretch(det.heatmap(incoming).maps),
        "PCA residual": stretch(residual.sum(1)),
    }
    masks = np.stack(sets["masks"])
    pixel = {name_: pixel_figures(m, masks, args.seed) for name_, m in maps.items()}
    return {
        "kinds": sets["kinds"],
        "areas": sets["areas"],
        "score": score,
        "pixel": pixel,
        "fit_seconds": fit_s,
        "score_images_per_s": len(incoming) / score_s,
        "working_size": prep.size,
    }


def image_figures(res: dict[str, Any]) -> dict[str, Any]:
    """Per method: FPR on clean, and per kind and area ROC-AUC and detection."""
    kinds, areas = res["kinds"], res["areas"]
    clean = kinds == "clean"
    out: dict[str, Any] = {}
    for method, s in res["score"].items():
        cells: dict[str, dict[str, dict[str, float]]] = {}
        for kind in KINDS:
            cells[kind] = {}
            for area in AREAS:
                sel = (kinds == kind) & (areas == area)
                y = np.r_[np.zeros(clean.sum()), np.ones(sel.sum())]
                cells[kind][str(area)] = {
                    "roc_auc": float(roc_auc_score(y, np.r_[s["ranking"][clean], s["ranking"][sel]])),
                    "detected": float(s["flags"][sel].mean()),
                }
        out[method] = {"fpr": float(s["flags"][clean].mean()), "cells": cells}
    return out


def averaged(per_material: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The mean over materials of every image-level figure."""
    mats = list(per_material.values())
    out: dict[str, Any] = {}
    for method in METHODS:
        cells = {
            kind: {
                str(area): {
                    f: float(np.mean([m[method]["cells"][kind][str(area)][f] for m in mats]))
                    for f in ("roc_auc", "detected")
                }
                for area in AREAS
            }
            for kind in KINDS
        }
        big = [[cells[k][str(a)]["roc_auc"] for a in AREAS if a >= 0.02] for k in KINDS]
        det = [[cells[k][str(a)]["detected"] for a in AREAS if a >= 0.02] for k in KINDS]
        out[method] = {
            "fpr": float(np.mean([m[method]["fpr"] for m in mats])),
            "cells": cells,
            "mean_auc_2pct_up": float(np.mean(big)),
            "worst_kind_auc_2pct_up": float(np.min(np.mean(big, axis=1))),
            "detected_2pct_up": float(np.mean(det)),
        }
    return out


def markdown(doc: dict[str, Any]) -> str:
    avg = doc["image"]
    lines = [
        f"Defects at {doc['side']} px, {doc['date']}, {doc['machine']}, commit {doc['commit']}; materials "
        f"{', '.join(doc['materials'])}, {doc['normal']} normal images each; working size {doc['working_size']} px",
        "",
        f"    {doc['command']}",
        "",
        "Default decision (`score`, auto, --fpr 0.01): ROC-AUC against clean images / detected, mean over materials:",
        "",
        "| kind | " + " | ".join(f"{int(a * 100)}% of the area" for a in AREAS) + " |",
        "| --- |" + " --- |" * len(AREAS),
    ]
    cells = avg["default decision"]["cells"]
    for kind in KINDS:
        row = " | ".join(f"{cells[kind][str(a)]['roc_auc']:.3f} / {cells[kind][str(a)]['detected']:.0%}" for a in AREAS)
        lines.append(f"| {kind} | {row} |")
    lines += [
        "",
        "Every method, defects of 2% of the area or more (mean over kinds, worst kind by its mean ROC-AUC):",
        "",
        "| method | mean ROC-AUC | worst kind ROC-AUC | detected | false positives, clean |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        m = avg[method]
        ranked_only = method in RANKED_ONLY
        lines.append(
            f"| {method} | {m['mean_auc_2pct_up']:.3f} | {m['worst_kind_auc_2pct_up']:.3f} | "
            + ("ranked only | ranked only |" if ranked_only else f"{m['detected_2pct_up']:.1%} | {m['fpr']:.1%} |")
        )
    lines += [
        "",
        "Pixel level (mean over materials): ROC-AUC / PRO (to 30% FPR)",
        "",
        "| map | ROC-AUC | PRO |",
        "| --- | --- | --- |",
    ]
    for name in MAPS:
        lines.append(f"| {name} | {doc['pixel'][name]['roc_auc']:.3f} | {doc['pixel'][name]['pro']:.3f} |")
    lines += [
        "",
        f"`fit` {doc['fit_seconds']:.0f} s per material (the whole command, mean); `score` "
        f"{doc['score_images_per_s']:.1f} images/s (the whole command, start-up included, mean).",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--normal", type=int, default=300)
    ap.add_argument("--clean", type=int, default=100)
    ap.add_argument("--per-cell", type=int, default=10, help="defective images per kind and area")
    ap.add_argument("--materials", default=",".join(MATERIALS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or RESULTS / f"defects_{args.side}"
    names = args.materials.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = {}
        for name in names:
            t0 = time.perf_counter()
            results[name] = one_material(work, name, args)
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    per_material = {n: image_figures(r) for n, r in results.items()}
    image = averaged(per_material)
    pixel = {
        m: {f: float(np.mean([r["pixel"][m][f] for r in results.values()])) for f in ("roc_auc", "pro")} for m in MAPS
    }
    doc: dict[str, Any] = {
        **provenance(),
        "side": args.side,
        "materials": names,
        "normal": args.normal,
        "working_size": results[names[0]]["working_size"],
        "fit_seconds": float(np.mean([r["fit_seconds"] for r in results.values()])),
        "score_images_per_s": float(np.mean([r["score_images_per_s"] for r in results.values()])),
        "image": image,
        "pixel": pixel,
        "per_material_pixel": {n: r["pixel"] for n, r in results.items()},
        "per_material_image": per_material,
    }
    write_results(out, doc, markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
