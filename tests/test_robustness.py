"""Never crash, never lose work: bad images, interrupted training, untrusted model files."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import disks, write_pngs
from vae_anomaly import Detector, FitConfig
from vae_anomaly.batching import iter_batches
from vae_anomaly.cli import main
from vae_anomaly.decoding import Preprocessing, decode_image
from vae_anomaly.errors import ImageReadError, ModelFileError
from vae_anomaly.listing import find_images

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
    from vae_anomaly.decoding import set_max_image_pixels

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
    import vae_anomaly.decoding as images_mod

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
    assert "colour images converted to grey" in r.stderr and "far from the trained size" in r.stderr
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
    from vae_anomaly import train as train_mod
    from vae_anomaly.errors import TrainingError

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
    """SIGKILL at moments spread over a whole fit (its length measured by a first run that is not
    killed), so that some land late in training or while the model file is written."""
    model = tmp_path / "m.vae"
    old = model_file.read_bytes()
    assert Detector.load(model_file, device="cpu").metadata_["training"]["images"] != 200, "tell old from new"
    args = ("--epochs", "2", "--checkpoint-every", "0")

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

    model.write_bytes(old)
    start = time.perf_counter()
    proc = _start_fit(train_folder, model, *args)
    _, err = proc.communicate(timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, err
    assert outcome("not killed") == "new", "a fit that is not killed replaces the old model"
    outcomes = []
    for fraction in (0.5, 0.8, 0.95):
        model.write_bytes(old)
        proc = _start_fit(train_folder, model, *args)
        time.sleep(fraction * seconds)
        proc.kill()
        proc.communicate(timeout=60)
        outcomes.append(outcome(f"killed after {fraction:.0%} of a fit's {seconds:.1f} s"))
    assert "old" in outcomes, f"a kill in mid-fit leaves the old model: {outcomes}"
