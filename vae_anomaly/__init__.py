"""vae-anomaly: flag images that do not look like a set of known-normal ones.

A convolutional VAE learns the normal images; new images are scored by
negative ELBO, an importance-weighted bound or the reconstruction
probability, turned into conformal p-values against held-out normal images,
and flagged at a false-positive rate you choose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Decision", "Detector", "FitConfig", "HeatMaps", "ScoreResult", "__version__"]

if TYPE_CHECKING:
    from .detector import Decision, Detector, FitConfig, HeatMaps, ScoreResult


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), so that `vae_anomaly.images` alone, what the
    # decoding worker processes load, does not pull in torch.
    if name in __all__:
        from . import detector

        return getattr(detector, name)
    raise AttributeError(f"module 'vae_anomaly' has no attribute {name!r}")
