"""Throughput of the product's own plumbing against a bare PyTorch loop.

For generated images (28x28 grey and 64x64 colour, smooth random blobs,
written as PNG files) or MNIST digits (`--data`), prints: decoding images/s
from a folder of PNG files; training images/s of `fit` and of a bare
PyTorch loop (same architecture and batch size, tensors already in memory)
and their ratio; end-to-end `fit` seconds from the folder (decoding
included, default settings); scoring images/s from files for every score
type; peak memory (RSS); and PyOD's VAE fit time where `pyod` is installed.

    python benchmarks/throughput.py [--n 6000] [--data ../shared/data/mnist]

Writes benchmarks/results/throughput.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist
from provenance import provenance, write_results

from vae_anomaly import Detector, FitConfig
from vae_anomaly.images import Preprocessing, find_images, read_images
from vae_anomaly.model import ConvVAE, VAEConfig
from vae_anomaly.scores import SCORE_NAMES
from vae_anomaly.train import elbo_loss

RESULTS = Path(__file__).resolve().parent / "results"


def blobs(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """Smooth random images: a few Gaussian blobs each, uint8 (N, H, W[, C])."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, size, size, channels))
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, (2, n, 1, 1))
        width = rng.uniform(0.05, 0.2, (n, 1, 1))
        g = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
        out += g[..., None] * rng.uniform(60, 200, (n, 1, 1, channels))
    out = np.clip(out + rng.normal(0, 4, out.shape), 0, 255).astype(np.uint8)
    return out[..., 0] if channels == 1 else out


def bare_loop(pixels: np.ndarray, batch_size: int, epochs: int) -> float:
    """The reference: the same network and loss, batches sliced from a float tensor in memory."""
    x = torch.from_numpy(pixels).float().div_(255.0)
    model = ConvVAE(VAEConfig(x.shape[1], x.shape[2]))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            loss, _ = elbo_loss(model, x[order[i : i + batch_size]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return epochs * len(x) / (time.perf_counter() - t0)


def measure(name: str, images: np.ndarray, tmp: Path) -> dict[str, Any]:
    folder = tmp / name
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    files = find_images([folder]).files
    channels = 3 if images.ndim == 4 else 1
    prep = Preprocessing(channels, images.shape[1])
    t0 = time.perf_counter()
    batch = read_images(files, prep)
    decode = len(files) / (time.perf_counter() - t0)
    epochs = 3
    det = Detector(FitConfig(epochs=epochs, patience=epochs, folds=1, device="cpu")).fit(batch.pixels)
    train = det.metadata_["training"]["images_per_s"]
    bare = bare_loop(batch.pixels[: det.metadata_["training"]["train_images"]], 128, epochs)
    t0 = time.perf_counter()
    full = Detector(FitConfig(device="cpu")).fit([folder])
    fit_s = time.perf_counter() - t0
    score = {}
    for s in SCORE_NAMES:
        t0 = time.perf_counter()
        full.score([folder], score=s, guard=None)
        score[s] = len(files) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    full.decide(full.score([folder]))
    score["default decision (elbo-ic + kl guard)"] = len(files) / (time.perf_counter() - t0)
    row: dict[str, Any] = {
        "images": len(files),
        "size": f"{images.shape[1]}x{images.shape[2]}x{channels}",
        "decode_img_s": decode,
        "fit_train_img_s": train,
        "bare_loop_img_s": bare,
        "ratio_to_bare": train / bare,
        "fit_end_to_end_s": fit_s,
        "fit_epochs": full.metadata_["training"]["epochs_run"],
        "score_from_files_img_s": score,
    }
    try:
        from pyod.models.vae import VAE
    except ImportError:
        return row
    t0 = time.perf_counter()
    VAE(verbose=0, device="cpu", random_state=0).fit(batch.pixels.reshape(len(files), -1) / 255.0)
    row["pyod_vae_fit_s"] = time.perf_counter() - t0
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="images per data set")
    ap.add_argument("--data", help="MNIST folder: use its first N training digits for the 28x28 grey set")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput")
    args = ap.parse_args()
    grey = load_mnist(args.data, "train")[0][: args.n] if args.data else blobs(args.n, 28, 1, 0)
    sets = {"28x28 grey": grey, "64x64 colour": blobs(args.n, 64, 3, 1)}
    doc: dict[str, Any] = {
        **provenance(f"torch threads {torch.get_num_threads()}"),
        "sets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in sets.items():
            doc["sets"][name] = measure(name.replace(" ", "_"), images, Path(tmp))
            print(name, json.dumps(doc["sets"][name]), file=sys.stderr, flush=True)
    doc["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [f"Throughput, {doc['date']}, {doc['machine']}, commit {doc['commit']}", "", f"    {doc['command']}", ""]
    for name, r in doc["sets"].items():
        lines += [
            f"{name}, {r['images']} PNG files: decode {r['decode_img_s']:,.0f} images/s; training "
            f"{r['fit_train_img_s']:,.0f} images/s vs bare loop {r['bare_loop_img_s']:,.0f} "
            f"(ratio {r['ratio_to_bare']:.2f}); fit end to end {r['fit_end_to_end_s']:.1f} s "
            f"({r['fit_epochs']} epochs); "
            "score from files: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in r["score_from_files_img_s"].items())
            + " images/s"
            + (f"; PyOD VAE fit {r['pyod_vae_fit_s']:.1f} s" if "pyod_vae_fit_s" in r else ""),
            "",
        ]
    lines.append(f"Peak RSS: {doc['peak_rss_mb']:,.0f} MB.")
    write_results(args.out, doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
