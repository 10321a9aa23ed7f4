"""Option groups several commands share, as decorators, and the parsers of option values."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..decision.calibration import TAILS
from ..decision.gate import GATE_RULES, GateRule, gate_from_options
from ..decision.rule import DecisionRule
from ..errors import ConfigError
from ..images.batching import DecodeOptions
from ..images.decoding import DEFAULT_MAX_IMAGE_PIXELS, set_max_image_pixels
from ..images.pixel_cache import default_cache_dir
from ..model.score_table import DEFAULT_GUARD, DEFAULT_SCORE, GUARDS, SCORE_NAMES
from ..reports.report import FORMATS
from ..reports.shard import parse_shard

F = TypeVar("F", bound=Callable[..., Any])


def max_pixels_option(fn: Any) -> Any:
    """Shared by every command that reads images: the decompression-bomb limit."""

    def apply(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        set_max_image_pixels(value)
        return value

    return click.option(
        "--max-image-pixels",
        type=click.IntRange(1),
        callback=apply,
        expose_value=False,
        help=f"Refuse images whose header declares more pixels (default {DEFAULT_MAX_IMAGE_PIXELS:,}).",
    )(fn)


def guard_option(help: str) -> Callable[[F], F]:
    """--guard kl|none, for `score` and `evaluate` alike."""
    return click.option(
        "--guard", type=click.Choice([*GUARDS, "none"]), default=DEFAULT_GUARD, show_default=True, help=help
    )


def checks_option(fn: F) -> F:
    """--checks/--no-checks, for `score` and `evaluate` alike."""
    option = click.option(
        "--checks/--no-checks",
        default=True,
        show_default=True,
        help="Test the image properties (brightness, sharpness, size, format, ...) in the same one test as the "
        "model's score; --no-checks decides on the model alone. Reasons name them either way.",
    )
    return option(fn)


def rule_options(fn: Any) -> Any:
    """The decision rule's options, shared by `score` and `merge` (which applies its own rule, never one a
    shard report brings): they reach the command as one `rule: DecisionRule`."""

    @functools.wraps(fn)
    def command(
        *args: Any,
        score_name: str,
        guard: str,
        threshold: str | float,
        fpr: float,
        fdr: float | None,
        strict_fpr: bool,
        tail: str | None,
        checks: bool,
        **kwargs: Any,
    ) -> Any:
        ctx = click.get_current_context()
        given = click.core.ParameterSource.COMMANDLINE
        chose = ctx.get_parameter_source("fpr") == given or (
            ctx.get_parameter_source("threshold") == given and threshold != "auto"
        )
        if fdr is not None and chose and ctx.get_parameter_source("fdr") != given:
            fdr = None  # --fpr or --threshold on the command line wins over a settings file's fdr
        rule = DecisionRule(
            score=score_name,
            guard=None if guard == "none" else guard,
            tail=tail,
            threshold=threshold,
            fpr=fpr,
            fdr=fdr,
            strict=strict_fpr,
            checks=checks,
        )
        return fn(*args, rule=rule, **kwargs)

    options = [
        click.option(
            "--score",
            "score_name",
            type=click.Choice(SCORE_NAMES),
            default=DEFAULT_SCORE,
            show_default=True,
            help="elbo-ic-nn: elbo-ic (-ELBO in bits minus the PNG length) plus the latent distance to the training "
            "images, each over its spread; see docs/decisions.md for all.",
        ),
        guard_option(
            "A second statistic, the latent KL, in the same test as the score: catches shrunk, noisy, dim frames."
        ),
        click.option(
            "--threshold",
            default="auto",
            show_default=True,
            callback=parse_threshold,
            help="'auto' flags conformal p <= --fpr; a number flags scores at or above it.",
        ),
        click.option(
            "--fpr",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=0.01,
            show_default=True,
            help="Target false-positive rate for --threshold auto.",
        ),
        click.option(
            "--fdr",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            help="Flag by Benjamini-Hochberg at this false discovery rate over the batch, instead of p <= --fpr.",
        ),
        click.option(
            "--strict-fpr/--no-strict-fpr",
            default=False,
            help="Where the calibration cannot reach --fpr (or --fdr), flag nothing instead of flagging at the "
            "smallest reachable level (which the report then states as the rate that holds).",
        ),
        click.option(
            "--tail",
            type=click.Choice(TAILS),
            default=None,
            help="Side of the model's score: two-sided also flags images too simple to be normal (blank, tiny, "
            "cropped). Default: the model's own (two-sided for pixel models, upper over the backbone's features).",
        ),
        checks_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def decode_options(fn: Any) -> Any:
    """Shared by every command that reads image files: worker processes and the pixel cache.

    The three options reach the command as one `decode: DecodeOptions`.
    """

    @functools.wraps(fn)
    def command(*args: Any, workers: int | None, no_cache: bool, cache_dir: Path | None, **kwargs: Any) -> Any:
        decode = DecodeOptions(workers, not no_cache, None if cache_dir is None else str(cache_dir))
        return fn(*args, decode=decode, **kwargs)

    options = [
        click.option(
            "--workers",
            type=click.IntRange(0),
            help="Processes that decode images (0: in this process). Default: one per CPU left free, "
            "for 1024 files or more.",
        ),
        click.option(
            "--no-cache/--cache",
            default=False,
            help="Neither read nor write the cache of decoded pixels (files are found again by path, size "
            "and modification time); --cache turns it back on where a settings file turned it off.",
        ),
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help=f"Where decoded pixels are cached (default $VAE_ANOMALY_CACHE_DIR or {default_cache_dir()}).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def report_options(fn: Any) -> Any:
    """Shared by `score` and `merge`: the output format and file, the gate, and the CI reports."""
    options = [
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True),
        click.option(
            "-o",
            "--output",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Write results here instead of stdout (format from --format, or the file's extension).",
        ),
        click.option(
            "--gate",
            "gate_specs",
            multiple=True,
            metavar="RULE=LIMIT[,...]",
            help="Gate rules over the batch, exit 1 when any fails: "
            + ", ".join(f"{k} ({v[0]}; fails when {v[1]})" for k, v in GATE_RULES.items())
            + ". Repeatable or comma separated.",
        ),
        click.option("--max-anomalies", type=click.IntRange(0), help="Same as --gate max-count=N."),
        click.option("--max-anomaly-rate", type=click.FloatRange(0, 1), help="Same as --gate max-rate=R."),
        click.option(
            "--baseline",
            type=click.Path(dir_okay=False, path_type=Path),
            help="A previous accepted JSON report of this model: test the batch's scores against it "
            "(gate rule drift-p).",
        ),
        click.option(
            "--junit",
            type=click.Path(dir_okay=False, path_type=Path),
            help="Also write JUnit XML here: one test case per image, flagged and unreadable ones fail.",
        ),
        click.option(
            "--skip-unreadable/--no-skip-unreadable",
            default=False,
            help="Unreadable inputs are reported but do not exit 3.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_threshold(ctx: click.Context, param: click.Parameter, value: str) -> str | float:
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"expected 'auto' or a number, got {value!r}", ctx, param) from None


def parse_shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def gate_rules(
    gate_specs: tuple[str, ...], max_anomalies: int | None, max_anomaly_rate: float | None
) -> tuple[GateRule, ...]:
    """--gate, --max-anomalies and --max-anomaly-rate as one list of rules (score and merge share them)."""
    try:
        return tuple(gate_from_options(gate_specs, max_anomalies, max_anomaly_rate))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="'--gate'") from None
