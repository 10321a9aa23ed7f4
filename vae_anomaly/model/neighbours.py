"""The latent neighbours of the default score: how far an image's code lies from the training images' codes.

The default score `elbo-ic-nn` adds to the complexity-corrected -ELBO the
distance of the image's latent mean to its nearest training latents, each in
units of its own spread on the training images:

    S_nn(x) = S_ic(x) / IQR_train(S_ic) + d_5(mu(x)) / IQR_train(d_5),
    d_5(m)  = 1/5 sum_{j=1..5} || m - mu(x_(j)) ||,

where mu(x_(j)) are the five nearest of model k's training latent means
(Euclidean), IQR_train(S_ic) the interquartile range of S_ic on model k's
training images and IQR_train(d_5) that of their leave-one-out distances.
The likelihood misses what the code sees: a digit 2 whose pixels the decoder
explains as well as a normal 7 still lands where no 7 does (deep kNN on
learned features, Bergman, Cohen & Hoshen 2020). Both constants come from
training images only, so calibration images stay exchangeable with incoming
ones and the conformal p-values keep their guarantee. Measured on one-class
MNIST, 3 seeds (benchmarks/README.md, "Detection quality").

No torch: the encoder means arrive as arrays (`inference.latent_banks`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import KDTree

SCORE = "elbo-ic-nn"
NEIGHBOURS = 5
BANK = 20_000  # training latents kept per model (a random subset above it): 1.3 MB at 16 dimensions
SCALE_SAMPLE = 2048  # training images whose S_ic gives IQR_train(S_ic)
PREFIX = "latent:"  # the banks' arrays in the model file's calibration tensors


def spread(values: np.ndarray) -> float:
    """The interquartile range, or 1 where it is zero (a constant statistic adds nothing to rank by)."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1) if q3 > q1 else 1.0


def neighbours_in(n: int) -> int:
    """Neighbours averaged in a bank of n latents: 5, or fewer where the bank is smaller (itself excluded)."""
    if n < 2:
        raise ValueError(f"latent bank: need at least 2 training latents, got {n}")
    return min(NEIGHBOURS, n - 1)


@dataclass(frozen=True)
class LatentBank:
    """One model's training latent means and the two spreads that put S_ic and d_5 in the same units."""

    means: np.ndarray  # (n, D) float32
    ic_scale: float  # IQR_train(S_ic)
    distance_scale: float  # IQR_train(d_5), leave-one-out
    index: KDTree = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.means.ndim != 2:
            raise ValueError(f"latent bank: means must be (n, D), got shape {self.means.shape}")
        neighbours_in(len(self.means))
        if not (self.ic_scale > 0 and self.distance_scale > 0):
            raise ValueError(f"latent bank: spreads must be positive, got {self.ic_scale}, {self.distance_scale}")
        object.__setattr__(self, "index", KDTree(self.means))

    @property
    def k(self) -> int:
        """Neighbours averaged: 5, or fewer where the bank is smaller."""
        return neighbours_in(len(self.means))

    def distances(self, mu: np.ndarray) -> np.ndarray:
        """d_5 of each latent mean (B, D) to the bank: the mean of its 5 nearest distances."""
        if not len(mu):
            return np.zeros(0)
        dist, _ = self.index.query(np.asarray(mu, np.float64), k=range(1, self.k + 1))
        return np.asarray(dist.mean(1), np.float64)

    def combine(self, ic: np.ndarray, mu: np.ndarray) -> np.ndarray:
        """S_nn = S_ic / IQR(S_ic) + d_5(mu) / IQR(d_5), the module's equation."""
        return np.asarray(ic, np.float64) / self.ic_scale + self.distances(mu) / self.distance_scale

    @classmethod
    def build(cls, means: np.ndarray, ic: np.ndarray, rng: np.random.Generator) -> LatentBank:
        """A bank from model k's training latent means and S_ic of (a sample of) its training images."""
        means = np.asarray(means, np.float32)
        if len(means) > BANK:
            means = means[np.sort(rng.choice(len(means), BANK, replace=False))]
        k = neighbours_in(len(means))
        dist, _ = KDTree(means).query(means, k=range(2, k + 2))  # the first neighbour is the image itself
        return cls(means, spread(ic), spread(dist.mean(1)))


def describe(banks: Sequence[LatentBank]) -> dict[str, object]:
    """The banks in numbers, for `info`: latents kept per model and the two spreads of each."""
    return {
        "neighbours": banks[0].k,
        "latents": [len(b.means) for b in banks],
        "ic_spread": [b.ic_scale for b in banks],
        "distance_spread": [b.distance_scale for b in banks],
    }


def arrays(banks: Sequence[LatentBank], prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """What the model file keeps, by name: each model's means and its two spreads."""
    out: dict[str, np.ndarray] = {}
    for k, b in enumerate(banks):
        out[f"{prefix}means{k}"] = b.means
        out[f"{prefix}scales{k}"] = np.array([b.ic_scale, b.distance_scale], np.float64)
    return out


def from_arrays(data: Mapping[str, np.ndarray], models: int, prefix: str = PREFIX) -> tuple[LatentBank, ...] | None:
    """The banks a model file keeps, or None in files written before them. Raises ValueError when
    their arrays do not fit the models."""
    a = {k[len(prefix) :]: np.asarray(v) for k, v in data.items() if k.startswith(prefix)}
    if not a:
        return None
    banks = []
    for k in range(models):
        scales = a[f"scales{k}"]
        banks.append(LatentBank(a[f"means{k}"].astype(np.float32), float(scales[0]), float(scales[1])))
    if len(a) != 2 * models:
        raise ValueError(f"latent banks: {len(a)} arrays for {models} models")
    return tuple(banks)
