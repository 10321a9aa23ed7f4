"""What the checks and the duplicate search cost `score`: this checkout against another, in one run.

1. Throughput: `vae-anomaly score` (default decision, JSON report, no pixel cache) over N 128x128
   JPEG photo crops, run alternately by this checkout and by the one at `--against` (a worktree of
   the commit before the checks, run with PYTHONPATH pointing at it), R times each; the median of
   each and their ratio. Both score with the same model file (written by this checkout; the older
   code reads it and ignores the checks' entries).
2. Leakage at scale: the same model with its training fingerprints padded to `--training` entries
   (random hashes behind the real ones), scoring M 28x28 PNG digits with the duplicate search on:
   images/s of the whole command and of the scoring loop.

    git worktree add /tmp/before <commit>
    python benchmarks/checks_cost.py --against /tmp/before [--files 10000] [--repeats 3]
        [--training 100000] [--digits 10000] [--out benchmarks/results/checks_cost]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photos
from mnist import load_mnist
from provenance import provenance, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def timed_score(folder: Path, model: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Seconds of the whole `score` command and of its scoring loop (its own "scored N ... in X s")."""
    cmd = [*photos.cli(), "score", str(folder), "--model", str(model), "--format", "json", "--no-cache"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"score exited {proc.returncode}")
    loop = float(re.search(r"scored \d+ of \d+ images.* in ([0-9.]+) s \(", proc.stderr).group(1))  # type: ignore[union-attr]
    return seconds, loop


def padded(model: Path, out: Path, n: int, seed: int) -> None:
    """The model file with `n` training fingerprints: its own, then random ones (re-checksummed)."""
    from vae_anomaly.model import artifact

    mf = artifact.load(model)
    rng = np.random.default_rng(seed)
    names = mf.metadata["checks"]["training_files"]
    extra = n - len(names)
    for key in (artifact.TRAIN_EXACT_KEY, artifact.TRAIN_NEAR_KEY):
        more = torch.from_numpy(rng.integers(-(2**63), 2**63 - 1, extra, dtype=np.int64))
        mf.calibration[key] = torch.cat([mf.calibration[key], more])
    mf.metadata["checks"]["training_files"] = names + [f"padding/{i:06d}.png" for i in range(extra)]
    artifact.save(out, mf.metadata, mf.state_dict, mf.calibration)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, required=True, help="a checkout of the code to compare with")
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--training", type=int, default=100_000)
    ap.add_argument("--digits", type=int, default=10_000)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "checks_cost")
    args = ap.parse_args()
    before = {**os.environ, "PYTHONPATH": str(args.against.resolve())}
    doc: dict[str, Any] = {**provenance(), "against": str(args.against)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sets = photos.build(work / "photos", 1000, 0, 0, args.seed)
        model = work / "photos.vae"
        photos.run([*photos.cli(), "fit", str(work / "photos" / "normal"), "-o", str(model)])
        photos.speed(work, args.files, model, args.seed)  # writes the N files (and times them once: a warm-up)
        runs: dict[str, list[tuple[float, float]]] = {"with checks": [], "before": []}
        for _ in range(args.repeats):
            runs["with checks"].append(timed_score(work / "speed", model))
            runs["before"].append(timed_score(work / "speed", model, before))
        med = {k: (float(np.median([s for s, _ in v])), float(np.median([lp for _, lp in v]))) for k, v in runs.items()}
        doc["throughput"] = {
            "files": args.files,
            "runs": runs,
            "images_per_s": {k: args.files / s for k, (s, _) in med.items()},
            "loop_images_per_s": {k: args.files / lp for k, (_, lp) in med.items()},
            "ratio": med["before"][0] / med["with checks"][0],
            "loop_ratio": med["before"][1] / med["with checks"][1],
        }
        # Leakage at scale: digits against a padded training set.
        x_tr, _ = load_mnist(args.data, "train")
        x_te, _ = load_mnist(args.data, "test")
        normal, incoming = work / "digits" / "normal", work / "digits" / "incoming"
        normal.mkdir(parents=True)
        incoming.mkdir(parents=True)
        for i in range(2000):
            Image.fromarray(x_tr[i]).save(normal / f"t{i:05d}.png")
        for i in range(args.digits):
            Image.fromarray(x_te[i % len(x_te)] if i < len(x_te) else x_tr[2000 + i]).save(incoming / f"d{i:05d}.png")
        digit_model, big = work / "digits.vae", work / "digits-big.vae"
        photos.run([*photos.cli(), "fit", str(normal), "-o", str(digit_model)])
        padded(digit_model, big, args.training, args.seed)
        scale = {"own": [], "padded": []}
        for _ in range(args.repeats):
            scale["own"].append(timed_score(incoming, digit_model))
            scale["padded"].append(timed_score(incoming, big))
        doc["leakage"] = {
            "training_fingerprints": args.training,
            "digits": args.digits,
            "runs": scale,
            "images_per_s": {k: args.digits / float(np.median([s for s, _ in v])) for k, v in scale.items()},
            "loop_images_per_s": {k: args.digits / float(np.median([lp for _, lp in v])) for k, v in scale.items()},
        }
        del sets
    write_results(args.out, doc, markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    t, lk = doc["throughput"], doc["leakage"]
    sizes = {"own": "the model's own (2,000)", "padded": f"{lk['training_fingerprints']:,}"}
    return "\n".join(
        [
            f"Cost of the checks and duplicates, {doc['date']}, {doc['machine']}, commit {doc['commit']} against "
            f"{doc['against']}",
            "",
            f"    {doc['command']}",
            "",
            "| run | score, images/s (whole command) | scoring loop, images/s |",
            "| --- | ---: | ---: |",
            *(
                f"| {k}: {t['files']:,} 128x128 JPEG | {t['images_per_s'][k]:,.0f} | {t['loop_images_per_s'][k]:,.0f} |"
                for k in ("before", "with checks")
            ),
            *(
                f"| {lk['digits']:,} 28x28 PNG digits, training fingerprints: "
                f"{sizes[k]} "
                f"| {lk['images_per_s'][k]:,.0f} | {lk['loop_images_per_s'][k]:,.0f} |"
                for k in ("own", "padded")
            ),
            "",
            f"with checks / before (medians of {len(t['runs']['before'])}): whole command "
            f"{1 / t['ratio']:.3f}, scoring loop {1 / t['loop_ratio']:.3f}",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
