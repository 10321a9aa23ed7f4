"""The backbone's forward pass alone: ONNX Runtime against PyTorch, in one run, on this machine.

`backbone.Features` runs the network under ONNX Runtime on the CPU where it measures faster than
PyTorch; this prints both engines' rates (images/s, forward pass only: no decoding, no VAE) at the
backbone's size (the export's only one), by batch size, each the median of `--repeats` timings of
`--images` random images, the engines alternated.

    python benchmarks/backbone_speed.py [--images 256] [--repeats 5] [--out benchmarks/results/backbone_speed]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance, write_results

from vae_anomaly.model import backbone


def rate(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        run(x[i : i + batch])
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="16,32,64")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "backbone_speed"))
    args = parser.parse_args()
    ort = backbone.Features(engine="onnxruntime")
    module = ort.module

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    def onnx(x: np.ndarray) -> np.ndarray:
        return ort.session.run(None, {"images": x})[0]

    rows, doc = [], []
    rng = np.random.default_rng(0)
    for size in (backbone.SIZE,):
        x = rng.uniform(0, 255, (args.images, 3, size, size)).astype(np.float32)
        for batch in (int(b) for b in args.batches.split(",")):
            onnx(x[:batch]), eager(x[:batch])  # warm-up: the first call allocates
            got: dict[str, list[float]] = {"onnxruntime": [], "torch": []}
            for _ in range(args.repeats):
                got["onnxruntime"].append(rate(onnx, x, batch))
                got["torch"].append(rate(eager, x, batch))
            med = {k: statistics.median(v) for k, v in got.items()}
            doc.append({"size": size, "batch": batch, "rates": got, "median": med})
            ratio = med["onnxruntime"] / med["torch"]
            rows.append(f"| {size} | {batch} | {med['onnxruntime']:,.0f} | {med['torch']:,.0f} | {ratio:.2f} |")
    prov = provenance()
    md = "\n".join(
        [
            f"Backbone forward pass, {prov['date']}, {prov['machine']}, torch threads {torch.get_num_threads()}, "
            f"commit {prov['commit']}",
            "",
            "    " + prov["command"],
            "",
            f"EfficientNet-Lite0 to the 992 pooled features, {args.images} random images, images/s, median of "
            f"{args.repeats} (engines alternated):",
            "",
            "| side px | batch | ONNX Runtime | PyTorch eager | ratio |",
            "| --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    write_results(Path(args.out), {**prov, "args": vars(args), "runs": doc}, md + "\n")


if __name__ == "__main__":
    main()
