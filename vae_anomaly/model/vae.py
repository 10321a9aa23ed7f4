"""The convolutional Variational Autoencoder (Kingma & Welling 2014).

Everything the network is lives in this file: a `VAEConfig` dataclass that
can be written to and read back from a model file, and `ConvVAE`, a plain
`nn.Module` with `encode`, `reparameterize`, `decode` and `forward`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from .feature_vae import FeatureVAE, FeatureVAEConfig
from .train_config import LIKELIHOODS

Likelihood = Literal["bernoulli", "gaussian"]

# A Gaussian decoder's scale is learned, but must not collapse to zero on
# pixels that are constant in the training set (MNIST's black border): that
# would make every image with one stray grey pixel infinitely unlikely.
# 1/255 is the quantisation step of 8-bit images, the finest scale the data
# can support.
MIN_LOG_SCALE = math.log(1.0 / 255.0)
MAX_LOG_SCALE = math.log(1.0)


def default_hidden_channels(image_size: int) -> tuple[int, ...]:
    """One stride-2 convolution per halving while the feature map is >= 12 px.

    28x28 digits get two of 32 and 64 channels (28 -> 14 -> 7, the layout
    measured best on MNIST). Above 32 px channels start at 16 and double up
    to 128: at the 48 px working size of photos that network (16, 32, 64)
    scores 3x faster than one starting at 32 and trains 2.8x faster, at
    0.006 lower ROC-AUC on benchmarks/photos.py (benchmarks/README.md).
    """
    channels = [32 if image_size <= 32 else 16]
    size = image_size // 2
    while size >= 12 and len(channels) < 5:
        channels.append(min(channels[-1] * 2, 128))
        size //= 2
    return tuple(channels)


@dataclass
class VAEConfig:
    """Shape of the network; everything needed to rebuild it from a model file."""

    in_channels: int = 1  # 1 for grey, 3 for colour: decided from the training images
    image_size: int = 28  # square input side after resizing
    latent_dim: int = 16  # small enough to force a summary, large enough for digit style
    hidden_channels: tuple[int, ...] = field(default_factory=tuple)  # () = from image_size
    likelihood: str = "gaussian"  # decoder p(x|z); Gaussian avoids Bernoulli's entropy floor
    dense_dim: int = 256  # a dense layer between the conv features and the code, both ways

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ConfigError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if not 4 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [4, 1024], got {self.image_size}")
        if not 1 <= self.latent_dim <= 4096:
            raise ConfigError(f"latent_dim must be in [1, 4096], got {self.latent_dim}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {self.likelihood!r}")
        self.hidden_channels = tuple(int(c) for c in self.hidden_channels) or (default_hidden_channels(self.image_size))
        if not 1 <= self.dense_dim <= 65536:
            raise ConfigError(f"dense_dim must be in [1, 65536], got {self.dense_dim}")
        if any(c < 1 for c in self.hidden_channels):
            raise ConfigError(f"hidden_channels must be positive, got {self.hidden_channels}")
        sizes = _feature_sizes(self.image_size, len(self.hidden_channels))
        if sizes[-1] < 1:
            fits = sum(1 for s in sizes[1:] if s >= 1)
            raise ConfigError(
                f"hidden_channels {','.join(map(str, self.hidden_channels))}: {len(self.hidden_channels)} stride-2 "
                f"layers shrink the {self.image_size}-px working size to nothing (at most {fits} fit); give fewer "
                "channel counts or a larger --image-size"
            )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_channels"] = list(self.hidden_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        known = {k: d[k] for k in ("in_channels", "image_size", "latent_dim", "likelihood", "dense_dim") if k in d}
        return cls(**known, hidden_channels=tuple(d.get("hidden_channels", ())))


def _feature_sizes(image_size: int, depth: int) -> list[int]:
    """Spatial side after each stride-2 conv (k=4, p=1): floor(s / 2)."""
    sizes = [image_size]
    for _ in range(depth):
        sizes.append(sizes[-1] // 2)
    return sizes


class ConvVAE(nn.Module):
    """Gaussian encoder q(z|x), N(0, I) prior, convolutional decoder p(x|z)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        chans = config.hidden_channels
        self.sizes = _feature_sizes(config.image_size, len(chans))
        last_c, last_s = chans[-1], self.sizes[-1]

        flat = last_c * last_s * last_s
        enc: list[nn.Module] = []
        c_in = config.in_channels
        for c in chans:
            enc += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in = c
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(flat, config.dense_dim), nn.LeakyReLU(0.2))
        self.to_stats = nn.Linear(config.dense_dim, 2 * config.latent_dim)

        self.from_latent = nn.Sequential(
            nn.Linear(config.latent_dim, config.dense_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(config.dense_dim, flat),
            nn.LeakyReLU(0.2),
        )
        dec: list[nn.Module] = []
        outs = [*list(chans[-2::-1]), config.in_channels]
        c_in = last_c
        for i, c in enumerate(outs):
            target = self.sizes[len(chans) - 1 - i]
            # ConvTranspose2d(k=4, s=2, p=1) gives 2 * in + output_padding: odd sides need 1.
            output_padding = target - 2 * self.sizes[len(chans) - i]
            dec.append(nn.ConvTranspose2d(c_in, c, 4, stride=2, padding=1, output_padding=output_padding))
            if i < len(outs) - 1:
                dec.append(nn.LeakyReLU(0.2))
            c_in = c
        self.decoder = nn.Sequential(*dec)
        # One learned log standard deviation per channel (the "sigma-VAE" of
        # Rybkin et al. 2021): a per-pixel scale overfits the empty border.
        self.log_scale = nn.Parameter(torch.full((config.in_channels,), math.log(0.2)))
        # A Bernoulli decoder has no scale. Freezing the unused parameter changes nothing in one
        # process (Adam skips a parameter without a gradient) and lets DistributedDataParallel,
        # which waits for a gradient of every trainable parameter, train a Bernoulli model.
        self.log_scale.requires_grad_(config.likelihood == "gaussian")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mu, logvar, each (B, D)."""
        stats = self.to_stats(self.encoder(x * 2.0 - 1.0))
        mu, logvar = stats.chunk(2, dim=-1)
        return mu, logvar.clamp(-12.0, 8.0)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Eq. 10).

        `eps` may be given so that scoring is repeatable: it broadcasts
        against (B, D), e.g. (L, 1, D) for L samples shared by every image.
        """
        if eps is None:
            eps = torch.randn_like(mu)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., D) -> decoder output (..., C, H, W): logits (Bernoulli) or
        pre-sigmoid means (Gaussian)."""
        lead = z.shape[:-1]
        s = self.sizes[-1]
        h = self.from_latent(z.reshape(-1, z.shape[-1]))
        h = h.view(-1, self.config.hidden_channels[-1], s, s)
        out = self.decoder(h)
        image: torch.Tensor = out.view(*lead, *out.shape[1:])
        return image

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One-sample pass: (decoder output, mu, logvar), in training and eval alike.

        `eps` (B, D), when given, is the draw of `reparameterize`: training
        passes it so that several processes can share one batch's draws.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, eps)
        return self.decode(z), mu, logvar

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """The decoder's mean E[x|z] in [0, 1], for reconstructions people look at."""
        return torch.sigmoid(out)

    def pixel_log_likelihood(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per pixel, shape of `out` (x broadcasts against it).

        Bernoulli: x log p + (1-x) log(1-p), the continuous-valued form used by
        Kingma & Welling (2014, Appendix C.1) for grey levels.
        Gaussian: log N(x; sigmoid(out), sigma^2), sigma learned per channel.
        """
        if self.config.likelihood == "bernoulli":
            return -nn.functional.binary_cross_entropy_with_logits(out, x.expand_as(out), reduction="none")
        log_sigma = self.log_scale.clamp(MIN_LOG_SCALE, MAX_LOG_SCALE).view(-1, 1, 1)
        mean = torch.sigmoid(out)
        return -0.5 * ((x - mean) / log_sigma.exp()) ** 2 - log_sigma - 0.5 * math.log(2 * math.pi)


VAE = ConvVAE | FeatureVAE  # the pixel VAE above, or the VAE over a backbone's features (feature_vae.py)
ModelConfig = VAEConfig | FeatureVAEConfig


def build_model(config: ModelConfig) -> VAE:
    """The network a config describes: a `FeatureVAEConfig` gives a `FeatureVAE`, a `VAEConfig` a `ConvVAE`."""
    return FeatureVAE(config) if isinstance(config, FeatureVAEConfig) else ConvVAE(config)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A model file's network config; files without a `kind` hold the pixel VAE."""
    return FeatureVAEConfig.from_dict(d) if d.get("kind") == "features" else VAEConfig.from_dict(d)
