"""Real photos at real sizes: `fit` and `score` with default settings, as a new user runs them.

Normal images are JPEG crops (96-256 px a side, mixed aspect ratios) of colour photographs that
ship inside packages (scikit-learn, scikit-image, matplotlib; nothing is downloaded), cut from the
left 60% of each photo. Clean incoming images are drawn the same way (exchangeable with the training
crops: the false-positive rate the decision states is about these); "shifted" clean images are crops
of the right 40% of the same photos, a benign shift reported apart (a detector that sees more also
notices it). Anomalies are further left-side crops with what a photo pipeline does to images:

    dark (x 0.15-0.35), overexposed (x 2-3, clipped), blurred (Gaussian, sigma 2.5% of the short side),
    channel-swapped (RGB -> BGR), grey (in a colour set), rotated (90, 180 or 270 degrees),
    letterboxed (content squeezed to 55-70% of the height or width, black bars), truncated
    (bottom 30-60% of the rows grey, as a cut-off JPEG decodes), other content (crops of photos
    not in the normal set), tiny thumbnails (16-40 px on the long side).

One run prints, per kind and overall: our default decision (`vae-anomaly score`, threshold auto,
--fpr 0.01) by ROC-AUC of its ranking and detection rate, with the false-positive rate on the clean
images; the same with `fit --features pixels` (the pixel VAE, the default before the backbone); the
Gaussian baseline on the backbone's features (Mahalanobis distance with Ledoit-Wolf shrinkage, fitted
on the same standardised 992 values the VAE models); PCA reconstruction error and kNN distance on
the working-size pixels and an image-statistics baseline (brightness, contrast, edge strength,
entropy, size: the largest robust z against the normal set), each thresholded at its own 99th
percentile of held-out normal images;
plus `fit` seconds and peak memory (the whole command, decoding included) and `score` images/s.

`--speed N` adds the throughput check: N 128x128 JPEG files, scored end to end by the CLI (default
decision, JSON report) against decoding the same files alone with the worker pool, and against the
backbone's forward pass alone on the same machine (the engine `score` uses).

    python benchmarks/photos.py [--normal 1000] [--per-kind 60] [--clean 300] [--speed 10000]
        [--no-pixels] [--fit-args "--time-budget 60"] [--work DIR] [--out benchmarks/results/photos]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_results
from throughput import _memory_kb, _tree

RESULTS = Path(__file__).resolve().parent / "results"
FPR = 0.01
CUT = 0.6  # normal crops from x < CUT * width, incoming crops from the rest


def _package_file(module: str, *parts: str) -> Path:
    mod = __import__(module)
    return Path(mod.__file__).resolve().parent.joinpath(*parts)


def photo_paths() -> tuple[list[Path], list[Path]]:
    """(normal photos, other-content photos), all shipped inside installed packages."""
    sk = ("sklearn", "datasets", "images")
    normal = [
        _package_file(sk[0], *sk[1:], "china.jpg"),
        _package_file(sk[0], *sk[1:], "flower.jpg"),
        _package_file("skimage", "data", "coffee.png"),
        _package_file("skimage", "data", "chelsea.png"),
        _package_file("skimage", "data", "astronaut.png"),
        _package_file("skimage", "data", "rocket.jpg"),
        _package_file("skimage", "data", "motorcycle_left.png"),
        _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
    ]
    other = [_package_file("skimage", "data", "hubble_deep_field.jpg"), _package_file("skimage", "data", "retina.jpg")]
    return normal, other


def crop(img: Image.Image, rng: np.random.Generator, lo: float, hi: float) -> Image.Image:
    """A crop of 96-256 px a side (mixed aspect) whose columns lie in [lo, hi) of the width."""
    w, h = img.size
    x_lo, x_hi = int(lo * w), int(hi * w)
    cw = int(rng.integers(96, min(256, x_hi - x_lo) + 1))
    ch = int(rng.integers(96, min(256, h) + 1))
    x0 = int(rng.integers(x_lo, x_hi - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _scale(img: Image.Image, factor: float) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64) * factor
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


def _letterbox(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    frac = rng.uniform(0.55, 0.70)
    canvas = Image.new("RGB", (w, h))
    if rng.random() < 0.5:  # bars top and bottom
        inner = img.resize((w, max(1, int(h * frac))), Image.Resampling.BILINEAR)
        canvas.paste(inner, (0, (h - inner.height) // 2))
    else:
        inner = img.resize((max(1, int(w * frac)), h), Image.Resampling.BILINEAR)
        canvas.paste(inner, ((w - inner.width) // 2, 0))
    return canvas


def _truncate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    arr = np.array(img)
    arr[int(arr.shape[0] * (1 - rng.uniform(0.3, 0.6))) :] = 128
    return Image.fromarray(arr)


def _thumbnail(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(16, 41))
    w, h = img.size
    s = side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)


CORRUPTIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "dark": lambda im, rng: _scale(im, rng.uniform(0.15, 0.35)),
    "overexposed": lambda im, rng: _scale(im, rng.uniform(2.0, 3.0)),
    "blurred": lambda im, rng: im.filter(ImageFilter.GaussianBlur(0.025 * min(im.size))),
    "channel-swapped": lambda im, rng: Image.fromarray(np.asarray(im)[..., ::-1].copy()),
    "grey": lambda im, rng: im.convert("L").convert("RGB"),
    "rotated": lambda im, rng: im.transpose(
        [Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270][int(rng.integers(3))]
    ),
    "letterboxed": _letterbox,
    "truncated": _truncate,
    "tiny thumbnail": _thumbnail,
}
KINDS = (*CORRUPTIONS, "other content")


def build(work: Path, n_normal: int, n_clean: int, per_kind: int, seed: int) -> dict[str, list[Path]]:
    """Write the JPEG files; returns kind -> files ("normal", "clean", then each anomaly kind)."""
    rng = np.random.default_rng(seed)
    normal_photos, other_photos = photo_paths()
    photos = [Image.open(p).convert("RGB") for p in normal_photos]
    others = [Image.open(p).convert("RGB") for p in other_photos]
    sets: dict[str, list[Path]] = {}

    def write(kind: str, folder: Path, images: list[Image.Image]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        sets[kind] = []
        for i, im in enumerate(images):
            path = folder / f"{kind.replace(' ', '_')}_{i:05d}.jpg"
            im.save(path, quality=90)
            sets[kind].append(path)

    write("normal", work / "normal", [crop(photos[i % len(photos)], rng, 0.0, CUT) for i in range(n_normal)])
    write("clean", work / "incoming", [crop(photos[i % len(photos)], rng, 0.0, CUT) for i in range(n_clean)])
    write("shifted", work / "incoming", [crop(photos[i % len(photos)], rng, CUT, 1.0) for i in range(n_clean)])
    for kind, fn in CORRUPTIONS.items():
        base = [crop(photos[i % len(photos)], rng, 0.0, CUT) for i in range(per_kind)]
        write(kind, work / "incoming", [fn(im, rng) for im in base])
    write("other content", work / "incoming", [crop(others[i % len(others)], rng, 0.0, 1.0) for i in range(per_kind)])
    return sets


def peak_rss(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str], float]:
    """`run`, and the command's peak resident memory in MB: the largest VmHWM of its processes, polled.

    Not `RUSAGE_CHILDREN`: a forked child reports the parent's pages until it execs, so this
    benchmark's own memory (the photos it cut) would be counted as the command's.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0

    def poll() -> None:
        nonlocal peak
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):  # a process that ends mid-walk
                peak = max([peak, *(_memory_kb(pid, "VmHWM") for pid in _tree(proc.pid))])
            time.sleep(0.05)

    watcher = threading.Thread(target=poll)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    seconds = time.perf_counter() - t0
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode not in (0, 1):
        sys.stderr.write(err)
        raise SystemExit(f"{shlex.join(cmd)} exited {proc.returncode}")
    return seconds, done, peak / 1024


def run(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{shlex.join(cmd)} exited {proc.returncode}")
    return seconds, proc


def cli() -> list[str]:
    return [sys.executable, "-m", "vae_anomaly"]


# ------------------------------------------------------------------ baselines
def pixels(files: list[Path], size: int) -> np.ndarray:
    """Working-size pixels, decoded the way the model decodes them (flattened, in [0, 1])."""
    from vae_anomaly.images.batching import read_images
    from vae_anomaly.images.decoding import Preprocessing

    batch = read_images(files, Preprocessing(3, size))
    assert not batch.errors, batch.errors[:3]
    return batch.pixels.reshape(len(files), -1).astype(np.float32) / 255.0


def statistics(files: list[Path]) -> np.ndarray:
    """Per file: brightness, contrast, edge strength, grey-level entropy, log pixel count, log aspect."""
    out = []
    for f in files:
        with Image.open(f) as im:
            grey = np.asarray(im.convert("L"), dtype=np.float64)
        edges = np.hypot(ndimage.sobel(grey, 0), ndimage.sobel(grey, 1)).mean()
        hist = np.bincount(grey.astype(np.uint8).ravel(), minlength=256) / grey.size
        entropy = -(hist[hist > 0] * np.log2(hist[hist > 0])).sum()
        h, w = grey.shape
        out.append([grey.mean(), grey.std(), edges, entropy, np.log(w * h), np.log(w / h)])
    return np.array(out)


def robust_z(train: np.ndarray, x: np.ndarray) -> np.ndarray:
    med = np.median(train, axis=0)
    mad = 1.4826 * np.median(np.abs(train - med), axis=0)
    mad = np.where(mad > 0, mad, np.abs(train - med).mean(axis=0) + 1e-9)
    return np.abs((x - med) / mad).max(axis=1)


def baselines(normal: list[Path], incoming: list[Path], size: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each baseline's scores on the incoming files, and on held-out normals for its threshold."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    k = len(normal) // 5
    fit_files, held_files = [normal[i] for i in order[k:]], [normal[i] for i in order[:k]]
    x_fit, x_held, x_in = pixels(fit_files, size), pixels(held_files, size), pixels(incoming, size)
    pca = PCA(n_components=0.9, random_state=seed).fit(x_fit)

    def pca_err(x: np.ndarray) -> np.ndarray:
        return np.asarray(((x - pca.inverse_transform(pca.transform(x))) ** 2).sum(1))

    nn = NearestNeighbors(n_neighbors=5).fit(x_fit)

    def knn(x: np.ndarray) -> np.ndarray:
        return np.asarray(nn.kneighbors(x)[0].mean(1))

    s_fit, s_held, s_in = statistics(fit_files), statistics(held_files), statistics(incoming)
    return {
        "PCA reconstruction (90% var), pixels": {"held": pca_err(x_held), "incoming": pca_err(x_in)},
        "kNN distance (k=5), pixels": {"held": knn(x_held), "incoming": knn(x_in)},
        "image statistics (max robust z)": {"held": robust_z(s_fit, s_held), "incoming": robust_z(s_fit, s_in)},
    }


# ------------------------------------------------------------------ figures
def per_kind(kind_of: np.ndarray, ranking: np.ndarray, flags: np.ndarray) -> dict[str, Any]:
    """ROC-AUC of each kind against the clean images, its detection rate, and overall figures."""
    clean = kind_of == "clean"
    out: dict[str, Any] = {"fpr": float(flags[clean].mean()), "kinds": {}}
    for kind in KINDS:
        sel = kind_of == kind
        y = np.r_[np.zeros(clean.sum()), np.ones(sel.sum())]
        out["kinds"][kind] = {
            "roc_auc": float(roc_auc_score(y, np.r_[ranking[clean], ranking[sel]])),
            "detected": float(flags[sel].mean()),
        }
    shifted = kind_of == "shifted"
    out["shifted"] = {
        "flagged": float(flags[shifted].mean()),
        "roc_auc": float(roc_auc_score(np.r_[np.zeros(clean.sum()), np.ones(shifted.sum())],
                                       np.r_[ranking[clean], ranking[shifted]])),
    }  # fmt: skip
    anomalous = ~clean & ~shifted
    keep = clean | anomalous
    out["roc_auc"] = float(roc_auc_score(anomalous[keep].astype(int), ranking[keep]))
    out["detected"] = float(flags[anomalous].mean())
    aucs = [v["roc_auc"] for v in out["kinds"].values()]
    out["mean_kind_auc"], out["worst_kind_auc"] = float(np.mean(aucs)), float(np.min(aucs))
    return out


def speed(work: Path, n: int, model: Path, seed: int) -> dict[str, Any]:
    """`vae-anomaly score` over n 128x128 JPEG files against decoding them alone (same worker pool)."""
    from vae_anomaly.images.batching import DecodeOptions, iter_batches
    from vae_anomaly.images.decoding import Preprocessing
    from vae_anomaly.images.listing import find_images

    folder = work / "speed"
    rng = np.random.default_rng(seed + 1)
    photos = [Image.open(p).convert("RGB") for p in photo_paths()[0]]
    if not folder.exists() or len(list(folder.iterdir())) != n:
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im = photos[i % len(photos)]
            x0, y0 = int(rng.integers(0, im.width - 128)), int(rng.integers(0, im.height - 128))
            im.crop((x0, y0, x0 + 128, y0 + 128)).save(folder / f"s{i:06d}.jpg", quality=90)
    info = json.loads(run([*cli(), "info", str(model), "--format", "json"])[1].stdout)
    prep = Preprocessing.from_dict(info["preprocessing"])
    files = find_images([folder]).files
    decode_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _batch in iter_batches(files, prep, 256, options=DecodeOptions(cache=False)):
            pass
        decode_s.append(time.perf_counter() - t0)
    score_s, loop_s = [], []
    for _ in range(3):
        seconds, proc = run([*cli(), "score", str(folder), "--model", str(model), "--format", "json", "--no-cache"])
        score_s.append(seconds)
        # "scored N of N images in X s": the scoring loop alone, without start-up, listing and the report
        loop_s.append(float(re.search(r"scored \d+ of \d+ images.* in ([0-9.]+) s \(", proc.stderr).group(1)))
    d, s, loop = float(np.median(decode_s)), float(np.median(score_s)), float(np.median(loop_s))
    from vae_anomaly.model import backbone

    net = backbone.Features()
    batch = next(iter_batches(files[: backbone.BATCH * 8], prep, backbone.BATCH * 8)).pixels
    net(batch[: backbone.BATCH])  # warm-up
    fwd = []
    for _ in range(3):
        t0 = time.perf_counter()
        net(batch)
        fwd.append(len(batch) / (time.perf_counter() - t0))
    return {
        "backbone_engine": net.engine,
        "backbone_batch": backbone.BATCH,
        "backbone_images_per_s": float(np.median(fwd)),
        "files": n,
        "decode_seconds": decode_s,
        "score_seconds": score_s,
        "score_loop_seconds": loop_s,
        "decode_images_per_s": n / d,
        "score_images_per_s": n / s,
        "score_loop_images_per_s": n / loop,
        "ratio": d / s,
        "loop_ratio": d / loop,
    }


def ours(work: Path, sets: dict[str, list[Path]], fit_args: str, tag: str) -> dict[str, Any]:
    """`fit` then `score` through the CLI, as a user runs them: the figures, and the fit's cost."""
    model = work / f"model-{tag}.vae"
    fit_cmd = [*cli(), "fit", str(work / "normal"), "-o", str(model), *shlex.split(fit_args)]
    fit_s, fit_proc, fit_rss_mb = peak_rss(fit_cmd)
    if fit_proc.returncode != 0:
        raise SystemExit(f"fit failed: {fit_proc.stderr[-2000:]}")
    info = json.loads(run([*cli(), "info", str(model), "--format", "json"])[1].stdout)
    score_cmd = [*cli(), "score", str(work / "incoming"), "--model", str(model), "--format", "json"]
    score_s, score_proc = run(score_cmd)
    report = json.loads(score_proc.stdout)
    records = {Path(r["path"]).name: r for r in report["records"]}
    incoming = [p for kind, files in sets.items() if kind != "normal" for p in files]
    kind_of = np.array([kind for kind, files in sets.items() if kind != "normal" for _ in files])
    rank = np.array([records[p.name]["rank"] for p in incoming], dtype=np.float64)
    flags = np.array([bool(records[p.name]["flagged"]) for p in incoming])
    score = np.array([records[p.name]["score"] for p in incoming], dtype=np.float64)
    return {
        "figures": per_kind(kind_of, -rank, flags),
        "score_alone": per_kind(kind_of, score, np.zeros(len(score), bool)),
        "model_path": model,
        "fit_command": "vae-anomaly fit normal -o model.vae " + fit_args,
        "fit_seconds": fit_s,
        "fit_peak_rss_mb": fit_rss_mb,
        "fit_stderr_tail": fit_proc.stderr[-3000:],
        "model": {k: info[k] for k in ("preprocessing", "config", "features", "training") if k in info},
        "score_seconds": score_s,
        "score_images_per_s": len(incoming) / score_s,
        "threshold": report["summary"].get("threshold"),
    }


def feature_gaussian(normal: list[Path], incoming: list[Path], seed: int) -> dict[str, np.ndarray]:
    """The Gaussian baseline on the backbone's features: Mahalanobis distance under Ledoit-Wolf's shrunk
    covariance of the standardised 992 values, fitted on 80% of the normal images (decoded as `fit` does)."""
    from sklearn.covariance import LedoitWolf

    from vae_anomaly.images.batching import read_images
    from vae_anomaly.images.decoding import Preprocessing
    from vae_anomaly.model import backbone

    features = backbone.Features()
    prep = Preprocessing(3, backbone.SIZE)

    def of(files: list[Path]) -> np.ndarray:
        return features(read_images(files, prep).pixels).astype(np.float64)

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(normal))
    k = len(normal) // 5
    x_fit, x_held = of([normal[i] for i in order[k:]]), of([normal[i] for i in order[:k]])
    mean, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    lw = LedoitWolf().fit((x_fit - mean) / sd)
    return {"held": lw.mahalanobis((x_held - mean) / sd), "incoming": lw.mahalanobis((of(incoming) - mean) / sd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--normal", type=int, default=1000, help="normal training images")
    ap.add_argument("--clean", type=int, default=300, help="clean incoming images (and as many shifted ones)")
    ap.add_argument("--per-kind", type=int, default=60, help="anomalies of each kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit-args", default="", help="extra `fit` options, e.g. '--time-budget 60'")
    ap.add_argument("--no-pixels", action="store_true", help="skip the `--features pixels` run")
    ap.add_argument("--speed", type=int, default=0, help="also score this many 128 px JPEG files for throughput")
    ap.add_argument("--work", type=Path, default=None, help="folder for the files (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=RESULTS / "photos")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        sets = build(work, args.normal, args.clean, args.per_kind, args.seed)
        incoming = [p for kind, files in sets.items() if kind != "normal" for p in files]
        kind_of = np.array([kind for kind, files in sets.items() if kind != "normal" for _ in files])
        runs = {"vae-anomaly default": ours(work, sets, args.fit_args, "default")}
        if not args.no_pixels:
            runs["vae-anomaly --features pixels"] = ours(work, sets, args.fit_args + " --features pixels", "pixels")
        methods = {name: r.pop("figures") for name, r in runs.items()}
        alone = runs["vae-anomaly default"].pop("score_alone")
        for r in runs.values():
            r.pop("score_alone", None)
        methods["our VAE's score alone (ranked only)"] = alone
        gauss = feature_gaussian(sets["normal"], incoming, args.seed)
        threshold = np.quantile(gauss["held"], 1 - FPR)
        methods["Gaussian on the backbone's features"] = per_kind(
            kind_of, gauss["incoming"], gauss["incoming"] > threshold
        )
        size = (
            int(runs["vae-anomaly --features pixels"]["model"]["preprocessing"]["size"]) if not args.no_pixels else 48
        )
        for name, s in baselines(sets["normal"], incoming, size, args.seed).items():
            threshold = np.quantile(s["held"], 1 - FPR)
            methods[name] = per_kind(kind_of, s["incoming"], s["incoming"] > threshold)
        doc: dict[str, Any] = {
            **provenance(f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"),
            "sets": {k: len(v) for k, v in sets.items()},
            "runs": {name: {k: v for k, v in r.items() if k != "model_path"} for name, r in runs.items()},
            "methods": methods,
        }
        if args.speed:
            doc["speed"] = speed(work, args.speed, runs["vae-anomaly default"]["model_path"], args.seed)
    write_results(args.out, doc, markdown(doc))
    return 0


def markdown(doc: dict[str, Any]) -> str:
    methods = doc["methods"]
    names = list(methods)
    head = "| kind | " + " | ".join(names) + " |\n| --- |" + " --- |" * len(names)
    lines = [
        f"Real photos, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
        f"Sets: {doc['sets']} (clean: drawn as the training crops; shifted: clean crops of other regions).",
        "",
        *[
            f"- {name}: `{r['fit_command'].strip()}` {r['fit_seconds']:.1f} s wall for the whole command, peak RSS "
            f"{r['fit_peak_rss_mb']:.0f} MB, models {r['model'].get('features', {}).get('kind', 'pixels')} at "
            f"{r['model']['preprocessing']['size']} px; `score` {r['score_images_per_s']:.0f} images/s (the "
            "command, start-up included)"
            for name, r in doc["runs"].items()
        ],
        "",
        "ROC-AUC against the clean incoming images / detected at the method's threshold "
        f"(ours: default `auto`, --fpr {FPR}; baselines: the 99th percentile of held-out normal images):",
        "",
        head,
    ]
    for kind in KINDS:
        cells = [
            f"{methods[m]['kinds'][kind]['roc_auc']:.3f} / "
            + ("-" if "ranked only" in m else f"{100 * methods[m]['kinds'][kind]['detected']:.0f}%")
            for m in names
        ]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    for label, key in (
        ("overall ROC-AUC", "roc_auc"),
        ("mean of kinds", "mean_kind_auc"),
        ("worst kind", "worst_kind_auc"),
    ):
        lines.append(f"| **{label}** | " + " | ".join(f"**{methods[m][key]:.3f}**" for m in names) + " |")
    lines.append(
        "| detected, all anomalies | "
        + " | ".join("-" if "ranked only" in m else f"{100 * methods[m]['detected']:.1f}%" for m in names)
        + " |"
    )
    lines.append(
        "| **false positives, clean** | "
        + " | ".join("-" if "ranked only" in m else f"**{100 * methods[m]['fpr']:.1f}%**" for m in names)
        + " |"
    )
    lines.append(
        "| flagged, shifted clean (ROC-AUC vs clean) | "
        + " | ".join(
            f"{100 * methods[m]['shifted']['flagged']:.1f}% ({methods[m]['shifted']['roc_auc']:.3f})" for m in names
        )
        + " |"
    )
    if "speed" in doc:
        sp = doc["speed"]
        lines += [
            "",
            f"Throughput, {sp['files']:,} 128x128 JPEG files (median of 3): `vae-anomaly score` (default decision, "
            f"JSON) {sp['score_images_per_s']:,.0f} images/s end to end; decoding alone (same workers) "
            f"{sp['decode_images_per_s']:,.0f} images/s; ratio **{sp['ratio']:.2f}**. The scoring loop alone (no "
            f"start-up, listing or report): {sp['score_loop_images_per_s']:,.0f} images/s, "
            f"ratio {sp['loop_ratio']:.2f}. The backbone's forward pass alone ({sp['backbone_engine']}, batches of "
            f"{sp['backbone_batch']}): {sp['backbone_images_per_s']:,.0f} images/s; `score` end to end at "
            f"**{sp['score_images_per_s'] / sp['backbone_images_per_s']:.2f}** of it.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
