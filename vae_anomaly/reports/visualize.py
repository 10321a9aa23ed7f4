"""Pictures of results: heat-map panels, score histograms, ROC and PR curves.

Everything returns PNG bytes or Pillow images, so the CLI can write files and
the HTML report can embed the same bytes. Charts are drawn by matplotlib
(the optional `report` extra) on the Agg backend: no display, no window.
Heat-map panels are composed with Pillow, since `score --heatmaps` may write
thousands of them and a matplotlib figure per image would be slow.
Nothing here imports torch, click or rich.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..decision.thresholds import Threshold
from ..errors import MissingExtraError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CMAP = "inferno"  # perceptually uniform, and readable in greyscale print
PANEL = 192  # px per panel side in heat-map PNGs
INSTALL_HINT = "pip install 'vae-anomaly[report]' (or: pip install 'matplotlib>=3.7')"


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a `MissingExtraError` that says what to install."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(f"plots, heat maps and HTML reports need matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_available() -> None:
    """Fail early (before scoring 100,000 images) when matplotlib is missing."""
    _pyplot()


def colour_table() -> np.ndarray:
    """The colour map as a (256, 3) uint8 table, so that colouring a map is one fancy index."""
    _pyplot()
    from matplotlib import colormaps

    table: np.ndarray = (colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)
    return table


# ----------------------------------------------------------------- images
def to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) with C in {1, 3}, or (H, W) -> (H, W, 3)."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    a = a.transpose(1, 2, 0)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def png_bytes(rgb: np.ndarray | Image.Image) -> bytes:
    img = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.ascontiguousarray(rgb))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def map_range(heat: np.ndarray) -> tuple[float, float]:
    """Colour scale of one map: its own minimum to maximum.

    The Gaussian decoder's per-pixel NLL has a floor of log sigma + log(2 pi)/2
    (a perfect reconstruction), which may be negative; the minimum is at or
    near that floor, so colour shows excess surprise over a good pixel.
    """
    lo, hi = float(np.min(heat)), float(np.max(heat))
    return lo, max(hi, lo + 1e-9)


def heat_overlay(
    image: np.ndarray, heat: np.ndarray, vrange: tuple[float, float] | None = None, lut: np.ndarray | None = None
) -> np.ndarray:
    """The map in colour over a dimmed grey copy of the input, (H, W, 3) uint8.

    Opacity grows with the value, so cool parts let the input show through
    and hot parts are unmistakable.
    """
    lut = colour_table() if lut is None else lut
    lo, hi = vrange or map_range(heat)
    t = np.clip((np.asarray(heat, np.float64) - lo) / (hi - lo), 0.0, 1.0)
    colour = lut[(t * 255).round().astype(int)].astype(np.float64)
    grey = to_rgb(image).astype(np.float64).mean(axis=2, keepdims=True) * 0.6
    alpha = (0.35 + 0.65 * t)[..., None]
    blended: np.ndarray = (grey * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)
    return blended


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heatmap_panel(
    image: np.ndarray,
    reconstruction: np.ndarray,
    heat: np.ndarray,
    *,
    caption: str = "",
    lut: np.ndarray | None = None,
    local: np.ndarray | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """input | reconstruction | map over the input [| the local statistic's map, its most unusual
    region boxed], side by side, with labels and the map's scale.

    Small inputs are enlarged with nearest-neighbour so pixels stay pixels.
    """
    lut = colour_table() if lut is None else lut
    vrange = map_range(heat)
    tiles = [to_rgb(image), to_rgb(reconstruction), heat_overlay(image, heat, vrange, lut)]
    labels = ["input", "reconstruction", "-log p(x|z) per pixel"]
    if local is not None:
        tiles.append(heat_overlay(image, local, lut=lut))
        labels.append("local: patch distance / bound")
    h, w = tiles[0].shape[:2]
    k = max(1, PANEL // max(h, w))
    pw, ph = w * k, h * k
    gap, top, bottom = 8, 22, 34
    canvas = Image.new("RGB", (len(tiles) * (pw + gap) + gap, top + ph + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x0 = gap + i * (pw + gap)
        canvas.paste(Image.fromarray(tile).resize((pw, ph), Image.Resampling.NEAREST), (x0, top))
        draw.text((x0, 4), label, fill="black", font=font)
    if local is not None and box is not None:  # the region, in working-size pixels
        x0 = gap + 3 * (pw + gap)
        bx0, by0, bx1, by1 = (v * k for v in box)
        draw.rectangle((x0 + bx0, top + by0, x0 + bx1 - 1, top + by1 - 1), outline="#00e5ff", width=2)
    # Colour bar under the map, with its two ends in nats.
    x0, y0 = gap + 2 * (pw + gap), top + ph + 6
    bar = Image.fromarray(np.repeat(lut[None], 8, axis=0)).resize((pw, 8), Image.Resampling.BILINEAR)
    canvas.paste(bar, (x0, y0))
    small = _font(11)
    draw.text((x0, y0 + 10), f"{vrange[0]:.3g}", fill="black", font=small)
    hi_text = f"{vrange[1]:.3g} nats"
    draw.text((x0 + pw - draw.textlength(hi_text, font=small), y0 + 10), hi_text, fill="black", font=small)
    if caption:
        draw.text((gap, y0 + 2), caption[:60], fill="#333333", font=small)
    return canvas


# ----------------------------------------------------------------- charts
def _figure_png(fig: Figure) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_histogram(
    groups: Mapping[str, np.ndarray], threshold: Threshold | None = None, *, score: str = "elbo", title: str = ""
) -> bytes:
    """Overlaid density histograms on shared bins (e.g. calibration normals against the scored batch),
    with the decision's bounds drawn: the auto rule may have a low and a high one."""
    plt = _pyplot()
    finite = [np.asarray(v, np.float64)[np.isfinite(v)] for v in groups.values()]
    pooled = np.concatenate([v for v in finite if len(v)] or [np.zeros(1)])
    lo, hi = np.percentile(pooled, [0.0, 100.0])
    if threshold is not None:
        for b in (threshold.low, threshold.high):
            if b is not None and np.isfinite(b):
                lo, hi = min(lo, b), max(hi, b)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    colours = ["#4c72b0", "#dd8452", "#c44e52", "#55a868"]
    for i, ((name, _), values) in enumerate(zip(groups.items(), finite, strict=True)):
        if len(values):
            ax.hist(
                values,
                bins=bins,
                density=True,
                alpha=0.55,
                color=colours[i % len(colours)],
                label=f"{name} (n={len(values):,})",
            )
    if threshold is not None:
        for bound, side in ((threshold.low, "low"), (threshold.high, "high")):
            if bound is not None:
                ax.axvline(bound, color="black", linestyle="--", linewidth=1.2)
                ax.annotate(
                    f"{side} bound {bound:.4g}",
                    (bound, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(3, -12),
                    textcoords="offset points",
                    fontsize=8,
                )
    ax.set_xlabel(f"{score} score (higher = more anomalous)")
    ax.set_ylabel("density")
    ax.set_title(title or f"{score} scores", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    return _figure_png(fig)


def roc_curves(labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> bytes:
    """ROC curve of each score type (sklearn's roc_curve), with its AUC in the legend."""
    from sklearn import metrics as skm

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, s in scores.items():
        fpr, tpr, _ = skm.roc_curve(labels, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.roc_auc_score(labels, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title("ROC", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _figure_png(fig)


def pr_curves(labels: np.ndarray, scores: Mapping[str, np.ndarray]) -> bytes:
    """Precision-recall curve of each score type, with its average precision and the chance level."""
    from sklearn import metrics as skm

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for name, s in scores.items():
        precision, recall, _ = skm.precision_recall_curve(labels, s)
        ax.plot(recall, precision, label=f"{name} (AP {skm.average_precision_score(labels, s):.3f})")
    ax.axhline(float(np.mean(labels)), color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    return _figure_png(fig)
