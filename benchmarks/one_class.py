"""One-class MNIST (Ruff et al. 2018): train on one digit, test on all 10,000 test images.

For each digit c: fit a `Detector` with DEFAULT settings on the training
images of class c; score all test images (class c normal, the other nine
anomalous); ROC-AUC per score type, per digit; then the mean and the worst
digit. Baselines computed in the same run on the same data: PCA
reconstruction error (90% variance), kNN distance (k=5) on raw pixels, and
PyOD's AutoEncoder and VAE where `pyod` is installed (`pip install -e .[bench]`).

    python benchmarks/one_class.py --data ../shared/data/mnist [--digits 0,8] [--seeds 0,1,2]
        [--time-budget 60] [--jobs 1] [--via-files] [--features auto|backbone|pixels]

Writes benchmarks/results/one_class.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist
from provenance import provenance, write_results

from vae_anomaly import Detector, FitConfig
from vae_anomaly.decision.calibration import decision_statistic
from vae_anomaly.images.decoding import PNG_LEVEL, png_bits
from vae_anomaly.model.score_table import SCORE_NAMES

RESULTS = Path(__file__).resolve().parent / "results"


def baselines(x_train: np.ndarray, x_test: np.ndarray, seed: int, with_pyod: bool = True) -> dict[str, np.ndarray]:
    """Scores of the simple methods a user could write in three lines; higher = more anomalous."""
    tr = x_train.reshape(len(x_train), -1) / 255.0
    te = x_test.reshape(len(x_test), -1) / 255.0
    out: dict[str, np.ndarray] = {}
    pca = PCA(n_components=0.90, random_state=seed).fit(tr)
    out["PCA reconstruction (90% var)"] = ((te - pca.inverse_transform(pca.transform(te))) ** 2).sum(1)
    dist, _ = NearestNeighbors(n_neighbors=5).fit(tr).kneighbors(te)
    out["kNN distance (k=5), pixels"] = dist.mean(1)
    if not with_pyod:
        return out
    try:
        from pyod.models.auto_encoder import AutoEncoder
        from pyod.models.vae import VAE
    except ImportError:
        return out
    for name, cls in (("PyOD AutoEncoder", AutoEncoder), ("PyOD VAE", VAE)):
        try:
            model = (
                cls(random_state=seed, verbose=0, preprocessing=False, device="cpu")
                if name.endswith("AutoEncoder")
                else cls(random_state=seed, verbose=0, device="cpu")
            )
            model.fit(tr)
            out[name] = model.decision_function(te)
        except Exception as exc:  # a baseline failing must not sink the benchmark
            print(f"warning: {name} failed: {exc}", file=sys.stderr)
    return out


DECISION = "default decision (elbo-ic-nn, kl guard, checks, two-sided)"


def run_digit(
    args: tuple[str, int, int, float | None, int, bool, tuple[str, ...], bool, tuple[int, ...], str],
) -> dict[str, Any]:
    data, digit, seed, budget, threads, via_files, score_names, with_pyod, png_levels, features = args
    import torch

    torch.set_num_threads(threads)
    x_tr, y_tr = load_mnist(data, "train")
    x_te, y_te = load_mnist(data, "test")
    normal = x_tr[y_tr == digit]
    labels = (y_te != digit).astype(int)
    cfg = FitConfig(seed=seed, device="cpu", time_budget=budget, features=features)
    t0 = time.perf_counter()
    det = Detector(cfg).fit(normal)
    fit_s = time.perf_counter() - t0
    row: dict[str, Any] = {
        "digit": digit,
        "seed": seed,
        "fit_seconds": fit_s,
        "train_seconds": det.metadata_["training"]["seconds"],
        "epochs": det.metadata_["training"]["epochs_run"],
        "train_images_per_s": det.metadata_["training"]["images_per_s"],
        "auc": {},
        "auc_decision": {},
        "images_per_s": {},
    }
    for name in score_names:
        t0 = time.perf_counter()
        res = det.score(x_te, score=name, batch_size=1000, guard=None)
        row["images_per_s"][name] = len(x_te) / (time.perf_counter() - t0)
        row["auc"][name] = roc_auc_score(labels, res.scores)
    # The default decision ranks by its own statistic: the p-value of its one test of the score, kl and checks.
    res = det.score(x_te, batch_size=1000)
    d = det.decide(res)
    stat = decision_statistic(det.calibration_[res.score], res.scores, "two-sided", d.p_values)
    row["auc_decision"][DECISION] = roc_auc_score(labels, stat)
    row["flagged_normal"] = float(d.flags[labels == 0].mean())
    row["flagged_anomalous"] = float(d.flags[labels == 1].mean())
    if png_levels:
        # The complexity term at other deflate levels, from the same model and draws:
        # elbo-ic at level L = elbo-ic at the default level + L_default(x) - L_L(x).
        res = det.score(x_te, score="elbo-ic", batch_size=1000, guard=None)
        x4 = x_te[:, None] if x_te.ndim == 3 else x_te
        t0 = time.perf_counter()
        base = png_bits(x4)
        row["png_us_per_image"] = {PNG_LEVEL: 1e6 * (time.perf_counter() - t0) / len(x4)}
        for level in png_levels:
            t0 = time.perf_counter()
            other = png_bits(x4, level)
            row["png_us_per_image"][level] = 1e6 * (time.perf_counter() - t0) / len(x4)
            row["auc"][f"elbo-ic, PNG level {level}"] = roc_auc_score(labels, res.scores + base - other)
    for name, s in baselines(normal, x_te, seed, with_pyod).items():
        row["auc"][name] = roc_auc_score(labels, s)
    if via_files:
        row["auc_via_files"] = via_cli(normal, x_te, labels, seed, budget)
        row["auc_in_memory_default"] = row["auc"][score_names[0]]
    return row


def via_cli(normal: np.ndarray, x_te: np.ndarray, labels: np.ndarray, seed: int, budget: float | None) -> float:
    """The same digit through PNG folders and the real command line."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "normal").mkdir()
        (root / "incoming").mkdir()
        for i, im in enumerate(normal):
            Image.fromarray(im).save(root / "normal" / f"{i:05d}.png")
        for i, im in enumerate(x_te):
            Image.fromarray(im).save(root / "incoming" / f"{i:05d}.png")
        cmd = [sys.executable, "-m", "vae_anomaly"]
        fit = [*cmd, "fit", str(root / "normal"), "-o", str(root / "m.vae"), "--seed", str(seed), "--quiet"]
        fit += ["--device", "cpu"] + (["--time-budget", str(budget)] if budget else [])
        subprocess.run(fit, check=True, capture_output=True)
        out = subprocess.run(
            [*cmd, "score", str(root / "incoming"), "-m", str(root / "m.vae"), "--format", "json", "--device", "cpu"],
            capture_output=True,
            text=True,
        )
        if out.returncode not in (0, 1):
            raise RuntimeError(out.stderr)
        recs = [r for r in json.loads(out.stdout)["records"] if r["error"] is None]
        idx = np.array([int(Path(r["path"]).stem) for r in recs])
        return float(roc_auc_score(labels[idx], [r["score"] for r in recs]))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: AUC per digit (mean over seeds), the mean over digits and the worst digit."""
    digits = sorted({r["digit"] for r in rows})
    table: dict[str, dict[str, Any]] = {}
    for key in ("auc", "auc_decision"):
        for m in rows[0][key]:
            per_digit = {str(d): float(np.mean([r[key][m] for r in rows if r["digit"] == d])) for d in digits}
            worst = min(per_digit, key=per_digit.get)
            table[m] = {
                "per_digit": per_digit,
                "mean": float(np.mean(list(per_digit.values()))),
                "worst": per_digit[worst],
                "worst_digit": worst,
            }
    return table


def markdown(doc: dict[str, Any]) -> str:
    t = doc["table"]
    digits = [int(d) for d in next(iter(t.values()))["per_digit"]]
    ours = [m for m in t if m.split(" ")[0].rstrip(",") in SCORE_NAMES or m == DECISION]
    base = [m for m in t if m not in ours]
    best_base = max(base, key=lambda m: t[m]["mean"]) if base else None
    lines = [
        f"One-class MNIST, {doc['date']}, {doc['machine']}, commit {doc['commit']}, seeds {doc['seeds']}, "
        f"time budget {doc['time_budget']}, features {doc.get('features', 'auto')}",
        "",
        f"    {doc['command']}",
        "",
        "| method | " + " | ".join(str(d) for d in digits) + " | mean | worst |",
        "| --- | " + " | ".join("---" for _ in digits) + " | --- | --- |",
    ]
    for m in ours + base:
        r = t[m]
        lines.append(
            f"| {m} | "
            + " | ".join(f"{r['per_digit'][str(d)]:.3f}" for d in digits)
            + f" | **{r['mean']:.3f}** | {r['worst']:.3f} ({r['worst_digit']}) |"
        )
    if best_base:
        lines += [
            "",
            f"Best baseline: {best_base} (mean {t[best_base]['mean']:.3f}, worst {t[best_base]['worst']:.3f}).",
        ]
        for m in ours:
            lines.append(
                f"- {m}: margin {t[m]['mean'] - t[best_base]['mean']:+.3f} mean, "
                f"{t[m]['worst'] - max(t[b]['worst'] for b in base):+.3f} worst digit vs the best worst"
            )
    s = doc["speed"]
    lines += [
        "",
        f"Training: {s['train_seconds_mean']:.1f} s per digit on average (max {s['train_seconds_max']:.1f} s), "
        f"{s['epochs_mean']:.1f} epochs. Scoring from memory: "
        + ", ".join(f"{k} {v:,.0f} images/s" for k, v in s["images_per_s"].items())
        + ".",
        f"Default decision at --fpr 0.01: flags {s['flagged_normal']:.2%} of the normal test digits and "
        f"{s['flagged_anomalous']:.1%} of the other digits.",
    ]
    if doc.get("png_us_per_image"):
        lines.append(
            "PNG length per 28x28 image (one core): "
            + ", ".join(f"level {k} {v:.0f} us" for k, v in doc["png_us_per_image"].items())
            + "."
        )
    if "via_files_max_diff" in doc:
        lines.append(
            f"Via PNG files and the CLI: largest ROC-AUC difference from the in-memory path "
            f"{doc['via_files_max_diff']:.4f}."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--time-budget", type=float, default=None, help="fit --time-budget (default: fit's default)")
    ap.add_argument("--features", default="auto", help="fit --features: auto, backbone or pixels")
    ap.add_argument("--jobs", type=int, default=1, help="digits trained in parallel (each with --threads)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--via-files", action="store_true", help="also run each digit through PNG files and the CLI")
    ap.add_argument(
        "--scores", default="elbo-ic-nn,elbo-ic,elbo,kl", help=f"score types to rank by, of {', '.join(SCORE_NAMES)}"
    )
    ap.add_argument("--no-pyod", action="store_true", help="skip PyOD's baselines even where pyod is installed")
    ap.add_argument(
        "--png-levels", default="", help="also rank by elbo-ic with the PNG length at these deflate levels, e.g. 1,3"
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "one_class")
    ap.add_argument(
        "--also",
        type=Path,
        nargs="*",
        default=[],
        help="JSON results of earlier runs (other seeds) to report with this one",
    )
    args = ap.parse_args()
    digits = [int(d) for d in args.digits.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = max(1, args.threads // args.jobs) if args.jobs > 1 else args.threads
    names = tuple(args.scores.split(","))
    png_levels = tuple(int(v) for v in args.png_levels.split(",") if v)
    tasks = [
        (args.data, d, s, args.time_budget, threads, args.via_files, names, not args.no_pyod, png_levels, args.features)
        for s in seeds
        for d in digits
    ]
    t0 = time.perf_counter()
    rows = []
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for row in pool.map(run_digit, tasks):
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
    else:
        for task in tasks:
            rows.append(run_digit(task))
            print(_line(rows[-1]), file=sys.stderr, flush=True)
    for earlier in args.also:
        rows += json.loads(earlier.read_text())["rows"]
    seeds = sorted({r["seed"] for r in rows})
    doc = {
        **provenance(f"torch threads {threads} x {args.jobs} jobs"),
        "seeds": seeds,
        "time_budget": args.time_budget,
        "features": args.features,
        "wall_seconds": time.perf_counter() - t0,
        "rows": rows,
        "table": summarise(rows),
        "png_us_per_image": {
            str(k): float(np.median([r["png_us_per_image"][k] for r in rows]))
            for k in (rows[0].get("png_us_per_image") or {})
        },
        "speed": {
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in rows])),
            "train_seconds_max": float(np.max([r["train_seconds"] for r in rows])),
            "epochs_mean": float(np.mean([r["epochs"] for r in rows])),
            "images_per_s": {k: float(np.mean([r["images_per_s"][k] for r in rows])) for k in names},
            "flagged_normal": float(np.mean([r["flagged_normal"] for r in rows])),
            "flagged_anomalous": float(np.mean([r["flagged_anomalous"] for r in rows])),
        },
    }
    if args.via_files:
        doc["via_files_max_diff"] = float(max(abs(r["auc_via_files"] - r["auc_in_memory_default"]) for r in rows))
    write_results(args.out, doc, markdown(doc))
    return 0


def _line(row: dict[str, Any]) -> str:
    aucs = " ".join(f"{k.split(' ')[0]}={v:.4f}" for k, v in row["auc"].items())
    return (
        f"digit {row['digit']} seed {row['seed']}: train {row['train_seconds']:.1f} s, {row['epochs']} epochs; {aucs}"
    )


if __name__ == "__main__":
    sys.exit(main())
