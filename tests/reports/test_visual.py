"""Heat maps, plots and the HTML report: correct, escaped, small, and rendered by a real browser."""

from __future__ import annotations

import html
import io
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import crosses, disks
from vae_anomaly import Detector
from vae_anomaly.cli import main
from vae_anomaly.decision.calibration import Calibration
from vae_anomaly.decision.rule import DecisionRule
from vae_anomaly.decision.thresholds import auto_threshold
from vae_anomaly.reports.html_report import RowImages, render_html
from vae_anomaly.reports.report import build_report
from vae_anomaly.reports.visualize import colour_table, heat_overlay, heatmap_panel, png_bytes, score_histogram

EVIL = "<img src=x onerror=alert(1)>"


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------- heat maps
def test_heat_map_sums_to_the_reconstruction_term_of_the_score(fitted: Detector) -> None:
    x = np.concatenate([disks(6, seed=30), crosses(6, seed=31)])
    hm = fitted.heatmap(x)
    assert hm.maps.shape == (12, 16, 16) and hm.images.shape == hm.reconstructions.shape == (12, 1, 16, 16)
    elbo = fitted.score(x, score="elbo").scores
    np.testing.assert_allclose(hm.maps.sum(axis=(1, 2)) + hm.kl, elbo, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(hm.images, x[:, None])


def test_hottest_region_is_the_pasted_square(fitted: Detector) -> None:
    """A bright 4x4 square pasted into a normal image, in the corner away from its disk."""
    images, squares = [], []
    for im in disks(6, seed=77):
        im = im.copy()
        cy, cx = np.unravel_index(np.argmax(im), im.shape)
        r0, c0 = (1 if cy >= 8 else 11), (1 if cx >= 8 else 11)
        im[r0 : r0 + 4, c0 : c0 + 4] = 230
        images.append(im)
        squares.append((r0, c0))
    hm = fitted.heatmap(np.stack(images))
    for m, (r0, c0) in zip(hm.maps, squares, strict=True):
        inside = np.zeros(m.shape, bool)
        inside[r0 : r0 + 4, c0 : c0 + 4] = True
        y, x = np.unravel_index(np.argmax(m), m.shape)
        assert inside[y, x], f"hottest pixel {(y, x)} is outside the square at {(r0, c0)}"
        hottest16 = np.argsort(m.ravel())[-16:]
        assert inside.ravel()[hottest16].mean() >= 0.75


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a 1-d mask."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist(), strict=True))


def _pixels(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _enlarged(rgb: np.ndarray, k: int = 12) -> np.ndarray:
    return rgb.repeat(k, axis=0).repeat(k, axis=1)


def test_heatmap_panel_shows_input_reconstruction_and_map_side_by_side_each_labelled() -> None:
    """Each tile is its 16 px picture enlarged 12 times, pixel for pixel; nothing in them is pure white,
    so the white canvas frames each tile."""
    image = np.minimum(crosses(1, seed=5), 250)  # (1, 16, 16) uint8, like HeatMaps.images[i]
    reconstruction = np.minimum(disks(1, seed=5), 250)
    yy, xx = np.mgrid[0:16, 0:16]
    heat = np.exp(-((yy - 3.0) ** 2 + (xx - 12.0) ** 2) / 8.0)  # one hot spot, at row 3 and column 12
    px = _pixels(png_bytes(heatmap_panel(image, reconstruction, heat, caption="#1")))
    inked = (px != 255).any(axis=2)
    spans = _runs(inked.any(axis=0))
    assert [b - a for a, b in spans] == [192, 192, 192], f"three tiles with white between them: {spans}"
    tiles, labels, below, tops = [], [], [], []
    for a, b in spans:
        rows = [(r0, r1) for r0, r1 in _runs(inked[:, a:b].all(axis=1)) if r1 - r0 > 20]  # not the colour bar
        assert len(rows) == 1 and rows[0][1] - rows[0][0] == 192, f"one 192 px tile in columns {a}-{b}: {rows}"
        top = rows[0][0]
        tops.append(top)
        tiles.append(px[top : top + 192, a:b])
        labels.append((px[:top, a:b] < 100).all(axis=2))
        below.append(px[top + 192 :, a:b])
    assert len(set(tops)) == 1, f"the tiles stand in one row: {tops}"
    grey = [np.repeat(im[0][..., None], 3, axis=2).astype(np.int16) for im in (image, reconstruction)]
    np.testing.assert_array_equal(tiles[0], _enlarged(grey[0]), err_msg="the first tile is the input")
    np.testing.assert_array_equal(tiles[1], _enlarged(grey[1]), err_msg="the second is the reconstruction")
    np.testing.assert_array_equal(tiles[2], _enlarged(heat_overlay(image, heat).astype(np.int16)))
    assert (tiles[0] != tiles[1]).any(axis=2).mean() > 0.2, "input and reconstruction differ where the images do"
    # The third is the map over the input: the hottest pixel in the colour map's top colour, the
    # coolest a dimmed grey of the input under a little of the map's bottom colour.
    cells = tiles[2][::12, ::12]
    lut = colour_table().astype(np.int16)
    np.testing.assert_array_equal(cells[3, 12], lut[-1])
    np.testing.assert_allclose(cells[15, 0], 0.65 * 0.6 * image[0, 15, 0] + 0.35 * lut[0], atol=1)
    assert np.ptp(cells, axis=2).max() > 100, "the map is in colour"
    assert all(np.ptp(tile, axis=2).max() == 0 for tile in tiles[:2]), "input and reconstruction are grey"
    assert [int(label.sum() > 30) for label in labels] == [1, 1, 1], "each tile has its label above it, in dark text"
    assert (labels[0] != labels[1]).any() and (labels[1] != labels[2]).any() and (labels[0] != labels[2]).any()
    coloured = [int((np.ptp(strip, axis=2) > 60).sum()) for strip in below]
    assert coloured[0] == coloured[1] == 0 and coloured[2] > 500, f"a colour bar under the map alone: {coloured}"


@pytest.fixture(scope="session")
def mixed_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """incoming/ plus an anomaly and an unreadable file with markup in their names."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(data_dir / "incoming", root, dirs_exist_ok=True)
    # Noise, the farthest of all from the disks, so the report's top rows hold it whatever the ties
    # among crosses.
    with Image.open(data_dir / "incoming" / "cross_0001.png") as im:
        size = im.size
    noise = np.random.default_rng(7).integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(noise).save(root / f"{EVIL}.png")
    (root / f"{EVIL}broken.png").write_bytes(b"\x89PNG\r\n\x1a\n<script>alert(2)</script>")
    return root


def test_score_heatmaps_writes_one_png_per_flagged_image(model_file: Path, mixed_dir: Path, tmp_path: Path) -> None:
    code, out, err = run(
        "score", mixed_dir, "-m", model_file, "--heatmaps", tmp_path / "hm", "--plots", tmp_path / "plots"
    )
    assert code == 3, "an unreadable input still exits 3"
    flagged = int(re.search(r"(\d+) of \d+ scored images flagged", out).group(1))
    files = sorted(p.name for p in (tmp_path / "hm").iterdir())
    assert flagged > 20 and len(files) == flagged
    assert files[0].startswith("00001_") and all(n.endswith(".png") and "<" not in n for n in files)
    with Image.open(tmp_path / "hm" / files[0]) as im:
        assert im.width > 3 * 192
    assert (tmp_path / "plots" / "histogram_elbo-ic-nn.png").exists()
    assert f"wrote {flagged} heat map(s)" in err and "heat map" not in out


def _dashed_vertical_lines(png: bytes) -> list[float]:
    """x (px) of each dashed dark vertical line inside a chart's axes box, whose solid frame is not one."""
    dark = (_pixels(png) < 80).all(axis=2)

    def longest(lines: np.ndarray) -> np.ndarray:
        return np.array([max((b - a for a, b in _runs(line)), default=0) for line in lines])

    frame_x, frame_y = np.nonzero(longest(dark.T) > 100)[0], np.nonzero(longest(dark) > 100)[0]
    left, top = int(frame_x.min()) + 2, int(frame_y.min()) + 2
    inside = dark[top : int(frame_y.max()) - 1, left : int(frame_x.max()) - 1]
    height = inside.shape[0]
    dashed = [
        column.sum() > 0.4 * height and len(_runs(column)) >= 10 and longest(column[None])[0] < 0.1 * height
        for column in inside.T
    ]
    return [left + (a + b - 1) / 2 for a, b in _runs(np.array(dashed))]


def test_histogram_draws_a_dashed_line_at_each_bound_of_the_rule_and_none_for_a_missing_one() -> None:
    cal = np.random.default_rng(0).normal(size=500)
    groups = {"calibration": cal, "batch": cal + 1}
    rule = auto_threshold(cal, 0.05, "two-sided")
    assert rule.low is not None and rule.high is not None
    # Bounds inside the scores' range leave the x axis as it is, so a line's column follows its value alone.
    both = _dashed_vertical_lines(score_histogram(groups, rule))
    high = _dashed_vertical_lines(score_histogram(groups, replace(rule, low=None)))
    middle = _dashed_vertical_lines(score_histogram(groups, replace(rule, low=(rule.low + rule.high) / 2, high=None)))
    assert len(both) == 2 and len(high) == len(middle) == 1, (both, high, middle)
    assert both[1] - both[0] > 100, "low bound on the left, high bound on the right, far apart"
    assert both[1] == pytest.approx(high[0], abs=1)
    assert middle[0] == pytest.approx((both[0] + both[1]) / 2, abs=2), "each line stands at its bound's value"
    assert _dashed_vertical_lines(score_histogram(groups, replace(rule, low=None, high=None))) == []
    assert _dashed_vertical_lines(score_histogram(groups, None)) == []


# ---------------------------------------------------------------- HTML
class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture(scope="session")
def html_report(model_file: Path, mixed_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    page = tmp_path_factory.mktemp("html") / "report.html"
    code, out, err = run(
        "score", mixed_dir, "-m", model_file, "--html", page, "--html-top", "30", "--max-anomaly-rate", "0.1"
    )
    assert code == 1, err
    assert "wrote" in err and str(page) in err and "most anomalous first" in out
    return page


def test_report_parses_and_shows_evil_names_only_as_text(html_report: Path) -> None:
    raw = html_report.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(raw)
    parser.close()
    imgs = [a for t, a in parser.tags if t == "img"]
    assert all(set(a) == {"class", "alt", "src"} for a in imgs), "no onerror or any other attribute"
    assert all((a["src"] or "").startswith("data:image/png;base64,") for a in imgs), "everything embedded"
    assert not any(t == "script" for t, _ in parser.tags)
    assert EVIL not in raw and "<script>" not in raw
    text = "".join(parser.text)
    assert f"{EVIL}.png" in text and f"{EVIL}broken.png" in text, "the names are shown, as text"
    assert html.escape(EVIL) in raw
    assert len(imgs) == 4 * 30 + 1, (
        "four pictures per top row (input, reconstruction, heat map, local map), one histogram"
    )
    assert "Gate FAILED" in text and "exit code 1" in text
    assert "Unreadable files (1)" in text and "not a readable image" in text


def test_report_stays_small_and_fast_for_100000_images() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=400)
    scores = rng.normal(size=100_000)
    rule, calibration = DecisionRule("elbo", guard=None), Calibration({"elbo": cal})
    decision = rule.decision(scores, rule.p_values(calibration, scores), calibration)
    paths = [f"batch/img_{i:06d}.png" for i in range(len(scores))]
    errors = [(f"batch/bad_{i}.png", "empty file (0 bytes)") for i in range(5000)]
    report = build_report(
        paths, scores, errors, decision, calibration=cal, score="elbo",
        samples=1, ignored=0, fingerprint="f" * 16, skip_unreadable=False,
    )  # fmt: skip
    hist = score_histogram({"calibration": cal, "scored": scores}, decision.threshold)
    tiny = png_bytes(np.zeros((16, 16, 3), np.uint8))
    pics = {r.path: RowImages(tiny, tiny, tiny) for r in report.records[:50]}
    page = render_html(report, histogram=hist, images=pics, top=50)
    assert len(page.encode()) < 1_000_000, len(page)  # no wall-clock assert: a busy machine is not a bug
    assert page.count("<tr>") == 50 + 1000 + 2 and "4,000 more" in page


# ---------------------------------------------------------------- browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / f"profile{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.mark.slow  # two headless browser runs
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(html_report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", html_report.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), dtype=np.int16)
    assert px.shape[:2] == (2000, 1280) and px.std() > 20, "the page is not blank"
    red = (px[..., 0] > 150) & (px[..., 1] < 90) & (px[..., 2] < 90)
    assert red.sum() > 50, "the FAILED verdict is drawn in red"
    hot = (px[..., 0] > 200) & (px[..., 1] > 150) & (px[..., 2] < 120)
    assert hot.sum() > 100, "heat maps (yellow pixels) are visible"
    dom = _chromium(tmp_path, "--dump-dom", html_report.as_uri()).stdout
    parser = _Collector()
    parser.feed(dom)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) == 121 and dom.count('<td class="num">') >= 30 * 3
    assert f"{EVIL}.png" in "".join(parser.text), "the evil name is text in the live DOM too"
    assert not any("onerror" in a for _, a in parser.tags)


def test_visual_options_without_matplotlib_are_a_usage_error(
    model_file: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run("score", data_dir / "incoming", "-m", model_file, "--html", tmp_path / "r.html")
    assert code == 2 and out == "" and "vae-anomaly[report]" in err and not (tmp_path / "r.html").exists()


def test_library_modules_import_neither_click_nor_rich() -> None:
    import ast

    import vae_anomaly

    package = Path(vae_anomaly.__file__).parent
    for path in package.rglob("*.py"):  # every wing too, not only the top-level modules
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("click", "rich") for n in names), f"{path.name} imports {names}"


def test_the_panel_adds_the_local_map_with_its_region_boxed() -> None:
    image = np.minimum(crosses(1, seed=5), 250)
    yy, xx = np.mgrid[0:16, 0:16]
    heat = np.exp(-((yy - 3.0) ** 2 + (xx - 12.0) ** 2) / 8.0)
    px = _pixels(png_bytes(heatmap_panel(image, image, heat, local=heat, box=(8, 0, 16, 8))))
    spans = _runs((px != 255).any(axis=2).any(axis=0))
    assert [b - a for a, b in spans] == [192, 192, 192, 192], f"four tiles: {spans}"
    a, b = spans[3]
    cyan = (px[:, a:b] == (0, 229, 255)).all(axis=2)
    ys, xs = np.nonzero(cyan)
    assert len(xs) and xs.min() == 8 * 12 and xs.max() == 16 * 12 - 1, "the box spans columns 8-15 of the map"
    assert ys.max() - ys.min() == 8 * 12 - 1, "and rows 0-7"
