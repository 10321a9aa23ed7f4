"""Ctrl-C, SIGTERM and kill -9 during fit and score: exit 128+N, keep the best model or the old files whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import disks, write_pngs
from vae_anomaly import Detector
from vae_anomaly.errors import ModelFileError
from vae_anomaly.process import Terminated, signals_held


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
