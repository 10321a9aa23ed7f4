"""Calibrated checks and their reasons, duplicates and leaks end to end: what a data team reads."""

from __future__ import annotations

import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import cli_run as run
from conftest import photo
from vae_anomaly import Detector
from vae_anomaly.decision.checks import Reason, kept, statistic_p_values
from vae_anomaly.decision.gate import evaluate_gate, parse_gate
from vae_anomaly.images.properties import BY_NAME
from vae_anomaly.model import artifact


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    (root / "normal").mkdir()
    (root / "in").mkdir()
    for i in range(300):
        Image.fromarray(photo(rng)).save(root / "normal" / f"n{i:03d}.png")
    for i in range(12):
        Image.fromarray(photo(rng)).save(root / "in" / f"ok{i:02d}.png")
    dark = (photo(rng).astype(np.float64) * 0.15).round().astype(np.uint8)
    Image.fromarray(dark).save(root / "in" / "dark.png")
    Image.fromarray(photo(rng)).filter(ImageFilter.GaussianBlur(2.5)).save(root / "in" / "blurred.png")
    Image.fromarray(photo(rng)).resize((8, 8), Image.Resampling.BILINEAR).save(root / "in" / "tiny.png")
    shutil.copyfile(root / "normal" / "n005.png", root / "in" / "leak_exact.png")
    Image.open(root / "normal" / "n006.png").save(root / "in" / "leak_near.jpg", quality=90)
    shutil.copyfile(root / "in" / "ok03.png", root / "in" / "zz_copy.png")
    return root


@pytest.fixture(scope="module")
def photos_model(photos_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("pm") / "m.vae"
    args = ["--epochs", "30", "--folds", "1", "--calibration-fraction", "0.5", "--seed", "0", "--device", "cpu"]
    code, _, err = run("fit", photos_dir / "normal", "-o", model, *args)
    assert code == 0, err
    return model


@pytest.fixture(scope="module")
def scored(photos_dir: Path, photos_model: Path) -> dict[str, dict]:
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, "--format", "json", "--no-cache")
    assert code == 0, err
    return {Path(r["path"]).name: r for r in json.loads(out)["records"]}


def test_one_sided_checks_see_only_their_side() -> None:
    cal = np.arange(100.0)
    dark_side = BY_NAME["highlights"].tail
    assert statistic_p_values(cal, np.array([-5.0]), dark_side)[0] < 1 / 101, "beyond every normal value"
    assert statistic_p_values(cal, np.array([500.0]), dark_side)[0] == 1.0, "bright highlights are not dark"
    assert statistic_p_values(cal, np.array([500.0]), BY_NAME["shadows"].tail)[0] < 1e-4, "far beyond"
    both = statistic_p_values(cal, np.array([500.0, -1.0, -30.0, 10.0]), "two-sided")
    assert both[0] < both[2] < both[1] < 2 / 101, "either side; further out, smaller"
    assert both[3] == pytest.approx(2 * 12 / 101), "two-sided: twice (the 11 normal values <= 10, and itself)"


def test_a_flagged_image_always_keeps_one_reason() -> None:
    found = [Reason("model", 1.0, 0.2, "a"), Reason("contrast", 3.0, 0.4, "b")]
    assert kept(found, 0.01) == found[:1], "none below the cut-off: the most atypical one"
    assert kept(found, 0.3) == found[:1] and kept(found, 0.5) == found
    assert kept(found, None) == found[:1], "a raw score threshold has no cut-off: the most atypical finding"


# ------------------------------------------------------------------ gate


def test_gate_counts_duplicates_and_leaks() -> None:
    rules = parse_gate(["max-duplicates=1,max-leaks=0"])
    checks = evaluate_gate(rules, 0, 10, counts={"duplicates": 1, "leaks": 1})
    assert [(c.name, c.value, c.passed) for c in checks] == [("max-duplicates", 1, True), ("max-leaks", 1, False)]
    with pytest.raises(Exception, match="whole number"):
        parse_gate(["max-leaks=0.5"])


# ------------------------------------------------------------------ end to end


def test_reasons_say_dark_blurred_and_tiny_in_words(scored: dict[str, dict]) -> None:
    def texts(name: str) -> str:
        r = scored[name]
        assert r["flagged"], (name, r)
        return " | ".join(reason["text"] for reason in r["reasons"])

    assert "darker" in texts("dark.png") and "% of normal images" in texts("dark.png")
    assert "blurrier than" in texts("blurred.png") and "sharpness" in texts("blurred.png")
    tiny = texts("tiny.png")
    assert "narrower than" in tiny and "width 8 px against 32 px-32 px" in tiny


def test_copies_of_training_and_of_batch_images_are_named(scored: dict[str, dict]) -> None:
    exact, near, copy = scored["leak_exact.png"], scored["leak_near.jpg"], scored["zz_copy.png"]
    assert exact["duplicate_of"].endswith("normal/n005.png")
    assert (exact["duplicate_kind"], exact["duplicate_in"]) == ("exact", "training")
    assert near["duplicate_of"].endswith("normal/n006.png") and near["duplicate_kind"] == "near"
    assert copy["duplicate_of"].endswith("in/ok03.png") and copy["duplicate_in"] == "batch"
    assert copy["duplicate_kind"] == "exact"
    assert scored["ok03.png"]["duplicate_of"] is None, "the first of two copies is the original"
    others = [r for n, r in scored.items() if n.startswith("ok") or n in ("dark.png", "blurred.png", "tiny.png")]
    assert all(r["duplicate_of"] is None for r in others)


def test_every_flagged_record_has_a_reason_in_every_output(
    photos_dir: Path, photos_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    junit, page = tmp_path / "j.xml", tmp_path / "r.html"
    args = ("--format", "csv", "--junit", junit, "--html", page)
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, *args)
    rows = list(csv.DictReader(io.StringIO(out)))
    flagged = [r for r in rows if r["flagged"] == "true"]
    assert code == 0 and len(flagged) >= 3
    assert all(r["reasons"] for r in flagged) and not any(r["reasons"] for r in rows if r["flagged"] == "false")
    assert next(r for r in rows if r["path"].endswith("leak_exact.png"))["duplicate_in"] == "training"
    cases = {Path(c.get("name")).name: c for c in ET.parse(junit).getroot().iter("testcase")}
    for r in flagged:
        message = cases[Path(r["path"]).name].find("failure").get("message")
        assert message.startswith("anomaly: " + r["reasons"].split("; ")[0]), message
    annotations = [line for line in err.splitlines() if line.startswith("::warning")]
    assert any("darker" in line and "dark.png" in line for line in annotations)
    assert any("training image in the batch" in line for line in annotations)
    text = summary.read_text()
    assert "darker" in text and "copy of a training image" in text
    html = page.read_text(encoding="utf-8")
    assert '<ul class="why"><li>' in html and "darker" in html and "exact copy of a training image" in html


def test_the_leak_gate_fails_the_batch(photos_dir: Path, photos_model: Path) -> None:
    code, out, err = run("score", photos_dir / "in", "-m", photos_model, "--gate", "max-leaks=0")
    assert code == 1 and "gate max-leaks: 2 <= 0 FAIL" in out, out
    code, _, err = run("score", photos_dir / "in", "-m", photos_model, "--gate", "max-leaks=2,max-duplicates=1")
    assert code == 0, err


def test_no_checks_decides_on_the_model_alone(photos_dir: Path, photos_model: Path) -> None:
    _, out, _ = run("score", photos_dir / "in", "-m", photos_model, "--format", "json", "--no-checks")
    doc = json.loads(out)
    assert doc["summary"]["threshold"]["checks"] == 0 and "image checks" not in doc["summary"]["rule"]
    _, out, _ = run("score", photos_dir / "in", "-m", photos_model, "--format", "json")
    assert json.loads(out)["summary"]["threshold"]["checks"] == 15, (
        "a colour model from files: all fourteen properties and the local statistic"
    )


def test_the_python_api_explains_and_finds_copies(fitted: Detector) -> None:
    """Arrays: pixel checks only (no file header), copies of training images and within the batch."""
    from conftest import disks

    training = disks(1000, seed=10)  # the `fitted` detector's own training array
    dark = (disks(1, seed=70).astype(np.float64) * 0.1).astype(np.uint8)
    x = np.concatenate([disks(3, seed=71), training[5:6], dark, disks(3, seed=71)[:1]])
    result = fitted.score(x)
    decision = fitted.decide(result)
    assert "property:width" not in fitted.calibration_, "an array has no file to check"
    assert decision.flags[4], "the dark frame"
    why = fitted.explain(result, decision, [4])[0]
    assert any(r.check in ("brightness", "highlights") and "darker" in r.text for r in why)
    dups = fitted.duplicates(result)
    assert dups[3] is not None and dups[3].training and dups[3].of == "[5]" and dups[3].kind == "exact"
    assert dups[5] is not None and not dups[5].training and (dups[5].of, dups[5].kind) == ("[0]", "exact")


def test_a_model_file_from_before_the_checks_scores_as_it_did(
    photos_dir: Path, photos_model: Path, tmp_path: Path
) -> None:
    mf = artifact.load(photos_model)
    cal = {k: v for k, v in mf.calibration.items() if not k.startswith(("property:", "train:"))}
    old = tmp_path / "old.vae"
    artifact.save(old, {k: v for k, v in mf.metadata.items() if k != "checks"}, mf.state_dict, cal)
    code, out, err = run("score", photos_dir / "in", "-m", old, "--format", "json")
    doc = json.loads(out)
    assert code == 0, err
    assert doc["summary"]["threshold"]["checks"] == 0 and doc["summary"]["leaks"] == 0, "no checks, no leaks"
    assert doc["summary"]["duplicates"] == 1, "copies within the batch need only the batch"
    flagged = [r for r in doc["records"] if r["flagged"]]
    assert flagged and all([reason["check"] for reason in r["reasons"]] == ["model"] for r in flagged)


def test_training_fingerprints_that_do_not_fit_their_names_are_refused(photos_model: Path, tmp_path: Path) -> None:
    mf = artifact.load(photos_model)
    mf.metadata["checks"]["training_files"] = mf.metadata["checks"]["training_files"][:-1]
    bad = tmp_path / "bad.vae"
    artifact.save(bad, mf.metadata, mf.state_dict, mf.calibration)  # a valid checksum over edited contents
    code, _, err = run("info", bad)
    assert code == 2 and "do not fit together" in err and "training file names" in err
