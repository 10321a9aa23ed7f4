"""The failures a dataset gate exists to catch, on real MNIST.

Normal: MNIST training digits of every class. Incoming: the clean test
digits, plus test digits corrupted in several kinds (blank or near-constant
frames, content shrunk into a corner, half occluded, Gaussian and
salt-and-pepper noise, blur, inverted, contrast crushed, heavy JPEG).

For each kind: the detection rate at the default decision (`--threshold
auto`, `--fpr 0.01`, two-sided, elbo-ic-nn score with the kl guard) and the
ROC-AUC of the decision's own statistic against the clean test digits; the
false-positive rate on the clean digits; the overall ROC-AUC.

    python benchmarks/corruptions.py --data ../shared/data/mnist [--train-size 12000] [--per-kind 1000]

Writes benchmarks/results/corruptions.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist
from provenance import provenance, write_results

from vae_anomaly import Detector, FitConfig
from vae_anomaly.decision.calibration import decision_statistic

RESULTS = Path(__file__).resolve().parent / "results"


def _each(x: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(fn(Image.fromarray(im)), dtype=np.uint8) for im in x])


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("L")


def _shrink(img: Image.Image) -> Image.Image:
    out = Image.new("L", img.size, 0)
    out.paste(img.resize((10, 10), Image.Resampling.BILINEAR), (0, 0))
    return out


def corruptions(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Each kind applied to the same test digits. x: uint8 (N, 28, 28)."""
    rng = np.random.default_rng(seed)
    f = x.astype(np.float64)
    half = x.copy()
    half[:, :, 14:] = 0
    salt = x.copy()
    mask = rng.random(x.shape)
    salt[mask < 0.05] = 0
    salt[mask > 0.95] = 255
    near_constant = np.clip(128 + rng.normal(0, 2, x.shape), 0, 255)
    return {
        "blank (black)": np.zeros_like(x),
        "near-constant grey": near_constant.round().astype(np.uint8),
        "shrunk into a corner": _each(x, _shrink),
        "half occluded": half,
        "Gaussian noise": np.clip(f + rng.normal(0, 0.3 * 255, x.shape), 0, 255).round().astype(np.uint8),
        "salt and pepper": salt,
        "blur": _each(x, lambda im: im.filter(ImageFilter.GaussianBlur(1.5))),
        "inverted": 255 - x,
        "contrast crushed": (f * 0.3 + 0.35 * 255).round().astype(np.uint8),
        "heavy JPEG (q=5)": _each(x, lambda im: _jpeg(im, 5)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--train-size", type=int, default=12_000, help="normal training images (all classes)")
    ap.add_argument("--per-kind", type=int, default=1000, help="test digits corrupted per kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fpr", type=float, default=0.01)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=RESULTS / "corruptions")
    args = ap.parse_args()

    x_tr, _ = load_mnist(args.data, "train")
    x_te, _ = load_mnist(args.data, "test")
    rng = np.random.default_rng(args.seed)
    normal = x_tr[rng.choice(len(x_tr), args.train_size, replace=False)]
    t0 = time.perf_counter()
    det = Detector(FitConfig(seed=args.seed, device=args.device)).fit(normal)
    fit_s = time.perf_counter() - t0
    kinds = corruptions(x_te[: args.per_kind], args.seed)

    first_reasons: dict[str, dict[str, int]] = {}

    def decide(x: np.ndarray, kind: str = "clean") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        res = det.score(x)
        d = det.decide(res, fpr=args.fpr)
        stat = decision_statistic(det.calibration_[res.score], res.scores, "two-sided", d.p_values)
        # Which check most sets each flagged image apart (its first reason, checks.explain).
        which = [int(i) for i in np.nonzero(d.flags)[0]]
        found = det.explain(res, d, which)
        first_reasons[kind] = dict(Counter(f[0].check for f in found if f).most_common())
        return d.flags, d.p_values, stat

    t0 = time.perf_counter()
    clean_flags, clean_p, _ = decide(x_te)
    score_s = time.perf_counter() - t0
    rows: dict[str, dict[str, float]] = {}
    all_p = [clean_p]
    for name, x in kinds.items():
        flags, p, _ = decide(x, name)
        all_p.append(p)
        y = np.r_[np.zeros(len(clean_p)), np.ones(len(p))]
        # The decision's statistic is the p-value (smaller = more anomalous); ties are rare
        # across sets, so -p is a fair ranking for ROC-AUC here.
        rows[name] = {"detected": float(flags.mean()), "roc_auc": float(roc_auc_score(y, -np.r_[clean_p, p]))}
    p_all = np.concatenate(all_p)
    y_all = np.r_[np.zeros(len(clean_p)), np.ones(len(p_all) - len(clean_p))]
    doc: dict[str, Any] = {
        **provenance(),
        "train_size": args.train_size,
        "fit_seconds": fit_s,
        "epochs": det.metadata_["training"]["epochs_run"],
        "score_images_per_s": len(x_te) / score_s,
        "fpr_clean": float(clean_flags.mean()),
        "overall_roc_auc": float(roc_auc_score(y_all, -p_all)),
        "rule": det.decide(det.score(x_te[:2]), fpr=args.fpr).threshold.describe(),
        "kinds": rows,
        "first_reasons": first_reasons,
    }
    lines = [
        f"Corruptions, {doc['date']}, {doc['machine']}, commit {doc['commit']}; normal: {args.train_size} "
        f"MNIST training "
        f"digits of every class, fit {fit_s:.0f} s ({doc['epochs']} epochs), default decision: {doc['rule']}",
        "",
        f"    {doc['command']}",
        "",
        "| kind | detected at default | ROC-AUC vs clean | first reason of the flagged ones |",
        "| --- | --- | --- | --- |",
        *[
            f"| {k} | {v['detected']:.1%} | {v['roc_auc']:.4f} | "
            + ", ".join(f"{c} {n}" for c, n in first_reasons.get(k, {}).items())
            + " |"
            for k, v in rows.items()
        ],
        "",
        f"False-positive rate on the 10,000 clean test digits: {doc['fpr_clean']:.2%}. "
        f"Overall ROC-AUC (clean vs every corrupted image): {doc['overall_roc_auc']:.4f}.",
    ]
    write_results(args.out, doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
