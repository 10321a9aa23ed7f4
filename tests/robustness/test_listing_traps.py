"""What the listing must not drop or hang on: named pipes, linked folders and link loops, unreadable subfolders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_run as run
from conftest import disks, write_pngs


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
