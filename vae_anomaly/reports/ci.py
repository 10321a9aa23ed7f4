"""What CI systems read: the plain-text verdict, JUnit XML, and GitHub annotations and job summary.

Every writer takes a finished `report.Report`; none decides anything.
"""

from __future__ import annotations

import html
import os
import re
import xml.etree.ElementTree as ET

from ..decision.gate import GateCheck
from ..errors import OutputError
from .report import Report, duplicates_text, reasons_text


def _gate_line(c: GateCheck) -> str:
    op = "<=" if c.fails_when == "value > limit" else ">"
    return f"{c.name}: {c.value:.4g} {op} {c.limit:g} {'pass' if c.passed else 'FAIL'}"


def verdict_lines(report: Report) -> list[str]:
    """The verdict in plain text: the rule, its guarantee, every gate rule, the outcome."""
    s = report.summary
    lines = [
        f"{s.flagged} of {s.scored} scored images flagged, {s.unreadable} unreadable, {s.ignored} ignored",
        f"rule: {s.rule}",
        f"guarantee: {s.guarantee}",
    ]
    if s.duplicates or s.leaks:
        lines.append(duplicates_text(s))
    if s.smallest_p_value is not None:
        models = f"{s.models} cross-fitted models, " if s.models > 1 else ""
        lines.append(
            f"calibration: {models}{s.calibration_images} normal scores; smallest reachable p-value "
            f"{s.smallest_p_value:.4g}"
        )
    for t in s.tests.values():
        lines.append(f"test {t['name']}: p = {t['p_value']:.4g} ({t['detail']})")
    for c in s.gate:
        lines.append(f"gate {_gate_line(c)}")
    if s.gate:
        lines.append(f"verdict: gate {'PASSED' if s.gate_passed else 'FAILED'}, exit code {s.exit_code}")
    else:
        lines.append(f"verdict: no gate asked for, exit code {s.exit_code}")
    return lines


# Characters XML 1.0 cannot hold at all, escaped or not (its Char production): C0 controls but
# tab, newline and carriage return; the surrogates; U+FFFE and U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """`text` with every character XML 1.0 cannot hold written as a visible escape, e.g. \\x01."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def to_junit(report: Report) -> str:
    """JUnit XML: one test case per image; flagged and unreadable images are failures.

    ElementTree escapes markup (<, &, quotes) in every name and message;
    `xml_text` replaces what XML 1.0 cannot hold even escaped (control
    characters in a file name), so the document is always well-formed.
    """
    s = report.summary
    failures = sum(1 for r in report.records if r.flagged or r.error)
    root = ET.Element("testsuites", name="vae-anomaly", tests=str(len(report.records)), failures=str(failures))
    suite = ET.SubElement(
        root, "testsuite", name="vae-anomaly score", tests=str(len(report.records)), failures=str(failures), errors="0"
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("rule", s.rule),
        ("guarantee", s.guarantee),
        ("model", s.model_fingerprint or ""),
        ("gate", "none" if not s.gate else ("passed" if s.gate_passed else "failed")),
        *((f"gate.{c.name}", _gate_line(c)) for c in s.gate),
        ("exit_code", str(s.exit_code)),
    ):
        ET.SubElement(props, "property", name=key, value=xml_text(value))
    for r in report.records:
        case = ET.SubElement(suite, "testcase", classname="vae-anomaly", name=xml_text(r.path))
        if r.error is not None:
            error = xml_text(r.error)
            ET.SubElement(case, "failure", type="unreadable", message=f"unreadable: {error}").text = error
        elif r.flagged:
            why = xml_text(reasons_text(r))
            msg = f"anomaly: {why}; score {r.score:.6g}, p-value {r.p_value:.4g}, rank {r.rank}"
            ET.SubElement(case, "failure", type="anomaly", message=msg).text = f"{msg}\nrule: {xml_text(s.rule)}"
        elif r.duplicate_of is not None:
            ET.SubElement(case, "system-out").text = xml_text(reasons_text(r))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def github_escape_data(text: str) -> str:
    """Escape a workflow-command message: %, CR and LF (GitHub's `escapeData`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_escape_property(text: str) -> str:
    """Escape a workflow-command property value: as data, plus ':' and ',' (`escapeProperty`)."""
    return github_escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(report: Report, limit: int = 50) -> list[str]:
    """`::warning file=PATH,title=...::message` lines for flagged, unreadable and duplicated files.

    GitHub shows at most 10 warnings a step inline, so more than `limit` are
    summed up in one last line rather than flooding the log.
    """
    lines = []
    bad = [r for r in report.records if r.flagged or r.error or r.duplicate_of is not None]
    for r in bad[:limit]:
        if r.error is not None:
            title, msg = "unreadable image", f"{r.path}: {r.error}"
        elif r.flagged:
            title = "anomalous image"
            msg = f"{r.path}: {reasons_text(r)}; score {r.score:.6g}, p-value {r.p_value:.4g} (rank {r.rank})"
        else:
            title = "training image in the batch" if r.leak else "duplicate image"
            msg = f"{r.path}: {reasons_text(r)}"
        lines.append(
            f"::warning file={github_escape_property(r.path)},title={github_escape_property(title)}"
            f"::{github_escape_data(msg)}"
        )
    if len(bad) > limit:
        lines.append(
            f"::warning title=vae-anomaly::{len(bad) - limit} more flagged, unreadable or duplicated images "
            "(see report)"
        )
    return lines


def _md(text: str) -> str:
    """Markdown-safe table cell: pipes and backticks would break the table, and GitHub renders the HTML a
    file name may hold (`<img src=...>`, `<a href>`), so markup is escaped as entities."""
    text = html.escape(text, quote=True)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def github_summary(report: Report, top: int = 20) -> str:
    """A Markdown job summary: verdict, gate rules, and the most anomalous images."""
    s = report.summary
    if s.gate:
        head = "✅ gate passed" if s.gate_passed else "❌ gate failed"
    else:
        head = "no gate"
    lines = [
        f"### vae-anomaly: {head} (exit code {s.exit_code})",
        "",
        f"{s.flagged} of {s.scored} scored images flagged, {s.unreadable} unreadable; {duplicates_text(s)}. "
        f"Rule: {_md(s.rule)}. {_md(s.guarantee)}",
        "",
    ]
    if s.gate:
        lines += ["| rule | measured | limit | fails when | result |", "| --- | --- | --- | --- | --- |"]
        lines += [
            f"| {c.name} | {c.value:.4g} | {c.limit:g} | {c.fails_when} | {'pass' if c.passed else '**FAIL**'} |"
            for c in s.gate
        ]
        lines.append("")
    bad = [r for r in report.records if r.flagged or r.error or r.duplicate_of is not None]
    if bad:
        lines += ["| # | image | score | p-value | why |", "| --- | --- | --- | --- | --- |"]
        for r in bad[:top]:
            if r.error is not None:
                lines.append(f"| | {_md(r.path)} | | | unreadable: {_md(r.error)} |")
            else:
                why = ("anomaly: " if r.flagged else "") + reasons_text(r)
                lines.append(f"| {r.rank} | {_md(r.path)} | {r.score:.4g} | {r.p_value:.4g} | {_md(why)} |")
        if len(bad) > top:
            lines.append(f"\n{len(bad) - top} more in the JSON or JUnit report.")
        lines.append("")
    return "\n".join(lines) + "\n"


def append_step_summary(report: Report, path: str | os.PathLike[str]) -> None:
    """Append the Markdown verdict to GitHub's $GITHUB_STEP_SUMMARY file."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(github_summary(report))
    except OSError as exc:
        raise OutputError(
            f"could not append to $GITHUB_STEP_SUMMARY ({os.fsdecode(path)}): {exc.strerror or exc}"
        ) from None
