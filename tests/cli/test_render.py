"""What `score` prints at 80 columns: every file name whole, the folder they share said once."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from vae_anomaly.cli import render
from vae_anomaly.decision.calibration import Calibration
from vae_anomaly.decision.rule import DecisionRule
from vae_anomaly.reports.report import build_report


def _report(paths: list[str]) -> object:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=200)
    scores = np.linspace(0.0, 6.0, len(paths))
    rule, calibration = DecisionRule("elbo", guard=None), Calibration({"elbo": cal})
    decision = rule.decision(scores, rule.p_values(calibration, scores), calibration)
    return build_report(
        paths, scores, [], decision, calibration=cal, score="elbo", samples=1, ignored=0,
        fingerprint="f" * 16, skip_unreadable=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "folder", ["incoming/2026-12-07/camera-north/", "/data/projects/quality-gate/incoming/batch-0042/"]
)
def test_the_score_table_keeps_file_names_whole_at_80_columns(folder: str, monkeypatch: pytest.MonkeyPatch) -> None:
    names = [f"IMG_20261207_1422{i:02d}_0001.jpg" for i in range(6)]  # a camera's names: 28 characters
    buffer = io.StringIO()
    monkeypatch.setattr(render, "out", Console(file=buffer, width=80, force_terminal=False))
    render.report_table(_report([folder + n for n in names]), top=0)  # type: ignore[arg-type]
    text = buffer.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    for name in names:
        assert name in text, f"{name} cut in:\n{text}"
    assert folder in "".join(text.split())  # said once, in the title


def test_paths_in_different_folders_keep_what_tells_them_apart() -> None:
    assert render._folder(["a/b/x.png", "a/c/y.png"]) == "a/"
    assert render._folder(["x.png", "a/y.png"]) == ""
    assert render._folder(["/d/x.png", "/d/y.png"]) == "/d/"
