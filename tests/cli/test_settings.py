"""Settings files (settings.py, cli/settings.py): vae-anomaly.toml or [tool.vae-anomaly] in pyproject.toml
set the commands' defaults, the command line overrides them, `vae-anomaly config` says where each came
from, and a key no command knows is an error naming the key and the file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import cli_run as run
from vae_anomaly.cli import main
from vae_anomaly.errors import ConfigError
from vae_anomaly.settings import find, load


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def resolved(*args: str | Path) -> dict:
    code, out, err = run("config", "--all", "--format", "json", *args)
    assert code == 0, err
    return json.loads(out)


def test_the_nearest_file_wins_and_a_pyproject_without_the_table_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "vae-anomaly.toml", "fpr = 0.02\n")
    write(tmp_path / "data" / "pyproject.toml", "[project]\nname = 'x'\n")
    deep = tmp_path / "data" / "batch"
    deep.mkdir()
    assert find(deep) == (tmp_path / "vae-anomaly.toml").resolve()
    write(tmp_path / "data" / "pyproject.toml", "[tool.vae-anomaly]\nfpr = 0.03\n")
    assert find(deep) == (tmp_path / "data" / "pyproject.toml").resolve()
    monkeypatch.chdir(deep)
    doc = resolved("score")
    assert doc["file"] == str((tmp_path / "data" / "pyproject.toml").resolve())
    fpr = doc["commands"]["score"]["fpr"]
    assert fpr["value"] == 0.03 and fpr["origin"].endswith("pyproject.toml [tool.vae-anomaly]")


def test_config_shows_each_value_and_its_origin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        tmp_path / "pyproject.toml",
        """
        [tool.vae-anomaly]
        fpr = 0.05
        workers = 0
        model = "models/gate.vae"

        [tool.vae-anomaly.score]
        gate = "max-count=0"
        format = "json"
        checks = false

        [tool.vae-anomaly.fit]
        time-budget = 60
        """,
    )
    monkeypatch.chdir(tmp_path)
    commands = resolved()["commands"]
    score, fit = commands["score"], commands["fit"]
    where = str((tmp_path / "pyproject.toml").resolve())
    assert score["fpr"] == {"value": 0.05, "origin": f"{where} [tool.vae-anomaly]"}
    assert score["gate"] == {"value": ["max-count=0"], "origin": f"{where} [tool.vae-anomaly.score]"}
    assert score["checks"]["value"] is False and score["format"]["value"] == "json"
    assert score["model"]["value"] == str(tmp_path.resolve() / "models" / "gate.vae"), "relative to the file"
    assert score["threshold"] == {"value": "auto", "origin": "default"}
    assert fit["time-budget"]["value"] == 60 and fit["workers"]["value"] == 0
    assert "fpr" not in fit and "time-budget" not in score, "a shared key applies where the option exists"
    code, out, err = run("config", "score")
    assert code == 0 and "gate" in out and "time-budget" not in out and where in err.replace("\n", "")


def test_file_values_are_the_defaults_and_the_command_line_overrides_them(
    cli_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "vae-anomaly.toml", f'model = "{cli_model}"\n[score]\nformat = "json"\nmax-anomalies = 0\n')
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("score", data_dir / "incoming")
    summary = json.loads(out)["summary"]
    assert code == 1 and summary["gate"][0]["name"] == "max-count", "the file's gate failed the batch"
    code, out, _ = run("score", data_dir / "incoming", "--max-anomalies", "1000", "--format", "csv")
    assert code == 0 and out.startswith("rank,path,"), "options given override the file"


def test_an_unknown_key_or_a_bad_value_is_an_error_naming_it_and_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = write(tmp_path / "bad.toml", "[score]\nfpt = 0.05\n")
    code, _, err = run("score", "x", "--config", bad)
    assert code == 2 and "'fpt'" in err and str(bad.resolve()) in err and "did you mean 'fpr'" in err
    write(tmp_path / "vae-anomaly.toml", "no-such-option = 1\n")
    code, _, err = run("config")
    assert code == 2 and "'no-such-option'" in err and "vae-anomaly.toml" in err
    write(tmp_path / "vae-anomaly.toml", "fpr = 2.0\n")
    code, _, err = run("score", "x")
    assert code == 2 and "fpr = 2.0" in err and "vae-anomaly.toml" in err
    write(tmp_path / "vae-anomaly.toml", "[scores]\nfpr = 0.1\n")
    code, _, err = run("score", "x")
    assert code == 2 and "unknown table [scores]" in err
    write(tmp_path / "vae-anomaly.toml", "fpr = \n")
    code, _, err = run("score", "x")
    assert code == 2 and "not valid TOML" in err
    code, _, err = run("score", "x", "--config", tmp_path / "missing.toml")
    assert code == 2 and "missing.toml not found" in err


def test_a_key_of_another_command_is_accepted_in_the_shared_table(tmp_path: Path) -> None:
    path = write(tmp_path / "vae-anomaly.toml", "time-budget = 90\nfpr = 0.02\n")
    settings = load(path)
    assert settings.values("score") == {"time-budget": 90, "fpr": 0.02}
    code, out, err = run("config", "--config", path, "--format", "json")
    assert code == 0, err
    commands = json.loads(out)["commands"]
    assert commands["fit"] == {"time-budget": {"value": 90.0, "origin": f"{path.resolve()} [top level]"}}
    with pytest.raises(ConfigError, match=r"no \[tool\.vae-anomaly\] table"):
        load(write(tmp_path / "pyproject.toml", "[project]\nname = 'x'\n"))


def test_shell_completion_scripts_come_from_click_and_complete_commands_and_options() -> None:
    for shell in ("bash", "zsh", "fish"):
        done = CliRunner().invoke(main, [], prog_name="vae-anomaly", env={"_VAE_ANOMALY_COMPLETE": f"{shell}_source"})
        assert done.exit_code == 0 and "_VAE_ANOMALY_COMPLETE" in done.output, shell

    def complete(words: str) -> list[str]:
        env = {"_VAE_ANOMALY_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return CliRunner().invoke(main, [], prog_name="vae-anomaly", env=env).output.split()

    assert complete("vae-anomaly con") == ["plain,config"]
    assert "plain,--config" in complete("vae-anomaly score --con")


def test_a_settings_file_never_applies_unseen_and_the_command_line_can_undo_it(
    cli_model: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file in a parent folder that would pass any gate: `score` names it and what it sets; a boolean
    from it can be switched off; --fpr on the command line wins over its fdr."""
    write(tmp_path / "vae-anomaly.toml", "[score]\nthreshold = 1e308\nskip-unreadable = true\nfdr = 0.5\n")
    batch = tmp_path / "ci" / "batch"
    batch.mkdir(parents=True)
    for p in sorted((data_dir / "incoming").glob("*.png"))[:6]:
        (batch / p.name).write_bytes(p.read_bytes())
    (batch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    monkeypatch.chdir(tmp_path / "ci")
    code, _, err = run("score", batch, "-m", cli_model, "--max-anomalies", "0", "--threshold", "auto")
    assert f"settings from {(tmp_path / 'vae-anomaly.toml').resolve()}: " in " ".join(err.split())
    assert "threshold" in err and "skip-unreadable" in err and "fdr" in err
    code, _, err = run("score", batch, "-m", cli_model, "--threshold", "auto", "--no-skip-unreadable")
    assert code == 3 and "broken.png" in err, "the file's skip-unreadable switched off"
    code, out, _ = run("score", batch, "-m", cli_model, "--threshold", "auto", "--fpr", "0.2", "--format", "json")
    rule = json.loads(out)["summary"]["threshold"]
    assert rule["rule"] == "auto" and rule["alpha"] == 0.2, "--fpr given here wins over the file's fdr"
