"""GPU check: `fit --device cuda` in float32 and bf16, against bare loops, and scoring throughput.

    python benchmarks/gpu_check.py DATA_DIR [OUT_DIR]

Prints JSON (and writes OUT_DIR/gpu_check.json) for one MNIST digit (8) as
the normal class: training images/s of `fit` with `--precision fp32` and
`bf16` beside a bare PyTorch loop of the same architecture and batch size
(tensors already on the GPU) in the same precision, the default decision's
ROC-AUC on all 10,000 test digits for each, and scoring images/s from
memory for every score type.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist

from vae_anomaly import Detector, FitConfig
from vae_anomaly.images.batching import DecodeOptions
from vae_anomaly.model.score_table import SCORE_NAMES
from vae_anomaly.model.train import elbo_loss
from vae_anomaly.model.vae import ConvVAE, VAEConfig


def bare_loop(pixels: torch.Tensor, precision: str, epochs: int = 3, batch_size: int = 128) -> float:
    """Same network, loss and batch as `fit`; float tensors already on the GPU; no held-out pass."""
    model = ConvVAE(VAEConfig(1, 28)).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xs = pixels.cuda().float() / 255
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    for rep in range(2):  # the second pass is timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(epochs if rep else 1):
            order = torch.randperm(len(xs), device="cuda")
            for i in range(0, len(xs), batch_size):
                with amp:
                    loss, _ = elbo_loss(model, xs[order[i : i + batch_size]])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.cuda.synchronize()
    return epochs * len(xs) / (time.perf_counter() - t0)


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else ".devdata"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OUT", ".")
    out: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    x, y = load_mnist(data, "train")
    xt, yt = load_mnist(data, "test")
    normal = x[y == 8]
    det = None
    for precision in ("fp32", "bf16"):
        cfg = FitConfig(seed=0, device="cuda", precision=precision, decode=DecodeOptions(cache=False))
        Detector(FitConfig(epochs=1, device="cuda", precision=precision)).fit(normal[:1000])  # warm-up
        t0 = time.perf_counter()
        det = Detector(cfg).fit(normal)
        torch.cuda.synchronize()
        tr = det.metadata_["training"]
        decision = det.decide(det.score(xt, batch_size=2000))
        train_images = normal[: tr["train_images"]]
        bare = bare_loop(torch.from_numpy(train_images[:, None].copy()), precision)
        out[f"fit_cuda_{precision}"] = {
            "fit_s": time.perf_counter() - t0,
            "train_s": tr["seconds"],
            "train_img_s": tr["images_per_s"],
            "epochs": tr["epochs_run"],
            "bare_loop_img_s": bare,
            "ratio_to_bare": tr["images_per_s"] / bare,
            "default_decision_auc": roc_auc_score(yt != 8, -decision.p_values),
        }
        print(precision, json.dumps(out[f"fit_cuda_{precision}"]), file=sys.stderr, flush=True)
    assert det is not None
    for name in SCORE_NAMES:
        det.score(xt[:1000], score=name, guard=None, batch_size=1000)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = det.score(xt, score=name, guard=None, batch_size=2000)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[f"score_cuda_{name}"] = {"img_s": len(xt) / seconds, "auc": roc_auc_score(yt != 8, r.scores)}
    print(json.dumps(out, indent=1))
    Path(out_dir, "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
