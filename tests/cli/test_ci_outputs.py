"""`score` in CI: --gate verdicts, --fdr, --baseline, JUnit XML, GitHub outputs, the JSON Schema."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from conftest import cli_run as run
from vae_anomaly.decision.thresholds import benjamini_hochberg
from vae_anomaly.reports.documents import schema


def _valid(out: str) -> dict:
    doc = json.loads(out)
    jsonschema.Draft202012Validator(schema()).validate(doc)
    return doc


@pytest.fixture
def odd_dir(data_dir: Path, tmp_path: Path) -> Path:
    """Five normal images, two crosses with awkward names, one unreadable file."""
    folder = tmp_path / "odd"
    folder.mkdir()
    normals = sorted((data_dir / "incoming").glob("disk_*.png"))[:5]
    crosses = sorted((data_dir / "incoming").glob("cross_*.png"))[:2]
    for p in normals:
        shutil.copy(p, folder / p.name)
    shutil.copy(crosses[0], folder / 'a&b<"c">.png')
    shutil.copy(crosses[1], folder / "x:1,y%2.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return folder


def test_gate_rules_each_reported_with_value_limit_and_verdict(cli_model: Path, data_dir: Path) -> None:
    args = ["score", data_dir / "incoming", "-m", cli_model, "--format", "json"]
    code, out, err = run(*args, "--gate", "max-rate=0.9,shift-p=0.001", "--gate", "binom-p=0.001")
    s = _valid(out)["summary"]
    checks = {c["name"]: c for c in s["gate"]}
    assert list(checks) == ["max-rate", "shift-p", "binom-p"]
    assert checks["max-rate"]["passed"] and checks["max-rate"]["value"] == s["flagged"] / 80
    assert checks["shift-p"]["value"] == s["tests"]["shift"]["p_value"] < 1e-6, "half the batch are crosses"
    assert checks["binom-p"]["value"] == s["tests"]["binomial"]["p_value"] < 1e-6
    assert not checks["shift-p"]["passed"] and checks["shift-p"]["fails_when"] == "p <= limit"
    assert code == 1 == s["exit_code"] and s["gate_passed"] is False and "Error" not in err
    assert s["guarantee"] == "Each normal image is flagged with probability at most 0.01 (exact, conformal)."
    assert s["smallest_p_value"] == pytest.approx(1 / 406) and s["models"] == 1


def test_normal_images_pass_the_gate_and_the_table_shows_the_verdict(cli_model: Path, data_dir: Path) -> None:
    disks = sorted((data_dir / "incoming").glob("disk_*.png"))
    code, out, err = run("score", *disks, "-m", cli_model, "--gate", "shift-p=0.001,binom-p=0.001,max-count=3")
    assert code == 0, out
    assert "gate shift-p: " in out and "> 0.001 pass" in out and "verdict: gate PASSED, exit code 0" in out
    assert "guarantee: Each normal image is flagged with probability at most 0.01" in out
    assert "scored 40 of 40" in err and "verdict" not in err


def test_bad_gate_rules_and_drift_without_baseline_exit_2(cli_model: Path, data_dir: Path) -> None:
    code, out, err = run("score", data_dir / "incoming", "-m", cli_model, "--gate", "max-ratio=0.1")
    assert code == 2 and out == "" and "unknown gate rule 'max-ratio=0.1'" in err and "--gate" in err
    code, out, err = run("score", data_dir / "incoming", "-m", cli_model, "--gate", "drift-p=0.01")
    assert code == 2 and out == "" and "pass --baseline previous.json" in err


def test_fdr_flags_by_benjamini_hochberg_and_says_what_it_guarantees(cli_model: Path, data_dir: Path) -> None:
    code, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--fdr", "0.05", "--format", "json")
    doc = _valid(out)
    s, recs = doc["summary"], doc["records"]
    p = np.array([r["p_value"] for r in recs])
    flags, cutoff = benjamini_hochberg(p, 0.05)
    assert [r["flagged"] for r in recs] == flags.tolist() and s["flagged"] == flags.sum() > 0
    assert s["threshold"]["rule"] == "fdr" and s["threshold"]["p_cutoff"] == cutoff
    floor = s["smallest_p_value"]
    kind = "(exact, conformal)." if cutoff >= floor else "(approximate: tail model, n = "
    assert "expected share of false alarms among flagged images is at most" in s["guarantee"]
    assert kind in s["guarantee"], "the crosses lie beyond every calibration image: their p-values are the tail's"
    assert s["rule"].startswith("fdr: Benjamini-Hochberg at q = 0.05") and code == 0


def test_baseline_adds_a_drift_test_from_the_same_model_only(
    cli_model: Path, data_dir: Path, tmp_path: Path, model_file: Path
) -> None:
    disks = sorted((data_dir / "incoming").glob("disk_*.png"))
    base = tmp_path / "previous.json"
    code, _, _ = run("score", *disks[:20], "-m", cli_model, "--output", base)
    assert code == 0
    code, out, _ = run(
        "score",
        data_dir / "incoming",
        "-m",
        cli_model,
        "--baseline",
        base,
        "--gate",
        "drift-p=0.001",
        "--format",
        "json",
    )
    s = _valid(out)["summary"]
    assert s["baseline"] == str(base) and s["tests"]["drift"]["p_value"] < 0.001 and code == 1
    code, out, _ = run("score", *disks[20:], "-m", cli_model, "--baseline", base, "--gate", "drift-p=0.001")
    assert code == 0 and "gate drift-p:" in out
    code, out, err = run("score", *disks, "-m", model_file, "--baseline", base)
    assert code == 2 and out == "" and "different models are not comparable" in err and "previous.json" in err
    base.write_text("{}")
    code, _, err = run("score", *disks, "-m", cli_model, "--baseline", base)
    assert code == 2 and "not a vae-anomaly score report" in err


def test_junit_has_one_case_per_image_with_failures_for_flagged_and_unreadable(
    cli_model: Path, odd_dir: Path, tmp_path: Path
) -> None:
    xml = tmp_path / "out" / "junit.xml"
    xml.parent.mkdir()
    code, out, err = run("score", odd_dir, "-m", cli_model, "--junit", xml, "--format", "json")
    doc = _valid(out)
    assert code == 3 and "JUnit" in err
    suite = ET.parse(xml).getroot().find("testsuite")
    cases = {Path(c.get("name")).name: c for c in suite.iter("testcase")}
    assert len(cases) == 8 == int(suite.get("tests"))
    failed = {name for name, c in cases.items() if c.find("failure") is not None}
    expected = {Path(r["path"]).name for r in doc["records"] if r["flagged"] or r["error"]}
    assert failed == expected and {'a&b<"c">.png', "x:1,y%2.png", "broken.png"} <= failed
    assert int(suite.get("failures")) == len(failed)
    assert cases["broken.png"].find("failure").get("type") == "unreadable"
    message = cases['a&b<"c">.png'].find("failure").get("message")
    reasons = next(r["reasons"] for r in doc["records"] if r["path"].endswith('a&b<"c">.png'))
    assert message.startswith(f"anomaly: {reasons[0]['text']}") and "score " in message, "why, then the figures"


def test_github_actions_get_a_step_summary_and_escaped_annotations(
    cli_model: Path, odd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    code, out, err = run("score", odd_dir, "-m", cli_model, "--max-anomalies", "0", "--skip-unreadable")
    assert code == 1
    md = summary.read_text()
    assert md.startswith("earlier step\n### vae-anomaly: ❌ gate failed (exit code 1)"), "appended, not overwritten"
    assert "| max-count | " in md and "**FAIL**" in md and "unreadable:" in md
    warnings = [line for line in err.splitlines() if line.startswith("::warning")]
    assert any(
        line.startswith("::warning file=") and "x%3A1%2Cy%252.png,title=anomalous image::" in line for line in warnings
    )
    assert any("broken.png,title=unreadable image::" in line for line in warnings)
    assert "::warning" not in out, "annotations go to stderr, results to stdout"
    monkeypatch.delenv("GITHUB_ACTIONS")
    code, _, err = run("score", odd_dir, "-m", cli_model, "--skip-unreadable")
    assert "::warning" not in err and summary.read_text() == md


def test_shipped_schema_is_valid_and_rejects_a_broken_report(cli_model: Path, odd_dir: Path) -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    _, out, _ = run("score", odd_dir, "-m", cli_model, "--format", "json")
    doc = _valid(out)
    doc["records"][0]["p_value"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema())
