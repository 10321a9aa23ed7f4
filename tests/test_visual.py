"""Heat maps, plots and the HTML report: correct, escaped, small, and rendered by a real browser."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import crosses, disks
from vae_anomaly import Detector
from vae_anomaly.calibration import p_values
from vae_anomaly.cli import main
from vae_anomaly.decision import DecisionRule, auto_threshold
from vae_anomaly.html_report import RowImages, render_html
from vae_anomaly.report import build_report
from vae_anomaly.visualize import heatmap_panel, png_bytes, score_histogram

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


def test_heatmap_panel_shows_three_labelled_panels(fitted: Detector) -> None:
    hm = fitted.heatmap(crosses(1, seed=5))
    panel = heatmap_panel(hm.images[0], hm.reconstructions[0], hm.maps[0], caption="#1")
    assert panel.width > 3 * 192 and panel.height > 192
    assert png_bytes(panel)[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def mixed_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """incoming/ plus an anomaly and an unreadable file with markup in their names."""
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(data_dir / "incoming", root, dirs_exist_ok=True)
    shutil.copy(data_dir / "incoming" / "cross_0001.png", root / f"{EVIL}.png")
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
    assert (tmp_path / "plots" / "histogram_elbo-ic.png").exists()
    assert f"wrote {flagged} heat map(s)" in err and "heat map" not in out


def test_histogram_draws_both_bounds_of_the_two_sided_rule() -> None:
    cal = np.random.default_rng(0).normal(size=500)
    rule = auto_threshold(cal, 0.05, "two-sided")
    png = score_histogram({"calibration": cal, "batch": cal + 1}, rule)
    assert rule.low is not None and rule.high is not None and png[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert len(imgs) == 3 * 30 + 1, "three pictures per top row, one histogram"
    assert "Gate FAILED" in text and "exit code 1" in text
    assert "Unreadable files (1)" in text and "not a readable image" in text


def test_report_stays_small_and_fast_for_100000_images() -> None:
    rng = np.random.default_rng(0)
    cal = rng.normal(size=400)
    scores = rng.normal(size=100_000)
    decision = DecisionRule("elbo", guard=None).decision(scores, p_values(cal, scores), cal)
    paths = [f"batch/img_{i:06d}.png" for i in range(len(scores))]
    errors = [(f"batch/bad_{i}.png", "empty file (0 bytes)") for i in range(5000)]
    t0 = time.perf_counter()
    report = build_report(
        paths, scores, errors, decision, calibration=cal, score="elbo",
        samples=1, ignored=0, fingerprint="f" * 16, gate=[], skip_unreadable=False,
    )  # fmt: skip
    hist = score_histogram({"calibration": cal, "scored": scores}, decision.threshold)
    tiny = png_bytes(np.zeros((16, 16, 3), np.uint8))
    pics = {r.path: RowImages(tiny, tiny, tiny) for r in report.records[:50]}
    page = render_html(report, histogram=hist, images=pics, top=50)
    seconds = time.perf_counter() - t0
    assert seconds < 10 and len(page.encode()) < 1_000_000, (seconds, len(page))
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
    assert len(imgs) == 91 and dom.count('<td class="num">') >= 30 * 3
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

    for path in Path(vae_anomaly.__file__).parent.glob("*.py"):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("click", "rich") for n in names), f"{path.name} imports {names}"
