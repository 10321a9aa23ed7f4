"""The GitHub Action (action.yml) without GitHub: its `run:` steps in a shell, with GITHUB_OUTPUT,
GITHUB_STEP_SUMMARY and GITHUB_ACTIONS set as a runner sets them; outputs and exit codes checked on a
tiny model. `uses:` steps (setup-python, the model cache) are GitHub's own and are not run here; the
install step is skipped with `install: false`, as a job that has vae-anomaly already would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_run as run

yaml = pytest.importorskip("yaml")  # PyYAML, with pre-commit in the dev extra

ROOT = Path(__file__).resolve().parents[2]
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _value(expr: str, inputs: dict[str, str], steps: dict[str, dict[str, str]]) -> str:
    """The few expressions action.yml uses: inputs.X, steps.ID.outputs.X, `a || 'b'`."""
    if "||" in expr:
        left, right = (part.strip() for part in expr.split("||", 1))
        return _value(left, inputs, steps) or right.strip("'")
    parts = expr.split(".")
    if parts[0] == "inputs":
        return inputs[parts[1]]
    if parts[0] == "steps":
        return steps.get(parts[1], {}).get(parts[3], "")
    raise AssertionError(f"action.yml uses an expression this test does not know: {expr}")


def _expand(text: str, inputs: dict[str, str], steps: dict[str, dict[str, str]]) -> str:
    return EXPR.sub(lambda m: _value(m.group(1), inputs, steps), text)


def _condition(expr: str, inputs: dict[str, str]) -> bool:
    m = re.fullmatch(r"inputs\.([\w-]+)\s*(==|!=)\s*'(.*)'", expr.strip())
    assert m, f"action.yml uses a condition this test does not know: {expr}"
    return (inputs[m.group(1)] == m.group(3)) == (m.group(2) == "==")


def run_action(workspace: Path, given: dict[str, str]) -> tuple[int, dict[str, str], str, str]:
    """Run action.yml's steps as a runner would, in `workspace`: (the job's exit code, the action's
    outputs, the step summary written, the steps' stderr, where the runner reads annotations)."""
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    unknown = set(given) - set(action["inputs"])
    assert not unknown, f"not inputs of the action: {unknown}"
    inputs = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    inputs.update(given)
    out_file, summary = workspace / "github_output", workspace / "step_summary"
    out_file.write_text("")
    summary.write_text("")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "GITHUB_ACTIONS": "true",
        "GITHUB_ACTION_PATH": str(ROOT),
        "GITHUB_OUTPUT": str(out_file),
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    steps: dict[str, dict[str, str]] = {}
    code, log = 0, ""
    for step in action["runs"]["steps"]:
        if "if" in step and not _condition(step["if"], inputs):
            continue
        if "uses" in step:
            continue
        assert step["shell"] == "bash", "composite run steps name their shell"
        step_env = {
            k: EXPR.sub(lambda m: _value(m.group(1), inputs, steps), str(v)) for k, v in step.get("env", {}).items()
        }
        out_file.write_text("")
        done = subprocess.run(
            ["bash", "-c", step["run"]],
            cwd=workspace,
            env={**env, **step_env},
            timeout=300,
            capture_output=True,
            text=True,
        )
        log += done.stderr
        outputs = dict(line.split("=", 1) for line in out_file.read_text().splitlines() if "=" in line)
        steps[step.get("id", "")] = outputs
        if done.returncode:
            code = done.returncode
            break
    result = {
        k: EXPR.sub(lambda m: _value(m.group(1), inputs, steps), v["value"]) for k, v in action["outputs"].items()
    }
    return code, result, summary.read_text(), log


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    (tmp_path / "ws").mkdir()
    return tmp_path / "ws"


@pytest.mark.slow  # a bash step that starts vae-anomaly (torch) in a fresh process
def test_the_action_fails_the_job_when_the_gate_fails_and_says_why(
    cli_model: Path, data_dir: Path, workspace: Path
) -> None:
    given = {"path": str(data_dir / "incoming"), "model": str(cli_model), "gate": "max-count=0", "install": "false"}
    code, out, summary, log = run_action(workspace, given)
    assert code == 1 and out["exit-code"] == "1"
    assert "::warning file=" in log and "cross_" in log, "flagged files become annotations"
    assert int(out["flagged"]) > 0 and out["unreadable"] == "0"
    assert out["report"] == "vae-anomaly-report.json" and (workspace / out["report"]).is_file()
    assert (workspace / "vae-anomaly-report.junit.xml").is_file()
    assert "vae-anomaly: ❌ gate failed (exit code 1)" in summary and "max-count" in summary


@pytest.mark.slow  # a bash step that starts vae-anomaly (torch) in a fresh process
def test_the_action_passes_a_batch_within_the_gate(cli_model: Path, data_dir: Path, workspace: Path) -> None:
    given = {
        "path": str(data_dir / "incoming"),
        "model": str(cli_model),
        "gate": "max-rate=0.9",
        "fpr": "0.02",
        "args": "--top 5 --no-checks",
        "report": "out/gate.json",
        "install": "false",
    }
    (workspace / "out").mkdir()
    code, out, _, _ = run_action(workspace, given)
    assert code == 0 and out["exit-code"] == "0" and out["report"] == "out/gate.json"
    assert (workspace / "out" / "gate.junit.xml").is_file()


@pytest.mark.slow  # a bash step that starts vae-anomaly (torch) in a fresh process
def test_the_action_reports_usage_errors_and_unreadable_inputs_by_their_exit_codes(
    cli_model: Path, data_dir: Path, workspace: Path
) -> None:
    code, out, _, _ = run_action(
        workspace, {"path": str(data_dir / "incoming"), "model": "missing.vae", "install": "false"}
    )
    assert code == 2 and out == {"exit-code": "2", "flagged": "", "unreadable": "", "report": ""}
    broken = workspace / "batch"
    broken.mkdir()
    for p in sorted((data_dir / "incoming").glob("*.png"))[:3]:
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out, _, _ = run_action(workspace, {"path": str(broken), "model": str(cli_model), "install": "false"})
    assert code == 3 and out["unreadable"] == "1" and out["exit-code"] == "3"
    spaced = workspace / "new batch"
    spaced.mkdir()
    for p in sorted((data_dir / "incoming").glob("disk_*.png"))[:2]:
        (spaced / p.name).write_bytes(p.read_bytes())
    given = {"path": f"{spaced}\n{broken / 'broken.png'}\n", "model": str(cli_model), "install": "false"}
    code, out, _, _ = run_action(workspace, given)
    report = json.loads((workspace / out["report"]).read_text())
    assert code == 3 and report["summary"]["scored"] == 2, "one path a line keeps the space in 'new batch'"


@pytest.mark.slow
def test_the_action_fits_a_missing_model_on_the_normal_folder_with_the_settings_file(
    data_dir: Path, workspace: Path
) -> None:
    """`normal` fits the model first where it is missing; the repository's vae-anomaly.toml holds the
    options the workflow no longer repeats."""
    (workspace / "vae-anomaly.toml").write_text(
        '[fit]\nepochs = 3\nfolds = 1\nlatent-dim = 4\nseed = 0\ndevice = "cpu"\n[score]\ngate = "max-rate=0.9"\n'
    )
    given = {"path": str(data_dir / "incoming"), "normal": str(data_dir / "normal"), "install": "false"}
    code, out, _, _ = run_action(workspace, given)
    assert code == 0 and out["exit-code"] == "0" and (workspace / "model.vae").is_file()
    assert int(out["flagged"]) >= 0 and out["unreadable"] == "0"


def test_the_readme_use_of_the_action_is_at_most_eight_lines_and_uses_only_its_inputs() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```yaml\n(\s*- uses: [\w.-]+/vae-anomaly@v1\n.*?)```", readme, re.S)
    assert block, "README shows the `uses:` step"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(lines) <= 8
    inputs = yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
    given = yaml.safe_load(block.group(1))[0].get("with", {})
    assert set(given) <= set(inputs)


def test_the_ci_examples_use_the_action_and_one_settings_file_instead_of_repeated_options() -> None:
    inputs = yaml.safe_load((ROOT / "action.yml").read_text())["inputs"]
    workflow = yaml.safe_load((ROOT / "examples" / "ci" / "github-actions.yml").read_text())
    ours = [s for s in workflow["jobs"]["gate"]["steps"] if str(s.get("uses", "")).endswith("/vae-anomaly@v1")]
    assert len(ours) == 1 and set(ours[0]["with"]) <= set(inputs)
    code, out, err = run("config", "--config", ROOT / "examples" / "ci" / "vae-anomaly.toml", "--format", "json")
    assert code == 0, err
    score = json.loads(out)["commands"]["score"]
    assert score["gate"]["value"] == ["max-rate=0.02", "shift-p=0.001", "binom-p=0.001"]
    assert {"format", "output", "junit", "model"} <= set(score)
    gitlab = yaml.safe_load((ROOT / "examples" / "ci" / "gitlab-ci.yml").read_text())
    script = "\n".join(gitlab["image-gate"]["script"])
    for repeated in ("max-rate", "--junit", "--format", "--output", "--seed"):
        assert repeated not in script, f"{repeated} comes from the settings file"
