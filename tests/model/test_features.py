"""The VAE over the backbone's features: the `auto` rule, the model's equations, fit and score end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.covariance import LedoitWolf

from conftest import cli_run
from vae_anomaly import Detector, FitConfig
from vae_anomaly.fit_steps import Phases
from vae_anomaly.model.feature_vae import FeatureVAE, FeatureVAEConfig, whitening
from vae_anomaly.model.features import PIXELS_BELOW, choose_features
from vae_anomaly.model.scores import latent_noise, negative_elbo
from vae_anomaly.model.vae import ConvVAE, build_model, config_from_dict

SIDE = 72  # above PIXELS_BELOW: `auto` picks the backbone


def photos(n: int, seed: int, dark: bool = False) -> np.ndarray:
    """Colour 'photos': a smooth two-colour gradient with a bright disc, (n, SIDE, SIDE, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    out = np.empty((n, SIDE, SIDE, 3), np.uint8)
    for i in range(n):
        a, b = rng.uniform(60, 200, 3), rng.uniform(60, 200, 3)
        t = (yy * rng.uniform(0.3, 1) + xx * rng.uniform(0.3, 1))[..., None] / 2
        img = a * (1 - t) + b * t
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.25)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(200, 255, 3)
        img += rng.normal(0, 4, img.shape)
        out[i] = np.clip(img * (0.12 if dark else 1.0), 0, 255).astype(np.uint8)
    return out


def write(folder: Path, images: np.ndarray, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{prefix}_{i:03d}.png")


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    write(root / "normal", photos(120, seed=1), "normal")
    write(root / "incoming", photos(10, seed=2), "clean")
    write(root / "incoming", photos(10, seed=3, dark=True), "dark")
    return root


FAST = {"epochs": 30, "batch_size": 32, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def feature_detector(photo_dir: Path) -> Detector:
    return Detector(FitConfig(**FAST)).fit([photo_dir / "normal"])


def test_auto_models_small_images_as_pixels_and_larger_ones_through_the_backbone() -> None:
    assert choose_features("auto", 28, False)[0] == "pixels"
    assert choose_features("auto", PIXELS_BELOW - 1, False)[0] == "pixels"
    assert choose_features("auto", PIXELS_BELOW, False)[0] == "backbone"
    assert choose_features("auto", 500, True) == ("pixels", "--image-size sets a working size for the pixel model")
    assert choose_features("backbone", 16, False)[0] == "backbone"
    assert choose_features("pixels", 1000, False)[0] == "pixels"


def test_whitening_gives_the_training_features_zero_mean_and_ledoit_wolf_identity_covariance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) * 5 + 3
    center, w = whitening(x)
    u = (x - center) @ w
    np.testing.assert_allclose(u.mean(0), 0, atol=1e-4)
    z = (x - x.mean(0)) / x.std(0)
    shrunk = LedoitWolf(assume_centered=True).fit(z).covariance_
    # W whitens the shrunk covariance: W^T S W = I in standardised units.
    np.testing.assert_allclose(w.T @ np.diag(x.std(0)) @ shrunk @ np.diag(x.std(0)) @ w, np.eye(12), atol=1e-3)


def test_with_a_zero_decoder_the_feature_elbo_is_the_mahalanobis_distance_plus_kl() -> None:
    """A decoder that predicts nothing leaves -log p(x|z) = ||u||^2 / 2 + D/2 log(2 pi), u = W (x - c):
    the Gaussian baseline's Mahalanobis distance, which the VAE must improve on by modelling structure."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(100, 8)) @ rng.normal(size=(8, 8))).astype(np.float32)
    model = FeatureVAE(FeatureVAEConfig(in_features=8, latent_dim=2, hidden=4)).eval()
    model.fit_whitening(x)
    torch.nn.init.zeros_(model.decoder[-1].weight)
    torch.nn.init.zeros_(model.decoder[-1].bias)
    xs = torch.from_numpy(x)
    with torch.no_grad():
        mu, logvar = model.encode(xs)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        got = negative_elbo(model, xs, latent_noise(2, 4, 0))
    z = (x - x.mean(0)) / x.std(0)
    maha = LedoitWolf(assume_centered=True).fit(z).mahalanobis(z)
    want = 0.5 * maha + 4 * np.log(2 * np.pi) + kl.numpy()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-3)


def test_a_feature_model_config_round_trips_and_builds_its_network() -> None:
    cfg = FeatureVAEConfig(in_features=992, latent_dim=8)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(build_model(again), FeatureVAE)
    assert isinstance(build_model(config_from_dict({"in_channels": 1, "image_size": 16})), ConvVAE)


def test_phases_report_each_start_and_end_with_their_seconds() -> None:
    ticks = iter([10.0, 12.5, 20.0, 21.0])
    lines: list[str] = []
    phases = Phases(lines.append, clock=lambda: next(ticks))
    phases.start("reading", "reading")
    phases.end("read")
    phases.start("training", "training")
    phases.end("trained")
    assert lines == ["reading", "read (2.5 s)", "training", "trained (1.0 s)"]
    assert phases.seconds == {"reading": 2.5, "training": 1.0}


def test_photos_are_modelled_through_the_backbone_and_the_file_says_so(feature_detector: Detector) -> None:
    meta = feature_detector.metadata_
    assert meta["features"]["kind"] == "backbone" and meta["config"]["kind"] == "features"
    assert meta["features"]["weights_sha256"].startswith("579344248a93")
    assert feature_detector.preprocessing_ is not None and feature_detector.preprocessing_.size == 128
    assert set(meta["training"]["phases"]) >= {"reading", "features", "local", "training", "calibration"}
    tested = meta["checks"]["sides"]
    assert "brightness" in tested and not {"balance-x", "balance-y", "entropy", "shadows"} & set(tested)
    assert feature_detector.calibration.features == "backbone"


def test_dark_photos_score_far_above_normal_ones_on_features(feature_detector: Detector, photo_dir: Path) -> None:
    result = feature_detector.score([photo_dir / "incoming"], score="elbo", guard=None)
    dark = np.array(["dark_" in p for p in result.paths])
    assert result.scores[dark].min() > np.median(result.scores[~dark])
    for name, scored in feature_detector.score_many([photo_dir / "incoming"]).items():
        assert np.isfinite(scored.scores).all(), name


def test_a_saved_feature_model_scores_as_the_one_in_memory(
    feature_detector: Detector, photo_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "features.vae"
    feature_detector.save(path)
    loaded = Detector.load(path)
    assert isinstance(loaded.models_[0], FeatureVAE)
    before = feature_detector.score([photo_dir / "incoming"]).scores
    np.testing.assert_allclose(loaded.score([photo_dir / "incoming"]).scores, before, rtol=1e-5)


def test_fit_features_pixels_keeps_the_pixel_vae(photo_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "pixels.vae"
    code, _, err = cli_run("fit", photo_dir / "normal", "-o", model, "--features", "pixels", "--epochs", "2")
    assert code == 0, err
    assert "the VAE models pixels (--features pixels)" in err
    assert isinstance(Detector.load(model).models_[0], ConvVAE)


def test_fit_says_what_it_does_phase_by_phase(photo_dir: Path, tmp_path: Path) -> None:
    code, _, err = cli_run("fit", photo_dir / "normal", "-o", tmp_path / "m.vae", "--epochs", "2")
    assert code == 0, err
    order = ["reading the training images", "the VAE models backbone", "features: efficientnet-lite0",
             "local statistic:", "s  training\n", "cross-fitting: model 1 of 5", "training done",
             "calibrating on", "wrote"]  # fmt: skip
    positions = [err.find(words) for words in order]
    assert -1 not in positions and positions == sorted(positions), err
    code, out, _ = cli_run("info", tmp_path / "m.vae", "--format", "json")
    assert code == 0 and '"backbone": "efficientnet-lite0"' in out and "auto: training images 72 px" in out


def test_a_backbone_model_cross_fits_where_a_pixel_model_splits_once() -> None:
    from vae_anomaly import crossfit

    rng = np.random.default_rng(0)
    assert len(crossfit.plan(1000, FitConfig(), rng, "pixels")) == 1
    plans = crossfit.plan(1000, FitConfig(), rng, "backbone")
    assert len(plans) == 5 and sum(len(c) for _, c in plans) == 1000  # every image calibrates
    assert len(crossfit.plan(6000, FitConfig(), rng, "backbone")) == 1
    assert len(crossfit.plan(1000, FitConfig(folds=1), rng, "backbone")) == 1


def test_decode_workers_start_beside_the_backbone_at_a_smaller_share_of_its_cost() -> None:
    from vae_anomaly.model.devices import ThreadShare

    pixel, feature = ThreadShare(torch.device("cpu")), ThreadShare(torch.device("cpu"), backbone=True)
    for share in (pixel, feature):
        share.observe(0.7, 100)  # 7 ms an image to score
    assert not pixel.worth_it(0.006) and feature.worth_it(0.006)
    assert not feature.worth_it(0.002)
