"""Throughput of the product's own plumbing against a bare PyTorch loop.

For 28x28 grey images (MNIST digits with `--data`, else generated blobs) and
64x64 colour ones (generated), written as PNG files, prints:

- decoding images/s from the folder: in this process, with the worker
  processes, and from a warm decoded-pixel cache;
- training images/s of `fit` and of a bare PyTorch loop (same architecture
  and batch size, float tensors already in memory), and their ratio; both
  after a warm-up, alternated `--repeats` times, medians reported;
- `vae-anomaly fit FOLDER` wall time in a fresh process, default settings,
  decoding included (cold cache, then warm);
- scoring images/s from files for each score type and for the default
  decision (elbo-ic-nn with the kl guard), decoding included, cold cache;
  and the whole `vae-anomaly score` command's wall time;
- with `--stream N` (28x28 only), `vae-anomaly score` over N PNG files:
  images/s and peak memory of the process tree (RSS of the main process;
  PSS summed over it and its decoding workers, which shares pages fairly);
- PyOD's VAE fit time on the same pixels, where `pyod` is installed.

    python benchmarks/throughput.py [--n 6000] [--data ../shared/data/mnist] [--stream 200000]

Writes benchmarks/results/throughput.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
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
from vae_anomaly.images.batching import DecodeOptions, available_cpus, read_images
from vae_anomaly.images.decoding import Preprocessing
from vae_anomaly.images.listing import find_images
from vae_anomaly.model.score_table import SCORE_NAMES
from vae_anomaly.model.train import elbo_loss
from vae_anomaly.model.vae import ConvVAE, VAEConfig

RESULTS = Path(__file__).resolve().parent / "results"
CLI = [sys.executable, "-m", "vae_anomaly"]


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


def write_folder(folder: Path, images: np.ndarray, n: int | None = None) -> None:
    """N PNG files (cycling through `images`), in subfolders of 10,000 like a real data set."""
    n = len(images) if n is None else n
    for i in range(n):
        sub = folder / f"{i // 10_000:03d}"
        if i % 10_000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(sub / f"{i:07d}.png")


def bare_loop(pixels: np.ndarray, batch_size: int, epochs: int, device: str = "cpu") -> float:
    """The reference: the same network and loss, batches sliced from a float tensor already on the device."""
    x = torch.from_numpy(pixels).to(device).float().div_(255.0)
    model = ConvVAE(VAEConfig(x.shape[1], x.shape[2])).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch_size):
            loss, _ = elbo_loss(model, x[order[i : i + batch_size]])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if device != "cpu":
        torch.cuda.synchronize()
    return epochs * len(x) / (time.perf_counter() - t0)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def training_ratio(pixels: np.ndarray, repeats: int, device: str) -> dict[str, Any]:
    """`fit`'s training loop (held-out loss, checkpoints and all) against the bare loop, alternated."""
    epochs = 3
    cfg = FitConfig(epochs=epochs, patience=epochs, folds=1, device=device, decode=DecodeOptions(cache=False))
    Detector(cfg).fit(pixels[:1024])  # warm-up: thread pools, allocator
    fit, bare = [], []
    for _ in range(repeats):
        det = Detector(cfg).fit(pixels)
        fit.append(det.metadata_["training"]["images_per_s"])
        bare.append(bare_loop(pixels[: det.metadata_["training"]["train_images"]], cfg.batch_size, epochs, device))
    return {
        "fit_train_img_s": statistics.median(fit),
        "bare_loop_img_s": statistics.median(bare),
        "ratio_to_bare": statistics.median(f / b for f, b in zip(fit, bare, strict=True)),
        "fit_train_runs": fit,
        "bare_loop_runs": bare,
    }


def measure(name: str, images: np.ndarray, tmp: Path, repeats: int, device: str) -> dict[str, Any]:
    folder = tmp / name
    write_folder(folder, images)
    files = find_images([folder]).files
    channels = 3 if images.ndim == 4 else 1
    prep = Preprocessing(channels, images.shape[1])
    cache_dir = tmp / f"cache-{name}"
    decode: dict[str, float] = {}
    for label, options in [
        ("in this process", DecodeOptions(workers=0, cache=False)),
        (f"{DecodeOptions().workers_for(len(files))} worker processes", DecodeOptions(cache=False)),
        ("to the cache (cold)", DecodeOptions(cache=True, cache_dir=str(cache_dir))),
        ("from the cache (warm)", DecodeOptions(cache=True, cache_dir=str(cache_dir))),
    ]:
        t0 = time.perf_counter()
        batch = read_images(files, prep, options=options)
        decode[label] = len(files) / (time.perf_counter() - t0)
    row: dict[str, Any] = {
        "images": len(files),
        "size": f"{images.shape[1]}x{images.shape[2]}x{channels}",
        "decode_img_s": decode,
        **training_ratio(batch.pixels, repeats, device),
    }
    env = {**os.environ, "VAE_ANOMALY_CACHE_DIR": str(tmp / f"cli-cache-{name}")}
    model = tmp / f"{name}.vae"
    fit_cmd = [*CLI, "fit", str(folder), "-o", str(model), "--quiet", "--device", device]
    row["fit_end_to_end_s"] = timed(fit_cmd, env)  # cold cache: every file decoded
    row["fit_end_to_end_warm_cache_s"] = timed(fit_cmd, env)
    row["fit_epochs"] = Detector.load(model, device).metadata_["training"]["epochs_run"]
    score: dict[str, float] = {}
    for s in [*SCORE_NAMES, "default decision (elbo-ic-nn + kl guard)"]:
        det = Detector.load(model, device, DecodeOptions(cache=True, cache_dir=str(tmp / f"cache-{name}-{len(score)}")))
        t0 = time.perf_counter()
        if s in SCORE_NAMES:
            det.score([folder], score=s, guard=None)
        else:
            det.decide(det.score([folder]))
        score[s] = len(files) / (time.perf_counter() - t0)
    row["score_from_files_img_s"] = score
    score_cmd = [*CLI, "score", str(folder), "--model", str(model), "--format", "json", "-o", str(tmp / "r.json")]
    score_cmd += ["--device", device]
    row["score_command_s"] = timed(score_cmd, env)  # warm cache (fit filled it), process start-up included
    try:
        from pyod.models.vae import VAE
    except ImportError:
        return row
    t0 = time.perf_counter()
    VAE(verbose=0, device="cpu", random_state=0).fit(batch.pixels.reshape(len(files), -1) / 255.0)
    row["pyod_vae_fit_s"] = time.perf_counter() - t0
    return row


def _tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            pids += [int(c) for c in children]
        i += 1
    return pids


def _memory_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup" if field == "Pss" else f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def stream(images: np.ndarray, n: int, tmp: Path, device: str) -> dict[str, Any]:
    """`vae-anomaly score` over n files: images/s and the process tree's peak memory, sampled every 0.5 s.

    Reading smaps_rollup walks page tables: sampled every 50 ms it took enough CPU from a
    2-core machine to slow the command it measures by a third.
    """
    folder = tmp / "stream"
    t0 = time.perf_counter()
    write_folder(folder, images, n)
    os.sync()  # else the kernel writes the new files back during the first timed run
    written = time.perf_counter() - t0
    model = tmp / "stream.vae"
    Detector(FitConfig(epochs=3, folds=1, device=device, decode=DecodeOptions(cache=False))).fit(images[:5000]).save(
        model
    )
    result: dict[str, Any] = {"images": n, "write_s": written}
    for label, extra in [("cold cache", []), ("warm cache", []), ("no cache", ["--no-cache"])]:
        env = {**os.environ, "VAE_ANOMALY_CACHE_DIR": str(tmp / "stream-cache")}
        cmd = [*CLI, "score", str(folder), "--model", str(model), "--format", "json", "-o", str(tmp / "s.json")]
        cmd += ["--device", device]
        t0 = time.perf_counter()
        proc = subprocess.Popen([*cmd, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak_rss = peak_pss = 0
        done = threading.Event()

        def sample(proc: subprocess.Popen[str] = proc, done: threading.Event = done) -> None:
            nonlocal peak_rss, peak_pss
            while not done.is_set():
                pids = _tree(proc.pid)
                peak_rss = max(peak_rss, _memory_kb(proc.pid, "VmRSS"))
                peak_pss = max(peak_pss, sum(_memory_kb(p, "Pss") for p in pids))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _, stderr = proc.communicate()
        done.set()
        sampler.join()
        seconds = time.perf_counter() - t0
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"score exited {proc.returncode}: {stderr[-2000:]}")
        result[label] = {
            "seconds": seconds,
            "img_s": n / seconds,
            "peak_rss_main_mb": peak_rss / 1024,
            "peak_pss_tree_mb": peak_pss / 1024,
        }
        print("stream", label, json.dumps(result[label]), file=sys.stderr, flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=6000, help="images per data set")
    ap.add_argument("--data", help="MNIST folder: use its first N training digits for the 28x28 grey set")
    ap.add_argument("--stream", type=int, default=0, help="also score this many 28x28 files for peak memory")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of fit and bare loop")
    ap.add_argument("--sets", default="28x28 grey,64x64 colour")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where fit, the bare loop and scoring run")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput")
    args = ap.parse_args()
    mnist = load_mnist(args.data, "train")[0] if args.data else None
    grey = mnist[: args.n] if mnist is not None else blobs(args.n, 28, 1, 0)
    sets = {"28x28 grey": grey, "64x64 colour": blobs(args.n, 64, 3, 1)}
    doc: dict[str, Any] = {
        **provenance(f"{available_cpus()} usable, torch threads {torch.get_num_threads()}, device {args.device}"),
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "sets": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            doc["sets"][name] = measure(name.replace(" ", "_"), sets[name], Path(tmp), args.repeats, args.device)
            print(name, json.dumps(doc["sets"][name]), file=sys.stderr, flush=True)
        if args.stream:
            doc["stream"] = stream(mnist if mnist is not None else grey, args.stream, Path(tmp), args.device)
    lines = [f"Throughput, {doc['date']}, {doc['machine']}, commit {doc['commit']}", "", f"    {doc['command']}", ""]
    names = list(doc["sets"])
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [fn(doc["sets"][n]) for n in names]))

    for key in doc["sets"][names[0]]["decode_img_s"]:
        add(f"decode PNG files, {key} (images/s)", lambda r, k=key: f"{r['decode_img_s'][k]:,.0f}")
    add("`fit` training (images/s)", lambda r: f"{r['fit_train_img_s']:,.0f}")
    add("bare PyTorch loop (images/s)", lambda r: f"{r['bare_loop_img_s']:,.0f}")
    add("**`fit` / bare loop**", lambda r: f"**{r['ratio_to_bare']:.2f}**")
    add("**`vae-anomaly fit`, end to end, cold cache (s)**", lambda r: f"**{r['fit_end_to_end_s']:.1f}**")
    add("`vae-anomaly fit`, warm cache (s)", lambda r: f"{r['fit_end_to_end_warm_cache_s']:.1f}")
    add("epochs (early stopping)", lambda r: str(r["fit_epochs"]))
    for key in doc["sets"][names[0]]["score_from_files_img_s"]:
        label = f"score from files, {key} (images/s)"
        label = f"**{label}**" if key.startswith("default") else label
        add(label, lambda r, k=key: f"{r['score_from_files_img_s'][k]:,.0f}")
    add("`vae-anomaly score` command, warm cache, start-up included (s)", lambda r: f"{r['score_command_s']:.1f}")
    if all("pyod_vae_fit_s" in doc["sets"][n] for n in names):
        add("PyOD VAE fit, pixels in memory (s)", lambda r: f"{r['pyod_vae_fit_s']:.1f}")
    header = "| | " + " | ".join(f"{n} ({doc['sets'][n]['images']:,} files)" for n in names) + " |"
    lines += [header, "| --- |" + " --- |" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    if "stream" in doc:
        s = doc["stream"]
        lines += ["", f"`vae-anomaly score` over {s['images']:,} 28x28 PNG files (default decision, JSON report):", ""]
        lines += ["| | seconds | images/s | peak RSS, main process (MB) | peak PSS, with workers (MB) |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for label in ("cold cache", "warm cache", "no cache"):
            r = s[label]
            lines.append(
                f"| {label} | {r['seconds']:.1f} | {r['img_s']:,.0f} | {r['peak_rss_main_mb']:,.0f} "
                f"| {r['peak_pss_tree_mb']:,.0f} |"
            )
    write_results(args.out, doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
