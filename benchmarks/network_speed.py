"""The network alone: training and forward images/s of each working size and channel layout compared in README.

No files, no decoding: random pixels in memory, batch 128 for training (Adam on -ELBO), 512 for the
forward pass, after one warm-up step, each timed for `--seconds`; median of `--repeats`.

    python benchmarks/network_speed.py [--threads 2] [--seconds 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_results

from vae_anomaly.model.train import elbo_loss
from vae_anomaly.model.vae import ConvVAE, VAEConfig, default_hidden_channels

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = [(28, 1, ()), (32, 3, ()), (48, 3, ()), (48, 3, (32, 64, 128)), (64, 3, ()), (64, 3, (32, 64, 128))]


def rate(step: object, batch: int, seconds: float) -> float:
    assert callable(step)
    step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += batch
    return n / (time.perf_counter() - t0)


def measure(size: int, channels: int, hidden: tuple[int, ...], seconds: float, repeats: int) -> dict[str, object]:
    cfg = VAEConfig(channels, size, 16, hidden)
    model = ConvVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, xb = torch.rand(128, channels, size, size), torch.rand(512, channels, size, size)

    def train_step() -> None:
        loss, _ = elbo_loss(model, x)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    def forward() -> None:
        with torch.no_grad():
            model(xb)

    train = statistics.median(rate(train_step, 128, seconds) for _ in range(repeats))
    model.eval()
    fwd = statistics.median(rate(forward, 512, seconds) for _ in range(repeats))
    return {
        "size": size,
        "channels": channels,
        "hidden_channels": list(cfg.hidden_channels),
        "default": hidden == () or tuple(hidden) == default_hidden_channels(size),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images_per_s": train,
        "forward_images_per_s": fwd,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "network_speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(size, channels, hidden, args.seconds, args.repeats) for size, channels, hidden in LAYOUTS]
    doc = {**provenance(f"torch threads {args.threads}"), "rows": rows}
    lines = [
        f"Network speed, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
        "| input | channels | parameters | training images/s | forward images/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = f"{r['size']}x{r['size']}x{r['channels']}"
        chans = "-".join(map(str, r["hidden_channels"])) + (" (default)" if r["default"] else "")
        lines.append(
            f"| {name} | {chans} | {r['parameters'] / 1e6:.2f} M | {r['train_images_per_s']:,.0f} | "
            f"{r['forward_images_per_s']:,.0f} |"
        )
    write_results(args.out, doc, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
