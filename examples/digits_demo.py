"""End-to-end demo on real data that needs no download.

scikit-learn ships 1,797 real 8x8 handwritten digits. This script writes
one digit's images out as PNG files (`normal_imgs/`), and a mix of unseen
images of that digit and of the nine others as `incoming/`, with the true
labels kept aside in `labels.csv`. Then it runs the real command line:

    vae-anomaly fit normal_imgs -o model.vae
    vae-anomaly score incoming --model model.vae --format json

and prints the ROC-AUC of the scores through sklearn.metrics.roc_auc_score.

    python examples/digits_demo.py [--digit 0] [--workdir examples/_run]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score, roc_auc_score


def write_folders(workdir: Path, digit: int, seed: int) -> dict[str, int]:
    """normal_imgs/: 70% of `digit`; incoming/: the other 30% plus 30 of every other digit."""
    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)  # 0..16 grey levels -> 0..255
    rng = np.random.default_rng(seed)
    normal_idx = rng.permutation(np.flatnonzero(digits.target == digit))
    cut = int(0.7 * len(normal_idx))
    incoming = [(i, 0) for i in normal_idx[cut:]]
    for other in range(10):
        if other != digit:
            pick = rng.choice(np.flatnonzero(digits.target == other), 30, replace=False)
            incoming += [(i, 1) for i in pick]
    for sub in ("normal_imgs", "incoming"):
        shutil.rmtree(workdir / sub, ignore_errors=True)
        (workdir / sub).mkdir(parents=True)
    for i in normal_idx[:cut]:
        Image.fromarray(images[i]).save(workdir / "normal_imgs" / f"{digit}_{i:04d}.png")
    labels: dict[str, int] = {}
    for i, y in incoming:
        name = f"img_{i:04d}.png"  # the file name does not give the answer away
        Image.fromarray(images[i]).save(workdir / "incoming" / name)
        labels[name] = y
    with (workdir / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows((f"incoming/{name}", y) for name, y in sorted(labels.items()))  # relative to the CSV
    return labels


def vae_anomaly(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vae_anomaly", *args]
    print("$ vae-anomaly " + " ".join(args), file=sys.stderr)
    # stderr passes through: fit's progress and phases show as they happen.
    return subprocess.run(cmd, stdout=subprocess.PIPE, text=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digit", type=int, default=0, help="the digit that counts as normal")
    ap.add_argument("--workdir", type=Path, default=Path(__file__).parent / "_run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="passed to fit (default: fit's own)")
    args = ap.parse_args()

    labels = write_folders(args.workdir, args.digit, args.seed)
    n_normal = len(list((args.workdir / "normal_imgs").iterdir()))
    print(
        f"wrote {n_normal} normal training images and {len(labels)} incoming images "
        f"({sum(labels.values())} anomalies) under {args.workdir}",
        file=sys.stderr,
    )

    model = args.workdir / "model.vae"
    extra = ["--epochs", str(args.epochs)] if args.epochs else []
    # Few normal images (about 125): hold out 35% so that a 5% two-sided test is reachable.
    t0 = time.perf_counter()
    fit = vae_anomaly(
        "fit",
        str(args.workdir / "normal_imgs"),
        "-o",
        str(model),
        "--seed",
        str(args.seed),
        "--calibration-fraction",
        "0.35",
        *extra,
    )
    fit_s = time.perf_counter() - t0
    if fit.returncode != 0:
        return fit.returncode

    t0 = time.perf_counter()
    score = vae_anomaly(
        "score",
        str(args.workdir / "incoming"),
        "--model",
        str(model),
        "--threshold",
        "auto",
        "--fpr",
        "0.05",
        "--format",
        "json",
    )
    score_s = time.perf_counter() - t0
    if score.returncode not in (0, 1):
        return score.returncode
    report = json.loads(score.stdout)
    records = [r for r in report["records"] if r["error"] is None]
    y = np.array([labels[Path(r["path"]).name] for r in records])
    s = np.array([r["score"] for r in records])
    flagged = np.array([r["flagged"] for r in records])
    summary = report["summary"]
    print(f"fit: {fit_s:.1f} s (including start-up); score: {score_s:.1f} s for {len(records)} images")
    print(f"rule: {summary['rule']}")
    print(
        f"flagged {flagged.sum()} of {len(records)}: {flagged[y == 1].mean():.0%} of the anomalies, "
        f"{flagged[y == 0].mean():.0%} of the unseen normal digits"
    )
    print(
        f"ROC-AUC of the {summary['score']} scores: {roc_auc_score(y, s):.3f}  "
        f"(average precision {average_precision_score(y, s):.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
