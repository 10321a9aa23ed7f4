"""Crafted options and documents: NaN options, edited baselines and shard reports, forged p-values and
calibrations, fuzzed reports: used honestly or refused with the file named, never a crash nor a forged pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_run as run


# ------------------------------------------------------------- crafted options and documents
@pytest.mark.parametrize(
    "options",
    [("--fpr", "nan"), ("--fdr", "nan"), ("--threshold", "nan"), ("--threshold", "inf"), ("--fpr", "inf")],
)
def test_nan_and_infinite_options_are_usage_errors(model_file: Path, data_dir: Path, options: tuple[str, str]) -> None:
    code, _, err = run("score", data_dir / "incoming", "-m", model_file, *options)
    assert code == 2 and "Error:" in err and "Traceback" not in err


def test_a_nan_time_budget_is_refused_before_training(data_dir: Path, tmp_path: Path) -> None:
    code, _, err = run("fit", data_dir / "normal", "-o", tmp_path / "m.vae", "--time-budget", "nan")
    assert code == 2 and "time_budget" in err and "nan" in err
    for option in ("--checkpoint-every", "--learning-rate", "--calibration-fraction", "--max-unreadable-fraction"):
        code, _, err = run("fit", data_dir / "normal", "-o", tmp_path / "m.vae", option, "nan")
        assert code == 2 and "got nan" in err, (option, err)


def _report(cli_model: Path, data_dir: Path, tmp_path: Path) -> dict:
    path = tmp_path / "base.json"
    assert run("score", data_dir / "incoming", "-m", cli_model, "-o", path)[0] == 0
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(records=3),
        lambda d: d.update(summary=[1, 2]),
        lambda d: d["records"][0].update(score="high"),
        lambda d: d["summary"].update(model_fingerprint=7),
    ],
)
def test_crafted_baselines_are_refused_with_the_file_named(
    cli_model: Path, data_dir: Path, tmp_path: Path, edit: object
) -> None:
    doc = _report(cli_model, data_dir, tmp_path)
    edit(doc)  # type: ignore[operator]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    code, _, err = run("score", data_dir / "incoming", "-m", cli_model, "--baseline", bad)
    assert code == 2 and f"--baseline {bad}: not a valid score report" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["summary"].update(models="abc"),
        lambda d: d["shard"].update(calibration=[]),
        lambda d: d["shard"]["options"].update(fpr=float("nan")),
        lambda d: d["shard"].update(index=0),
    ],
)
def test_crafted_shards_are_refused_with_the_file_named(
    cli_model: Path, data_dir: Path, tmp_path: Path, edit: object
) -> None:
    shards = [tmp_path / f"s{i}.json" for i in (1, 2)]
    for i, path in enumerate(shards, 1):
        assert run("score", data_dir / "incoming", "-m", cli_model, "--shard", f"{i}/2", "-o", path)[0] == 0
    doc = json.loads(shards[1].read_text())
    edit(doc)  # type: ignore[operator]
    shards[1].write_text(json.dumps(doc).replace("NaN", '"NaN"'))
    code, _, err = run("merge", *shards)
    assert code == 2 and str(shards[1]) in err and "Traceback" not in err


# ------------------------------------------------------------- forged shards
def _shards(cli_model: Path, folder: Path, tmp_path: Path) -> list[Path]:
    shards = [tmp_path / f"s{i}.json" for i in (1, 2)]
    for i, path in enumerate(shards, 1):
        assert run("score", folder, "-m", cli_model, "--shard", f"{i}/2", "-o", path)[0] == 0
    return shards


def test_merge_recomputes_p_values_so_forged_ones_fail_instead_of_passing_the_gate(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    shards = _shards(cli_model, data_dir / "incoming", tmp_path)
    code, out, _ = run("merge", *shards, "--format", "json", "--max-anomalies", "0")
    honest = json.loads(out)["summary"]
    assert code == 1 and honest["flagged"] > 0, "the crosses fail the gate"
    for path in shards:
        doc = json.loads(path.read_text())
        for r in doc["records"]:
            if r["error"] is None:
                r["p_value"], r["flagged"] = 1.0, False
        path.write_text(json.dumps(doc))
    code, _, err = run("merge", *shards, "--max-anomalies", "0")
    assert code == 2, "forged p-values must never pass the gate"
    assert f"{shards[0]}: " in err and "has p-value 1.0, but its score gives" in err and "edited" in err


def test_merge_with_the_model_refuses_a_calibration_forged_in_every_shard(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    shards = _shards(cli_model, data_dir / "incoming", tmp_path)
    for path in shards:
        doc = json.loads(path.read_text())
        doc["shard"]["calibration"] = [c + 1000.0 for c in doc["shard"]["calibration"]]
        path.write_text(json.dumps(doc))
    code, _, err = run("merge", *shards, "--model", cli_model)
    assert code == 2 and "calibration scores are not those of the --model file" in err


# ------------------------------------------------------------- fuzzed documents
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _places(doc: dict) -> list[tuple[str, ...]]:
    """Every key path of a report one level into summary, shard, shard.options and the first two records."""
    places: list[tuple[str, ...]] = [(k,) for k in doc]
    for part in ("summary", "shard"):
        places += [(part, k) for k in doc.get(part, {})]
    places += [("shard", "options", k) for k in doc.get("shard", {}).get("options", {})]
    places += [("records", str(i), k) for i in range(2) for k in doc["records"][i]]
    return places


def _mutated(doc: dict, place: tuple[str, ...], value: object) -> dict:
    out = json.loads(json.dumps(doc))
    node = out
    for key in place[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[place[-1]] = value
    return out


@pytest.fixture(scope="module")
def documents(cli_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("docs")
    run("score", data_dir / "incoming", "-m", cli_model, "-o", folder / "base.json")
    for i in (1, 2):
        run("score", data_dir / "incoming", "-m", cli_model, "--shard", f"{i}/2", "-o", folder / f"s{i}.json")
    return {"folder": folder, **{n: json.loads((folder / f"{n}.json").read_text()) for n in ("base", "s1", "s2")}}


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=JSON)
def test_any_edit_of_a_baseline_is_used_or_refused_never_a_crash(
    documents: dict, data: st.DataObject, value: object
) -> None:
    from vae_anomaly.errors import DocumentError
    from vae_anomaly.reports.documents import load_baseline

    doc = documents["base"]
    place = data.draw(st.sampled_from(_places(doc)))  # type: ignore[arg-type]
    path = documents["folder"] / "fuzzed.json"  # type: ignore[operator]
    path.write_text(json.dumps(_mutated(doc, place, value)))  # type: ignore[arg-type]
    try:
        scores = load_baseline(path, doc["summary"]["model_fingerprint"], doc["summary"]["score"])  # type: ignore[index]
    except DocumentError:
        return
    assert scores.dtype == np.float64 and len(scores) > 0


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=JSON)
def test_any_edit_of_a_shard_is_merged_honestly_or_refused_never_a_crash(
    documents: dict, data: st.DataObject, value: object
) -> None:
    from vae_anomaly.errors import DocumentError
    from vae_anomaly.reports.merge import load_shard_report, merge_reports

    doc = documents["s2"]
    place = data.draw(st.sampled_from(_places(doc)))  # type: ignore[arg-type]
    path = documents["folder"] / "fuzzed-shard.json"  # type: ignore[operator]
    path.write_text(json.dumps(_mutated(doc, place, value)))  # type: ignore[arg-type]
    try:
        report = merge_reports([load_shard_report(documents["folder"] / "s1.json"), load_shard_report(path)], gate=[])  # type: ignore[operator]
    except DocumentError:
        return
    honest = merge_reports([load_shard_report(documents["folder"] / f"s{i}.json") for i in (1, 2)], gate=[])  # type: ignore[operator]
    assert [r.p_value for r in report.records] == [r.p_value for r in honest.records] or place[-1] in (
        "path",
        "error",
        "rank",
        "flagged",
        "warnings",
        "decision_warnings",
        "unlike",
    ), f"an edit of {place} that merge accepted changed the p-values"
