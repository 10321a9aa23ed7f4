"""Below the conformal floor: a generalised Pareto tail for the most atypical images' p-values.

n calibration images give exact conformal p-values no smaller than 1/(n+1),
so 50 normal images cannot flag at 1%, and Benjamini-Hochberg over a batch of
200 needs p <= 0.00025 for its first flag. Extreme-value theory says what lies
beyond: the excesses of a statistic over a high threshold u are close to a
generalised Pareto distribution (Pickands 1975; Balkema and de Haan 1974), so

    P(D >= d) ~ k / (n + 1) * S_GPD(d - u; xi, sigma),   d > u,        (1)

with D the combined evidence T of `combination.py`, u the (k+1)-th largest of the n calibration
images' values of it and (xi, sigma)
fitted to the k excesses by maximum likelihood (SciPy's `genpareto.fit`). Only
the images whose exact p-value is already the floor get (1) instead, when it is
smaller: every decision at a level >= 1/(n+1) stays exact, and the levels below
it are approximate, as the rule's guarantee says. No torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_CALIBRATION = 20  # fewer calibration images: no tail is fitted, the rule flags at its floor
MIN_EXCEEDANCES = 10
TAIL_SHARE = 0.2  # the share of the calibration values of T taken as the tail
# From this many calibration images up the exact conformal p-values are used alone: 1/(n+1) is
# then below 0.0005, and the rule's guarantee stays exact at every level it is likely to be asked.
TAIL_MODEL_BELOW = 2000


@dataclass(frozen=True)
class TailModel:
    """A generalised Pareto fit to the calibration images' largest combined evidence, and how well it fits."""

    n: int  # calibration images
    exceedances: int  # k, the tail's size
    threshold: float  # u, the (k+1)-th largest calibration value of T
    shape: float  # xi >= 0 (a fitted xi < 0 is replaced by the exponential tail, xi = 0: see `fit_tail`)
    scale: float  # sigma
    fit_p: float  # Kolmogorov-Smirnov p of the k excesses against the fit (optimistic: fitted parameters)

    def survival(self, d: np.ndarray) -> np.ndarray:
        """Equation (1); 1 at or below the threshold, where the model says nothing."""
        from scipy.stats import genpareto

        excess = np.asarray(d, dtype=np.float64) - self.threshold
        sf = genpareto.sf(np.maximum(excess, 0.0), self.shape, scale=self.scale)
        p: np.ndarray = np.where(
            excess > 0, np.maximum(self.exceedances / (self.n + 1.0) * sf, np.finfo(np.float64).tiny), 1.0
        )
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"a generalised Pareto tail (shape {self.shape:.3g}, scale {self.scale:.3g}) fitted to the "
            f"{self.exceedances} largest of {self.n} calibration images' combined evidence, "
            f"goodness of fit p = {self.fit_p:.2g}"
        )


def covers(n_calibration: int) -> bool:
    """Whether p-values below 1/(n+1) come from a tail model for n calibration images."""
    return MIN_CALIBRATION <= n_calibration < TAIL_MODEL_BELOW


def fit_tail(deviations: np.ndarray) -> TailModel | None:
    """Fit (1) to the calibration images' values of T (`deviations`); None where there are too few or they have no tail.

    A fitted shape xi < 0 means a tail that ends at a finite point, and p = 0
    beyond it: a handful of excesses cannot support that, so the exponential
    tail (xi = 0, sigma = their mean) is used instead, the heavier and so the
    more cautious of the two.
    """
    from scipy.stats import genpareto, kstest

    d = np.sort(np.asarray(deviations, dtype=np.float64))[::-1]
    n = len(d)
    if not covers(n) or not np.all(np.isfinite(d)):
        return None
    k = max(MIN_EXCEEDANCES, round(TAIL_SHARE * n))
    u = float(d[k])
    excess = d[:k] - u
    if excess.max() <= 0:
        return None
    shape, _, scale = genpareto.fit(excess, floc=0)
    if not np.isfinite(shape) or shape < 0 or not np.isfinite(scale) or scale <= 0:
        shape, scale = 0.0, float(excess.mean())
    fit_p = float(kstest(excess, genpareto(shape, 0, scale).cdf).pvalue)
    return TailModel(n, k, u, float(shape), float(scale), fit_p)


def at_floor(p: np.ndarray, n: int) -> np.ndarray:
    """Which exact p-values are the conformal floor 1/(n+1): the only ones the tail model refines."""
    floor: np.ndarray = p <= 1.0 / (n + 1.0) + 1e-15
    return floor


def refine(p: np.ndarray, n: int, deviations: np.ndarray, model: TailModel | None) -> np.ndarray:
    """The floor's p-values replaced by (1) where it is smaller; all others as they were.

    `deviations` is (K, m), each new image's T under each of K models;
    with K > 1 the tail probabilities are averaged, as cross-conformal counts are.
    """
    if model is None:
        return p
    tail_p = np.mean([model.survival(d) for d in np.atleast_2d(deviations)], axis=0)
    refined: np.ndarray = np.where(at_floor(p, n), np.minimum(p, tail_p), p)
    return refined
