"""Hostile file names and outputs: a gate must never pass what it did not read, nor destroy what it was
given (issue 16): escaped names in every report, no output over an input or the model, whole files on a full disk."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_run as run
from conftest import crosses, disks, write_pngs


@pytest.fixture
def evil_dir(tmp_path: Path) -> Path:
    """Normal images, two crosses, and file names a spreadsheet or an XML parser would choke on."""
    folder = tmp_path / "evil"
    write_pngs(folder, disks(6, seed=50))
    for name, image in (("=HYPERLINK(x)\x01.png", crosses(1, seed=51)[0]), ("-2+3\x1f.png", crosses(1, seed=52)[0])):
        Image.fromarray(image).save(folder / name)
    (folder / "@broken\x0b.png").write_bytes(b"not a png")
    return folder


def test_junit_is_well_formed_whatever_the_file_names(model_file: Path, evil_dir: Path, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    code, _, _ = run("score", evil_dir, "-m", model_file, "--junit", junit, "--threshold", "-1e9")
    root = ET.parse(junit).getroot()  # raises on a character XML 1.0 cannot hold
    names = [case.get("name") for case in root.iter("testcase")]
    assert code == 3 and len(names) == 9
    assert str(evil_dir / "=HYPERLINK(x)\\x01.png") in names, "control characters shown as visible escapes"
    assert any("\\x0b" in (n or "") for n in names)


def test_csv_text_cells_never_start_a_formula(
    model_file: Path, evil_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(evil_dir)  # relative paths, so that a name's first character starts the cell
    names = sorted(os.listdir("."))
    code, out, _ = run("score", "-m", model_file, "--format", "csv", "--threshold", "-1e9", "--", *names)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 3 and len(rows) == 9
    for r in rows:
        for cell in (r["path"], r["error"]):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    paths = {r["path"] for r in rows}
    assert {"'=HYPERLINK(x)\x01.png", "'-2+3\x1f.png", "'@broken\x0b.png"} <= paths, "quoted, otherwise kept"
    assert "img_0000.png" in paths, "other names are left alone"
    assert all(float(r["score"]) == float(r["score"]) for r in rows if r["score"]), "scores stay plain numbers"


@pytest.mark.parametrize("option", ["--output", "--junit", "--html"])
def test_no_output_may_overwrite_the_model(model_file: Path, data_dir: Path, tmp_path: Path, option: str) -> None:
    model = tmp_path / "m.vae"
    shutil.copy(model_file, model)
    before = model.read_bytes()
    fmt = ("--format", "json") if option == "--output" else ()
    code, _, err = run("score", data_dir / "incoming", "-m", model, option, model, *fmt)
    assert code == 2 and "is the model file" in err
    assert model.read_bytes() == before


def test_no_output_may_overwrite_an_input_image_or_another_output(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    write_pngs(folder, disks(4, seed=53))
    image = sorted(folder.iterdir())[0]
    before = image.read_bytes()
    code, _, err = run("score", image, "-m", model_file, "--output", image, "--format", "json")
    assert code == 2 and f"is the input {image}" in err and image.read_bytes() == before
    code, _, err = run("score", folder, "-m", model_file, "--output", folder / "x.png", "--format", "csv")
    assert code == 2 and "is an image file under the input folder" in err
    report = tmp_path / "r.json"
    code, _, err = run("score", folder, "-m", model_file, "-o", report, "--junit", report)
    assert code == 2 and "also the --output file" in err
    code, _, err = run("score", folder, "-m", model_file, "--heatmaps", folder / "maps")
    assert code == 2 and "inside the input folder" in err


def test_a_failed_report_write_leaves_the_previous_report_whole(
    model_file: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "r.json"
    assert run("score", data_dir / "incoming", "-m", model_file, "-o", report)[0] == 0
    before = report.read_bytes()
    real_replace = os.replace

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    code, _, err = run("score", data_dir / "incoming", "-m", model_file, "-o", report, "--threshold", "-1e9")
    monkeypatch.setattr(os, "replace", real_replace)
    assert code == 2 and "No space left on device" in err
    assert report.read_bytes() == before, "the old report is whole"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.json")] == [], "no temporary file is left"
    assert oct(report.stat().st_mode & 0o777) != oct(0o600), "reports keep the usual permissions"


def test_a_name_that_is_not_utf8_with_html_gives_a_report(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_pngs(folder, disks(3, seed=60))
    Image.fromarray(crosses(1, seed=61)[0]).save(os.fsdecode(os.fsencode(str(folder)) + b"/\xff.png"))
    page = tmp_path / "r.html"
    code, _, err = run("score", folder, "-m", model_file, "--html", page, "--threshold", "-1e9")
    assert code == 0 and "Traceback" not in err and "\\xff.png" in page.read_text(encoding="utf-8")


def test_a_raw_byte_and_its_escape_are_two_names_in_every_report(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_pngs(folder, disks(2, seed=62))
    raw = os.fsdecode(os.fsencode(str(folder)) + b"/\xff.png")
    Image.fromarray(disks(1, seed=63)[0]).save(raw)
    Image.fromarray(disks(1, seed=64)[0]).save(folder / "\\xff.png")  # the four characters \ x f f
    code, out, _ = run("score", folder, "-m", model_file, "--format", "json")
    paths = sorted(r["path"] for r in json.loads(out)["records"])
    assert code == 0 and len(set(paths)) == 4
    assert str(folder / "\\xff.png") in paths and str(folder / "\\\\xff.png") in paths
    shards = [tmp_path / f"s{i}.json" for i in (1, 2)]
    for i, path in enumerate(shards, 1):
        assert run("score", folder, "-m", model_file, "--shard", f"{i}/2", "-o", path)[0] == 0
    code, out, err = run("merge", *shards, "--format", "json")
    assert code == 0, err
    assert sorted(r["path"] for r in json.loads(out)["records"]) == paths


# ------------------------------------------------------------- fit's model file
def test_fit_into_a_folder_that_cannot_be_written_fails_before_training(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(30, seed=65))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run("fit", tmp_path / "normal", "-o", blocker / "m.vae", "--epochs", "50")
    assert code == 2 and f"cannot write the model file to {blocker / 'm.vae'}" in err and "choose another -o" in err
    assert "epoch" not in err and "training" not in err, "refused before any training (no progress line)"


@pytest.mark.slow
def test_a_failed_model_write_keeps_the_training_for_resume_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vae_anomaly.model import artifact

    write_pngs(tmp_path / "normal", disks(40, seed=66))
    model = tmp_path / "m.vae"
    args = ("--epochs", "2", "--folds", "2", "--seed", "3", "-q", "--no-cache")
    real = artifact._atomic_torch_save

    def disk_full_for_models(path: Path, payload: dict) -> None:
        if path.suffix == ".vae":
            raise OSError(28, "No space left on device")
        real(path, payload)

    monkeypatch.setattr(artifact, "_atomic_torch_save", disk_full_for_models)
    code, _, err = run("fit", tmp_path / "normal", "-o", model, *args)
    assert code == 2 and "No space left on device" in err and "--resume -o OTHER.vae" in err, err
    assert not model.exists() and (tmp_path / "m.vae.ckpt").exists()
    monkeypatch.setattr(artifact, "_atomic_torch_save", real)
    (tmp_path / "m.vae.ckpt").rename(tmp_path / "other.vae.ckpt")
    from vae_anomaly import crossfit

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("trained again")

    with monkeypatch.context() as patch:
        patch.setattr(crossfit, "train", no_training)
        code, _, err = run("fit", tmp_path / "normal", "-o", tmp_path / "other.vae", "--resume", *args)
    assert code == 0, err
    code, _, err = run("fit", tmp_path / "normal", "-o", tmp_path / "fresh.vae", *args)
    again = artifact.load(tmp_path / "other.vae").state_dict
    fresh = artifact.load(tmp_path / "fresh.vae").state_dict
    assert all(bool((again[k] == fresh[k]).all()) for k in fresh), "the same models as an uninterrupted fit"
