"""Our calibrated checks and duplicates beside CleanVision's fixed thresholds, on the same folders, in one run.

Three sets, each written as files and run through `vae-anomaly fit` and `score` with default
settings, and through CleanVision (`Imagelab(data_path).find_issues()`, its defaults; optional,
`pip install -e .[bench]`):

- photos: benchmarks/photos.py's set (JPEG crops of packaged photos; 10 kinds of anomaly).
- digits: MNIST PNG files (../shared/data/mnist): normal training digits, clean test digits and
  benchmarks/corruptions.py's 10 corruptions.
- duplicates: the photo model's training images copied into the incoming batch (exact copies,
  JPEG re-encoded at quality 75, resized to half, brightened by 8%, cropped by 5%), copies of
  incoming images within the batch (exact, re-encoded), and distinct look-alikes (other crops of
  the same photos, the clean images).

Per set and kind: detection (share flagged; CleanVision: any of its quality issues) and the
false-positive rate on clean images, with our model alone (`--no-checks`) beside our default
decision, which measures what the checks add to it; duplicates: recall per kind (found, naming the right source)
and precision (of images called copies, the share that are); CleanVision runs on the union of
training and incoming folders for leaks, as a user would. Seconds per 10,000 images of `score`
(the whole command) and of CleanVision. `--bounds` adds the near-duplicate bound sweep: per
Hamming distance d, the share of copies within d of their source and of distinct images within d
of any training image (NEAR_BITS in duplicates.py is chosen from it).

    python benchmarks/quality_checks.py --data ../shared/data/mnist [--seed 0] [--bounds]
        [--out benchmarks/results/quality_checks]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import photos
from corruptions import corruptions
from mnist import load_mnist
from provenance import provenance, write_results

RESULTS = Path(__file__).resolve().parent / "results"
QUALITY = ("dark", "light", "blurry", "low_information", "grayscale", "odd_size", "odd_aspect_ratio")
COPIES = ("exact copy", "re-encoded (q 75)", "resized (x 0.5)", "brightened (+8%)", "cropped (5%)")
WITHIN = ("exact copy in the batch", "re-encoded copy in the batch")


def ours(work: Path, normal: Path, incoming: Path) -> tuple[dict[str, dict[str, Any]], float, Path]:
    """`fit` and `score` with defaults; records by file name (each with the model-alone flag of
    `--no-checks` added as "model_alone"), the default score command's seconds, the model."""
    model = work / f"{normal.parent.name}.vae"  # photos.vae, digits.vae
    photos.run([*photos.cli(), "fit", str(normal), "-o", str(model)])
    seconds, proc = photos.run([*photos.cli(), "score", str(incoming), "-m", str(model), "--format", "json"])
    records = {Path(r["path"]).name: r for r in json.loads(proc.stdout)["records"]}
    cmd = [*photos.cli(), "score", str(incoming), "-m", str(model), "--format", "json", "--no-checks"]
    for r in json.loads(photos.run(cmd)[1].stdout)["records"]:
        records[Path(r["path"]).name]["model_alone"] = r["flagged"]
    return records, seconds, model


def cleanvision(folder: Path) -> tuple[Any, float]:
    from cleanvision import Imagelab

    t0 = time.perf_counter()
    lab = Imagelab(data_path=str(folder))
    lab.find_issues(verbose=False)
    return lab, time.perf_counter() - t0


def quality_rows(kind_of: dict[str, str], records: dict[str, dict[str, Any]], lab: Any) -> dict[str, dict[str, float]]:
    """Per kind: our detection, CleanVision's (any quality issue), each with the issues named most."""
    issues = lab.issues
    cv_any = issues[[f"is_{q}_issue" for q in QUALITY]].any(axis=1)
    cv = {Path(p).name: bool(v) for p, v in cv_any.items()}
    rows: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(kind_of.values()):
        names = [n for n, k in kind_of.items() if k == kind]
        why: dict[str, int] = {}
        for n in names:
            for reason in records[n]["reasons"][:1]:
                why[reason["check"]] = why.get(reason["check"], 0) + 1
        rows[kind] = {
            "images": len(names),
            "ours": float(np.mean([bool(records[n]["flagged"]) for n in names])),
            "model alone": float(np.mean([bool(records[n]["model_alone"]) for n in names])),
            "cleanvision": float(np.mean([cv[n] for n in names])),
            "our first reasons": ", ".join(f"{k} {v}" for k, v in sorted(why.items(), key=lambda kv: -kv[1])[:3]),
        }
    return rows


def photo_set(work: Path, seed: int) -> dict[str, Any]:
    sets = photos.build(work / "photos", 1000, 300, 60, seed)
    kind_of = {p.name: kind for kind, files in sets.items() if kind != "normal" for p in files}
    records, seconds, model = ours(work, work / "photos" / "normal", work / "photos" / "incoming")
    lab, cv_seconds = cleanvision(work / "photos" / "incoming")
    n = len(kind_of)
    return {
        "rows": quality_rows(kind_of, records, lab),
        "ours_s_per_10k": seconds / n * 10_000,
        "cleanvision_s_per_10k": cv_seconds / n * 10_000,
        "model": model,
        "sets": sets,
    }


def digit_set(work: Path, data: str, seed: int) -> dict[str, Any]:
    x_tr, _ = load_mnist(data, "train")
    x_te, _ = load_mnist(data, "test")
    rng = np.random.default_rng(seed)
    normal, incoming = work / "digits" / "normal", work / "digits" / "incoming"
    normal.mkdir(parents=True)
    incoming.mkdir(parents=True)
    for i in rng.choice(len(x_tr), 4000, replace=False):
        Image.fromarray(x_tr[i]).save(normal / f"train_{i:05d}.png")
    kind_of: dict[str, str] = {}
    for i in range(1000):
        Image.fromarray(x_te[1000 + i]).save(incoming / f"clean_{i:04d}.png")
        kind_of[f"clean_{i:04d}.png"] = "clean"
    for kind, x in corruptions(x_te[:200], seed).items():
        slug = kind.split(" (")[0].replace(" ", "_")
        for i, im in enumerate(x):
            Image.fromarray(im).save(incoming / f"{slug}_{i:04d}.png")
            kind_of[f"{slug}_{i:04d}.png"] = kind
    records, seconds, model = ours(work, normal, incoming)
    lab, cv_seconds = cleanvision(incoming)
    n = len(kind_of)
    return {
        "rows": quality_rows(kind_of, records, lab),
        "ours_s_per_10k": seconds / n * 10_000,
        "cleanvision_s_per_10k": cv_seconds / n * 10_000,
        "model": model,
        "sets": {"normal": sorted(normal.iterdir()), "clean": sorted(incoming.glob("clean_*.png"))},
    }


def _copy(kind: str, src: Path, dst: Path) -> None:
    if kind.startswith("exact"):
        shutil.copyfile(src, dst)
        return
    with Image.open(src) as im:
        im = im.convert("RGB")
        if kind.startswith("re-encoded"):
            im.save(dst, quality=75)
        elif kind.startswith("resized"):
            im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BILINEAR).save(dst, quality=90)
        elif kind.startswith("brightened"):
            ImageEnhance.Brightness(im).enhance(1.08).save(dst, quality=90)
        else:  # cropped 5%: 2.5% off each side
            dx, dy = round(im.width * 0.025), round(im.height * 0.025)
            im.crop((dx, dy, im.width - dx, im.height - dy)).save(dst, quality=90)


def duplicate_set(
    work: Path, label: str, model: Path, sets: dict[str, list[Path]], seed: int, bounds: bool
) -> dict[str, Any]:
    """Copies of training images (leaks) and of incoming images (within the batch), and distinct look-alikes."""
    rng = np.random.default_rng(seed + 1)
    incoming = work / label / "incoming"
    incoming.mkdir(parents=True)
    truth: dict[str, tuple[str, str]] = {}  # file -> (kind, the source's name)
    train, clean = sets["normal"], sets["clean"]
    for p in clean:  # the distinct look-alikes: other crops of the same photos
        shutil.copyfile(p, incoming / p.name)
        truth[p.name] = ("distinct", "")
    for kind in COPIES:
        for j, i in enumerate(rng.choice(len(train), 60, replace=False)):
            suffix = train[i].suffix if kind.startswith("exact") else ".jpg"
            name = f"leak_{kind.split()[0]}_{j:03d}{suffix}"
            _copy(kind, train[i], incoming / name)
            truth[name] = (kind, train[i].name)
    for kind in WITHIN:
        for j, i in enumerate(rng.choice(len(clean), 30, replace=False)):
            suffix = clean[i].suffix if kind.startswith("exact") else ".jpg"
            name = f"zz_{kind.split()[0]}_{j:03d}{suffix}"  # listed after its source
            _copy(kind, clean[i], incoming / name)
            truth[name] = (kind, clean[i].name)
    seconds, proc = photos.run([*photos.cli(), "score", str(incoming), "-m", str(model), "--format", "json"])
    records = {Path(r["path"]).name: r for r in json.loads(proc.stdout)["records"]}
    rows: dict[str, dict[str, Any]] = {}
    union = work / label / "union"  # CleanVision sees training and incoming images together
    union.mkdir()
    for p in train:
        (union / f"train_{p.name}").symlink_to(p)
    for name in truth:
        (union / name).symlink_to(incoming / name)
    lab, cv_seconds = cleanvision(union)
    cv_sets = lab.info["exact_duplicates"]["sets"] + lab.info["near_duplicates"]["sets"]
    cv_partner: dict[str, set[str]] = {}
    for group in cv_sets:
        names = {Path(p).name.removeprefix("train_") for p in group}
        for p in group:
            cv_partner.setdefault(Path(p).name, set()).update(names - {Path(p).name})
    for kind in ("distinct", *COPIES, *WITHIN):
        names = [n for n, (k, _) in truth.items() if k == kind]
        found = [records[n]["duplicate_of"] is not None for n in names]
        right = [
            records[n]["duplicate_of"] is not None and Path(records[n]["duplicate_of"]).name == truth[n][1]
            for n in names
        ]
        cv_right = [truth[n][1] in cv_partner.get(n, set()) for n in names]
        cv_found = [bool(cv_partner.get(n)) for n in names]
        rows[kind] = {
            "images": len(names),
            "ours found": float(np.mean(found)),
            "ours right source": float(np.mean(right)),
            "cleanvision found": float(np.mean(cv_found)),
            "cleanvision right source": float(np.mean(cv_right)),
        }
    info = json.loads(photos.run([*photos.cli(), "info", str(model), "--format", "json"])[1].stdout)
    called = [n for n in truth if records[n]["duplicate_of"] is not None]
    cv_called = [n for n in truth if cv_partner.get(n)]
    doc: dict[str, Any] = {
        "near_bits": info["checks"]["near_bits"],  # the bound `fit` calibrated on the training images
        "rows": rows,
        "ours_precision": float(np.mean([truth[n][0] != "distinct" for n in called])) if called else None,
        "cleanvision_precision": float(np.mean([truth[n][0] != "distinct" for n in cv_called])) if cv_called else None,
        "ours_s_per_10k": seconds / len(truth) * 10_000,
        "cleanvision_s_per_10k": cv_seconds / (len(train) + len(truth)) * 10_000,
    }
    if bounds:
        doc["bounds"] = bound_sweep(model, train, incoming, truth)
    return doc


def bound_sweep(
    model: Path, train: list[Path], incoming: Path, truth: dict[str, tuple[str, str]]
) -> dict[str, dict[str, Any]]:
    """Per perceptual hash of `imagehash` (pHash, the default, and dHash) and Hamming distance d: the
    share of each copy kind within d of its source, and of distinct images within d of their nearest
    training image; with each hash's cost per image."""
    import imagehash

    from vae_anomaly.images.batching import read_images
    from vae_anomaly.images.decoding import Preprocessing
    from vae_anomaly.images.duplicates import fingerprints, hamming

    prep = Preprocessing.from_dict(
        json.loads(photos.run([*photos.cli(), "info", str(model), "--format", "json"])[1].stdout)["preprocessing"]
    )
    names = sorted(truth)
    mine, theirs = read_images([incoming / n for n in names], prep), read_images(train, prep)
    index = {p.name: i for i, p in enumerate(train)}
    pos = {n: i for i, n in enumerate(names)}
    out: dict[str, dict[str, Any]] = {}
    for label, fn in (("phash", imagehash.phash), ("dhash", imagehash.dhash)):
        t0 = time.perf_counter()
        fp = fingerprints(mine.pixels, mine.sources, fn)
        cost = (time.perf_counter() - t0) / len(names)
        train_fp = fingerprints(theirs.pixels, theirs.sources, fn)
        dist: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            kind, src = truth[n]
            if kind == "distinct":
                d = int(hamming(fp.near[i : i + 1], train_fp.near).min())
            elif src in index:
                d = int(hamming(fp.near[i : i + 1], train_fp.near[index[src] : index[src] + 1])[0, 0])
            else:
                d = int(hamming(fp.near[i : i + 1], fp.near[pos[src] : pos[src] + 1])[0, 0])
            dist.setdefault(kind, []).append(d)
        out[label] = {
            "us_per_image": cost * 1e6,
            "within": {k: {str(b): float(np.mean(np.array(v) <= b)) for b in range(17)} for k, v in dist.items()},
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder with the MNIST IDX files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bounds", action="store_true", help="also sweep the near-duplicate Hamming bound")
    ap.add_argument("--out", type=Path, default=RESULTS / "quality_checks")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photo = photo_set(work, args.seed)
        digits = digit_set(work, args.data, args.seed)
        dups = duplicate_set(work, "photo-dups", photo.pop("model"), photo.pop("sets"), args.seed, args.bounds)
        digit_dups = duplicate_set(work, "digit-dups", digits.pop("model"), digits.pop("sets"), args.seed, args.bounds)
    doc = {**provenance(), "photos": photo, "digits": digits, "duplicates": dups, "digit duplicates": digit_dups}
    write_results(args.out, doc, markdown(doc))
    return 0


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"Quality checks and duplicates, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
    ]
    for name in ("photos", "digits"):
        s = doc[name]
        lines += [
            f"{name}: detection per kind (clean: the false-positive rate); vae-anomaly default decision "
            f"(--fpr 0.01) against CleanVision's defaults (any quality issue)",
            "",
            "| kind | images | vae-anomaly | its model alone (--no-checks) | CleanVision | our most frequent "
            "first reason |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for kind, r in s["rows"].items():
            lines.append(
                f"| {kind} | {r['images']} | {_pct(r['ours'])} | {_pct(r['model alone'])} | {_pct(r['cleanvision'])} "
                f"| {r['our first reasons']} |"
            )
        lines += [
            "",
            f"seconds per 10,000 images: vae-anomaly score {s['ours_s_per_10k']:.0f} (the whole command, "
            f"model included), CleanVision {s['cleanvision_s_per_10k']:.0f}",
            "",
        ]
    for key, what in (
        ("duplicates", "photo crops; the distinct images are other crops of the same photos, some overlapping"),
        ("digit duplicates", "MNIST digits; the distinct images are other handwritten digits"),
    ):
        d = doc[key]
        lines += [
            f"{key} ({what}; the bound fit calibrated: {d.get('near_bits')} bits): found (named as a copy) and "
            "right source, per kind; distinct images should find none",
            "",
            "| kind | images | vae-anomaly found | right source | CleanVision found | right source |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for kind, r in d["rows"].items():
            lines.append(
                f"| {kind} | {r['images']} | {_pct(r['ours found'])} | {_pct(r['ours right source'])} | "
                f"{_pct(r['cleanvision found'])} | {_pct(r['cleanvision right source'])} |"
            )
        lines += [
            "",
            f"precision (of images called copies, the share that are): vae-anomaly {_pct(d['ours_precision'])}, "
            f"CleanVision {_pct(d['cleanvision_precision'])}; seconds per 10,000 images: vae-anomaly score "
            f"{d['ours_s_per_10k']:.0f}, CleanVision {d['cleanvision_s_per_10k']:.0f} (training and incoming images)",
            "",
        ]
        for label, sweep in d.get("bounds", {}).items():
            kinds = list(sweep["within"])
            lines += [
                f"near-duplicate bound, {label} (fingerprints {sweep['us_per_image']:.0f} us an image, exact hash "
                "included): share within Hamming distance d (of 64 bits) of the source (distinct: of any training "
                "image)",
                "",
                "| d | " + " | ".join(kinds) + " |",
                "| ---: | " + " | ".join("---:" for _ in kinds) + " |",
            ]
            for b in range(0, 17):
                lines.append(f"| {b} | " + " | ".join(_pct(sweep["within"][k][str(b)]) for k in kinds) + " |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
