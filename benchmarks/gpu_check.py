"""GPU check: `fit --device cuda` and scoring throughput on one MNIST digit, against a bare loop.

    python benchmarks/gpu_check.py DATA_DIR [OUT_DIR]

Prints JSON (and writes OUT_DIR/gpu_check.json): training images/s of `fit`
beside a bare PyTorch loop of the same architecture and batch size with the
tensors already on the GPU, and scoring images/s from memory for every
score type with its ROC-AUC (digit 8 normal, all 10,000 test images).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist

from vae_anomaly import Detector, FitConfig
from vae_anomaly.model import ConvVAE, VAEConfig
from vae_anomaly.scores import SCORE_NAMES
from vae_anomaly.train import elbo_loss


def main() -> None:
    data = sys.argv[1] if len(sys.argv) > 1 else ".devdata"
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("OUT", ".")
    out: dict[str, object] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    x, y = load_mnist(data, "train")
    xt, yt = load_mnist(data, "test")
    normal = x[y == 8]
    t0 = time.perf_counter()
    det = Detector(FitConfig(seed=0, device="cuda")).fit(normal)
    torch.cuda.synchronize()
    tr = det.metadata_["training"]
    out["fit_cuda"] = {
        "fit_s": time.perf_counter() - t0,
        "train_s": tr["seconds"],
        "train_img_s": tr["images_per_s"],
        "epochs": tr["epochs_run"],
    }
    for name in SCORE_NAMES:
        det.score(xt[:1000], score=name, guard=None, batch_size=1000)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = det.score(xt, score=name, guard=None, batch_size=2000)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[f"score_cuda_{name}"] = {"img_s": len(xt) / seconds, "auc": roc_auc_score(yt != 8, r.scores)}
    model = ConvVAE(VAEConfig(1, 28)).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xs = torch.from_numpy(normal[:, None]).cuda().float() / 255
    for _ in range(2):  # the second pass is timed
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(xs), 128):
            loss, _ = elbo_loss(model, xs[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
    out["bare_loop_cuda_img_s"] = len(xs) / (time.perf_counter() - t0)
    print(json.dumps(out, indent=1))
    Path(out_dir, "gpu_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
