"""`score --html`: one self-contained HTML file a reviewer can open from a CI artifact.

Images are embedded as base64 `data:` URIs; there is no script, no external
style sheet, no font or network request. Every path, message and reason
passes through `html.escape`, so a file named `<img src=x onerror=alert(1)>.png`
is shown as text. The size stays bounded for large runs: only the top N
records get images and a table row, and the histogram is one picture.
Nothing here imports torch, click or rich.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from .. import __version__
from .report import ImageRecord, Report, duplicate_text, duplicates_text, near_miss

MAX_UNREADABLE_ROWS = 1000  # beyond this the table says how many more; the JSON output has them all


@dataclass(frozen=True)
class RowImages:
    """PNG bytes of what the model saw, what it gave back, and the heat map, for one record."""

    image: bytes
    reconstruction: bytes
    heatmap: bytes
    local: bytes | None = None  # the local statistic's map (local.py), for model files that have it


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="{cls}" alt="{_e(alt)}" src="data:image/png;base64,{data}">'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;max-width:1180px;
padding:0 16px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ec;padding-bottom:4px}
.meta{color:#5b6475;font-size:12.5px}
.verdict{border-radius:8px;padding:14px 18px;margin:16px 0;font-size:18px;font-weight:600}
.pass{background:#e6f4ea;color:#1e6b34;border:1px solid #b7dfc2}
.fail{background:#fdecea;color:#a3231a;border:1px solid #f3b9b3}
.warnbox{background:#fff7e0;color:#7a5200;border:1px solid #f0d58c}
.nogate{background:#eef2f8;color:#2b3d5c;border:1px solid #cdd7e6}
.verdict small{display:block;font-size:13px;font-weight:400;margin-top:4px}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:4px 18px;margin:0}
dl.summary dt{color:#5b6475}dl.summary dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}th,td{padding:6px 8px;border-bottom:1px solid #eceef2;text-align:left;
vertical-align:middle}th{background:#f6f7f9;font-weight:600;font-size:12.5px;color:#3a4252;position:sticky;top:0}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.path{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;overflow-wrap:anywhere;max-width:380px}
img.px{width:72px;height:72px;image-rendering:pixelated;border:1px solid #d5d9e0;background:#000;display:block}
img.chart{max-width:100%;height:auto}
.flag{display:inline-block;padding:1px 7px;border-radius:10px;font-size:12px;font-weight:600}
.flag.yes{background:#fdecea;color:#a3231a}.flag.no{background:#eef1f4;color:#566070}
.why{margin:4px 0 0;padding-left:16px;font-size:12px;color:#3d4653;max-width:28em}
ul.warnings{color:#7a5200}
"""


def _verdict(report: Report) -> str:
    s = report.summary
    if s.gate:
        checks = "; ".join(
            f"{c.name}: {c.value:.4g} (limit {c.limit:g}) {'pass' if c.passed else 'FAIL'}" for c in s.gate
        )
        cls, head = ("pass", "Gate PASSED") if s.gate_passed else ("fail", "Gate FAILED")
        detail = f"{s.flagged} of {s.scored} scored images flagged; {checks}"
    else:
        cls = "nogate" if s.flagged == 0 else "warnbox"
        head = f"{s.flagged} of {s.scored} images flagged (no gate set)"
        detail = "Add --max-anomalies or --max-anomaly-rate to make flagged images fail the run."
    if s.unreadable:
        detail += f"; {s.unreadable} file(s) could not be read"
        if not s.skip_unreadable and cls != "fail":
            cls = "warnbox"
    return f'<div class="verdict {cls}">{_e(head)} &middot; exit code {s.exit_code}<small>{_e(detail)}</small></div>'


def _p_floor(report: Report) -> str:
    """Why many rows share one p-value: the decision rule cannot give a smaller one (the summary says which)."""
    s = report.summary
    if s.smallest_p_value is None:
        return "-"
    n, floor = s.calibration_images, s.smallest_p_value
    # 1/(n+1): the rule is one test, whatever its tail and guard.
    formula = f"1/(n+1), n = {n:,}" if floor < 1 else f"n = {n:,}"
    return (
        f"{floor:.4g} ({formula}): an image further out than every calibration image gets it; such ties are "
        "ranked by distance from the calibration median"
    )


def _why(r: ImageRecord, level: float | None) -> str:
    """A record's reasons (checks.py) and the image it copies, as a short list beside its pictures; for a
    near miss, its most atypical statistics with their p-values."""
    if near_miss(r, level):
        items = [_e(f"near miss: {a.text} (p {a.p_value:.2g})") for a in r.atypical]
    else:
        items = [_e(reason.text) for reason in r.reasons]
    if r.duplicate_of is not None:
        items.append(_e(duplicate_text(r)))
    return '<ul class="why">' + "".join(f"<li>{item}</li>" for item in items) + "</ul>" if items else ""


def render_html(
    report: Report,
    *,
    histogram: bytes | None = None,
    images: Mapping[str, RowImages] | None = None,
    top: int = 50,
    title: str = "vae-anomaly report",
    model: str = "",
    inputs: str = "",
) -> str:
    """The whole page as one string. `images` maps a record's path to its pictures (top records only)."""
    s = report.summary
    scored = [r for r in report.records if r.error is None]
    unreadable = [r for r in report.records if r.error is not None]
    parts = [*_head(report, title, model, inputs), *_summary(report)]
    if histogram is not None:
        parts += ["<h2>Scores</h2>", _img(histogram, f"histogram of {s.score} scores", "chart")]
    parts += _top_table(scored, images or {}, top, s.effective_fpr)
    parts += _unreadable_table(unreadable)
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _head(report: Report, title: str, model: str, inputs: str) -> list[str]:
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network, no script: nothing this page refers to can be fetched or run.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="meta">{_e(created)} &middot; vae-anomaly {_e(__version__)}'
        + (f" &middot; model {_e(model)}" if model else "")
        + (f" &middot; inputs {_e(inputs)}" if inputs else "")
        + "</div>",
        _verdict(report),
    ]


def _summary(report: Report) -> list[str]:
    s = report.summary
    rows = [
        ("images", f"{s.total:,} files: {s.scored:,} scored, {s.unreadable:,} unreadable, {s.ignored:,} ignored"),
        ("flagged", f"{s.flagged:,} ({s.flagged / s.scored:.1%} of scored)" if s.scored else "0"),
        ("score", f"{s.score} ({s.samples} Monte Carlo sample(s))"),
        ("rule", s.rule),
        ("calibration", f"{s.calibration_images:,} held-out normal images"),
        ("duplicates", duplicates_text(s)),
        ("p-value floor", _p_floor(report)),
        ("model fingerprint", s.model_fingerprint or "-"),
    ]
    parts = ["<h2>Summary</h2>", '<dl class="summary">']
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows]
    parts.append("</dl>")
    if report.warnings:
        parts.append('<ul class="warnings">' + "".join(f"<li>{_e(w)}</li>" for w in report.warnings) + "</ul>")
    return parts


def _top_table(scored: list[ImageRecord], images: Mapping[str, RowImages], top: int, fpr: float | None) -> list[str]:
    """The most anomalous `top` records with their pictures, most anomalous first."""
    shown = scored[:top]
    parts = [
        f"<h2>Most anomalous {len(shown):,} of {len(scored):,}</h2>"
        if len(scored) > len(shown)
        else f"<h2>All {len(scored):,} scored images, most anomalous first</h2>",
        '<p class="meta">Images at the model\'s input size. Heat map: -log p(x|z) per pixel, averaged over the '
        "Monte Carlo draws, over a dimmed copy of the input; each map has its own colour scale (dark = as "
        "expected, bright yellow = most surprising pixel of that image). Local map: each pixel's largest distance "
        "to normal patches (the local statistic), on the same kind of scale.</p>",
    ]
    with_local = any(p.local is not None for p in images.values())
    local_head = "<th>local map</th>" if with_local else ""
    parts.append(
        '<table id="top"><thead><tr><th class="num">#</th><th>input</th><th>reconstruction</th><th>heat map</th>'
        f'{local_head}<th class="num">score</th><th class="num">p-value</th><th>flag</th><th>path</th>'
        "</tr></thead><tbody>"
    )
    parts += [_top_row(r, images.get(r.path), with_local, fpr) for r in shown]
    parts.append("</tbody></table>")
    if len(scored) > len(shown):
        parts.append(
            f'<p class="meta">{len(scored) - len(shown):,} more not shown (raise --html-top, or use --format json '
            "for every record).</p>"
        )
    return parts


def _top_row(r: ImageRecord, pics: RowImages | None, with_local: bool, fpr: float | None) -> str:
    cells = (
        [
            _img(pics.image, "input", "px"),
            _img(pics.reconstruction, "reconstruction", "px"),
            _img(pics.heatmap, "heat map", "px"),
            _img(pics.local, "local map", "px") if pics.local is not None else "",
        ]
        if pics
        else ["", "", "", ""]
    )
    local_cell = f"<td>{cells[3]}</td>" if with_local else ""
    flag = ('<span class="flag yes">ANOMALY</span>' if r.flagged else '<span class="flag no">ok</span>') + _why(r, fpr)
    return (
        f'<tr><td class="num">{r.rank}</td><td>{cells[0]}</td><td>{cells[1]}</td><td>{cells[2]}</td>{local_cell}'
        f'<td class="num">{r.score:,.2f}</td><td class="num">{r.p_value:.4f}</td><td>{flag}</td>'
        f'<td class="path">{_e(r.path)}</td></tr>'
    )


def _unreadable_table(unreadable: list[ImageRecord]) -> list[str]:
    if not unreadable:
        return []
    parts = [
        f"<h2>Unreadable files ({len(unreadable):,})</h2>",
        '<table id="unreadable"><thead><tr><th>path</th><th>reason</th></tr></thead><tbody>',
    ]
    parts += [
        f'<tr><td class="path">{_e(r.path)}</td><td>{_e(r.error)}</td></tr>' for r in unreadable[:MAX_UNREADABLE_ROWS]
    ]
    parts.append("</tbody></table>")
    if len(unreadable) > MAX_UNREADABLE_ROWS:
        parts.append(f'<p class="meta">{len(unreadable) - MAX_UNREADABLE_ROWS:,} more; see --format json.</p>')
    return parts
