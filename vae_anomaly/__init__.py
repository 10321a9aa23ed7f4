"""vae-anomaly: flag images that do not look like a set of known-normal ones.

A convolutional VAE learns the normal images; new images are scored by
negative ELBO, an importance-weighted bound or the reconstruction
probability, turned into conformal p-values against held-out normal images,
and flagged at a false-positive rate you choose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names and the module each lives in.
_PUBLIC = {
    "Decision": "decision.rule",
    "DecisionRule": "decision.rule",
    "Detector": "detector",
    "FitConfig": "config",
    "HeatMaps": "model.inference",
    "ScoreResult": "model.inference",
    "VaeAnomalyError": "errors",
}
__all__ = [
    "Decision",
    "DecisionRule",
    "Detector",
    "FitConfig",
    "HeatMaps",
    "ScoreResult",
    "VaeAnomalyError",
    "__version__",
]

if TYPE_CHECKING:
    from .config import FitConfig
    from .decision.rule import Decision, DecisionRule
    from .detector import Detector
    from .errors import VaeAnomalyError
    from .model.inference import HeatMaps, ScoreResult


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), so that `vae_anomaly.images.batching` alone, what the
    # decoding worker processes load, does not pull in torch.
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'vae_anomaly' has no attribute {name!r}")
