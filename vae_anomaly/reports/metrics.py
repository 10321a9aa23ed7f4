"""Detection quality against known labels, all through `sklearn.metrics`.

Labels: 1 = anomaly, 0 = normal. Scores: higher = more anomalous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn import metrics as skm


@dataclass(frozen=True)
class DetectionMetrics:
    roc_auc: float
    average_precision: float
    best_f1: float
    best_f1_threshold: float
    best_f1_precision: float
    best_f1_recall: float
    tpr_at_fpr_1pct: float
    tpr_at_fpr_5pct: float
    n_normal: int
    n_anomaly: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape} vs {s.shape}")
    if len(np.unique(y)) != 2:
        raise ValueError("metrics need both normal (0) and anomalous (1) examples")
    return y, s


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The best true-positive rate whose false-positive rate does not exceed `fpr`."""
    y, s = _check(labels, scores)
    f, t, _ = skm.roc_curve(y, s)
    return float(t[f <= fpr + 1e-12].max(initial=0.0))


def evaluate(labels: np.ndarray, scores: np.ndarray) -> DetectionMetrics:
    y, s = _check(labels, scores)
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    # The last precision/recall pair has no threshold (recall 0 by definition).
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)
    best = int(np.argmax(f1))
    return DetectionMetrics(
        roc_auc=float(skm.roc_auc_score(y, s)),
        average_precision=float(skm.average_precision_score(y, s)),
        best_f1=float(f1[best]),
        best_f1_threshold=float(thresholds[best]),
        best_f1_precision=float(p[best]),
        best_f1_recall=float(r[best]),
        tpr_at_fpr_1pct=tpr_at_fpr(y, s, 0.01),
        tpr_at_fpr_5pct=tpr_at_fpr(y, s, 0.05),
        n_normal=int((y == 0).sum()),
        n_anomaly=int((y == 1).sum()),
    )


@dataclass(frozen=True)
class Confusion:
    """Counts of a yes/no decision against the labels (positive = anomaly)."""

    tn: int
    fp: int
    fn: int
    tp: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def tpr(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0


def confusion(labels: np.ndarray, flags: np.ndarray) -> Confusion:
    """sklearn's confusion matrix of flags against labels, unpacked."""
    tn, fp, fn, tp = skm.confusion_matrix(
        np.asarray(labels).astype(int), np.asarray(flags).astype(int), labels=[0, 1]
    ).ravel()
    return Confusion(int(tn), int(fp), int(fn), int(tp))
