"""Shared fixtures: tiny generated images, written once per session, and one
trained model that every test reads (training happens once, not per test)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vae_anomaly import Detector, FitConfig
from vae_anomaly.cli import main

SIZE = 16
BACKGROUND = 40  # grey level of the empty parts of every generated image
torch.set_num_threads(int(os.environ.get("VAE_ANOMALY_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(autouse=True, scope="session")
def _private_pixel_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never write into the user's ~/.cache: every run gets its own decoded-pixel cache."""
    os.environ["VAE_ANOMALY_CACHE_DIR"] = str(tmp_path_factory.mktemp("pixel-cache"))


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)


def disks(n: int, seed: int) -> np.ndarray:
    """Normal images: one filled disk of random place, radius and brightness (some
    nearly invisible) on a noisy grey background, like photos from one camera.
    A flat, noise-free frame (a dead sensor) is simpler than any of them."""
    rng = np.random.default_rng(seed)
    yy, xx = _grid()
    out = np.empty((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(5.5, SIZE - 5.5, 2)
        r = rng.uniform(2.5, 5.5)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        img = BACKGROUND + np.clip(r + 0.5 - d, 0, 1) * rng.uniform(0, 200)
        img += rng.normal(0, 6, img.shape)
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def crosses(n: int, seed: int) -> np.ndarray:
    """Anomalies: thin crosses and hollow squares, unlike any disk."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, SIZE, SIZE), np.uint8)
    for i in range(n):
        img = BACKGROUND + rng.normal(0, 6, (SIZE, SIZE))
        c = rng.integers(4, SIZE - 4, 2)
        v = rng.uniform(180, 250)
        if i % 2 == 0:
            img[c[0], 1:-1] = v
            img[1:-1, c[1]] = v
        else:
            a = rng.integers(2, 5)
            img[c[0] - a : c[0] + a + 1, c[1] - a] = v
            img[c[0] - a : c[0] + a + 1, c[1] + a] = v
            img[c[0] - a, c[1] - a : c[1] + a + 1] = v
            img[c[0] + a, c[1] - a : c[1] + a + 1] = v
        out[i] = np.clip(img, 0, 255).round().astype(np.uint8)
    return out


def write_pngs(folder: Path, images: np.ndarray, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{prefix}_{i:04d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    return paths


PHOTO_SIDE = 32


def photo(rng: np.random.Generator, side: int = PHOTO_SIDE) -> np.ndarray:
    """A small colour 'photo': a smooth colour gradient, coarse texture, a bright disk, sensor noise.

    The texture (an 8x8 random pattern, enlarged) makes two pictures differ in their low frequencies,
    as two photos do; gradients alone would share perceptual hashes."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    base = rng.uniform(60, 160, 3)
    tilt = rng.uniform(-40, 40, (2, 3))
    img = base + yy[..., None] * tilt[0] + xx[..., None] * tilt[1]
    img += np.kron(rng.normal(0, 20, (8, 8, 1)), np.ones((side // 8, side // 8, 3)))
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
    img += (np.hypot(yy - cy, xx - cx) < r)[..., None] * rng.uniform(30, 80, 3)
    img += rng.normal(0, 5, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


FAST_FIT = dict(epochs=100, latent_dim=8, patience=25, seed=0, device="cpu", folds=1)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """normal/ (900 disks) and incoming/ (40 disks, 40 crosses), as PNG files."""
    root = tmp_path_factory.mktemp("data")
    write_pngs(root / "normal", disks(900, seed=1))
    write_pngs(root / "incoming", disks(40, seed=2), prefix="disk")
    write_pngs(root / "incoming", crosses(40, seed=3), prefix="cross")
    return root


@pytest.fixture(scope="session")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    """One detector trained from an array, with a large calibration split for FPR tests."""
    det = Detector(FitConfig(calibration_fraction=0.4, **FAST_FIT))
    return det.fit(disks(1000, seed=10))


@pytest.fixture(scope="session")
def crossfit() -> Detector:
    """150 normal images, 5 folds: five small models (40 epochs of 4 steps each, about 6 s in all)."""
    det = Detector(FitConfig(epochs=40, batch_size=32, latent_dim=8, seed=0, device="cpu"))
    return det.fit(disks(150, seed=20))


@pytest.fixture(scope="session")
def model_file(fitted: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.vae"
    fitted.save(path)
    return path


# The CLI's model: fitted once per session through `vae-anomaly fit` (one model, no cross-fitting).
# 405 calibration images: enough for the default decision (two two-sided tests, 1% in all) to flag.
FIT_ARGS = [
    "--calibration-fraction",
    "0.45",
    "--epochs",
    "100",
    "--latent-dim",
    "8",
    "--seed",
    "0",
    "--device",
    "cpu",
    "--patience",
    "25",
    "--folds",
    "1",
]


def cli_run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="session")
def cli_model(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("cli") / "model.vae"
    code, out, err = cli_run("fit", data_dir / "normal", "-o", model, *FIT_ARGS)
    assert code == 0, err
    assert out == "", "fit writes nothing to stdout"
    assert "wrote" in err and model.exists()
    return model
