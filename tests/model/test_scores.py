"""The score functions against their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vae_anomaly.model.neighbours import LatentBank
from vae_anomaly.model.score_table import SCORE_NAMES
from vae_anomaly.model.scores import (
    complexity_corrected_neighbours,
    iwae_bound,
    kl_to_standard_normal,
    latent_noise,
    log_importance_weights,
    negative_elbo,
    pixel_nll_map,
    reconstruction_probability,
    score_batch,
    score_images,
)
from vae_anomaly.model.vae import ConvVAE, VAEConfig


def _model(likelihood: str = "gaussian") -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(1, 12, 4, likelihood=likelihood)).eval()


def _x(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_closed_form_kl_matches_monte_carlo_estimate() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=gen)
    logvar = torch.randn(3, 5, generator=gen) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(kl_to_standard_normal(mu, logvar), mc, rtol=0.02, atol=0.01)


def test_kl_is_zero_exactly_at_the_prior() -> None:
    assert float(kl_to_standard_normal(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0


def test_iwae_with_one_sample_is_the_one_sample_elbo() -> None:
    model, x = _model(), _x()
    eps = latent_noise(4, 1, seed=3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        z = model.reparameterize(mu, logvar, eps[0])
        ll = model.pixel_log_likelihood(x, model.decode(z)).flatten(1).sum(-1)
        q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        expected = -(ll + prior - q)
        torch.testing.assert_close(iwae_bound(model, x, eps), expected, rtol=1e-5, atol=1e-4)


def test_iwae_tightens_as_k_grows() -> None:
    model, x = _model(), _x(16)
    with torch.no_grad():
        bounds = [float(iwae_bound(model, x, latent_noise(4, k, seed=5)).mean()) for k in (1, 8, 64)]
        elbo = float(negative_elbo(model, x, latent_noise(4, 256, seed=6)).mean())
        one = float(iwae_bound(model, x, latent_noise(4, 1, seed=7)).mean())
    assert bounds[0] > bounds[1] > bounds[2]
    # The one-sample IWAE and the closed-form-KL ELBO estimate the same quantity.
    assert abs(elbo - one) < 0.05 * abs(elbo) + 5


def test_reconstruction_probability_is_a_logsumexp_mean_of_likelihoods() -> None:
    model, x = _model("bernoulli"), _x()
    eps = latent_noise(4, 7, seed=2)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        lls = torch.stack(
            [
                model.pixel_log_likelihood(x, model.decode(model.reparameterize(mu, logvar, e))).flatten(1).sum(-1)
                for e in eps
            ]
        )
        expected = -(torch.logsumexp(lls, 0) - math.log(7))
        torch.testing.assert_close(reconstruction_probability(model, x, eps), expected)
        # Jensen: -log of the mean likelihood <= the mean of -log likelihoods.
        assert torch.all(expected <= -lls.mean(0) + 1e-4)


def test_importance_weights_have_one_row_per_sample() -> None:
    with torch.no_grad():
        assert log_importance_weights(_model(), _x(5), latent_noise(4, 3, 0)).shape == (3, 5)


def test_scores_do_not_depend_on_the_batch_an_image_sits_in() -> None:
    model, x = _model(), _x(8)
    eps = latent_noise(4, 4, seed=9)
    rng = np.random.default_rng(0)
    bank = LatentBank.build(rng.normal(size=(30, 4)), rng.normal(size=30), rng)

    def score(name: str, part: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return score_batch(model, part, {name: eps}, bank=bank)[name]

    for name in SCORE_NAMES:
        whole = score(name, x)
        parts = torch.cat([score(name, x[:3]), score(name, x[3:])])
        with torch.no_grad():
            alone = (
                complexity_corrected_neighbours(model, x, eps, bank)
                if name == "elbo-ic-nn"
                else score_images(model, x, name, eps)
            )
        torch.testing.assert_close(whole, alone)
        torch.testing.assert_close(whole, parts, rtol=1e-5, atol=1e-4)


def test_pixel_map_sums_to_the_reconstruction_term() -> None:
    model, x = _model(), _x(4)
    eps = latent_noise(4, 5, seed=1)
    with torch.no_grad():
        maps, recon = pixel_nll_map(model, x, eps)
        mu, logvar = model.encode(x)
        recon_term = negative_elbo(model, x, eps) - kl_to_standard_normal(mu, logvar)
    torch.testing.assert_close(maps.flatten(1).sum(-1), recon_term, rtol=1e-4, atol=1e-3)
    assert recon.shape == x.shape and float(recon.min()) >= 0 and float(recon.max()) <= 1


def test_latent_noise_is_repeatable_and_rejects_zero_samples() -> None:
    torch.testing.assert_close(latent_noise(3, 4, 1), latent_noise(3, 4, 1))
    try:
        latent_noise(3, 0, 1)
    except ValueError as exc:
        assert "samples" in str(exc)
    else:
        raise AssertionError("samples=0 must be refused")


def test_complexity_corrected_elbo_is_elbo_in_bits_minus_png_bits() -> None:
    from vae_anomaly.images.decoding import png_bits
    from vae_anomaly.model.scores import complexity_corrected_elbo

    model, x = _model(), _x(5)
    x = (x * 255).round() / 255  # exact 8-bit pixels, as the model always sees them
    eps = latent_noise(4, 2, seed=4)
    with torch.no_grad():
        nats = negative_elbo(model, x, eps) + 144 * math.log(255.0)
        bits = torch.from_numpy(png_bits((x * 255).round().byte().numpy())).float()
        torch.testing.assert_close(complexity_corrected_elbo(model, x, eps), nats / math.log(2) - bits)


def test_png_bits_grow_with_image_complexity() -> None:
    import numpy as np

    from vae_anomaly.images.decoding import png_bits

    flat = np.zeros((1, 1, 28, 28), np.uint8)
    noise = np.random.default_rng(0).integers(0, 255, (1, 1, 28, 28), dtype=np.uint8)
    colour = np.random.default_rng(0).integers(0, 255, (1, 3, 28, 28), dtype=np.uint8)
    assert png_bits(flat)[0] < png_bits(noise)[0] < png_bits(colour)[0]


def test_kl_score_is_the_closed_form_kl_of_the_encoding() -> None:
    model, x = _model(), _x(3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        torch.testing.assert_close(
            score_images(model, x, "kl", latent_noise(4, 1, 0)), kl_to_standard_normal(mu, logvar)
        )


def test_calibration_batches_are_bounded_by_decoded_values_and_change_no_score(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 draws of 48x48 RGB images would hold GBs of activations at 512 a batch; the bound changes no score."""
    from vae_anomaly.model import inference
    from vae_anomaly.model.distributed import World
    from vae_anomaly.model.vae import ConvVAE, VAEConfig

    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(3, 16, 4)).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (40, 3, 16, 16), dtype=np.uint8)
    noise = {"elbo": latent_noise(4, 1, 0), "iwae": latent_noise(4, 16, 0)}
    args = (pixels, [np.arange(40)], noise, torch.device("cpu"), World())
    whole = inference.calibration_scores([model], *args)
    seen: list[int] = []
    original = inference.score_pixels
    monkeypatch.setattr(inference, "score_pixels", lambda m, x, *a: seen.append(len(x)) or original(m, x, *a))
    monkeypatch.setattr(inference, "DECODED_PER_BATCH", 16 * 3 * 16 * 16 * 7)  # 7 images of 16 draws
    small = inference.calibration_scores([model], *args)
    assert seen == [7, 7, 7, 7, 7, 5]
    for name in noise:
        np.testing.assert_allclose(small[name], whole[name], rtol=1e-6)
