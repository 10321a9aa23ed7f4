"""What the VAE models: a pretrained backbone's features or the pixels; the `auto` rule and its words.

No torch: `fit` decides before any image is decoded, and `info` describes a model file without loading it.
"""

from __future__ import annotations

from typing import Any

# Training images whose working size is below this side are modelled as pixels, larger ones through the
# backbone (fit --features auto). Measured (benchmarks/feature_choice.py): 28-px MNIST digits rank better on
# pixels, 96-256 px photo crops far better on features; ImageNet's network has not seen images this small.
PIXELS_BELOW = 64


def choose_features(requested: str, side: int, image_size_given: bool) -> tuple[str, str]:
    """("backbone" or "pixels", why) for a training set whose native working side is `side` px."""
    if requested != "auto":
        return requested, f"--features {requested}"
    if image_size_given:
        return "pixels", "--image-size sets a working size for the pixel model"
    if side < PIXELS_BELOW:
        return "pixels", f"auto: training images {side} px a side, below {PIXELS_BELOW} px"
    return "backbone", f"auto: training images {side} px a side, at least {PIXELS_BELOW} px"


def describe(features: dict[str, Any] | None, config: dict[str, Any]) -> tuple[str, str]:
    """(what the VAE models, its network), in words, from a model file's metadata (`info` shows them)."""
    if config.get("kind") != "features":
        why = "" if not features else f" ({features.get('why', '')})"
        net = f"latent {config['latent_dim']}, channels {config['hidden_channels']}, {config['likelihood']} decoder"
        return "pixels" + why, net
    assert features is not None
    seen = (
        f"{features['backbone']} (ImageNet weights, SHA-256 {str(features['weights_sha256'])[:12]}...): "
        f"{features['dim']} pooled values per image at {features['size']} px, standardised and whitened "
        f"(Ledoit-Wolf) on each model's training images ({features.get('why', '')})"
    )
    d, h = config["in_features"], config["hidden"]
    return seen, f"MLP {d}-{h}-{h}-{config['latent_dim']} and back, Gaussian decoder with a learned scale per value"
