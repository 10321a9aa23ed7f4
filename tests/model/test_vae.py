"""The network's shapes follow the input size; the config round-trips."""

from __future__ import annotations

import pytest
import torch

from vae_anomaly.model.vae import ConvVAE, VAEConfig


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 33), (3, 64), (1, 5)])
def test_forward_returns_images_of_the_input_shape(channels: int, size: int) -> None:
    model = ConvVAE(VAEConfig(channels, size, 6))
    x = torch.rand(2, channels, size, size)
    out, mu, logvar = model(x)
    assert out.shape == x.shape and mu.shape == (2, 6) and logvar.shape == (2, 6)
    assert model.pixel_log_likelihood(x, out).shape == x.shape


def test_depth_grows_with_input_size() -> None:
    assert len(VAEConfig(1, 8).hidden_channels) < len(VAEConfig(1, 28).hidden_channels)
    assert len(VAEConfig(1, 28).hidden_channels) < len(VAEConfig(1, 64).hidden_channels)


def test_decode_accepts_a_leading_sample_dimension() -> None:
    model = ConvVAE(VAEConfig(1, 16, 4))
    assert model.decode(torch.zeros(3, 2, 4)).shape == (3, 2, 1, 16, 16)


def test_config_round_trips_through_a_dict() -> None:
    cfg = VAEConfig(3, 32, 10, (8, 16), "bernoulli")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"in_channels": 2}, "in_channels"), ({"latent_dim": 0}, "latent_dim"), ({"likelihood": "poisson"}, "likelihood")],
)
def test_bad_config_values_are_refused_with_the_allowed_range(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        VAEConfig(**kwargs)
