"""The pre-commit hook (.pre-commit-hooks.yaml) through the real pre-commit (`pre-commit try-repo`) on a
temporary git repository: the images a commit adds are scored against the model, and the gate, both
from the repository's vae-anomaly.toml, decides whether the commit goes in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pre_commit")
ROOT = Path(__file__).resolve().parents[2]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_hook_fails_a_commit_of_odd_images_and_passes_normal_ones(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "dataset"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "vae-anomaly.toml").write_text(f'model = "{cli_model}"\n[score]\nmax-anomalies = 2\n')
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }

    def hook(names: list[Path]) -> subprocess.CompletedProcess[str]:
        for p in names:
            shutil.copy(p, repo / p.name)
        _git(repo, "add", *[p.name for p in names])
        cmd = [sys.executable, "-m", "pre_commit", "try-repo", str(ROOT), "vae-anomaly-system"]
        return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    disks = sorted((data_dir / "incoming").glob("disk_*.png"))[:4]
    done = hook(disks)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "vae-anomaly image gate" in done.stdout and "Passed" in done.stdout
    _git(repo, "commit", "-q", "-m", "normal images")
    crosses = sorted((data_dir / "incoming").glob("cross_*.png"))[:6]
    done = hook(crosses)
    assert done.returncode == 1 and "Failed" in done.stdout, done.stdout + done.stderr
    assert "gate FAILED" in done.stdout and "cross_" in done.stdout, "the hook's output names the images"
    assert "disk_" not in done.stdout, "only the staged images are scored"
