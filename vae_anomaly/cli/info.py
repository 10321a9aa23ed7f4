"""`vae-anomaly info`: what a model file was trained on and how."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..detector import Detector
from .render import info_table


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info(model: Path, fmt: str) -> None:
    """Show what MODEL was trained on and how."""
    data = Detector.load(model, device="cpu").info()
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    else:
        info_table(str(model), data)
