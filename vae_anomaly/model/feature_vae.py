"""The VAE over a pretrained backbone's features (Kingma & Welling 2014, on 992 numbers per image).

The input x is the backbone's pooled feature vector (backbone.py). Before
the encoder it is standardised and whitened with the training images'
covariance, shrunk by Ledoit & Wolf (2004): a few hundred images cannot
estimate a 992 x 992 covariance, and unshrunk whitening would blow up the
directions they happen not to vary along. In whitened coordinates u the
decoder is Gaussian with a learned scale per coordinate,

    log p(x|z) = sum_j log N(u_j; m_j(z), s_j^2),   u = W (x - c),

so -ELBO, IWAE and the reconstruction probability are the equations of
scores.py unchanged (the whitening's Jacobian is the same for every image).
A VAE with a linear decoder and this likelihood is probabilistic PCA, the
Gaussian baseline every benchmark runs beside it (Mahalanobis distance on
the same features); the MLP lets it bend where the normal images do.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.covariance import ledoit_wolf_shrinkage
from torch import nn

from ..errors import ConfigError

# The smallest decoder scale in whitened units: a coordinate the training images explain perfectly
# must not make every new image infinitely unlikely.
MIN_LOG_SCALE = math.log(0.05)
MAX_LOG_SCALE = math.log(10.0)


@dataclass
class FeatureVAEConfig:
    """Shape of the feature VAE; everything needed to rebuild it from a model file."""

    in_features: int = 992
    latent_dim: int = 16
    hidden: int = 256
    likelihood: str = "gaussian"  # the only one over real-valued features
    backbone: str = "efficientnet-lite0"
    image_size: int = 128  # the backbone's input side
    in_channels: int = 3
    kind: str = "features"

    def __post_init__(self) -> None:
        if not 1 <= self.in_features <= 65536:
            raise ConfigError(f"in_features must be in [1, 65536], got {self.in_features}")
        if not 1 <= self.latent_dim <= 4096:
            raise ConfigError(f"latent_dim must be in [1, 4096], got {self.latent_dim}")
        if not 1 <= self.hidden <= 65536:
            raise ConfigError(f"hidden must be in [1, 65536], got {self.hidden}")
        if self.likelihood != "gaussian":
            raise ConfigError(f"a feature VAE's decoder is Gaussian; likelihood {self.likelihood!r} is for pixels")
        if self.kind != "features":
            raise ConfigError(f"kind must be 'features', got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureVAEConfig:
        names = ("in_features", "latent_dim", "hidden", "likelihood", "backbone", "image_size", "in_channels", "kind")
        return cls(**{k: d[k] for k in names if k in d})


def whitening(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c, W) such that u = (x - c) W has zero mean and identity covariance under Ledoit-Wolf's shrunk
    covariance C = (1 - d) S + d m I of the standardised training features (ZCA whitening, W = C^(-1/2)
    after the standardisation). With n images S has rank < n: C^(-1/2) acts as (d m)^(-1/2) off the
    span of the training images and is computed from their thin SVD, O(n^2 D) rather than O(D^3)."""
    x = np.asarray(features, np.float64)
    center = x.mean(0)
    scale = x.std(0)
    scale = np.where(scale > 1e-6 * max(float(scale.max()), 1e-12), scale, 1.0)  # constant features stay put
    z = (x - center) / scale
    n, d = z.shape
    shrinkage = float(ledoit_wolf_shrinkage(z, assume_centered=True))
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    mu = float((sv**2).sum() / (n * d))  # trace(S) / D
    floor = max(shrinkage * mu, 1e-12)  # the shrunk eigenvalue off the span
    values = (1.0 - shrinkage) * sv**2 / n + floor
    inv_sqrt = np.eye(d) / np.sqrt(floor) + (vt.T * (1.0 / np.sqrt(values) - 1.0 / np.sqrt(floor))) @ vt
    return center.astype(np.float32), (inv_sqrt / scale[:, None]).astype(np.float32)


class FeatureVAE(nn.Module):
    """Gaussian encoder q(z|x), N(0, I) prior, MLP decoder p(u|z) over whitened features u."""

    center: torch.Tensor  # c (D,), a buffer: saved with the weights
    whiten: torch.Tensor  # W (D, D), as a matrix acting on row vectors

    def __init__(self, config: FeatureVAEConfig) -> None:
        super().__init__()
        self.config = config
        d, h, latent = config.in_features, config.hidden, config.latent_dim
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("whiten", torch.eye(d))
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2))
        self.to_stats = nn.Linear(h, 2 * latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, d)
        )
        self.log_scale = nn.Parameter(torch.zeros(d))
        self._memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit_whitening(self, features: np.ndarray) -> None:
        """Set c and W from the images this model trains on (never its calibration images); u = (x - c) W."""
        center, w = whitening(features)
        self.center.copy_(torch.from_numpy(center))
        self.whiten.copy_(torch.from_numpy(w))

    def whitened(self, x: torch.Tensor) -> torch.Tensor:
        """u = W (x - c), (B, D); the last batch's kept, since every decoder draw compares against it."""
        if self._memo is not None and self._memo[0] is x:
            return self._memo[1]
        u = (x - self.center) @ self.whiten
        self._memo = (x, u)
        return u

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, D) raw features -> mu, logvar, each (B, latent)."""
        mu, logvar = self.to_stats(self.encoder(self.whitened(x))).chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Eq. 10)."""
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., latent) -> the decoder's means in whitened coordinates (..., D)."""
        out: torch.Tensor = self.decoder(z)
        return out

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's mean (whitened features; there is no image to show)."""
        return out

    def pixel_log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log N(u_j; m_j, s_j^2) per whitened coordinate, shape of `out`."""
        log_sigma = self.log_scale.clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
        return -0.5 * ((self.whitened(x) - out) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)
