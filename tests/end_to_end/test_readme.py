"""Every command README shows runs, as a newcomer would type it, on the demo's real digits."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vae_anomaly.cli import main

ROOT = Path(__file__).resolve().parents[2]
# The synopsis' placeholders, as the files the test writes.
PLACEHOLDERS = {"FILE.csv": "examples/_run/labels.csv", "SHARD.json...": "shard-1.json shard-2.json"}


def readme_commands(text: str) -> list[str]:
    """The shell commands of README's code blocks, continuation lines joined, comments dropped, each
    `&&` part on its own."""
    lines, fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif fence or line.startswith("    "):
            lines.append(line.strip())
    joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        for part in line.split("&&"):
            part = part.split(" # ")[0].strip()
            if part.startswith("vae-anomaly ") or "examples/digits_demo.py" in part:
                out.append(part)
    return out


def test_readme_commands_are_found() -> None:
    found = readme_commands((ROOT / "README.md").read_text())
    assert any("digits_demo.py" in c for c in found) and any(c.startswith("vae-anomaly merge") for c in found)
    typed = "    a && vae-anomaly fit x \\\n        -o m.vae  # note\n"
    assert readme_commands(typed) == ["vae-anomaly fit x -o m.vae"]


@pytest.mark.slow
def test_every_command_in_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # Read by every command run here (the nearest settings file): two epochs, not the default budget.
    (tmp_path / "vae-anomaly.toml").write_text("[fit]\nepochs = 2\n")
    run = tmp_path / "examples" / "_run"
    runner = CliRunner()
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) >= 8
    for command in commands:
        if "digits_demo.py" in command:
            demo = [sys.executable, str(ROOT / "examples" / "digits_demo.py"), "--workdir", str(run)]
            done = subprocess.run(demo, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
            for name, src in (("normal_imgs", "normal_imgs"), ("incoming", "incoming")):
                shutil.copytree(run / src, tmp_path / name)
                shutil.copytree(run / src, tmp_path / "data" / name.replace("_imgs", ""))
            continue
        words = shlex.split(command)[1:]
        if "DIR_OR_FILES..." in words:
            words[words.index("DIR_OR_FILES...")] = "normal_imgs" if words[0] == "fit" else "incoming"
        words = [w for word in words for w in PLACEHOLDERS.get(word, word).split()]
        if words[0] == "merge":
            for i in (1, 2):
                shard = ["score", "incoming", "-m", "model.vae", "--shard", f"{i}/2", "-o", f"shard-{i}.json"]
                assert runner.invoke(main, shard).exit_code == 0
        done = runner.invoke(main, words)
        assert done.exit_code in (0, 1), f"{command}\n{done.output}"  # 1: a gate that failed, as gates may
