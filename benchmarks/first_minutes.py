"""The first five minutes of a new user, through the command line, with default settings.

Two cases of issue 29, each `vae-anomaly fit DIR -o m.vae`, then `vae-anomaly score IN --model m.vae
--threshold auto --format json`:

  crops: 300 normal JPEG crops (100-250 px) of four packaged photographs; incoming 60 clean crops
         drawn the same way and 8 bad ones of each kind of `photo_crops.py` (48 in all);
  dark:  400 normal 128-px crops of the same photographs; incoming 5 crops darkened to 10%.

Printed and written: how many of each kind the default decision flags, whether each flagged dark image
has a brightness reason, the warnings, and, from the same model file and files, the rule of fc067ad
(`previous_rule.py`) beside it.

    python benchmarks/first_minutes.py [--work DIR] [--out benchmarks/results/first_minutes]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_crops import KINDS, NORMAL_PHOTOS, _photos, build, write
from provenance import provenance, write_results
from small_sets import today_p_values

from vae_anomaly import Detector

RESULTS = Path(__file__).resolve().parent / "results"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "vae_anomaly", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def dark_case(folder: Path, seed: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    """400 normal 128-px crops; 5 crops darkened to 10%."""
    if (folder / "train").exists():  # a rerun on the same --work: the same files
        train = sorted(str(p) for p in (folder / "train").glob("*.jpg"))
        return train, {"dark": sorted(str(p) for p in (folder / "incoming").glob("*.jpg"))}
    rng = np.random.default_rng(seed)
    photos = _photos(NORMAL_PHOTOS)

    def crop128() -> Image.Image:
        img = photos[int(rng.integers(len(photos)))]
        x0, y0 = int(rng.integers(0, img.width - 128)), int(rng.integers(0, img.height - 128))
        return img.crop((x0, y0, x0 + 128, y0 + 128))

    train = write(folder / "train", "normal", [crop128() for _ in range(400)])
    dark = [Image.fromarray((np.asarray(crop128(), dtype=np.float64) * 0.10 + 0.5).astype(np.uint8)) for _ in range(5)]
    return train, {"dark": write(folder / "incoming", "dark", dark)}


def crops_case(folder: Path, seed: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    if (folder / "train").exists():  # a rerun on the same --work: the same files
        paths = sorted(str(p) for p in (folder / "incoming").glob("*.jpg"))
        kinds = {"clean": "clean", **{k.replace(" ", "_"): k for k in KINDS}}
        incoming: dict[str, list[str]] = {}
        for p in paths:
            incoming.setdefault(kinds[Path(p).name.rsplit("_", 1)[0]], []).append(p)
        return sorted(str(p) for p in (folder / "train").glob("*.jpg")), incoming
    train, held, bad = build(folder, 300, 60, 8, seed)
    return train, {"clean": held, **bad}


def run_case(name: str, folder: Path, train: list[str], incoming: dict[str, list[str]]) -> dict[str, Any]:
    model, timing = folder / "m.vae", folder / "fit.json"
    if model.exists() and timing.exists():  # a rerun on the same --work: the same fit, its time kept
        fit_s = float(json.loads(timing.read_text())["seconds"])
    else:
        t0 = time.perf_counter()
        fit = cli("fit", folder / "train", "-o", model)
        fit_s = time.perf_counter() - t0
        if fit.returncode != 0:
            raise SystemExit(f"{name}: fit failed\n{fit.stderr}")
        timing.write_text(json.dumps({"seconds": fit_s}))
    score = cli("score", folder / "incoming", "--model", model, "--threshold", "auto", "--format", "json")
    doc = json.loads(score.stdout)
    kind_of = {Path(p).name: k for k, paths in incoming.items() for p in paths}
    records = [r for r in doc["records"] if r["error"] is None]
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in incoming:
        rs = [r for r in records if kind_of[Path(r["path"]).name] == kind]
        by_kind[kind] = {
            "images": len(rs),
            "flagged": sum(r["flagged"] for r in rs),
            "with a brightness reason": sum(any(x["check"] == "brightness" for x in r["reasons"]) for r in rs),
            "brightness among the three most atypical": sum(
                any(x["check"] == "brightness" for x in r["atypical"]) for r in rs
            ),
            "median p": float(np.median([r["p_value"] for r in rs])),
        }
    # The rule it replaced, from the same model file and files.
    det = Detector.load(model)
    paths = [p for paths in incoming.values() for p in paths]
    res = det.score(paths)
    today = today_p_values(det, res)
    level = doc["summary"]["effective_fpr"]
    kinds = np.array([kind_of[Path(p).name] for p in res.paths])
    for kind in incoming:
        by_kind[kind]["flagged today"] = int(np.sum(today[kinds == kind] <= level + 1e-12))
    return {
        "case": name,
        "training images": len(train),
        "fit seconds": fit_s,
        "exit code": score.returncode,
        "level": level,
        "warnings": doc["warnings"],
        "guarantee": doc["summary"]["guarantee"],
        "kinds": by_kind,
        "dark reasons": [
            (r["reasons"] or r["atypical"])[0]["text"] for r in records if kind_of[Path(r["path"]).name] == "dark"
        ][:5],
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# The first five minutes, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
        "Default `fit`, then `score --threshold auto`; **today**: the rule of fc067ad on the same scores.",
    ]
    for case in doc["cases"]:
        lines += [
            "",
            f"## {case['case']}: {case['training images']} normal images, fit {case['fit seconds']:.0f} s, "
            f"level {case['level']:.4g}",
            "",
            "| kind | images | flagged | flagged today | with a brightness reason | brightness among its three "
            "most atypical | median p |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for kind, k in case["kinds"].items():
            lines.append(
                f"| {kind} | {k['images']} | {k['flagged']} | {k['flagged today']} | "
                f"{k['with a brightness reason']} | {k['brightness among the three most atypical']} | "
                f"{k['median p']:.4g} |"
            )
        lines += ["", f"- {case['guarantee']}", *[f"- warning: {w}" for w in case["warnings"]]]
        lines += [f"- a dark image's first reason (or most atypical statistic): {t}" for t in case["dark reasons"][:2]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "first_minutes")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="first-minutes-"))
    cases = []
    for name, make in (("crops", crops_case), ("dark", dark_case)):
        folder = work / name
        train, incoming = make(folder)
        case = run_case(name, folder, train, incoming)
        print(json.dumps({k: case[k] for k in ("case", "kinds")}), file=sys.stderr, flush=True)
        cases.append(case)
    doc = {**provenance("default settings"), "kinds": list(KINDS), "cases": cases}
    write_results(args.out, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
