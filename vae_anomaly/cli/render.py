"""What people see: rich tables on stdout, and messages on stderr. The only module that imports rich."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..decision.checks import PREFIX
from ..images.decoding import Preprocessing
from ..model.features import describe as describe_features
from ..reports.ci import verdict_lines
from ..reports.report import Report, why_text

if TYPE_CHECKING:  # scikit-learn is imported by `evaluate` alone, not by every `score`
    from ..evaluation import Evaluation

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def _p_value(p: float | None) -> str:
    """Four decimals, or two significant digits below 1e-4, where tail-model p-values go."""
    if p is None:
        return "-"
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(msg)}")


def say(msg: str) -> None:
    """A progress or file-written line on stderr; an unreadable file's line in red."""
    if msg.startswith("unreadable: "):
        err.print(f"[red]unreadable:[/] {escape(msg[len('unreadable: ') :])}", highlight=False)
    else:
        err.print(escape(msg), highlight=False)


def _checks_row(data: dict[str, Any]) -> str:
    """The property checks the model calibrated (with their normal medians), its file formats, and the
    training images whose fingerprints it keeps for the duplicate search."""
    checked = {k.removeprefix(PREFIX): v for k, v in data["calibration"].items() if k.startswith(PREFIX)}
    c = data["checks"]
    formats = ", ".join(f"{f or 'arrays'} {s:.0%}" for f, s in c.get("formats", {}).items())
    medians = "; ".join(f"{k} {v['median']:.4g}" for k, v in checked.items())
    return (
        f"{len(checked)} calibrated on the same images, medians {medians}; formats {formats}; fingerprints of "
        f"{c.get('training_files', 0):,} training images ({_near(c.get('near_bits'))})"
    )


def _local_row(local: dict[str, Any]) -> str:
    return (
        f"largest distance of {local['patch']}-px patches (stride {local['stride']}, of the "
        f"{local['working_size']}-px working size) to one bank of {local['bank_patches']:,} normal patches (of "
        f"{local['banks']}, picked by the image's pixels); regions past {local['region_bound']:.3g}"
    )


def _neighbours_row(nn: dict[str, Any]) -> str:
    lat = nn["latents"]
    kept = f"{lat[0]:,}" if len(set(lat)) == 1 else f"{min(lat):,}-{max(lat):,}"
    return (
        f"elbo-ic-nn adds the mean distance to the {nn['neighbours']} nearest of {kept} training latents per model; "
        f"spreads on the training images: elbo-ic {nn['ic_spread'][0]:.4g}, distance {nn['distance_spread'][0]:.4g}"
        + (" (model 1)" if len(lat) > 1 else "")
    )


def _tiles_row(tiles: dict[str, Any]) -> str:
    return (
        f"{tiles['tiles']}, overlap {tiles['overlap']:.0%}; each tile read at {tiles['working_size']} px and "
        f"measured as above against {tiles['banks']} bank(s) of {tiles['bank_patches']:,} tile patches; the larger "
        f"scale, each over its own region bound ({tiles['region_bound']:.3g} for tiles), is the statistic"
    )


def _near(bits: int | None) -> str:
    if bits is None or bits < 0:
        return "exact copies only: distinct training images share perceptual hashes"
    return f"near duplicates within {bits} of 64 bits"


WHY_MIN = 10  # columns of the score table's `why`, which wraps at its words


def _folder(paths: list[str]) -> str:
    """The folder every path lies in, with its final '/', or '': said once in the table's title, so
    that the path column holds what tells the files apart and keeps names whole at 80 columns."""
    common: list[str] = []
    for level in zip(*(path.split("/")[:-1] for path in paths), strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) + "/" if common else ""


def report_table(report: Report, top: int) -> None:
    """The most anomalous images first, then the verdict lines."""
    s = report.summary
    scored = [r for r in report.records if r.error is None]
    shown = scored if top == 0 else scored[:top]
    folder = _folder([r.path for r in shown])
    where = f" in {escape(folder)}" if folder else ""
    table = Table(title=f"most anomalous first ({s.score}, {s.threshold['tail']}){where}", title_justify="left")
    names = [r.path[len(folder) :] for r in shown]
    table.add_column("#", justify="right")
    # What the other columns need at least (borders and padding included): the rest keeps names whole.
    others = 3 * 6 + 1 + len(str(len(scored))) + len("score") + len("p-value") + len("ANOMALY") + WHY_MIN
    fit = max(out.width - others, 8)
    table.add_column("path", overflow="fold", min_width=min(max(map(len, names), default=4), fit))
    table.add_column("score", justify="right")
    table.add_column("p-value", justify="right")
    table.add_column("flag")
    table.add_column("why", overflow="fold", min_width=WHY_MIN)
    for r, name in zip(shown, names, strict=True):
        table.add_row(
            str(r.rank),
            escape(name),
            f"{r.score:.4g}",
            _p_value(r.p_value),
            "[bold red]ANOMALY[/]" if r.flagged else "ok",
            escape(why_text(r, s.effective_fpr, limit=1)),
        )
    if shown:
        out.print(table)
    if len(scored) > len(shown):
        out.print(f"... {len(scored) - len(shown)} more (use --top 0 or --format json for all)")
    for line in verdict_lines(report):
        out.print(escape(line), highlight=False)


def evaluation_table(ev: Evaluation) -> None:
    table = Table(
        title=f"{escape(ev.source)}: {int((ev.labels == 0).sum())} normal, {int((ev.labels == 1).sum())} anomalous",
        title_justify="left",
    )
    res = list(ev.results.values())
    rows = [
        ("ROC-AUC", [f"{r.metrics.roc_auc:.4f}" for r in res]),
        ("average precision", [f"{r.metrics.average_precision:.4f}" for r in res]),
        ("best F1", [f"{r.metrics.best_f1:.4f}" for r in res]),
        ("  at score >=", [f"{r.metrics.best_f1_threshold:.4g}" for r in res]),
        ("  precision / recall", [f"{r.metrics.best_f1_precision:.3f} / {r.metrics.best_f1_recall:.3f}" for r in res]),
        ("TPR at FPR 1%", [f"{r.metrics.tpr_at_fpr_1pct:.4f}" for r in res]),
        ("TPR at FPR 5%", [f"{r.metrics.tpr_at_fpr_5pct:.4f}" for r in res]),
        ("auto rule: TN / FP", [f"{r.confusion.tn} / {r.confusion.fp}" for r in res]),
        ("auto rule: FN / TP", [f"{r.confusion.fn} / {r.confusion.tp}" for r in res]),
        ("auto rule: FPR / TPR", [f"{r.confusion.fpr:.3f} / {r.confusion.tpr:.3f}" for r in res]),
    ]
    # At 80 columns with every score, labels stay whole and values and headers wrap (rich would cut them).
    table.add_column("metric", no_wrap=True, min_width=max(len(label) for label, _ in rows))
    for name, r in ev.results.items():
        table.add_column(f"{name} ({r.samples})", justify="right", overflow="fold", min_width=6)
    for label, cells in rows:
        table.add_row(label, *cells)
    out.print(table)
    out.print(
        "ROC-AUC, AP, best F1 and TPR at FPR rank by the raw score (higher = more anomalous). "
        f"The auto rule is the model's own (--fpr {ev.fpr:g}, --tail {ev.tail}): "
        + "; ".join(f"{n}: {escape(r.threshold.describe())}" for n, r in ev.results.items()),
        highlight=False,
    )


def _plan_row(plan: dict[str, Any], tr: dict[str, Any]) -> str:
    budget = "no limit" if plan["budget"] is None else f"{plan['budget']:.0f} s"
    capped = f", capped from {plan['default_epochs']}" if plan["capped"] else ""
    return (
        f"{budget}; planned up to {plan['epochs']} epochs{capped} at {1 / plan['speed']['train']:,.0f} training "
        f"images/s, expected {plan['expected']:.0f} s; the fit took {plan['seconds']:.0f} s"
    )


def info_table(model: str, data: dict[str, Any]) -> None:
    """`vae-anomaly info` for people: one row per fact about the model."""
    table = Table(show_header=False, title=f"model {escape(model)}", title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    tr = data["training"]
    cfg = data["config"]
    prep = data["preprocessing"]
    rows = [
        ("fingerprint", data["fingerprint"]),
        ("created", data["created"]),
        ("input", Preprocessing.from_dict(prep).describe(cfg.get("kind") == "features")),
        ("features", describe_features(data.get("features"), cfg)[0]),
        ("network", describe_features(data.get("features"), cfg)[1]),
        (
            "images",
            f"{tr['images']} read ({tr['train_images']} train, {tr['validation_images']} validation, "
            f"{tr['calibration_images']} calibration), {tr['unreadable_images']} unreadable",
        ),
        ("data fingerprint", tr["data_fingerprint"]),
        (
            "models",
            f"{data['models']} cross-fitted (each scores the fold it did not see; cross-conformal p-values)"
            if data["models"] > 1
            else "1 (calibration split held out)",
        ),
        (
            "training",
            f"{tr['epochs_run']} epochs ({tr['stopped']}), best epoch {tr['best_epoch']}, "
            f"{tr['seconds']:.1f} s, seed {tr['seed']}, {tr['device']}"
            + (f", {tr['processes']} processes" if tr.get("processes", 1) > 1 else ""),
        ),
        *([("time budget", _plan_row(tr["plan"], tr))] if "plan" in tr else []),
        (
            "final losses",
            f"train {tr['final_train_loss']:.4g}, held-out "
            + ("-" if tr["best_val_loss"] is None else f"{tr['best_val_loss']:.4g}"),
        ),
        *[
            (f"calibration {k}", f"{v['n']} scores, {v['samples']} sample(s), median {v['median']:.4g}")
            for k, v in data["calibration"].items()
            if not k.startswith(PREFIX)
        ],
        *([("checks", _checks_row(data))] if "checks" in data else []),
        *([("local statistic", _local_row(data["local"]))] if "local" in data else []),
        *([("tiles", _tiles_row(data["tiles"]))] if "tiles" in data else []),
        *([("latent neighbours", _neighbours_row(data["neighbours"]))] if "neighbours" in data else []),
        ("versions", ", ".join(f"{k} {v}" for k, v in data["versions"].items())),
    ]
    for k, v in rows:
        table.add_row(k, escape(str(v)))
    out.print(table)


def settings_table(path: str | None, commands: dict[str, dict[str, dict[str, Any]]]) -> None:
    """`vae-anomaly config`: each command's settings, their values and where each came from."""
    err.print(f"settings file: {path}" if path else "no settings file here (vae-anomaly.toml or pyproject.toml)")
    table = Table("command", "setting", "value", "from")
    for name, rows in commands.items():
        for key, row in rows.items():
            value = row["value"]
            shown = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
            table.add_row(name, key, escape(shown), escape(str(row["origin"])))
    out.print(table)
