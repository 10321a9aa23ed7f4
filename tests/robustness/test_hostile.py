"""What a hostile or careless user did to outputs, options, settings and model files (issue 30): each a
test that failed before its fix. Edited shards and caches: test_shard.py, test_robustness.py."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import disks, write_pngs
from vae_anomaly.cli import main
from vae_anomaly.reports.outputs import write_file


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------- outputs
def test_an_output_onto_a_fifo_is_written_through_and_a_link_keeps_naming_its_target(tmp_path: Path) -> None:
    """Atomic replacement is for regular files: a FIFO (or /dev/stdout, a device) stays what it was."""
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_file(fifo, '{"a": 1}', "the report")
    reader.join(10)
    assert got == [b'{"a": 1}'] and stat.S_ISFIFO(os.stat(fifo).st_mode), "still a FIFO, the report went through it"
    target = tmp_path / "reports" / "today.json"
    target.parent.mkdir()
    target.write_text("yesterday")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    write_file(link, "today", "the report")
    assert link.is_symlink() and target.read_text() == "today", "the link followed, not replaced"


def test_fit_refuses_a_model_file_that_would_overwrite_a_training_image(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(30, seed=65))
    image = sorted((tmp_path / "normal").glob("*.png"))[0]
    before = image.read_bytes()
    code, _, err = run("fit", tmp_path / "normal", "-o", image, "--epochs", "1")
    assert code == 2 and "is an image file under the input folder" in err and "would destroy an input" in err
    assert image.read_bytes() == before
    code, _, err = run("fit", image, tmp_path / "normal", "-o", image, "--epochs", "1")
    assert code == 2 and f"-o {image} is the input {image}" in err


# ------------------------------------------------------------- settings files
def test_a_settings_value_of_the_wrong_kind_is_exit_2_naming_key_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for text, key in (
        ("fpr = [0.1]\n", "fpr"),
        ("[score]\nfpr = {a = 1}\n", "fpr"),
        ("fpr = 1979-05-27\n", "fpr"),
        ("no-cache = 3\n", "no-cache"),
        ("[score]\nmax-anomalies = 2.7\n", "max-anomalies"),
        ("workers = 1.9\n", "workers"),
    ):
        (tmp_path / "vae-anomaly.toml").write_text(text)
        code, _, err = run("score", tmp_path, "-m", tmp_path / "m.vae")
        flat = " ".join(err.split())
        assert code == 2 and f"{tmp_path / 'vae-anomaly.toml'}" in flat and f"{key} = " in flat, (text, err)
    (tmp_path / "vae-anomaly.toml").unlink()
    (tmp_path / "pyproject.toml").write_text("tool = 5\n")
    code, _, err = run("score", tmp_path, "-m", tmp_path / "m.vae")
    assert code == 2 and "pyproject.toml: `tool` must be a table" in " ".join(err.split())


# ------------------------------------------------------------- options and model files
def test_a_network_too_deep_for_the_working_size_is_refused_before_any_image_is_read(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(30, seed=65))
    code, _, err = run("fit", tmp_path / "normal", "-o", tmp_path / "m.vae", "--hidden-channels", "16," * 7 + "16")
    flat = " ".join(err.split())
    assert code == 2 and "8 stride-2 layers shrink the" in flat and "give fewer channel counts" in flat, err
    assert "Traceback" not in err and not (tmp_path / "m.vae").exists()


def test_a_pickled_file_is_refused_without_advice_to_load_it_anyway(tmp_path: Path) -> None:
    import pickle

    import torch

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("true",))

    saved, raw = tmp_path / "saved.vae", tmp_path / "raw.vae"
    with saved.open("wb") as fh:
        torch.save({"format": "vae-anomaly-model", "x": Exploit()}, fh, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    raw.write_bytes(pickle.dumps({"format": "vae-anomaly-model", "x": Exploit()}))
    for evil in (saved, raw):
        code, _, err = run("info", evil)
        flat = " ".join(err.split())
        assert code == 2 and "not loaded" in flat and "weights_only" not in flat, err


def test_the_github_summary_escapes_the_html_a_file_name_holds() -> None:
    from vae_anomaly.reports.ci import github_summary
    from vae_anomaly.reports.report import ImageRecord, Report, Summary

    name = 'in/<img src=x onerror="alert(1)">.png'
    summary = Summary(
        total=1,
        scored=0,
        unreadable=1,
        ignored=0,
        flagged=0,
        score="elbo",
        samples=1,
        threshold={},
        rule="auto",
        calibration_images=10,
        model_fingerprint=None,
        skip_unreadable=False,
    )
    text = github_summary(Report([ImageRecord(None, name, None, None, None, "cannot decode <b>")], summary))
    assert "<img" not in text and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in text and "<b>" not in text


# ------------------------------------------------------------- reports read back
def test_a_baseline_with_a_string_version_or_a_nan_score_is_refused_saying_why(tmp_path: Path) -> None:
    import json

    from vae_anomaly.errors import DocumentError
    from vae_anomaly.reports.documents import read_report

    doc = {"schema": "vae-anomaly/score", "schema_version": "1", "summary": {}, "warnings": [], "records": []}
    path = tmp_path / "base.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DocumentError, match=r"schema_version must be a whole number, got '1'"):
        read_report(path, "--baseline ")
    doc["schema_version"] = 1
    path.write_text(json.dumps(doc).replace('"records": []', '"records": [{"score": NaN}]'))
    with pytest.raises(DocumentError, match="NaN where JSON allows only numbers"):
        read_report(path, "--baseline ")


def test_an_absurd_shard_count_and_an_oversized_report_are_refused_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vae_anomaly.errors import DocumentError, MergeError
    from vae_anomaly.reports import documents

    code, _, err = run("score", tmp_path, "-m", tmp_path / "m.vae", "--shard", "1/99999999999999999999")
    assert code == 2 and "at most 10,000 shards" in " ".join(err.split())
    from vae_anomaly.reports.merge import ShardReport, _check_compatible

    forged = ShardReport.__new__(ShardReport)
    object.__setattr__(forged, "count", 10**20)
    object.__setattr__(forged, "path", "s1.json")
    with pytest.raises(MergeError, match="claims 100,000,000,000,000,000,000 shards"):
        _check_compatible([forged])
    big = tmp_path / "big.json"
    big.write_text("{}" + " " * 4096)
    monkeypatch.setattr(documents, "MAX_REPORT_BYTES", 1024)
    with pytest.raises(DocumentError, match="more than the 0 MiB a report is read up to; split the batch"):
        documents.read_report(big, "")


def test_the_pixel_limit_holds_for_cached_files_and_names_one_limit(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    args = ("score", data_dir / "incoming", "-m", cli_model, "--cache-dir", tmp_path / "cache", "--workers", "0")
    assert run(*args)[0] in (0, 1)  # fills the cache
    code, _, err = run(*args, "--max-image-pixels", "1")
    flat = " ".join(err.split())
    assert code == 3 and "scored 0 of" in flat, "every file refused, cached or not"
    assert "more than the limit of 1 (a decompression bomb?)" in flat and "limit of 2" not in flat


def test_model_files_follow_the_umask_and_a_killed_runs_temporary_files_are_cleared(tmp_path: Path) -> None:
    from vae_anomaly.model import artifact

    left = tmp_path / ".m.vae.ckpt.abc123.tmp"
    left.write_bytes(b"\0" * 1000)  # what kill -9 left mid-write
    old = os.umask(0o022)
    try:
        artifact._atomic_torch_save(tmp_path / "m.vae.ckpt", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m.vae.ckpt").st_mode) == 0o644, "as a report: readable by the CI job"
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.vae.ckpt"]


def test_a_format_1_model_file_is_refused_saying_re_fit_not_damaged(tmp_path: Path) -> None:
    import json

    import torch

    from vae_anomaly.model import artifact

    meta, state, cal = json.dumps({"models": 1}), {"w": torch.zeros(2)}, {"elbo": torch.zeros(3)}
    payload = {
        "format": artifact.FORMAT_NAME,
        "format_version": 1,
        "metadata": meta,
        "state_dict": state,
        "calibration": cal,
        "checksum": artifact._digest(meta, state, cal),
    }
    torch.save(payload, tmp_path / "old.vae")
    code, _, err = run("info", tmp_path / "old.vae")
    flat = " ".join(err.split())
    assert code == 2 and "model format 1" in flat and "is no longer read; re-fit it" in flat, err
    assert "damaged" not in flat and "edited" not in flat


def test_an_interrupted_score_says_which_outputs_are_new(
    cli_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted between the JSON report and the JUnit file: the message names the new report, and
    says the earlier run's JUnit file was left as it was."""
    from vae_anomaly.reports import ci

    out, junit = tmp_path / "out.json", tmp_path / "junit.xml"
    junit.write_text("<previous run/>")

    def interrupted(*args: object, **kwargs: object) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(ci, "to_junit", interrupted)
    code, _, err = run("score", data_dir / "incoming", "-m", cli_model, "-o", out, "--junit", junit)
    flat = " ".join(err.split())
    assert code == 130 and f"written before it, each whole: {out}" in flat and "was not written" in flat, err
    assert out.exists() and junit.read_text() == "<previous run/>"
