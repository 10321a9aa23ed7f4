"""metrics.evaluate reports what sklearn.metrics computes on the same scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from vae_anomaly.reports.metrics import evaluate, tpr_at_fpr


def test_figures_equal_sklearn_on_the_same_scores() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300), np.ones(60)].astype(int)
    s = np.r_[rng.normal(0, 1, 300), rng.normal(2, 1, 60)]
    m = evaluate(y, s)
    assert m.roc_auc == pytest.approx(skm.roc_auc_score(y, s))
    assert m.average_precision == pytest.approx(skm.average_precision_score(y, s))
    pred = s >= m.best_f1_threshold
    assert m.best_f1 == pytest.approx(skm.f1_score(y, pred))
    assert m.best_f1_precision == pytest.approx(skm.precision_score(y, pred))
    assert m.best_f1_recall == pytest.approx(skm.recall_score(y, pred))
    fpr, tpr, _ = skm.roc_curve(y, s)
    assert m.tpr_at_fpr_5pct == pytest.approx(tpr[fpr <= 0.05].max())
    assert (m.n_normal, m.n_anomaly) == (300, 60)


def test_perfect_scores_reach_full_recall_at_any_fpr() -> None:
    y = np.array([0, 0, 0, 1, 1])
    assert tpr_at_fpr(y, np.array([0.1, 0.2, 0.3, 0.9, 1.0]), 0.0) == 1.0


def test_one_class_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="both"):
        evaluate(np.zeros(4), np.arange(4.0))
