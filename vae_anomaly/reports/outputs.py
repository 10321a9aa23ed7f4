"""Every file `score` and `merge` write besides stdout: the report, JUnit, HTML, heat maps, plots.

Each write goes through `write_file`, so any path that cannot be written is
one `OutputError` (exit 2) naming the path and the system's reason. What
was written is narrated through `on_message` (the CLI prints it on stderr).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import OutputError
from ..images.listing import IMAGE_EXTENSIONS
from . import ci, html_report, visualize
from .report import WRITERS, ImageRecord, Report

if TYPE_CHECKING:
    from ..decision.thresholds import Threshold
    from ..model.inference import HeatMaps

Say = Callable[[str], None]
EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".csv": "csv"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The files this process wrote, in order: an interrupted command says which are new (each is whole) and
# so which others still hold an earlier run's contents.
WRITTEN: list[str] = []


def _written_through(path: Path) -> bool:
    """Whether `path` is a device, FIFO or socket (`/dev/stdout`, a named pipe), or a path under /dev or
    /proc: written to as it is, never replaced by a regular file."""
    try:
        st = os.stat(path)  # follows links: /dev/stdout -> /proc/self/fd/1 -> a tty, pipe or file
    except OSError:
        return False
    return not stat.S_ISREG(st.st_mode) or os.path.abspath(path).startswith(("/dev/", "/proc/"))


def write_file(path: Path, data: bytes | str, what: str) -> None:
    """Write `data` to `path` atomically, creating its folder; an `OutputError` says which path failed and why.

    A temporary file in the same folder, then `os.replace`: a full disk, a
    crash or Ctrl-C leaves the previous file whole, never a truncated one.
    Atomic replacement is for regular files: a symbolic link is followed and
    its target replaced (the link stays), and a device, FIFO or /dev path
    (`--output /dev/stdout`) is written through, never replaced.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if _written_through(path):
        try:
            with open(path, "wb") as fh:
                fh.write(raw)
        except OSError as exc:
            raise OutputError(f"cannot write {what} to {os.fsdecode(path)}: {exc.strerror or exc}") from None
        WRITTEN.append(os.fsdecode(path))
        return
    path = Path(os.path.realpath(path))  # a link's target, which the link goes on naming
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide a report from the CI job's other users
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, path)
        tmp = None
        WRITTEN.append(os.fsdecode(path))
    except OSError as exc:
        raise OutputError(f"cannot write {what} to {os.fsdecode(path)}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def output_format(output: Path | None, fmt: str) -> str:
    """With --output and no --format, the format comes from the file's extension."""
    if output is not None and fmt == "table":
        fmt = EXTENSIONS.get(output.suffix.lower(), "")
        if not fmt:
            raise OutputError(f"--output {os.fsdecode(output)}: say which format with --format json|jsonl|csv")
    return fmt


@dataclass(frozen=True)
class Outputs:
    """What to write besides the terminal table, and where."""

    format: str = "table"  # table, json, jsonl or csv
    output: Path | None = None  # None: the report goes to stdout
    junit: Path | None = None
    html: Path | None = None
    html_top: int = 50
    heatmaps: Path | None = None
    plots: Path | None = None

    @property
    def pictures(self) -> bool:
        return bool(self.heatmaps or self.plots or self.html)

    def files(self) -> dict[str, Path]:
        """The output files asked for, by option."""
        named = {"--output": self.output, "--junit": self.junit, "--html": self.html}
        return {option: path for option, path in named.items() if path is not None}

    def folders(self) -> dict[str, Path]:
        named = {"--heatmaps": self.heatmaps, "--plots": self.plots}
        return {option: path for option, path in named.items() if path is not None}

    def check(self, model: Path | None, inputs: tuple[Path, ...]) -> None:
        """Refuse outputs that would overwrite the model, an input or each other (before anything is read).

        An input is a file named directly, or an image file under an input
        folder (what the listing reads); picture folders may not lie inside
        an input folder, whose next listing would read their PNGs.
        """
        where = {"the model file": model} if model is not None else {}
        taken: dict[str, str] = {os.path.realpath(p): what for what, p in where.items()}
        folders = [os.path.realpath(p) for p in inputs if Path(p).is_dir()]
        for p in inputs:
            if not Path(p).is_dir():
                taken.setdefault(os.path.realpath(p), f"the input {os.fsdecode(p)}")
        for option, path in self.files().items():
            check_output(option, path, taken, folders)
            taken[os.path.realpath(path)] = f"also the {option} file"
        for option, path in self.folders().items():
            real = os.path.realpath(path)
            inside = next((f for f in folders if os.path.commonpath([f, real]) == f), None)
            if real in taken or inside is not None:
                what = taken.get(real) or f"inside the input folder {inside}, whose images its PNGs would join"
                raise OutputError(f"{option} {os.fsdecode(path)} is {what}; choose a folder outside the inputs")


def check_output(option: str, path: Path, taken: dict[str, str], folders: list[str]) -> None:
    """Refuse an output file that is already something (`taken`: real path -> what), or an image file under
    an input folder (the listing reads it: an input)."""
    real = os.path.realpath(path)
    if real in taken:
        raise OutputError(f"{option} {os.fsdecode(path)} is {taken[real]}; writing it there would destroy it")
    inside = next((f for f in folders if os.path.commonpath([f, real]) == f), None)
    if inside is not None and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
        raise OutputError(
            f"{option} {os.fsdecode(path)} is an image file under the input folder {inside}; writing it there "
            "would destroy an input"
        )


def check_model_output(path: Path, inputs: Sequence[Path]) -> None:
    """`fit -o`: never one of the inputs, nor an image file under an input folder."""
    folders = [os.path.realpath(p) for p in inputs if Path(p).is_dir()]
    taken = {os.path.realpath(p): f"the input {os.fsdecode(p)}" for p in inputs if not Path(p).is_dir()}
    check_output("-o", path, taken, folders)


def report_text(report: Report, outputs: Outputs, on_message: Say) -> str | None:
    """The machine-readable report: written to --output (returns None), or returned for stdout."""
    if outputs.format == "table":
        return None
    text = WRITERS[outputs.format](report)
    if outputs.output is None:
        return text
    write_file(outputs.output, text, "the report")
    on_message(f"wrote {os.fsdecode(outputs.output)}")
    return None


def ci_outputs(report: Report, junit: Path | None, github: bool, on_message: Say, on_warning: Say) -> list[str]:
    """JUnit XML when asked; on GitHub Actions the job summary, and the annotation lines to print on stderr."""
    if junit is not None:
        write_file(junit, ci.to_junit(report), "JUnit XML")
        on_message(f"wrote {os.fsdecode(junit)} (JUnit XML)")
    if not (github and os.environ.get("GITHUB_ACTIONS")):
        return []
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        try:
            ci.append_step_summary(report, summary_file)
        except OutputError as exc:  # the verdict and its exit code still stand
            on_warning(str(exc))
    return ci.github_annotations(report)


def safe_name(path: str) -> str:
    """A file-name fragment from any input path: letters, digits, dot, dash, underscore."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "image"
    return stem[:80]


def pictured(report: Report, outputs: Outputs) -> list[ImageRecord]:
    """The records `pictures` draws: the HTML page's top rows and, with --heatmaps, every flagged image."""
    if not (outputs.heatmaps or outputs.html):
        return []
    ranked = [r for r in report.records if r.error is None]
    top = outputs.html_top if outputs.html else 0
    wanted = {r.path: r for r in ranked[:top]}
    if outputs.heatmaps:
        wanted.update({r.path: r for r in ranked if r.flagged})
    return list(wanted.values())


def pictures(
    report: Report,
    threshold: Threshold,
    outputs: Outputs,
    *,
    calibration: np.ndarray,
    maps: Iterable[tuple[Sequence[ImageRecord], HeatMaps]],
    model: str,
    inputs: str,
    on_message: Say,
    on_warning: Say,
) -> None:
    """Heat maps of flagged images, the histogram, the HTML report: only what was asked for. `maps`: the
    heat maps of the records `pictured` chose, a chunk at a time, computed by the caller."""
    if not outputs.pictures:
        return
    s = report.summary
    histogram = None
    if outputs.plots or outputs.html:
        ranked = np.array([r.score for r in report.records if r.error is None])
        histogram = visualize.score_histogram(
            {"calibration (normal)": calibration, "scored batch": ranked},
            threshold,
            score=s.score,
            title=f"{s.score}: {s.flagged:,} of {s.scored:,} flagged; {s.rule}",
        )
        if outputs.plots:
            target = outputs.plots / f"histogram_{s.score}.png"
            write_file(target, histogram, "the score histogram")
            on_message(f"wrote {os.fsdecode(target)}")
    top = outputs.html_top if outputs.html else 0
    rows: dict[str, html_report.RowImages] = {}
    lut = None
    written = 0
    for chunk, found in maps:
        lut = visualize.colour_table() if lut is None else lut
        for e in found.errors:
            on_warning(f"no heat map for {e.path}: {e.reason} (it changed since it was scored?)")
        by_path = {r.path: r for r in chunk}
        for j, path in enumerate(found.paths):
            rec = by_path[path]
            img, rec_img, heat = found.images[j], found.reconstructions[j], found.maps[j]
            local = None if found.local is None else found.local[j]
            box = None if found.regions is None else _box(found.regions[j])
            if outputs.heatmaps and rec.flagged:
                caption = f"#{rec.rank}  score {rec.score:.4g}  p {rec.p_value:.4f}"
                panel = visualize.heatmap_panel(img, rec_img, heat, caption=caption, lut=lut, local=local, box=box)
                target = outputs.heatmaps / f"{rec.rank:05d}_{safe_name(path)}.png"
                write_file(target, visualize.png_bytes(panel), "a heat map")
                written += 1
            if outputs.html and rec.rank is not None and rec.rank <= top:
                rows[path] = html_report.RowImages(
                    visualize.png_bytes(visualize.to_rgb(img)),
                    visualize.png_bytes(visualize.to_rgb(rec_img)),
                    visualize.png_bytes(visualize.heat_overlay(img, heat, lut=lut)),
                    None if local is None else visualize.png_bytes(visualize.heat_overlay(img, local, lut=lut)),
                )
    if outputs.heatmaps:
        try:
            outputs.heatmaps.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write heat maps to {outputs.heatmaps}: {exc.strerror or exc}") from None
        on_message(f"wrote {written} heat map(s) of flagged images to {os.fsdecode(outputs.heatmaps)}")
    if outputs.html:
        page = html_report.render_html(report, histogram=histogram, images=rows, top=top, model=model, inputs=inputs)
        write_file(outputs.html, page, "the HTML report")
        on_message(f"wrote {os.fsdecode(outputs.html)} ({len(page.encode()) / 1024:,.0f} KiB)")


def _box(region: np.ndarray) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in region)
    return x0, y0, x1, y1
