"""The command line end to end: fit, score, info; outputs and exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from conftest import cli_run as run


def _json(out: str) -> dict:
    doc = json.loads(out)
    assert doc["schema"] == "vae-anomaly/score" and doc["schema_version"] == 1
    return doc


def test_fit_then_score_separates_shapes_with_high_roc_auc(cli_model: Path, data_dir: Path) -> None:
    code, out, _ = run("score", data_dir / "incoming", "--model", cli_model, "--format", "json", "--tail", "upper")
    records = [r for r in _json(out)["records"] if r["error"] is None]
    labels = [int(Path(r["path"]).name.startswith("cross")) for r in records]
    assert len(records) == 80
    assert roc_auc_score(labels, [r["score"] for r in records]) >= 0.95
    assert code == 0, "no gate was asked for, so flags alone do not fail the run"


def test_json_output_field_by_field(cli_model: Path, data_dir: Path, tmp_path: Path) -> None:
    code, out, err = run("score", data_dir / "incoming", "--model", cli_model, "--format", "json")
    doc = _json(out)
    s = doc["summary"]
    assert set(s) == {
        "total",
        "scored",
        "flagged",
        "unreadable",
        "ignored",
        "score",
        "samples",
        "threshold",
        "rule",
        "calibration_images",
        "model_fingerprint",
        "skip_unreadable",
        "gate",
        "gate_passed",
        "exit_code",
        "guarantee",
        "models",
        "smallest_p_value",
        "tests",
        "baseline",
        "effective_fpr",
        "duplicates",
        "leaks",
    }
    assert (s["total"], s["scored"], s["unreadable"], s["ignored"]) == (80, 80, 0, 0)
    assert s["score"] == "elbo-ic-nn" and s["samples"] == 1 and s["exit_code"] == code == 0
    assert s["threshold"]["rule"] == "auto" and s["threshold"]["tail"] == "two-sided"
    assert s["threshold"]["guard"] == "kl" and "one test of their combined evidence" in s["rule"]
    assert s["threshold"]["checks"] == 13 and "one of 13 image checks" in s["rule"], (
        "a grey model from files: 12 properties + local"
    )
    assert s["smallest_p_value"] == 1 / 406  # one test of score and guard, both sides, 405 calibration scores
    assert s["threshold"]["alpha"] == 0.01 and s["calibration_images"] == 405
    assert s["effective_fpr"] == 0.01 and s["threshold"]["requested"] is None, "405 scores reach 1%"
    assert s["rule"].startswith("auto: conformal two-sided p <= 0.01")
    assert len(s["model_fingerprint"]) == 16 and s["gate"] == [] and s["gate_passed"] is True
    recs = doc["records"]
    assert [r["rank"] for r in recs] == list(range(1, 81))
    fields = {"rank", "path", "score", "p_value", "flagged", "error", "reasons", "atypical"}
    assert all(set(r) == fields | {"duplicate_of", "duplicate_kind", "duplicate_in", "region", "tile"} for r in recs)
    assert all(1 <= len(r["atypical"]) <= 3 for r in recs), "every record, flagged or not, says what is odd about it"
    for r in recs:
        a = r["atypical"]
        assert [x["p_value"] for x in a] == sorted(x["p_value"] for x in a), "most atypical first"
        assert all(len(x["normal"]) == 2 and x["normal"][0] <= x["normal"][1] for x in a), "with the normal range"
    assert all(r["tile"] is None for r in recs), "16-px files are not tiled"
    boxes = [r["region"] for r in recs]
    assert all(0 <= x0 < x1 <= 16 and 0 <= y0 < y1 <= 16 for x0, y0, x1, y1 in boxes), "in the 16-px files' pixels"
    assert all(r["reasons"] for r in recs if r["flagged"]) and not any(r["reasons"] for r in recs if not r["flagged"])
    p = [r["p_value"] for r in recs]
    assert p == sorted(p), "ranked by the decision's own statistic"
    assert all(0 < v <= 1 for v in p) and all(isinstance(r["flagged"], bool) for r in recs)
    assert s["flagged"] == sum(r["flagged"] for r in recs)
    assert all((r["p_value"] <= 0.01) == r["flagged"] for r in recs)
    assert "scored 80 of 80" in err


def test_table_output_lists_most_anomalous_first_and_a_summary(cli_model: Path, data_dir: Path) -> None:
    code, out, _ = run("score", data_dir / "incoming", "--model", cli_model, "--top", "5")
    assert code == 0
    assert "most anomalous first" in out and "ANOMALY" in out
    assert "... 75 more" in out
    assert "of 80 scored images flagged" in out


def test_jsonl_and_csv_carry_the_same_records(cli_model: Path, data_dir: Path, tmp_path: Path) -> None:
    _, out_json, _ = run("score", data_dir / "incoming", "-m", cli_model, "--format", "json")
    _, out_jsonl, _ = run("score", data_dir / "incoming", "-m", cli_model, "--format", "jsonl")
    code, _, err = run("score", data_dir / "incoming", "-m", cli_model, "--output", tmp_path / "r.csv")
    recs = _json(out_json)["records"]
    lines = [json.loads(line) for line in out_jsonl.splitlines()]
    assert [ln["type"] for ln in lines] == ["image"] * 80 + ["summary"]
    assert [ln["path"] for ln in lines[:-1]] == [r["path"] for r in recs]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text())))
    assert code == 0 and "wrote" in err
    assert [r["path"] for r in rows] == [r["path"] for r in recs]
    assert [float(r["score"]) for r in rows] == [r["score"] for r in recs]


def test_exit_1_when_the_gate_fails_and_0_when_it_passes(cli_model: Path, data_dir: Path) -> None:
    code, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--max-anomalies", "0", "--format", "json")
    s = _json(out)["summary"]
    assert code == 1 and s["gate_passed"] is False and s["exit_code"] == 1
    assert s["gate"] == [
        {
            "name": "max-count",
            "limit": 0,
            "value": s["flagged"],
            "passed": False,
            "fails_when": "value > limit",
            "measures": "number of flagged images",
        }
    ]
    code, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--max-anomaly-rate", "0.9")
    assert code == 0 and "gate PASSED" in out
    code, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--max-anomaly-rate", "0.05")
    assert code == 1 and "gate FAILED" in out


@pytest.fixture
def broken_dir(data_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted((data_dir / "normal").glob("*.png"))[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_exit_3_lists_unreadable_inputs_unless_skipped(cli_model: Path, broken_dir: Path) -> None:
    code, out, err = run("score", broken_dir, "-m", cli_model, "--format", "json")
    doc = _json(out)
    assert code == 3 and doc["summary"]["unreadable"] == 2 and doc["summary"]["ignored"] == 1
    bad = {Path(r["path"]).name: r for r in doc["records"] if r["error"]}
    assert bad["empty.jpg"]["error"] == "empty file (0 bytes)" and bad["empty.jpg"]["score"] is None
    assert "broken.png" in bad and "unreadable:" in err and "broken.png" in err
    code, out, _ = run("score", broken_dir, "-m", cli_model, "--format", "json", "--skip-unreadable")
    assert code == 0 and _json(out)["summary"]["scored"] == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "MISSING"], "no such model file"),
        (["--threshold", "high"], "expected 'auto' or a number"),
        (["--fpr", "2"], "--fpr"),
        (["--score", "nope"], "--score"),
    ],
)
def test_exit_2_for_usage_errors(cli_model: Path, data_dir: Path, tmp_path: Path, args: list, message: str) -> None:
    args = [str(tmp_path / "missing.vae") if a == "MISSING" else a for a in args]
    if "--model" not in args:
        args = [*args, "--model", str(cli_model)]
    code, out, err = run("score", data_dir / "incoming", *args)
    assert code == 2 and out == "" and message in err


def test_exit_2_for_a_damaged_model_naming_the_file(cli_model: Path, data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "half.vae"
    bad.write_bytes(cli_model.read_bytes()[:2000])
    code, out, err = run("score", data_dir / "incoming", "--model", bad)
    assert code == 2 and out == "" and "half.vae" in err and "Error:" in err


def test_exit_2_for_a_missing_input_and_an_empty_folder(cli_model: Path, tmp_path: Path) -> None:
    code, _, err = run("score", tmp_path / "nowhere", "--model", cli_model)
    assert code == 2 and "no such file or folder" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run("score", tmp_path / "empty", "--model", cli_model)
    assert code == 2 and "no image files found" in err


def test_fit_errors_are_clear(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run("fit", tmp_path / "empty", "-o", tmp_path / "m.vae")
    assert code == 2 and "no image files found" in err
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one.png")
    code, _, err = run("fit", tmp_path / "one.png", "-o", tmp_path / "m.vae")
    assert code == 2 and "at least 10" in err
    code, _, err = run("fit", tmp_path / "nope", "-o", tmp_path / "m.vae")
    assert code == 2 and "no such file or folder" in err
    assert not (tmp_path / "m.vae").exists()


def test_numeric_threshold_flags_scores_at_or_above_it(cli_model: Path, data_dir: Path) -> None:
    """The threshold is one image's exact score (JSON floats round-trip): `>=` flags that image, `>` would not."""
    _, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--format", "json")
    scores = {r["path"]: r["score"] for r in _json(out)["records"] if r["error"] is None}
    ranked = sorted(scores, key=scores.get)
    at = ranked[len(ranked) // 2]  # the median image, whose score no other image shares
    threshold = scores[at]
    assert list(scores.values()).count(threshold) == 1
    code, out, _ = run(
        "score", data_dir / "incoming", "-m", cli_model, "--threshold", repr(threshold), "--format", "json"
    )
    doc = _json(out)
    assert doc["summary"]["threshold"]["rule"] == "score" and doc["summary"]["threshold"]["high"] == threshold
    records = {r["path"]: r for r in doc["records"]}
    assert {p: r["score"] for p, r in records.items()} == scores, "the same scores as the first run"
    assert records[at]["flagged"] is True, "an image whose score equals the threshold is flagged"
    flagged = {p for p, r in records.items() if r["flagged"]}
    assert flagged == {p for p, s in scores.items() if s >= threshold}
    assert doc["summary"]["flagged"] == len(ranked) - len(ranked) // 2 == 40
    assert code == 0, "no gate was asked for"


def test_info_shows_training_data_and_settings(cli_model: Path) -> None:
    code, out, _ = run("info", cli_model, "--format", "json")
    info = json.loads(out)
    assert code == 0 and info["training"]["images"] == 900 and info["preprocessing"]["size"] == 16
    code, out, _ = run("info", cli_model)
    assert code == 0 and "fingerprint" in out and "calibration elbo" in out
    flat = " ".join(out.replace("│", " ").split())  # the table wraps long values onto continuation rows
    assert "training files 16-16 px a side; the working size is their native size up to 48 px" in flat
    assert "time budget" in flat and "no limit; planned up to 100 epochs" in flat
    assert "local statistic largest distance of 4-px patches (stride 2, of the 16-px working size)" in flat
    assert "checks 13 calibrated on the same images" in flat and "fingerprints of 900 training images" in flat
    assert "property:" not in flat and "None sample(s)" not in flat


def test_hidden_channels_are_given_as_a_list_and_checked(tmp_path: Path) -> None:
    code, _, err = run("fit", tmp_path, "--hidden-channels", "16,x")
    assert code == 2 and "a comma-separated list of whole numbers" in err
    code, _, err = run("fit", tmp_path, "--hidden-channels", "16,0")
    assert code == 2 and "hidden_channels must be a whole number from 1 to 4096, got 0" in err


@pytest.mark.slow
def test_python_m_entry_point_runs() -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "vae_anomaly", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "vae-anomaly" in r.stdout


def test_table_shows_tail_model_p_values_below_the_floor_instead_of_zeros(cli_model: Path, data_dir: Path) -> None:
    """405 calibration scores: exact p-values stop at 1/406; crosses far beyond get the tail model's
    (with every check: a discrete one, whose quartile is its median, is scaled by its outer percentile,
    so it puts no point mass of huge deviations in the tail)."""
    code, out, _ = run("score", data_dir / "incoming", "--model", cli_model, "--format", "json")
    smallest = min(r["p_value"] for r in _json(out)["records"] if r["p_value"] is not None)
    assert code == 0 and smallest < 1 / 406 / 10
    code, out, _ = run("score", data_dir / "incoming", "--model", cli_model, "--top", "1")
    assert code == 0
    row = next(line for line in out.splitlines() if "ANOMALY" in line)
    assert f"{smallest:.1e}" in row and "0.0000" not in out
