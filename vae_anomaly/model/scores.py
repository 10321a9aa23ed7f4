"""Anomaly scores of a trained VAE. Higher always means more anomalous.

Every score is a Monte Carlo estimate over samples z ~ q(z|x). To make a
score a function of the image alone (not of the batch it sits in, nor of
the order of calls), all images share the same standard-normal draws
eps_1..eps_L, fixed by a seed: z_l = mu(x) + sigma(x) * eps_l. These common
random numbers also make scores of different images directly comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from ..errors import ConfigError
from ..images.decoding import png_bits
from .feature_vae import FeatureVAE
from .neighbours import LatentBank
from .score_table import SCORE_NAMES
from .vae import VAE

LOG_2PI = math.log(2 * math.pi)


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
    model: VAE, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
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


@dataclass
class _Terms:
    """What every score is made of: the encoder's output and the decoder's likelihoods under `eps`."""

    logvar: torch.Tensor  # (B, D)
    kl: torch.Tensor  # (B,) closed form
    ll: torch.Tensor | None  # (L, B) log p(x|z_l); None when no decoding was needed
    z: torch.Tensor | None  # (L, B, D)
    eps: torch.Tensor  # (L, D)
    mu: torch.Tensor | None = None  # (B, D), for the latent neighbours of `elbo-ic-nn`
    bank: LatentBank | None = None  # the model's training latents (neighbours.py)


def _terms(model: VAE, x: torch.Tensor, eps: torch.Tensor, decode: bool = True) -> _Terms:
    mu, logvar = model.encode(x)
    ll, z = _log_likelihoods(model, x, mu, logvar, eps) if decode else (None, None)
    return _Terms(logvar, kl_to_standard_normal(mu, logvar), ll, z, eps, mu)


def _negative_elbo(t: _Terms) -> torch.Tensor:
    assert t.ll is not None
    return -t.ll.mean(0) + t.kl


def negative_elbo(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-ELBO(x) = -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)), per image (B,).

    The SGVB estimator B of Kingma & Welling (2014, Eq. 7): the reconstruction
    term averaged over the L draws in `eps`, the KL term in closed form.
    """
    return _negative_elbo(_terms(model, x, eps))


def _log_importance_weights(t: _Terms) -> torch.Tensor:
    assert t.ll is not None and t.z is not None
    log_prior = -0.5 * (t.z.pow(2) + LOG_2PI).sum(-1)
    # z_k - mu = sigma * eps_k, so the Gaussian exponent is just eps_k^2.
    e = t.eps.to(t.logvar.device).unsqueeze(1)  # (K, 1, D)
    log_q = -0.5 * (e.pow(2) + t.logvar.unsqueeze(0) + LOG_2PI).sum(-1)
    return t.ll + log_prior - log_q


def log_importance_weights(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), shape (K, B)."""
    return _log_importance_weights(_terms(model, x, eps))


def _iwae_bound(t: _Terms) -> torch.Tensor:
    log_w = _log_importance_weights(t)
    return -(torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0]))


def iwae_bound(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-L_K(x) = -log (1/K) sum_k w_k, per image (B,) (Burda et al. 2016, Eq. 8).

    An upper bound on -log p(x) that tightens as K grows; with K = 1 it is the
    one-sample ELBO with a Monte Carlo KL term (Kingma & Welling 2014, Eq. 6).
    """
    return _iwae_bound(_terms(model, x, eps))


def _reconstruction_probability(t: _Terms) -> torch.Tensor:
    assert t.ll is not None
    return -(torch.logsumexp(t.ll, dim=0) - math.log(t.ll.shape[0]))


def reconstruction_probability(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-log (1/L) sum_l p(x|z_l), z_l ~ q(z|x), per image (B,).

    An & Cho (2015), Algorithm 4: the reconstruction probability is the mean
    decoder likelihood over L encoder samples; we take -log of it, computed
    with logsumexp so that it never underflows.
    """
    return _reconstruction_probability(_terms(model, x, eps))


def _complexity_corrected(model: VAE, x: torch.Tensor, t: _Terms, bits: torch.Tensor | None) -> torch.Tensor:
    nats = _negative_elbo(t)
    if isinstance(model, FeatureVAE):  # features have no PNG length: -ELBO in bits
        return nats / math.log(2.0)
    if model.config.likelihood == "gaussian":
        nats = nats + x[0].numel() * math.log(255.0)
    if bits is None:
        bits = torch.from_numpy(png_bits((x * 255.0).round().clamp(0, 255).byte().cpu().numpy()))
    return nats / math.log(2.0) - bits.to(nats)


def complexity_corrected_elbo(
    model: VAE, x: torch.Tensor, eps: torch.Tensor, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """S(x) = -ELBO(x) in bits - L(x), L the PNG length in bits (Serra et al. 2020, Eq. 2).

    An upper bound on how many more bits the VAE needs for x than a generic
    compressor does. It removes what -ELBO mostly measures on its own, the
    image's complexity: simple images (thin strokes, blank frames) no longer
    look typical just for being simple, and busy ones are not flagged for
    being busy. A Gaussian density on [0, 1] becomes a code length for 8-bit
    pixels by adding log2(255) bits per pixel (the quantisation bin width).
    Over a backbone's features (feature_vae.py) there is no PNG length to
    subtract, and S(x) is -ELBO in bits: the backbone's features already
    describe what an image shows, not how many bits its pixels take.
    `bits`, if given, is `png_bits` of x's pixels computed beforehand (by
    the decoding workers), which takes compression off the scoring path.
    """
    return _complexity_corrected(model, x, _terms(model, x, eps), bits)


def _with_neighbours(model: VAE, x: torch.Tensor, t: _Terms, bits: torch.Tensor | None) -> torch.Tensor:
    if t.bank is None or t.mu is None:
        raise ConfigError(
            "the score elbo-ic-nn needs the training images' latent codes, which this model file does not keep "
            "(it was fitted by an earlier release); re-fit it, or score with --score elbo-ic"
        )
    ic = _complexity_corrected(model, x, t, bits)
    return torch.from_numpy(t.bank.combine(ic.double().cpu().numpy(), t.mu.float().cpu().numpy())).to(ic)


def complexity_corrected_neighbours(
    model: VAE, x: torch.Tensor, eps: torch.Tensor, bank: LatentBank, bits: torch.Tensor | None = None
) -> torch.Tensor:
    """S_nn(x) = S_ic(x) / IQR_train(S_ic) + d_5(mu(x)) / IQR_train(d_5), per image (B,).

    `elbo-ic` plus the mean distance of the latent mean to its 5 nearest
    training latents of this model, each in units of its spread on the
    training images (neighbours.py gives the equation and why).
    """
    t = _terms(model, x, eps)
    return _with_neighbours(model, x, replace(t, bank=bank), bits)


def latent_kl(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) alone (Kingma & Welling 2014, Appendix B), per image (B,).

    The latent part of -ELBO: large when the encoder places x far from where
    normal images go, or is unusually certain about it. No sampling, so `eps`
    is unused.
    """
    return _terms(model, x, eps, decode=False).kl


# The one dispatch table: each score from the terms of one encoder pass (and the decoder passes
# its draws need); `score_batch` and every public function above go through it.
_FROM_TERMS: dict[str, Callable[[VAE, torch.Tensor, _Terms, torch.Tensor | None], torch.Tensor]] = {
    "elbo-ic-nn": _with_neighbours,
    "elbo": lambda model, x, t, bits: _negative_elbo(t),
    "elbo-ic": _complexity_corrected,
    "kl": lambda model, x, t, bits: t.kl,
    "iwae": lambda model, x, t, bits: _iwae_bound(t),
    "recon-prob": lambda model, x, t, bits: _reconstruction_probability(t),
}
if tuple(_FROM_TERMS) != SCORE_NAMES:  # pragma: no cover - a new score must be added to both tables
    raise ImportError(f"scores.py computes {tuple(_FROM_TERMS)}, config.SCORE_SPECS lists {SCORE_NAMES}")
NEEDS_DECODER = frozenset(SCORE_NAMES) - {"kl"}
NEEDS_BITS = frozenset({"elbo-ic", "elbo-ic-nn"})  # the scores with the PNG length L(x) in them


def score_batch(
    model: VAE,
    x: torch.Tensor,
    noise: Mapping[str, torch.Tensor],
    bits: torch.Tensor | None = None,
    bank: LatentBank | None = None,
) -> dict[str, torch.Tensor]:
    """Several scores of one batch from one encoder pass; scores with equal draws share the decoder passes.

    `noise` maps each score name to its draws. Each result equals the score's
    own function above (tested): `elbo-ic-nn`, `elbo-ic` and the `kl` guard
    of the default decision cost one encoder and one decoder pass together,
    not three and two. `bank` is the model's training latents, which
    `elbo-ic-nn` needs.
    """
    for name in noise:
        if name not in _FROM_TERMS:
            raise ConfigError(f"unknown score {name!r}; choose one of {', '.join(SCORE_NAMES)}")
    with torch.no_grad():
        mu, logvar = model.encode(x)
        kl = kl_to_standard_normal(mu, logvar)
        decoded: dict[tuple[tuple[int, ...], bytes], tuple[torch.Tensor, torch.Tensor]] = {}
        out: dict[str, torch.Tensor] = {}
        for name, eps in noise.items():
            ll = z = None
            if name in NEEDS_DECODER:
                key = (tuple(eps.shape), eps.cpu().numpy().tobytes())
                if key not in decoded:
                    decoded[key] = _log_likelihoods(model, x, mu, logvar, eps)
                ll, z = decoded[key]
            out[name] = _FROM_TERMS[name](model, x, _Terms(logvar, kl, ll, z, eps, mu, bank), bits)
        return out


def pixel_nll_map(model: VAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def score_images(model: VAE, x: torch.Tensor, score: str, eps: torch.Tensor) -> torch.Tensor:
    """One score by name; `x` is float (B, C, H, W) in [0, 1] on the model's device."""
    return score_batch(model, x, {score: eps})[score]
