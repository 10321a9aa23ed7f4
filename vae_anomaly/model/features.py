"""What the VAE models: a pretrained backbone's features or the pixels; the `auto` rule and its words.

No torch: `fit` decides before any image is decoded, and `info` describes a model file without loading it.
"""

from __future__ import annotations

from typing import Any

# Training images whose working size is below this side are modelled as pixels, larger ones through the
# backbone (fit --features auto). Measured (benchmarks/one_class.py --digits 0,8 --seeds 0, `--features pixels`
# and `--features backbone`, results one_class_pixels_08.md and one_class_backbone.md): 28-px MNIST digits rank
# better on pixels (elbo-ic-nn 0.991 against 0.982; 47.9% of other digits flagged against 43.3%, at 13x the
# speed), 96-256 px photo crops far better on features (benchmarks/photos.py: 0.987 against 0.863).
PIXELS_BELOW = 64


# How the decision weighs a feature model's statistics (decision.py applies it; benchmarks/photos.py measured it,
# 1,000 photo crops, default decision, ROC-AUC / detected at 1% of clean: 0.959 / 65% with pixel settings).
# - Its score and guard are upper-tailed: a feature vector close to the normal images' mean is the most typical
#   image there is, where a pixel VAE gives blank frames too small a -ELBO (hence two-sided there): 0.970 / 72%.
# - These checks leave the test: over photos each ranks every kind of anomaly at chance (0.43-0.64; shadows
#   counts dark images as normal), and each dilutes the evidence of the others: 0.970 / 68% without them.
# - The score weighs more than any one check in the combination (combination.py, (3)), the more the more normal
#   images calibrate it: one weight per SCORE_WEIGHT_PER calibration images, between 1 and as much as every
#   other statistic together. The backbone's features carry what a dozen pixel statistics cannot, but a VAE
#   trained on a few dozen images has a noisy upper tail, and a heavy weight then lets one odd calibration
#   image block every anomaly. Measured (benchmarks/small_sets.py --datasets photos, saved fits; photos.py at
#   1,000), detected at 1% with the score's weight 1 / 3 / all others: n = 50: 41% / 36% / 23%; n = 100:
#   35% / 35% / 26%; n = 300: 64% / 71% / 72% (dark 99% / 99% / 91%, grey 100% / 100% / 61%); n = 1,000:
#   75% / 79% / 82% (x8: 81%).
SCORE_WEIGHT_PER = 100
SCORE_SIDE = {"pixels": "two-sided", "backbone": "upper"}
NOT_TESTED = {"pixels": (), "backbone": ("balance-x", "balance-y", "entropy", "shadows")}


def weights(kind: str, n_stats: int, n_calibration: int) -> tuple[float, ...] | None:
    """Each statistic's weight in the combination, the score first (None: all 1, the pixel VAE's)."""
    if kind != "backbone" or n_stats < 2:
        return None
    score = min(float(n_stats - 1), max(1.0, n_calibration / SCORE_WEIGHT_PER))
    return (score,) + (1.0,) * (n_stats - 1)


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
