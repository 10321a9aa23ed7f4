"""Anomaly scores of a trained VAE. Higher always means more anomalous.

Every score is a Monte Carlo estimate over samples z ~ q(z|x). To make a
score a function of the image alone (not of the batch it sits in, nor of
the order of calls), all images share the same standard-normal draws
eps_1..eps_L, fixed by a seed: z_l = mu(x) + sigma(x) * eps_l. These common
random numbers also make scores of different images directly comparable.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .model import ConvVAE

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ScoreSpec:
    """What a score is called, what it estimates, and its default sample count."""

    name: str
    default_samples: int
    summary: str


SCORE_SPECS: dict[str, ScoreSpec] = {
    "elbo": ScoreSpec("elbo", 1, "-ELBO: reconstruction cost + KL(q(z|x) || N(0, I))"),
    "elbo-ic": ScoreSpec("elbo-ic", 1, "-ELBO in bits minus the PNG-compressed length in bits (Serra et al. 2020)"),
    "kl": ScoreSpec("kl", 1, "KL(q(z|x) || N(0, I)): how far the image's latent code is from the prior"),
    "iwae": ScoreSpec("iwae", 16, "-log p(x) by the importance-weighted bound (Burda et al. 2016)"),
    "recon-prob": ScoreSpec("recon-prob", 16, "-log of the mean decoder likelihood over z ~ q(z|x) (An & Cho 2015)"),
}
SCORE_NAMES: tuple[str, ...] = tuple(SCORE_SPECS)


def latent_noise(latent_dim: int, samples: int, seed: int) -> torch.Tensor:
    """The shared draws eps_1..eps_L ~ N(0, I), shape (L, D), from a private generator."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, latent_dim, generator=gen)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) in closed form, per image (B,).

    Kingma & Welling (2014), Appendix B:
    -KL = 1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2).
    """
    return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=-1)


def _log_likelihoods(
    model: ConvVAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x|z_l) summed over pixels, and the z_l themselves: (L, B), (L, B, D).

    One decoder call per sample keeps memory at one batch of images.
    """
    lls, zs = [], []
    for e in eps.to(mu.device):
        z = model.reparameterize(mu, logvar, e)  # (B, D)
        out = model.decode(z)  # (B, C, H, W)
        lls.append(model.pixel_log_likelihood(x, out).flatten(1).sum(-1))
        zs.append(z)
    return torch.stack(lls), torch.stack(zs)


def negative_elbo(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)), per image (B,).

    The SGVB estimator B of Kingma & Welling (2014, Eq. 7): the reconstruction
    term averaged over the L draws in `eps`, the KL term in closed form.
    """
    mu, logvar = model.encode(x)
    ll, _ = _log_likelihoods(model, x, mu, logvar, eps)
    return -ll.mean(0) + kl_to_standard_normal(mu, logvar)


def log_importance_weights(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (K, B)."""
    mu, logvar = model.encode(x)
    ll, z = _log_likelihoods(model, x, mu, logvar, eps)
    log_prior = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)
    # z_k - mu = sigma * eps_k, so the Gaussian exponent is just eps_k^2.
    e = eps.to(mu.device).unsqueeze(1)  # (K, 1, D)
    log_q = -0.5 * (e.pow(2) + logvar.unsqueeze(0) + LOG_2PI).sum(-1)
    return ll + log_prior - log_q


def iwae_bound(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-L_K(x) = -log (1/K) sum_k w_k, per image (B,) (Burda et al. 2016, Eq. 8).

    An upper bound on -log p(x) that tightens as K grows; with K = 1 it is the
    one-sample ELBO with a Monte Carlo KL term (Kingma & Welling 2014, Eq. 6).
    """
    log_w = log_importance_weights(model, x, eps)
    return -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def reconstruction_probability(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-log (1/L) sum_l p(x|z_l), z_l ~ q(z|x), per image (B,).

    An & Cho (2015), Algorithm 4: the reconstruction probability is the mean
    decoder likelihood over L encoder samples; we take -log of it, computed
    with logsumexp so that it never underflows.
    """
    mu, logvar = model.encode(x)
    ll, _ = _log_likelihoods(model, x, mu, logvar, eps)
    return -(torch.logsumexp(ll, dim=0) - math.log(ll.shape[0]))


def png_bits(pixels: np.ndarray) -> np.ndarray:
    """Lossless PNG length of each uint8 (C, H, W) image, in bits (deflate level 9).

    The generic compressor of Serra et al. (2020): its code length L(x) is
    an estimate of the image's complexity that knows nothing of the data set.
    """
    out = np.empty(len(pixels))
    for i, img in enumerate(pixels):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=9)
        out[i] = 8 * buf.getbuffer().nbytes
    return out


def complexity_corrected_elbo(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """S(x) = -ELBO(x) in bits - L(x), L the PNG length in bits (Serra et al. 2020, Eq. 2).

    An upper bound on how many more bits the VAE needs for x than a generic
    compressor does. It removes what -ELBO mostly measures on its own, the
    image's complexity: simple images (thin strokes, blank frames) no longer
    look typical just for being simple, and busy ones are not flagged for
    being busy. A Gaussian density on [0, 1] becomes a code length for 8-bit
    pixels by adding log2(255) bits per pixel (the quantisation bin width).
    """
    nats = negative_elbo(model, x, eps)
    if model.config.likelihood == "gaussian":
        nats = nats + x[0].numel() * math.log(255.0)
    pixels = (x * 255.0).round().clamp(0, 255).byte().cpu().numpy()
    bits = torch.from_numpy(png_bits(pixels)).to(nats)
    return nats / math.log(2.0) - bits


def latent_kl(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) alone (Kingma & Welling 2014, Appendix B), per image (B,).

    The latent part of -ELBO: large when the encoder places x far from where
    normal images go, or is unusually certain about it. No sampling, so `eps`
    is unused.
    """
    mu, logvar = model.encode(x)
    return kl_to_standard_normal(mu, logvar)


SCORE_FUNCTIONS: dict[str, Callable[[ConvVAE, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "elbo": negative_elbo,
    "elbo-ic": complexity_corrected_elbo,
    "kl": latent_kl,
    "iwae": iwae_bound,
    "recon-prob": reconstruction_probability,
}


def pixel_nll_map(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel -log p(x|z) averaged over the draws, and the mean reconstruction.

    Returns (B, C, H, W) maps whose sum over pixels is the reconstruction term
    of `negative_elbo`, and (B, C, H, W) reconstructions in [0, 1].
    """
    mu, logvar = model.encode(x)
    maps = torch.zeros_like(x)
    recon = torch.zeros_like(x)
    for e in eps.to(mu.device):
        out = model.decode(model.reparameterize(mu, logvar, e))
        maps -= model.pixel_log_likelihood(x, out)
        recon += model.mean_image(out)
    return maps / len(eps), recon / len(eps)


def score_images(model: ConvVAE, x: torch.Tensor, score: str, eps: torch.Tensor) -> torch.Tensor:
    """Dispatch by name; `x` is float (B, C, H, W) in [0, 1] on the model's device."""
    try:
        fn = SCORE_FUNCTIONS[score]
    except KeyError:
        raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORE_NAMES)}") from None
    with torch.no_grad():
        return fn(model, x, eps)
