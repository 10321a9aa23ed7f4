"""Hostile inputs and outputs: a gate must never pass what it did not read, nor destroy what it was given."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import crosses, disks, write_pngs
from vae_anomaly.cli import main


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


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


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_score_interrupted_exits_128_plus_the_signal_and_keeps_the_old_report(
    model_file: Path, tmp_path: Path, signum: int, code: int
) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):  # enough that scoring is still running when the signal comes
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    report = tmp_path / "r.json"
    report.write_text('{"previous": true}')
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vae_anomaly", "score", str(folder), "-m", str(model_file), "-o", str(report)]
    cmd += ["--no-cache", "--score", "iwae", "--samples", "2000", "--threshold", "0"]  # slow: minutes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(6.0)  # started, and most likely scoring: either way the signal must end it cleanly
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err and json.loads(report.read_text()) == {"previous": True}


# ------------------------------------------------------------- what the listing must not drop
def _score_json(*args: str | Path, timeout: float = 120) -> tuple[int, dict, str]:
    """The CLI in a fresh process with a time limit: a hang fails the test instead of stalling the suite."""
    cmd = [sys.executable, "-m", "vae_anomaly", "score", *map(str, args), "--format", "json", "--no-cache"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_a_record_not_a_hang(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_pngs(folder, disks(3, seed=54))
    os.mkfifo(folder / "x.png")
    code, doc, err = _score_json(folder, "-m", model_file)
    bad = [r for r in doc["records"] if r["error"] is not None]
    assert code == 3, err
    assert [Path(r["path"]).name for r in bad] == ["x.png"] and "named pipe (FIFO)" in bad[0]["error"]
    code, _, err = _score_json(folder / "x.png", "-m", model_file)
    assert code == 3 and "Traceback" not in err


@pytest.mark.slow
def test_fit_refuses_a_fifo_instead_of_hanging(tmp_path: Path) -> None:
    folder = tmp_path / "normal"
    write_pngs(folder, disks(30, seed=55))
    os.mkfifo(folder / "y.png")
    cmd = [sys.executable, "-m", "vae_anomaly", "fit", str(folder), "-o", str(tmp_path / "m.vae")]
    proc = subprocess.run(
        [*cmd, "--epochs", "1", "--folds", "1", "--no-cache", "-q"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "y.png: not a regular file but a named pipe (FIFO)" in proc.stderr


def test_linked_folders_are_followed_and_link_loops_walked_once(model_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    write_pngs(other, disks(2, seed=56))
    folder = tmp_path / "in"
    write_pngs(folder, disks(3, seed=57))
    (folder / "linked").symlink_to(other, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    code, out, _ = run("score", folder, "-m", model_file, "--format", "json")
    s = json.loads(out)["summary"]
    assert code == 0 and s["total"] == 5, "the 3 images, and the 2 behind the link"
    assert s["ignored"] == 1, "the loop back to the folder itself, walked once"


def test_an_unreadable_subfolder_is_an_unreadable_record(
    model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root every folder is readable, so the refusal is simulated where the walk and the reason look."""
    folder = tmp_path / "in"
    write_pngs(folder, disks(3, seed=58))
    locked = folder / "locked"
    write_pngs(locked, disks(2, seed=59))
    real_scandir, real_listdir = os.scandir, os.listdir

    def check(path: object) -> None:
        if os.fspath(path) == str(locked):  # type: ignore[call-overload]
            raise PermissionError(13, "Permission denied", str(locked))

    def scandir(path: str = ".") -> object:
        check(path)
        return real_scandir(path)

    def listdir(path: str = ".") -> list[str]:
        check(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    code, out, _ = run("score", folder, "-m", model_file, "--format", "json", "--workers", "0")
    bad = [r for r in json.loads(out)["records"] if r["error"] is not None]
    assert code == 3, "a folder the tool could not read must not pass"
    assert [r["path"] for r in bad] == [str(locked)]
    assert "a folder that cannot be read (Permission denied)" in bad[0]["error"]


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


@pytest.mark.parametrize("prep", [{"size": 20}, {"channels": 0}, {"size": 0}, {"resize": "crop"}])
def test_a_model_file_with_a_valid_checksum_but_impossible_settings_is_refused(
    fitted: object, data_dir: Path, tmp_path: Path, prep: dict
) -> None:
    from vae_anomaly import artifact

    path = tmp_path / "m.vae"
    fitted.save(path)  # type: ignore[attr-defined]
    mf = artifact.load(path)
    mf.metadata["preprocessing"].update(prep)
    artifact.save(path, mf.metadata, mf.state_dict, mf.calibration)  # a fresh, valid checksum
    code, _, err = run("score", data_dir / "incoming", "-m", path)
    assert code == 2 and f"{path}: the weights or settings inside do not fit together" in err, err


def test_a_name_that_is_not_utf8_with_html_gives_a_report(model_file: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_pngs(folder, disks(3, seed=60))
    Image.fromarray(crosses(1, seed=61)[0]).save(os.fsdecode(os.fsencode(str(folder)) + b"/\xff.png"))
    page = tmp_path / "r.html"
    code, _, err = run("score", folder, "-m", model_file, "--html", page, "--threshold", "-1e9")
    assert code == 0 and "Traceback" not in err and "\\xff.png" in page.read_text(encoding="utf-8")


@pytest.mark.slow
def test_ctrl_c_while_starting_up_exits_130_without_a_traceback(model_file: Path, data_dir: Path) -> None:
    cmd = [sys.executable, "-m", "vae_anomaly", "score", str(data_dir / "incoming"), "-m", str(model_file)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # importing torch takes longer than this
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


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
    t0 = time.perf_counter()
    code, _, err = run("fit", tmp_path / "normal", "-o", blocker / "m.vae", "--epochs", "50", "-q")
    assert code == 2 and f"cannot write the model file to {blocker / 'm.vae'}" in err and "choose another -o" in err
    assert "epoch" not in err and time.perf_counter() - t0 < 20, "refused before any training"


@pytest.mark.slow
def test_a_failed_model_write_keeps_the_training_for_resume_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vae_anomaly import artifact

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


# ------------------------------------------------------------- the decoded-pixel cache
def _scores(model: Path, folder: Path, *cache: str | Path) -> tuple[dict[str, float], str]:
    code, out, err = run("score", folder, "-m", model, "--format", "json", "--workers", "0", *cache)
    assert code == 0, err
    return {r["path"]: r["score"] for r in json.loads(out)["records"]}, err


@pytest.mark.slow
def test_a_damaged_or_stale_pixel_cache_never_changes_a_score(model_file: Path, tmp_path: Path) -> None:
    import sqlite3

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, im in enumerate(disks(30, seed=67)):
        Image.fromarray(im).save(a / f"{i:02d}.bmp")  # BMP: every file of these the same size
    write_pngs(b, crosses(30, seed=68))
    cache = ("--cache-dir", tmp_path / "cache")
    truth, _ = _scores(model_file, a, "--no-cache")
    assert _scores(model_file, a, *cache)[0] == truth  # cold: fills the cache
    (folder,) = (tmp_path / "cache").glob("pixels-v*")
    data, index = folder / "pixels.u8", folder / "index.sqlite"

    raw = bytearray(data.read_bytes())  # 1. flipped bytes
    raw[100:4000] = bytes(255 - v for v in raw[100:4000])
    data.write_bytes(bytes(raw))
    got, err = _scores(model_file, a, *cache)
    assert got == truth and "failed their check" in err

    with sqlite3.connect(index) as db:  # 2. index rows pointed at other files' pixels
        db.execute("UPDATE files SET row = (row + 1) % 30")
    got, err = _scores(model_file, a, *cache)
    assert got == truth and "failed their check" in err

    with open(data, "r+b") as fh:  # 3. truncated, then refilled with another folder's pixels
        fh.truncate(data.stat().st_size // 3)
    _scores(model_file, b, *cache)
    assert _scores(model_file, a, *cache)[0] == truth

    target = a / "05.bmp"  # 4. rewritten with the same size and modification time
    st = target.stat()
    Image.fromarray(crosses(1, seed=69)[0]).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    truth, _ = _scores(model_file, a, "--no-cache")
    assert _scores(model_file, a, *cache)[0] == truth, "the new pixels, not the cached ones"


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
    from vae_anomaly.documents import load_baseline
    from vae_anomaly.errors import DocumentError

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
    from vae_anomaly.merge import load_shard_report, merge_reports

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
