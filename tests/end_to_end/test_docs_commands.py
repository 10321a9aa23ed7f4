"""Every `vae-anomaly` command the guides in docs/ show parses against the real command line.

Each command of a fenced code block is parsed by click as typed (no model, no images, nothing run):
an option that does not exist, a value outside its choices or range, or a gate rule that is not one
fails here, naming the page and the command.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import click
import PIL.Image
import pytest

from vae_anomaly.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# GitHub Actions expressions and shell variables, as a runner would expand them.
EXPRESSION = re.compile(r"\$\{\{[^}]*\}\}")
VARIABLE = re.compile(r"^\"?\$\{?\w+\}?\"?$")


def fenced_blocks(text: str) -> Iterator[list[str]]:
    """The lines of each fenced (```) code block."""
    block: list[str] | None = None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if block is None:
                block = []
            else:
                yield block
                block = None
        elif block is not None:
            block.append(line)


def doc_commands(text: str) -> list[str]:
    """The `vae-anomaly` commands of a page's fenced blocks: continuation lines joined, prompts (`$ `),
    YAML list dashes and `run: ` dropped, comments cut, each `&&` and `||` part on its own. In a block with `$ `
    prompts only the prompted lines are commands (the rest is output). `python -m vae_anomaly`, as
    torchrun starts it, counts as `vae-anomaly`."""
    out = []
    for block in fenced_blocks(text):
        prompted = any(line.lstrip().startswith("$ ") for line in block)
        joined = re.sub(r"\s*\\\n\s*", " ", "\n".join(block))
        for line in joined.splitlines():
            line = line.strip()
            if prompted:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = re.sub(r"^(- )?(run: )?", "", line)
            for part in re.split(r"&&|\|\|", line):
                part = part.split(" # ")[0].strip()
                part = re.sub(r"^.*?-m vae_anomaly ", "vae-anomaly ", part)
                if part.startswith("vae-anomaly "):
                    out.append(part)
    return out


def all_commands() -> list[tuple[str, str]]:
    return [(page.name, command) for page in sorted(DOCS.glob("*.md")) for command in doc_commands(page.read_text())]


COMMANDS = all_commands()


def test_commands_are_found() -> None:
    pages = {page for page, _ in COMMANDS}
    assert {"usage.md", "decisions.md", "checks.md", "ci.md", "reports.md"} <= pages
    names = {shlex.split(EXPRESSION.sub("1", c))[1] for _, c in COMMANDS}
    assert {"fit", "score", "merge", "evaluate", "info", "config"} <= names
    typed = "```console\n$ vae-anomaly fit x \\\n    -o m.vae  # note\nvae-anomaly output line\n```\n"
    assert doc_commands(typed) == ["vae-anomaly fit x -o m.vae"]
    yaml = "```yaml\n- run: |\n    vae-anomaly score d --shard ${{ matrix.shard }}/4 \\\n      --format json\n```\n"
    assert doc_commands(yaml) == ["vae-anomaly score d --shard ${{ matrix.shard }}/4 --format json"]
    torchrun = "```bash\ntorchrun --nproc-per-node N -m vae_anomaly fit d -o m.vae\n```\n"
    assert doc_commands(torchrun) == ["vae-anomaly fit d -o m.vae"]


def gate_rule_names(command: click.Command) -> set[str]:
    """The rule names `--gate` takes, as its help lists them ("max-count (number of ...)")."""
    gate = next(p for p in command.params if p.name == "gate_specs")
    names = set(re.findall(r"([a-z][a-z-]+) \(", getattr(gate, "help", "") or ""))
    assert {"max-count", "max-rate", "binom-p"} <= names, names  # the help's wording changed: adapt this
    return names


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working folder (no settings file around), and Pillow's pixel limit restored afterwards:
    `--max-image-pixels` sets it as the command line is parsed."""
    monkeypatch.chdir(tmp_path)
    limit = PIL.Image.MAX_IMAGE_PIXELS
    yield tmp_path
    PIL.Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}: {c}" for p, c in COMMANDS])
def test_doc_command_parses(page: str, command: str, workdir: Path) -> None:
    words = [w for w in shlex.split(EXPRESSION.sub("1", command)) if not VARIABLE.match(w)][1:]
    for option, value in itertools.pairwise(words):
        if option == "--config":  # read as the line is parsed: an empty settings file stands in
            (workdir / value).parent.mkdir(parents=True, exist_ok=True)
            (workdir / value).write_text("")
    try:
        if not words or words[0].startswith("-"):
            main.make_context("vae-anomaly", words, resilient_parsing=False)
            return
        group_ctx = click.Context(main, info_name="vae-anomaly")
        cmd = main.get_command(group_ctx, words[0])
        assert cmd is not None, f"{page}: no command {words[0]!r} in `{command}`"
        ctx = cmd.make_context(words[0], words[1:], parent=group_ctx, resilient_parsing=False)
    except click.exceptions.Exit:  # --help, --version
        return
    except click.ClickException as exc:
        pytest.fail(f"{page}: `{command}` does not parse: {exc.format_message()}")
    specs = ctx.params.get("gate_specs") or ()
    if specs:
        known = gate_rule_names(cmd)
        for spec in specs:
            for item in filter(None, (s.strip() for s in spec.split(","))):
                name = item.partition("=")[0]
                assert name in known, f"{page}: `{command}`: no gate rule {name!r} (rules: {sorted(known)})"
