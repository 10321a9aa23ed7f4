"""vae-anomaly: flag images that do not look like a set of known-normal ones.

A convolutional VAE learns the normal images; new images are scored by
negative ELBO, an importance-weighted bound or the reconstruction
probability, turned into conformal p-values against held-out normal images,
and flagged at a false-positive rate you choose.
"""

__version__ = "0.1.0"

from .detector import Decision, Detector, FitConfig, HeatMaps, ScoreResult

# evaluation (sklearn.metrics) and visualize (matplotlib) are imported where used:
# `from vae_anomaly.evaluation import evaluate_detector`, so that scoring stays light.
__all__ = ["Decision", "Detector", "FitConfig", "HeatMaps", "ScoreResult", "__version__"]
