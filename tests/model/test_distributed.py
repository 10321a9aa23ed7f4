"""`torchrun --nproc-per-node 2 -m vae_anomaly fit`: two CPU processes (gloo) train one model.

The processes split every batch and DDP averages their gradients, with the
same shuffles and the same noise as one process, so the model equals a
single-process fit of the same seed up to float summation order.
The torchrun tests are slow; the one-process `World` every plain run uses is checked without them.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import vae_anomaly
from conftest import cli_run, disks, write_pngs
from vae_anomaly import Detector
from vae_anomaly.model import distributed
from vae_anomaly.model.distributed import World

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

# 422 images, 2 folds: each model trains on 190 images and stops early on 21. Batches of 21
# split 10 / 11 between the two processes (unequal weights), and the last batch of each epoch
# holds one image, so one process has nothing of it and runs at weight 0: every case of the
# weighting is in each epoch.
N_IMAGES = 422
FIT_OPTIONS = ["--seed", "3", "--epochs", "4", "--batch-size", "21", "--latent-dim", "4", "--folds", "2"]
FIT_OPTIONS += ["--device", "cpu", "--patience", "2", "--quiet"]
# Measured on CPU with torch 2.13: the largest difference of any score (new images and
# calibration, all five score types) between the two models was 4e-7 of the largest score
# (float summation order: each process's convolution sums over 10 or 11 images instead of 21,
# and gloo sums the two gradients). Unweighted slice losses (batches of 7) gave 0.2 to 0.3.
RTOL = 1e-4


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "normal"
    write_pngs(folder, disks(N_IMAGES, seed=11))
    return folder


def _torchrun(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Two processes on this machine; --standalone picks a free port, so runs side by side do not clash."""
    root = str(Path(vae_anomaly.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += ["-m", "vae_anomaly", "fit", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=root)


@pytest.mark.slow  # torchrun: two processes that import torch and train, about 10 s
def test_torchrun_two_processes_write_one_model_that_scores_like_one_process(normal_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    run = _torchrun(normal_dir, "-o", out / "model.vae", *FIT_OPTIONS)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.vae"], "rank 0 alone writes, and no checkpoint is left"
    assert run.stderr.count("wrote ") == 1 and "trained by 2 processes" in run.stderr
    ddp = Detector.load(out / "model.vae", device="cpu")
    tr = ddp.metadata_["training"]
    assert tr["processes"] == 2 and ddp.n_models == 2 and tr["validation_images"] == 21

    code, _, err = cli_run("fit", normal_dir, "-o", tmp_path / "one.vae", *FIT_OPTIONS)
    assert code == 0, err
    one = Detector.load(tmp_path / "one.vae", device="cpu")
    assert one.metadata_["training"]["processes"] == 1
    for a, b in zip(one.metadata_["training"]["per_model"], tr["per_model"], strict=True):
        assert (a["epochs_run"], a["best_epoch"], a["stopped"]) == (b["epochs_run"], b["best_epoch"], b["stopped"])

    incoming = disks(60, seed=12)
    for name in ("elbo", "iwae", "kl"):
        s1 = one.score(incoming, score=name, guard=None).scores
        s2 = ddp.score(incoming, score=name, guard=None).scores
        np.testing.assert_allclose(s2, s1, rtol=RTOL, atol=RTOL * np.abs(s1).max(), err_msg=name)
        np.testing.assert_allclose(
            ddp.calibration_[name], one.calibration_[name], rtol=RTOL, atol=RTOL * np.abs(s1).max(), err_msg=name
        )
    np.testing.assert_array_equal(ddp.calibration_folds_, one.calibration_folds_)


@pytest.mark.slow  # torchrun: two processes that import torch and train, about 10 s
def test_torchrun_time_budget_stops_every_process_at_the_same_step(normal_dir: Path, tmp_path: Path) -> None:
    """Each process reads its own clock; if they stopped at different steps, DDP would hang."""
    model = tmp_path / "model.vae"
    args = ["--epochs", "100000", "--patience", "100000", "--time-budget", "1", "--folds", "1", "--device", "cpu"]
    run = _torchrun(normal_dir, "-o", model, "--latent-dim", "4", "--quiet", *args, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.vae"]
    assert Detector.load(model, device="cpu").metadata_["training"]["stopped"] == "time-budget"


def test_a_plain_run_is_a_world_of_one_whose_collectives_return_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched() and not dist.is_initialized()
    one = distributed.current()
    assert one == World() and one.is_main and distributed.is_main()
    t = torch.arange(3.0)
    assert one.shard(10) == (0, 10) and one.all_reduce_sum(t) is t and one.broadcast_object(["x"]) == ["x"]
    one.barrier()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.launched(), "torchrun sets RANK too"
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert not distributed.launched()


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_the_processes_slices_cover_every_item_once_and_differ_in_size_by_at_most_one(size: int) -> None:
    for n in range(30):
        slices = [World(rank=r, size=size).shard(n) for r in range(size)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(slices)), slices
        sizes = [hi - lo for lo, hi in slices]
        assert max(sizes) - min(sizes) <= 1, (n, slices)
    assert [r for r in range(size) if World(rank=r, size=size).is_main] == [0]
