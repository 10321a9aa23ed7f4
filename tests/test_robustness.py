"""Never crash, never lose work: bad images, interrupted training, untrusted model files."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import crosses, disks, write_pngs
from vae_anomaly import Detector, FitConfig
from vae_anomaly.cli import main
from vae_anomaly.errors import ImageReadError, ModelFileError
from vae_anomaly.images.batching import iter_batches
from vae_anomaly.images.decoding import Preprocessing, decode_image
from vae_anomaly.images.listing import find_images
from vae_anomaly.process import Terminated, signals_held

GREY16 = Preprocessing(1, 16)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in its header but holds almost no data: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of messy input a real folder holds, next to good files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8))
    png, jpg = _encoded(grey, "PNG"), _encoded(grey, "JPEG")
    files: dict[str, bytes] = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "random.png": rng.bytes(500),
        "random.webp": rng.bytes(64),
        "text.jpg": b"this is a text file, not a JPEG\n",
        "bomb.png": _png_header_only(60_000, 60_000),
        "good one with spaces.png": png,
        "<img src=x onerror=alert(1)>.png": png,
        "one-by-one.png": _encoded(Image.new("L", (1, 1), 128), "PNG"),
        "large.jpg": _encoded(Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)), "JPEG"),
        "sixteen.png": _encoded(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"),
        "cmyk.jpg": _encoded(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG"),
        "palette.png": _encoded(grey.convert("P"), "PNG"),
        "alpha.png": _encoded(Image.new("RGBA", (20, 20), (10, 200, 30, 100)), "PNG"),
        "image.tiff": _encoded(grey, "TIFF"),
        "image.webp": _encoded(grey, "WEBP"),
        ".hidden.png": png,
        "notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    frames = [Image.new("L", (20, 20), v) for v in (10, 200)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "folder.png").mkdir()  # a folder with an image name is walked, not read
    os.symlink(root / "does-not-exist.png", root / "dangling.png")
    os.symlink(root / "loop-b.png", root / "loop-a.png")
    os.symlink(root / "loop-a.png", root / "loop-b.png")
    fd = os.open(os.fsencode(root) + b"/not-utf8-\xff\xfe.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, png)
    os.close(fd)
    return root


GOOD = {
    "good one with spaces.png",
    "<img src=x onerror=alert(1)>.png",
    "one-by-one.png",
    "large.jpg",
    "sixteen.png",
    "cmyk.jpg",
    "palette.png",
    "alpha.png",
    "image.tiff",
    "image.webp",
    "animated.gif",
    "not-utf8-\\xff\\xfe.png",
}
BAD = {
    "empty.png": "empty file",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "random.png": "not a readable image",
    "random.webp": "not a readable image",
    "text.jpg": "not a readable image",
    "bomb.png": "refused",
    "dangling.png": "not found",
    "loop-a.png": "symbolic links",
    "loop-b.png": "symbolic links",
}


def test_every_bad_input_becomes_a_record_and_every_good_one_is_read(bad_corpus: Path) -> None:
    listing = find_images([bad_corpus])
    assert listing.ignored == 2  # .hidden.png and notes.txt
    batches = list(iter_batches(listing.files, GREY16, batch_size=7))
    read = {Path(p).name for b in batches for p in b.paths}
    errors = {Path(e.path).name: e.reason for b in batches for e in b.errors}
    assert read == GOOD
    assert set(errors) == set(BAD)
    for name, words in BAD.items():
        assert words in errors[name], (name, errors[name])
    assert "89,478,485" in errors["bomb.png"] and "--max-image-pixels" in errors["bomb.png"]
    assert all(b.pixels.shape[1:] == (1, 16, 16) for b in batches)


def test_animated_gif_gives_its_first_frame(bad_corpus: Path) -> None:
    assert decode_image(bad_corpus / "animated.gif", GREY16).max() == 10


def test_bomb_limit_can_be_raised(bad_corpus: Path) -> None:
    from vae_anomaly.images.decoding import set_max_image_pixels

    set_max_image_pixels(10)
    try:
        with pytest.raises(ImageReadError, match="refused"):
            decode_image(bad_corpus / "palette.png", GREY16)  # 400 pixels > 10
    finally:
        set_max_image_pixels(None)
    decode_image(bad_corpus / "palette.png", GREY16)


def test_permission_denied_is_a_record_even_where_root_could_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI runs as root, who reads any file: the reader's handling is checked by making open() refuse."""
    import vae_anomaly.images.decoding as images_mod

    p = tmp_path / "locked.png"
    Image.new("L", (4, 4)).save(p)

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_mod.Image, "open", refuse)
    batch = next(iter_batches([p], GREY16))
    assert batch.errors[0].reason == "permission denied: make the file readable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions_are_a_record(tmp_path: Path) -> None:
    p = tmp_path / "locked.png"
    Image.new("L", (4, 4)).save(p)
    p.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        decode_image(p, GREY16)


def test_score_cli_lists_every_bad_file_and_exits_3(bad_corpus: Path, model_file: Path) -> None:
    r = CliRunner().invoke(main, ["score", str(bad_corpus), "-m", str(model_file), "--format", "json"])
    assert r.exit_code == 3, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"]["unreadable"] == len(BAD) and doc["summary"]["scored"] == len(GOOD)
    assert doc["summary"]["ignored"] == 2
    assert "colour images converted to grey" in r.stderr and "far from the size of the training images" in r.stderr
    args = ["score", str(bad_corpus), "-m", str(model_file), "--skip-unreadable", "--format", "csv"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0
    names = {Path(row["path"]).name for row in csv.DictReader(io.StringIO(r.stdout))}
    assert names == GOOD | set(BAD)


def test_fit_skips_unreadable_training_images_with_a_warning(bad_corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    write_pngs(folder, disks(40, seed=3))
    (folder / "broken.png").write_bytes(b"junk")
    args = ["fit", str(folder), "-o", str(tmp_path / "m.vae"), "--epochs", "1", "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable training image" in r.stderr and "broken.png" in r.stderr
    r = CliRunner().invoke(main, [*args, "--max-unreadable-fraction", "0.01"])
    assert r.exit_code == 2 and "--max-unreadable-fraction" in r.stderr
    r = CliRunner().invoke(
        main, ["fit", str(bad_corpus / "empty.png"), str(bad_corpus / "text.jpg"), "-o", str(tmp_path / "x.vae")]
    )
    assert r.exit_code == 2 and "none of the 2 training image files could be read" in r.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_crash_the_reader(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "fuzz.png"
    p.write_bytes(data)
    try:
        arr = decode_image(p, GREY16)
    except ImageReadError as exc:
        assert str(exc)
    else:
        assert arr.shape == (1, 16, 16) and arr.dtype == np.uint8


_SEEDS = {
    fmt: _encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12), dtype=np.uint8)), fmt)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(_SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_real_images_never_crash_the_reader(
    tmp_path: Path, fmt: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_SEEDS[fmt])
    for pos, val in edits:
        data[pos % len(data)] = val
    p = tmp_path / f"fuzz.{fmt.lower()}"
    p.write_bytes(bytes(data[: max(1, cut % (len(data) + 1))]))
    try:
        decode_image(p, GREY16)
    except ImageReadError as exc:
        assert str(exc)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10**7),
)
def test_mutated_model_files_load_or_fail_cleanly(model_file: Path, tmp_path: Path, edits: list, cut: int) -> None:
    data = bytearray(model_file.read_bytes())
    for pos, val in edits:
        data[pos % len(data)] = val
    p = tmp_path / "fuzz.vae"
    p.write_bytes(bytes(data[: len(data) if cut % 3 else cut % len(data)]))
    try:
        Detector.load(p, device="cpu")
    except ModelFileError as exc:
        assert "fuzz.vae" in str(exc)


# ------------------------------------------------------ training that survives
SMALL = dict(latent_dim=4, seed=3, device="cpu", patience=100, batch_size=64, folds=1)


def _weights(det: Detector) -> bytes:
    return b"".join(t.numpy().tobytes() for t in det.model_.state_dict().values())


def test_same_seed_gives_byte_identical_weights_and_scores() -> None:
    x = disks(200, seed=5)
    a = Detector(FitConfig(epochs=3, **SMALL)).fit(x)
    b = Detector(FitConfig(epochs=3, **SMALL)).fit(x)
    assert _weights(a) == _weights(b)
    np.testing.assert_array_equal(a.score(x).scores, b.score(x).scores)
    np.testing.assert_array_equal(a.calibration_["iwae"], b.calibration_["iwae"])


def test_resume_reaches_the_same_model_as_an_uninterrupted_run(tmp_path: Path) -> None:
    x = disks(200, seed=5)
    whole = Detector(FitConfig(epochs=6, **SMALL)).fit(x)
    steps = iter(range(10_000))
    ckpt = tmp_path / "m.ckpt"
    cut = Detector(FitConfig(epochs=6, **SMALL)).fit(
        x,
        checkpoint=ckpt,
        checkpoint_every=0,
        should_stop=lambda: next(steps) == 9,  # mid epoch 4
    )
    assert cut.metadata_["training"]["stopped"] == "interrupted" and ckpt.exists()
    resumed = Detector(FitConfig(epochs=6, **SMALL)).fit(x, checkpoint=ckpt, resume=True, checkpoint_every=0)
    assert resumed.metadata_["training"]["epochs_run"] == 6
    assert _weights(resumed) == _weights(whole)
    np.testing.assert_array_equal(resumed.score(x).scores, whole.score(x).scores)


def test_cross_fit_interrupted_then_resumed_matches_an_uninterrupted_cross_fit(tmp_path: Path) -> None:
    from vae_anomaly.errors import FitInterrupted

    x = disks(120, seed=6)
    cfg = {**SMALL, "folds": 2}
    whole = Detector(FitConfig(epochs=3, **cfg)).fit(x)
    steps = iter(range(10_000))
    ckpt = tmp_path / "m.ckpt"
    with pytest.raises(FitInterrupted, match="model 2 of 2"):
        Detector(FitConfig(epochs=3, **cfg)).fit(
            x,
            checkpoint=ckpt,
            checkpoint_every=0,
            should_stop=lambda: next(steps) == 4,  # model 2, epoch 2
        )
    resumed = Detector(FitConfig(epochs=3, **cfg)).fit(x, checkpoint=ckpt, resume=True, checkpoint_every=0)
    for a, b in zip(whole.models_, resumed.models_, strict=True):
        assert all(torch.equal(t, u) for t, u in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    np.testing.assert_array_equal(whole.calibration_["elbo"], resumed.calibration_["elbo"])


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path: Path) -> None:
    ckpt = tmp_path / "m.ckpt"
    Detector(FitConfig(epochs=1, **SMALL)).fit(disks(100, seed=1), checkpoint=ckpt, checkpoint_every=0)
    with pytest.raises(ModelFileError, match="other images or other fit options"):
        Detector(FitConfig(epochs=1, **SMALL)).fit(disks(100, seed=2), checkpoint=ckpt, resume=True)


def test_nan_loss_stops_with_the_step_and_what_to_try(monkeypatch: pytest.MonkeyPatch) -> None:
    from vae_anomaly.errors import TrainingError
    from vae_anomaly.model import train as train_mod

    monkeypatch.setattr(
        train_mod, "elbo_loss", lambda model, x, eps=None: (torch.tensor(float("nan")), torch.tensor(0.0))
    )
    with pytest.raises(TrainingError, match=r"epoch 1, step 1.*--learning-rate"):
        Detector(FitConfig(epochs=1, **SMALL)).fit(disks(50, seed=1))


def _start_fit(folder: Path, model: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "vae_anomaly",
        "fit",
        str(folder),
        "-o",
        str(model),
        "--epochs",
        "100000",
        "--patience",
        "100000",
        "--device",
        "cpu",
        "--latent-dim",
        "4",
        "--folds",
        "1",
        *extra,
    ]
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _wait_for_line(proc: subprocess.Popen[str], starts: str, contains: str = "") -> list[str]:
    """Read the fit's stderr up to a line that starts with `starts` and holds `contains`."""
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if line.startswith(starts) and contains in line:
            return lines
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"fit printed no line {starts!r}...{contains!r}: {''.join(lines)}")


def _wait_for_epochs(proc: subprocess.Popen[str], n: int) -> list[str]:
    return _wait_for_line(proc, f"epoch {n}/")


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sig") / "normal"
    write_pngs(folder, disks(200, seed=8))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_fit_writes_the_best_model_so_far(train_folder: Path, tmp_path: Path, sig: int) -> None:
    model = tmp_path / "m.vae"
    proc = _start_fit(train_folder, model)
    _wait_for_epochs(proc, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "stopping after this step" in err and "interrupted" in err and "--resume" in err
    det = Detector.load(model, device="cpu")
    assert det.metadata_["training"]["stopped"] == "interrupted"
    assert (tmp_path / "m.vae.ckpt").exists()


@pytest.mark.slow
def test_second_ctrl_c_aborts_without_a_model_file(train_folder: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.vae"
    proc = _start_fit(train_folder, model)
    _wait_for_epochs(proc, 2)
    proc.send_signal(signal.SIGINT)
    # Two signals sent at once can merge into one; the second is sent once the first was handled,
    # while the fit still finishes its step, calibrates and writes (a second or so on these images).
    _wait_for_line(proc, "", "stopping after this step")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "aborted" in err and "no model file written" in err and "wrote the best model" not in err, err
    assert not model.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_kill_9_leaves_the_old_model_or_the_new_one(train_folder: Path, tmp_path: Path, model_file: Path) -> None:
    """SIGKILL (no handler runs) during training, and late: after training, while the fit calibrates
    and writes the model file, at a moment taken from a first run that is not killed."""
    model = tmp_path / "m.vae"
    old = model_file.read_bytes()
    assert Detector.load(model_file, device="cpu").metadata_["training"]["images"] != 200, "tell old from new"

    def outcome(when: str) -> str:
        for leftover in tmp_path.glob(".m.vae.*.tmp"):  # a temporary file a kill may leave is no model
            leftover.unlink()
        assert model.exists(), f"{when}: the old model file is gone"
        if model.read_bytes() == old:
            return "old"
        try:
            det = Detector.load(model, device="cpu")
        except ModelFileError as exc:
            pytest.fail(f"{when}: neither the old model nor a complete new one: {exc}")
        training = det.metadata_["training"]
        assert (training["images"], training["epochs_run"]) == (200, 2), f"{when}: {training}"
        return "new"

    def start(*extra: str) -> subprocess.Popen[str]:
        model.write_bytes(old)
        return _start_fit(train_folder, model, "--checkpoint-every", "0", *extra)

    proc = start("--epochs", "2")
    _wait_for_epochs(proc, 2)
    trained = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    tail = time.perf_counter() - trained  # calibrating and writing the model file
    assert proc.returncode == 0, err
    assert outcome("not killed") == "new", "a fit that is not killed replaces the old model"
    proc = start()  # 100,000 epochs: still training when killed
    _wait_for_epochs(proc, 2)
    proc.kill()
    proc.communicate(timeout=60)
    assert outcome("killed while training") == "old", "a kill while training leaves the old model as it was"

    proc = start("--epochs", "2")
    _wait_for_epochs(proc, 2)
    time.sleep(0.8 * tail)
    proc.kill()
    proc.communicate(timeout=60)
    outcome(f"killed {0.8 * tail:.2f} s after training (of {tail:.2f} s to calibrate and write)")


# ============================================================= hostile inputs and outputs
# A gate must never pass what it did not read, nor destroy what it was given (issue 16).
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "vae_anomaly", "score", str(folder), "-m", str(model_file), "-o", str(report)]
    cmd += ["--no-cache", "--score", "iwae", "--samples", "2000", "--threshold", "0"]  # slow: minutes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(6.0)  # started, and most likely scoring: either way the signal must end it cleanly
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a hang: SIGABRT makes faulthandler print every thread's stack
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"no exit within 60 s of signal {signum}; where each thread was:\n{err[-6000:]}")
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


@pytest.mark.parametrize("prep", [{"size": 20}, {"channels": 0}, {"size": 0}, {"resize": "crop"}])
def test_a_model_file_with_a_valid_checksum_but_impossible_settings_is_refused(
    fitted: object, data_dir: Path, tmp_path: Path, prep: dict
) -> None:
    from vae_anomaly.model import artifact

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


@pytest.mark.parametrize(("signum", "raised"), [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_a_signal_during_a_held_import_is_raised_only_after_it(signum: int, raised: type[BaseException]) -> None:
    finished = []
    before = signal.getsignal(signum)
    with pytest.raises(raised):
        with signals_held():
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs here, between two bytecodes
            finished.append(True)  # torch's C++ start-up would have been cut short here
    assert finished == [True] and signal.getsignal(signum) is before


def test_a_held_block_that_fails_keeps_its_own_error_and_the_handlers() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(ImportError), signals_held():
        raise ImportError("no such module")
    assert signal.getsignal(signal.SIGINT) is before


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


def test_edited_cache_columns_never_change_a_score_or_a_check(cli_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """The PNG length (read by elbo-ic-nn), width and format (checks) are covered by digests: an edit is
    computed or decoded again, never used."""
    import sqlite3

    def records(*cache: str | Path) -> tuple[list[dict], str]:
        args = ("--format", "json", "--workers", "0", *cache)
        code, out, err = run("score", data_dir / "incoming", "-m", cli_model, *args)
        assert code in (0, 1), err
        keep = ("path", "score", "p_value", "flagged", "atypical")
        return [{k: r[k] for k in keep} for r in json.loads(out)["records"]], err

    truth, _ = records("--no-cache")
    cache = ("--cache-dir", tmp_path / "cache")
    assert records(*cache)[0] == truth  # cold: fills the cache
    (folder,) = (tmp_path / "cache").glob("pixels-v*")
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("UPDATE files SET bits = bits + 5000 WHERE rowid % 2 = 0")
    assert records(*cache)[0] == truth, "an edited PNG length is computed again"
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("UPDATE files SET width = 5000, format = 'TIFF' WHERE rowid % 3 = 0")
    got, err = records(*cache)
    assert got == truth and "failed their check" in err, "an edited width or format: decoded again"


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
