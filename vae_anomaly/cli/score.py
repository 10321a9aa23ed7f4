"""`vae-anomaly score` and `vae-anomaly merge`: options into one config, one pipeline call, the report."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..decision.rule import DecisionRule
from ..images.batching import DecodeOptions
from ..pipeline import MergeConfig, ScoreConfig, score_report
from ..pipeline import merge as merge_reports
from ..reports.outputs import Outputs
from ..reports.report import Report
from .options import decode_options, gate_rules, max_pixels_option, parse_shard_option, report_options, rule_options
from .render import report_table, say, warn
from .settings import config_option


@click.command()
@config_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", type=click.Path(path_type=Path), default=Path("model.vae"), show_default=True)
@click.option(
    "--samples", type=click.IntRange(1, 10_000), help="Monte Carlo samples; default: the model's calibration."
)
@rule_options
@report_options
@click.option(
    "--shard",
    metavar="I/N",
    callback=parse_shard_option,
    help="Score only the I-th of N parts of the sorted listing (round robin) and write a JSON report "
    "for `vae-anomaly merge`, which gates the whole batch.",
)
@click.option("--batch-size", type=click.IntRange(1), default=256, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--top", type=click.IntRange(0), default=30, show_default=True, help="Rows in the terminal table (0: all)."
)
@click.option(
    "--heatmaps",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a PNG per flagged image here: input | reconstruction | heat map.",
)
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path), help="Write the score histogram here (PNG).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report (verdict, summary, histogram, top images).",
)
@click.option(
    "--html-top",
    type=click.IntRange(0),
    default=50,
    show_default=True,
    help="Most anomalous images shown, with pictures, in the HTML report.",
)
@max_pixels_option
@decode_options
def score(
    inputs: tuple[Path, ...],
    model: Path,
    samples: int | None,
    rule: DecisionRule,
    fmt: str,
    output: Path | None,
    gate_specs: tuple[str, ...],
    max_anomalies: int | None,
    max_anomaly_rate: float | None,
    baseline: Path | None,
    junit: Path | None,
    skip_unreadable: bool,
    shard: tuple[int, int] | None,
    batch_size: int,
    device: str,
    top: int,
    heatmaps: Path | None,
    plots: Path | None,
    html_path: Path | None,
    html_top: int,
    decode: DecodeOptions,
) -> None:
    """Score INPUTS (folders or files) against a model; flag and gate.

    With --shard I/N, score only one part of the listing and write a JSON report that
    `vae-anomaly merge` joins with the other parts' (the gate is decided there, over all of them).
    """
    config = ScoreConfig(
        inputs=inputs,
        model=model,
        rule=rule,
        samples=samples,
        gate=gate_rules(gate_specs, max_anomalies, max_anomaly_rate),
        baseline=baseline,
        skip_unreadable=skip_unreadable,
        batch_size=batch_size,
        device=device,
        shard=shard,
        decode=decode,
        outputs=Outputs(fmt, output, junit, html_path, html_top, heatmaps, plots),
    )
    run = score_report(config, on_message=say, on_warning=warn)
    _show(run.report, run.stdout, run.annotations, config.outputs.format, top)
    sys.exit(run.report.return_code)


def _show(report: Report, stdout: str | None, annotations: list[str], fmt: str, top: int) -> None:
    """The report on stdout (a table, or the machine-readable text), and GitHub's annotations on stderr."""
    if fmt == "table":
        report_table(report, top)
    elif stdout is not None:
        click.echo(stdout, nl=False)
    for line in annotations:
        click.echo(line, err=True)


@click.command()
@config_option
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "-m",
    "--model",
    type=click.Path(path_type=Path),
    help="Also check that the shards were scored by this model file (by fingerprint).",
)
@rule_options
@report_options
@click.option(
    "--top", type=click.IntRange(0), default=30, show_default=True, help="Rows in the terminal table (0: all)."
)
def merge(
    reports: tuple[Path, ...],
    model: Path | None,
    rule: DecisionRule,
    fmt: str,
    output: Path | None,
    gate_specs: tuple[str, ...],
    max_anomalies: int | None,
    max_anomaly_rate: float | None,
    baseline: Path | None,
    junit: Path | None,
    skip_unreadable: bool,
    top: int,
) -> None:
    """Join the JSON reports of `score --shard I/N` (all N of them) into one, and gate it.

    The result is the report one unsharded `score` run over the whole listing gives: the same
    records in the same order, with --fdr flags, ranks, batch tests and the gate computed over
    the union. The decision options are merge's own, as for `score`: the shards must have been scored
    with the same ones (a shard report never brings its own rule). Exit codes as for `score`: 0 pass,
    1 gate failed, 2 usage, 3 unreadable inputs.
    """
    config = MergeConfig(
        reports=reports,
        model=model,
        rule=rule,
        gate=gate_rules(gate_specs, max_anomalies, max_anomaly_rate),
        baseline=baseline,
        skip_unreadable=skip_unreadable,
        outputs=Outputs(fmt, output, junit),
    )
    run = merge_reports(config, on_message=say, on_warning=warn)
    _show(run.report, run.stdout, run.annotations, config.outputs.format, top)
    sys.exit(run.report.return_code)
