"""How well a fitted detector separates labelled normal and anomalous images.

Labelled data comes as a folder with `normal/` and `anomaly/` subfolders, or
as a CSV file with columns `path,label` (1 = anomaly, 0 = normal; paths
relative to the CSV's folder, or absolute). The figures come from
`metrics.py` (all `sklearn.metrics`); the confusion matrix is taken at the
model's own `auto` rule, guard included, so it shows what `score
--threshold auto` would flag.

    data = labelled_folders("labelled/")        # or labels_csv("labels.csv")
    ev = evaluate_detector(Detector.load("model.vae"), data, fpr=0.01)
    ev.results["elbo"].metrics.roc_auc

Nothing here imports click or rich.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .decision.thresholds import Threshold
from .detector import Detector
from .errors import LabelsError
from .images.decoding import ReadError
from .images.listing import display_path, find_images
from .model.score_table import DEFAULT_GUARD, SCORE_NAMES
from .reports import outputs, visualize
from .reports.metrics import Confusion, DetectionMetrics, confusion, evaluate

SCHEMA_NAME = "vae-anomaly/evaluate"
SCHEMA_VERSION = 1
LABEL_WORDS = {"0": 0, "1": 1, "normal": 0, "anomaly": 1}


@dataclass
class LabelledSet:
    """Image files and their labels (1 = anomaly), in a repeatable order."""

    files: list[Path]
    labels: np.ndarray  # int (N,)
    source: str  # what the labels came from, for the report
    ignored: int = 0


def labelled_folders(root: str | os.PathLike[str]) -> LabelledSet:
    """`root/normal/**` are label 0, `root/anomaly/**` label 1 (walked like `score` walks folders)."""
    base = Path(root)
    if not base.is_dir():
        raise LabelsError(f"{display_path(base)}: no such folder. Give a folder with normal/ and anomaly/ inside.")
    missing = [sub for sub in ("normal", "anomaly") if not (base / sub).is_dir()]
    if missing:
        raise LabelsError(
            f"{display_path(base)}: no {' and no '.join(m + '/' for m in missing)} subfolder. Put normal images "
            "in normal/ and anomalous ones in anomaly/, or give the labels with --labels FILE.csv"
        )
    files: list[Path] = []
    labels: list[int] = []
    ignored = 0
    for sub, label in (("normal", 0), ("anomaly", 1)):
        listing = find_images([base / sub])
        files += listing.files
        labels += [label] * len(listing.files)
        ignored += listing.ignored
    return LabelledSet(files, np.array(labels, dtype=int), f"folders {display_path(base)}/{{normal,anomaly}}", ignored)


def labels_csv(path: str | os.PathLike[str]) -> LabelledSet:
    """Rows `path,label` with a header; relative paths are taken from the CSV's folder."""
    csv_path = Path(path)
    name = display_path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(f"{name}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelsError(f"{name}: cannot read the labels file ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"path", "label"} <= {f.strip() for f in reader.fieldnames}:
        raise LabelsError(f"{name}: the first line must be the header 'path,label', got {reader.fieldnames}")
    by_path: dict[Path, int] = {}
    for line_no, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        raw, label = row.get("path", ""), row.get("label", "").lower()
        if not raw:
            raise LabelsError(f"{name}, line {line_no}: empty path")
        if label not in LABEL_WORDS:
            raise LabelsError(f"{name}, line {line_no}: label {label!r} for {raw}; use 1 (anomaly) or 0 (normal)")
        file = Path(raw) if Path(raw).is_absolute() else csv_path.parent / raw
        if not (file.exists() or file.is_symlink()):
            raise LabelsError(
                f"{name}, line {line_no}: {display_path(file)} does not exist (relative paths are read from the "
                "CSV's folder)"
            )
        y = LABEL_WORDS[label]
        if by_path.setdefault(file, y) != y:
            raise LabelsError(f"{name}, line {line_no}: {raw} is listed twice with different labels")
    if not by_path:
        raise LabelsError(f"{name}: no rows below the header")
    return LabelledSet(list(by_path), np.array(list(by_path.values()), dtype=int), f"labels {name}")


@dataclass
class ScoreEvaluation:
    """One score type's figures, and the scores behind them (for plots)."""

    score: str
    samples: int
    metrics: DetectionMetrics
    threshold: Threshold  # the auto rule at the requested fpr and tail
    confusion: Confusion  # of that rule's flags against the labels
    scores: np.ndarray
    flags: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "samples": self.samples,
            **self.metrics.to_dict(),
            "auto_threshold": {**self.threshold.to_dict(), "rule_text": self.threshold.describe()},
            "confusion": self.confusion.to_dict(),
            "auto_fpr": self.confusion.fpr,
            "auto_tpr": self.confusion.tpr,
        }


@dataclass
class Evaluation:
    source: str
    paths: list[str]  # readable images, in the order of `labels` and every result's scores
    labels: np.ndarray
    results: dict[str, ScoreEvaluation]
    fpr: float
    tail: str
    calibration: dict[str, np.ndarray]
    unreadable: list[ReadError] = field(default_factory=list)
    ignored: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "images": len(self.paths),
            "n_normal": int((self.labels == 0).sum()),
            "n_anomaly": int((self.labels == 1).sum()),
            "fpr": self.fpr,
            "tail": self.tail,
            "results": [r.to_dict() for r in self.results.values()],
            "unreadable": [{"path": e.path, "reason": e.reason} for e in self.unreadable],
            "ignored": self.ignored,
            "warnings": self.warnings,
        }


def evaluate_detector(
    detector: Detector,
    data: LabelledSet,
    *,
    scores: Sequence[str] = SCORE_NAMES,
    fpr: float = 0.01,
    tail: str | None = None,
    guard: str | None = DEFAULT_GUARD,
    strict: bool = False,
    checks: bool = True,
    batch_size: int = 256,
    on_batch: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Score the labelled images once per score type (decoding each file once) and compare with the labels.

    Each score's confusion matrix is taken at the rule `score` applies by
    default: the score's conformal p-value combined with the `guard`
    statistic's and, with `checks`, the image-property checks' (one test), raised
    to the smallest reachable level unless `strict`, as `score` does. Unreadable files are left out of the
    figures and listed. Raises `LabelsError` when what is left lacks normal
    or anomalous images.
    """
    label_of = {display_path(f): int(y) for f, y in zip(data.files, data.labels, strict=True)}
    names = list(dict.fromkeys([*scores, *([guard] if guard is not None else [])]))
    scored = detector.score_many(data.files, scores=names, batch_size=batch_size, on_batch=on_batch)
    first = scored[next(iter(scored))]
    labels = np.array([label_of[p] for p in first.paths], dtype=int)
    if (labels == 0).sum() == 0 or (labels == 1).sum() == 0:
        raise LabelsError(
            f"{data.source}: {int((labels == 0).sum())} readable normal and {int((labels == 1).sum())} readable "
            "anomalous images; evaluation needs at least one of each"
        )
    warnings: list[str] = []
    results: dict[str, ScoreEvaluation] = {}
    for name in scores:
        result = scored[name]
        if guard is not None and guard != name:
            result = replace(result, guard=scored[guard])
        decision = detector.decide(result, threshold="auto", fpr=fpr, tail=tail, strict=strict, checks=checks)
        warnings += [w for w in decision.warnings if w not in warnings]
        results[name] = ScoreEvaluation(
            name,
            result.samples,
            evaluate(labels, result.scores),
            decision.threshold,
            confusion(labels, decision.flags),
            result.scores,
            decision.flags,
        )
    return Evaluation(
        data.source,
        first.paths,
        labels,
        results,
        fpr,
        tail or detector.rule(first).tail_for(detector.calibration),
        {name: detector.calibration_[name] for name in scores},
        first.errors,
        data.ignored,
        warnings,
    )


def evaluation_plots(ev: Evaluation, folder: Path, on_message: Callable[[str], None]) -> None:
    """Per score: the histogram of calibration, normal and anomalous scores with the auto rule; ROC and PR curves."""
    written = []
    for name, r in ev.results.items():
        png = visualize.score_histogram(
            {
                "calibration (normal)": ev.calibration[name],
                "labelled normal": r.scores[ev.labels == 0],
                "labelled anomaly": r.scores[ev.labels == 1],
            },
            r.threshold,
            score=name,
            title=f"{name}: ROC-AUC {r.metrics.roc_auc:.3f}; auto rule at fpr {ev.fpr:g} ({ev.tail})",
        )
        written.append(folder / f"histogram_{name}.png")
        outputs.write_file(written[-1], png, "a histogram")
    scores = {name: r.scores for name, r in ev.results.items()}
    written += [folder / "roc.png", folder / "pr.png"]
    outputs.write_file(written[-2], visualize.roc_curves(ev.labels, scores), "the ROC curves")
    outputs.write_file(written[-1], visualize.pr_curves(ev.labels, scores), "the precision-recall curves")
    on_message(f"wrote {', '.join(os.fsdecode(w) for w in written)}")
