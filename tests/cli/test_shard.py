"""`score --shard I/N` and `merge`: N shards merged give exactly the report of one unsharded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import cli_run as run
from conftest import disks, write_pngs
from vae_anomaly import Detector
from vae_anomaly.decision.thresholds import benjamini_hochberg
from vae_anomaly.reports.documents import schema
from vae_anomaly.reports.shard import parse_shard, shard_positions

# Every run below scores one image at a time. Scores do not depend on the batch an image sits in,
# but only up to float rounding (tests/test_scores.py); scored alone, an image's score is the same
# bits in a shard as in the whole run, so the merged report can be compared with `==`.
ONE = ("--batch-size", "1")


def _valid(text: str) -> dict:
    doc = json.loads(text)
    jsonschema.Draft202012Validator(schema()).validate(doc)
    return doc


@pytest.fixture(scope="module")
def batch(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A batch as CI sees it: subfolders of disks and crosses, an unreadable file, a non-image file
    (ignored), two colour images and an oversized one (both kinds are warned about)."""
    root = tmp_path_factory.mktemp("batch")
    incoming = data_dir / "incoming"
    disks_, crosses_ = sorted(incoming.glob("disk_*.png")), sorted(incoming.glob("cross_*.png"))
    for day, files in (
        ("day0", disks_[16:18]),
        ("day1", disks_[:8] + crosses_[:4]),
        ("day2", disks_[8:16] + crosses_[4:8]),
    ):
        (root / day).mkdir()
        for p in files:
            shutil.copy(p, root / day / p.name)
    # Listing positions (30 files): day0 0-1, day1/colour_a.png 2 (shard 3 of 3), day2/big.png 15 (shard 1),
    # day2/colour_b.png 16 (shard 2), day2/truncated.png 29. One run warns about colour images first, with
    # colour_a as the example, and counts two: merge must add up counts, pick the first example in the
    # whole listing and order the kinds by it, whatever order the shards come in.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "day1" / "colour_a.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "day2" / "colour_b.png")
    Image.fromarray(np.kron(disks(1, seed=5)[0], np.ones((5, 5), np.uint8))).save(root / "day2" / "big.png")
    (root / "day2" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "notes.txt").write_text("not an image")
    return root


def _shards(model: Path, folder: Path, out: Path, n: int, *score_args: str) -> list[Path]:
    """Score `folder` in n shards, as n CI runners would; unreadable files are the merge's business."""
    paths = []
    for i in range(1, n + 1):
        paths.append(out / f"shard-{i}.json")
        code, stdout, err = run(
            "score", folder, "-m", model, "--shard", f"{i}/{n}", "--skip-unreadable", "-o", paths[-1], *ONE, *score_args
        )
        assert code == 0 and stdout == "", err
        assert f"(shard {i}/{n} of a listing of" in err and "::warning" not in err
    return paths


def _same_as_one_run(
    model: Path, folder: Path, out: Path, score_args: tuple[str, ...], gate_args: tuple[str, ...], n: int = 3
) -> tuple[int, dict]:
    """Score once over the whole folder and in n shards, merge, and check the two reports are identical."""
    code, stdout, _ = run("score", folder, "-m", model, "--format", "json", *ONE, *score_args, *gate_args)
    whole = _valid(stdout)
    shards = _shards(model, folder, out, n, *score_args)
    for p in shards:
        assert "shard" in _valid(p.read_text())
    merged_code, stdout, err = run("merge", *shards, "--format", "json", *score_args, *gate_args)
    merged = _valid(stdout)
    assert "shard" not in merged and all("index" not in r for r in merged["records"])
    assert merged == whole, "records (and their order), summary, gate, warnings: all the same"
    assert merged_code == code == whole["summary"]["exit_code"]
    assert f"merged {n} shard reports: {whole['summary']['scored']} of {whole['summary']['total']}" in err
    return code, whole


@pytest.mark.parametrize(
    ("score_args", "gate_args", "expected_code"),
    [
        # The default decision; shift-p fails, since a third of the batch are crosses.
        ((), ("--gate", "max-rate=0.5,shift-p=0.001,binom-p=0.001"), 1),
        # Benjamini-Hochberg over the union's p-values; the gate passes, the unreadable file exits 3.
        # (These three run in the full suite; the `not slow` subset keeps the default decision's case.)
        pytest.param(("--fdr", "0.1"), ("--gate", "max-count=100"), 3, marks=pytest.mark.slow),
        # BH with score bounds (one test, one model) read off the calibration scores; a failing count.
        pytest.param(
            ("--fdr", "0.2", "--guard", "none", "--tail", "upper"),
            ("--max-anomalies", "0", "--skip-unreadable"),
            1,
            marks=pytest.mark.slow,
        ),
        # A raw score threshold ranks by score; no gate, unreadable files skipped.
        pytest.param(("--threshold", "-1e9", "--score", "elbo"), ("--skip-unreadable",), 0, marks=pytest.mark.slow),
    ],
)
def test_three_shards_merged_equal_one_unsharded_run(
    cli_model: Path,
    batch: Path,
    tmp_path: Path,
    score_args: tuple[str, ...],
    gate_args: tuple[str, ...],
    expected_code: int,
) -> None:
    code, whole = _same_as_one_run(cli_model, batch, tmp_path, score_args, gate_args)
    s = whole["summary"]
    assert code == expected_code
    assert (s["total"], s["unreadable"], s["ignored"]) == (30, 1, 1) and s["flagged"] > 0
    assert [w.split(" (e.g. ")[0] for w in whole["warnings"][:2]] == [
        "2 colour images converted to grey",
        "1 images far from the size of the training images (with sides 16 to 16 px), resized",
    ]
    assert f"(e.g. {batch / 'day1' / 'colour_a.png'})" in whole["warnings"][0]


def test_merge_decides_from_p_values_never_from_shard_verdicts(cli_model: Path, batch: Path, tmp_path: Path) -> None:
    """Each shard's flags, ranks, BH cut-off, tests and gate are about its part alone: merge ignores them."""
    gate = ("--gate", "max-count=3,shift-p=0.001,binom-p=0.001")
    _, whole = _same_as_one_run(cli_model, batch, tmp_path, ("--fdr", "0.1"), gate)
    for i in (1, 2, 3):
        path = tmp_path / f"shard-{i}.json"
        doc = json.loads(path.read_text())
        for r in doc["records"]:
            r.update(flagged=None if r["error"] else not r["flagged"], rank=None if r["error"] else 1)
        doc["records"].reverse()
        doc["summary"].update(flagged=0, tests={}, gate_passed=True, exit_code=0)
        doc["summary"]["threshold"].update(p_cutoff=0.5, low=None, high=None)
        path.write_text(json.dumps(doc))
    shards = [tmp_path / f"shard-{i}.json" for i in (1, 2, 3)]
    code, out, _ = run("merge", *shards, "--format", "json", "--fdr", "0.1", *gate)
    assert json.loads(out) == whole and code == whole["summary"]["exit_code"] == 1
    p = np.array([r["p_value"] for r in whole["records"] if r["error"] is None])
    assert whole["summary"]["flagged"] == benjamini_hochberg(p, 0.1)[0].sum() > 0


def test_table_junit_and_github_outputs_match_the_unsharded_run(
    cli_model: Path, batch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "shards.md"))
    shards = _shards(cli_model, batch, tmp_path, 3)
    assert not (tmp_path / "shards.md").exists(), "a shard's verdict is partial: merge writes the job summary"
    gate = ("--gate", "max-rate=0.5,binom-p=0.001")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "one.md"))
    code, table, err = run("score", batch, "-m", cli_model, *ONE, *gate, "--junit", tmp_path / "one.xml", "--top", "0")
    notes = [line for line in err.splitlines() if line.startswith("::warning")]
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "merged.md"))
    merged_code, merged_table, err = run("merge", *shards, *gate, "--junit", tmp_path / "merged.xml", "--top", "0")
    assert merged_code == code == 1 and merged_table == table and "verdict: gate FAILED, exit code 1" in table
    assert [line for line in err.splitlines() if line.startswith("::warning")] == notes and notes
    assert (tmp_path / "merged.xml").read_text() == (tmp_path / "one.xml").read_text()
    assert (tmp_path / "merged.md").read_text() == (tmp_path / "one.md").read_text()


@pytest.mark.slow
def test_cross_fitted_shards_keep_each_models_score_for_the_shift_test(
    crossfit: Detector, batch: Path, tmp_path: Path
) -> None:
    model = tmp_path / "cf.vae"
    crossfit.save(model)
    gate = ("--gate", "shift-p=0.001,binom-p=0.001")
    _, whole = _same_as_one_run(model, batch, tmp_path, ("--fpr", "0.2"), gate)
    assert whole["summary"]["models"] == 5 and whole["summary"]["gate_passed"] is False
    shard = json.loads((tmp_path / "shard-2.json").read_text())
    scored = [r for r in shard["records"] if r["error"] is None]
    assert all(len(r["model_scores"]) == 5 and r["score"] == pytest.approx(np.mean(r["model_scores"])) for r in scored)


def test_more_shards_than_files_leaves_empty_shards_that_still_merge(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for p in sorted((data_dir / "incoming").glob("disk_*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    code, whole = _same_as_one_run(cli_model, folder, tmp_path, (), ("--gate", "shift-p=0.001"), n=4)
    assert code == 0 and whole["summary"]["scored"] == 2
    empty = json.loads((tmp_path / "shard-4.json").read_text())
    assert empty["records"] == [] and empty["summary"]["total"] == 0 and empty["shard"]["listing"] == 2


def test_copies_in_different_shards_and_leaks_are_found_as_one_run_finds_them(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "copies"
    folder.mkdir()
    disks_ = sorted((data_dir / "incoming").glob("disk_*.png"))[:6]
    for p in disks_:
        shutil.copy(p, folder / p.name)
    shutil.copy(disks_[0], folder / "z_copy_of_first.png")  # listed last: another shard than its original
    shutil.copy(sorted((data_dir / "normal").glob("*.png"))[3], folder / "leak.png")
    code, whole = _same_as_one_run(cli_model, folder, tmp_path, (), ("--gate", "max-duplicates=0"), n=3)
    by_name = {Path(r["path"]).name: r for r in whole["records"]}
    copy, leak = by_name["z_copy_of_first.png"], by_name["leak.png"]
    assert copy["duplicate_of"].endswith(disks_[0].name) and copy["duplicate_in"] == "batch"
    assert leak["duplicate_in"] == "training" and leak["duplicate_kind"] == "exact"
    assert code == 1 and whole["summary"]["duplicates"] == 1 and whole["summary"]["leaks"] == 1


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 300), count=st.integers(1, 12))
def test_round_robin_puts_every_file_in_exactly_one_shard(total: int, count: int) -> None:
    parts = [list(shard_positions(total, i, count)) for i in range(1, count + 1)]
    assert sorted(p for part in parts for p in part) == list(range(total))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1, "balanced: sizes differ by at most one"


def test_shard_option_is_checked_before_anything_runs(cli_model: Path, batch: Path) -> None:
    assert parse_shard("2/3") == (2, 3) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad, why in [
        ("2", "expected I/N, e.g. 2/3"),
        ("a/b", "expected I/N"),
        ("-1/3", "expected I/N"),
        ("0/3", "I must be between 1 and N = 3"),
        ("4/3", "I must be between 1 and N = 3"),
        ("1/0", "N, the number of shards, must be at least 1"),
    ]:
        code, out, err = run("score", batch, "-m", cli_model, "--format", "json", "--shard", bad)
        assert code == 2 and out == "" and "Invalid value for '--shard'" in err and why in err, (bad, err)
    code, out, err = run("score", batch, "-m", cli_model, "--format", "json", "--shard", "1/2", "--gate", "max-count=1")
    assert code == 2 and out == "" and "pass them to `vae-anomaly merge shard-*.json --gate ...`" in err
    code, out, err = run("score", batch, "-m", cli_model, "--shard", "2/2")
    assert code == 2 and out == "" and "add --format json and --output shard-2.json" in err


@pytest.fixture
def three(cli_model: Path, batch: Path, tmp_path: Path) -> list[Path]:
    return _shards(cli_model, batch, tmp_path, 3)


def _refused(*args: str | Path) -> str:
    code, out, err = run("merge", *args)
    assert code == 2 and out == "", (code, err)
    return " ".join(err.split())  # rich wraps long lines


def test_merge_refuses_missing_and_duplicated_shards(three: list[Path], tmp_path: Path) -> None:
    err = _refused(three[0], three[2])
    assert "shard 2/3 missing (got 1 (" in err and "pass all 3 reports" in err
    copy = tmp_path / "copy-of-1.json"
    shutil.copy(three[0], copy)
    err = _refused(*three, copy)
    assert f"shard 1/3 given twice: {three[0]} and {copy}" in err


def test_merge_refuses_shards_of_another_model_options_split_or_listing(
    three: list[Path], cli_model: Path, model_file: Path, batch: Path, tmp_path: Path
) -> None:
    def shard(name: str, *args: str | Path) -> Path:
        path = tmp_path / name
        code, _, err = run("score", batch, "-m", cli_model, "-o", path, "--skip-unreadable", *ONE, *args)
        assert code == 0, err
        return path

    other_model = shard("other-model.json", "--shard", "3/3", "-m", model_file)  # the last -m wins
    err = _refused(*three[:2], other_model)
    assert f"{other_model} was scored by model" in err and "scores of different models cannot be merged" in err
    halves = shard("halves.json", "--shard", "2/2")
    assert f"{halves} is shard 2/2, but {three[0]} is shard 1/3" in _refused(three[0], halves, three[2])
    fdr = shard("fdr.json", "--shard", "2/3", "--fdr", "0.1")
    err = _refused(three[0], fdr, three[2])
    assert f"{fdr} was scored with --fdr 0.1, but {three[0]} with --fdr not given" in err
    more = tmp_path / "more"
    shutil.copytree(batch, more)
    write_pngs(more / "day3", disks(1, seed=4))
    more_3 = tmp_path / "more-3.json"
    run("score", more, "-m", cli_model, "--shard", "3/3", "-o", more_3, "--skip-unreadable", *ONE)
    err = _refused(*three[:2], more_3)
    assert f"{more_3} listed 31 image files (1 ignored), but {three[0]} 30 (1 ignored)" in err
    assert "the runners saw different inputs" in err
    err = _refused(*three, "--model", model_file)
    assert "the shard reports were scored by model" in err and "but --model is" in err


def test_merge_applies_its_own_rule_never_one_a_shard_brings(three: list[Path]) -> None:
    """The same option edited in every shard (a rule under which nothing is flagged) is refused, naming it;
    merge given the options the shards were scored with decides as before."""
    code, _, _ = run("merge", *three, "--max-anomalies", "0")
    assert code == 1, "the crosses fail the gate"
    for path in three:
        doc = json.loads(path.read_text())
        doc["shard"]["options"]["fpr"] = 1e-300
        path.write_text(json.dumps(doc))
    err = _refused(*three, "--max-anomalies", "0")
    assert f"{three[0]} was scored with --fpr 1e-300, but merge applies --fpr 0.01" in err
    code, _, err = run("merge", *three, "--max-anomalies", "0", "--fpr", "1e-300")
    assert code == 1 and "no image can be flagged at 1e-298%" in err, "asked knowingly: flagged at the floor"


def test_merge_refuses_a_score_that_is_not_the_mean_of_its_models_scores(
    data_dir: Path, batch: Path, tmp_path: Path
) -> None:
    """Cross-fitted shards carry each model's score: a `score` edited alone (the drift test reads it) is an edit."""
    model = tmp_path / "cf.vae"
    write_pngs(tmp_path / "normal", disks(30, seed=26))
    assert run("fit", tmp_path / "normal", "-o", model, "--epochs", "1", "--device", "cpu")[0] == 0
    shards = _shards(model, data_dir / "incoming", tmp_path, 2)
    for path in shards:
        doc = json.loads(path.read_text())
        for r in doc["records"]:
            r["score"] = -1000.0
        path.write_text(json.dumps(doc))
    err = _refused(*shards, "--model", model)
    assert "its score -1000.0 is not the mean of its models' scores" in err and "edited" in err


def test_merge_refuses_files_that_are_not_shard_reports(
    three: list[Path], cli_model: Path, batch: Path, tmp_path: Path
) -> None:
    whole = tmp_path / "whole.json"
    run("score", batch, "-m", cli_model, "-o", whole)
    err = _refused(*three, whole)
    assert f"{whole}: the report of a whole run, not of one shard" in err
    (tmp_path / "text.json").write_text("hello")
    assert f"{tmp_path / 'text.json'}: not a JSON file" in _refused(*three, tmp_path / "text.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert "other.json: not a vae-anomaly score report" in _refused(*three, tmp_path / "other.json")
    assert "nowhere.json: no such file" in _refused(*three, tmp_path / "nowhere.json")
    cut = json.loads(three[1].read_text())
    cut["records"].pop()
    three[1].write_text(json.dumps(cut))
    err = _refused(*three)
    assert f"{three[1]}: its {len(cut['records'])} records are not those of shard 2/3 of a listing of 30 files" in err
    del cut["shard"]["calibration"]
    three[1].write_text(json.dumps(cut))
    err = _refused(*three)
    assert f"{three[1]}: not a valid score report at shard: 'calibration' is a required property" in err


def test_drift_against_a_baseline_is_tested_over_the_union(
    cli_model: Path, model_file: Path, data_dir: Path, batch: Path, tmp_path: Path
) -> None:
    base = tmp_path / "previous.json"
    code, _, _ = run("score", *sorted((data_dir / "incoming").glob("disk_*.png"))[20:], "-m", cli_model, "-o", base)
    assert code == 0
    gate = ("--baseline", str(base), "--gate", "drift-p=0.001", "--skip-unreadable")
    code, whole = _same_as_one_run(cli_model, batch, tmp_path, (), gate)
    assert whole["summary"]["baseline"] == str(base) and "drift" in whole["summary"]["tests"]
    shards = [tmp_path / f"shard-{i}.json" for i in (1, 2, 3)]
    assert "pass --baseline previous.json" in _refused(*shards, "--gate", "drift-p=0.01")
    run("score", *sorted((data_dir / "incoming").glob("disk_*.png"))[20:], "-m", model_file, "-o", base)
    assert "different models are not comparable" in _refused(*shards, "--baseline", base)
