"""Image properties a person can name: brightness, contrast, sharpness, information, colour, size, format.

Each is one number per image, computed from the decoded pixels at the
working size (vectorised over a batch, in the process that assembles
batches, so cached files get them too) or from the file's own header
(width, height, format). `checks.py` calibrates them against the normal
images; this module only measures. No torch.

Luminance is ITU-R BT.601 luma, as Pillow's `convert("L")` computes it:
    Y = 0.299 R + 0.587 G + 0.114 B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from .decoding import Source

_LUMA = np.array([0.299, 0.587, 0.114])
_OPPONENT = np.array([[1.0, -1.0, 0.0], [0.5, 0.5, -1.0]], dtype=np.float32)  # rg, yb


@dataclass(frozen=True)
class Property:
    """One property: how it is named, which side of it is atypical, and the words for each side."""

    name: str
    what: str  # the statistic in words, for reasons and README
    tail: str  # "two-sided", "lower" (only too low is odd) or "upper"
    low: str  # the image compared with normal ones when the value is low, e.g. "darker"
    high: str
    unit: str = ""
    digits: int = 0  # decimals shown in reasons
    # The side(s) the decision's one test takes (`combination.SIDES`), or None: reported, not tested.
    # Both sides only where both catch bad images on the benchmarks (too dark and too bright; plainer
    # and busier; content moved either way: balance-x and balance-y find half-occluded digits,
    # benchmarks/corruptions.py, 48.6% without them against 100% with), one where only one does
    # (blurrier, greyer, smaller). Stored in the model file at fit (`checks.calibrate`), so a later
    # change here never moves an old model's verdicts.
    decided: str | None = "two-sided"


PROPERTIES: tuple[Property, ...] = (
    Property("brightness", "mean brightness (0-255)", "two-sided", "darker", "brighter"),
    Property(
        "highlights",
        "99th-percentile brightness",
        "lower",
        "darker in its brightest parts",
        "brighter",
        decided="lower",
    ),
    Property(
        "shadows", "1st-percentile brightness", "upper", "darker", "lighter in its darkest parts", decided="upper"
    ),
    Property(
        "contrast",
        "contrast (RMS, brightness std)",
        "two-sided",
        "flatter",
        "more contrasted",
        digits=1,
        decided="lower",
    ),
    Property(
        "sharpness",
        "sharpness (variance of the Laplacian)",
        "two-sided",
        "blurrier",
        "sharper or noisier",
        decided="lower",
    ),
    Property("entropy", "information (entropy, bits/pixel)", "two-sided", "plainer", "busier", digits=2),
    Property(
        "colourfulness", "colourfulness (Hasler-Suesstrunk)", "two-sided", "greyer", "more colourful", decided="lower"
    ),
    Property("saturation", "colour spread (max - min channel)", "lower", "greyer", "more saturated", decided="lower"),
    Property(
        "balance-x",
        "brightness centroid, share of the width right of the centre",
        "two-sided",
        "with its bright content further left",
        "with its bright content further right",
        digits=3,
    ),
    Property(
        "balance-y",
        "brightness centroid, share of the height below the centre",
        "two-sided",
        "with its bright content higher up",
        "with its bright content lower down",
        digits=3,
    ),
    Property("width", "width", "two-sided", "narrower", "wider", unit=" px", decided="lower"),
    Property("height", "height", "two-sided", "shorter", "taller", unit=" px", decided="lower"),
    Property("aspect", "aspect ratio (width/height)", "two-sided", "taller in shape", "wider in shape", digits=2),
    Property(
        "format",
        "share of normal images in its file format",
        "lower",
        "in a rarer file format",
        "",
        digits=3,
        decided="lower",
    ),
    # Not measured here: the fitted model's patch bank gives it (local.py), at score time.
    Property(
        "local",
        "largest patch distance to normal patches, over its bound",
        "upper",
        "closer to normal patches",
        "with a region farther from every normal patch",
        digits=2,
        decided="upper",
    ),
)
BY_NAME = {p.name: p for p in PROPERTIES}
HEADER = ("width", "height", "aspect", "format")  # read from the file's header, not its pixels


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over the last axis, from float32 sums (6x faster than .std in float64)."""
    n = a.shape[-1]
    mean = a.sum(axis=-1, dtype=np.float64) / n
    squares = np.einsum("...i,...i->...", a, a).astype(np.float64) / n
    return mean, np.sqrt(np.maximum(squares - mean * mean, 0.0))


def measure(pixels: np.ndarray, sources: Sequence[Source]) -> dict[str, np.ndarray]:
    """Every numeric property of a batch: uint8 (B, C, H, W) at the working size, and each file's header.

    `format` is not here: its value is the format's share among the
    calibration images, which `checks.py` looks up. About 15 us an image
    at 48x48 RGB on one core (benchmarks/quality_checks.py measures it).
    """
    u = np.asarray(pixels, dtype=np.uint8)
    x = u.astype(np.float32)
    b = len(x)
    grey = x[:, 0] if x.shape[1] == 1 else np.einsum("c,bchw->bhw", _LUMA.astype(np.float32), x)
    flat = grey.reshape(b, int(np.prod(grey.shape[1:])))
    out: dict[str, np.ndarray] = {}
    out["brightness"], out["contrast"] = _mean_std(flat)
    # The Laplacian over each image's two spatial axes (not across the batch): d2/dy2 + d2/dx2.
    lap = ndimage.correlate1d(grey, [1.0, -2.0, 1.0], axis=1, mode="reflect")
    lap += ndimage.correlate1d(grey, [1.0, -2.0, 1.0], axis=2, mode="reflect")
    out["sharpness"] = _mean_std(lap.reshape(flat.shape))[1] ** 2
    # Where the bright content lies: the luma-weighted centroid, as a share of the side from the
    # centre (-0.5 to 0.5); a black frame has none and sits at the centre.
    h, w = grey.shape[1:]
    total = flat.sum(axis=1, dtype=np.float64)
    for name, profile, side in (("balance-x", grey.sum(axis=1), w), ("balance-y", grey.sum(axis=2), h)):
        centre = profile.astype(np.float64) @ (np.arange(side) + 0.5)
        out[name] = np.divide(centre, total, out=np.full(b, side / 2), where=total > 0) / side - 0.5
    # 256-level histogram of each image's luma (grey pixels are their own levels; RGB luma is rounded).
    levels = u[:, 0].reshape(flat.shape).astype(np.intp) if x.shape[1] == 1 else np.rint(flat).astype(np.intp)
    levels += 256 * np.arange(b, dtype=np.intp)[:, None]
    counts = np.bincount(levels.ravel(), minlength=256 * b).reshape(b, 256)
    # Shannon entropy in bits, -sum p log2 p, with SciPy's elementwise -p log p (`entr`).
    out["entropy"] = special.entr(counts / max(flat.shape[1], 1)).sum(axis=1) / np.log(2)
    # Percentiles from the same histogram (the lowest level holding that share of the pixels): a
    # sort per image (np.percentile) costs 30 us at 48x48, this a cumulative sum.
    cum = np.cumsum(counts, axis=1)
    for name, q in (("shadows", 0.01), ("highlights", 0.99)):
        out[name] = np.argmax(cum >= q * flat.shape[1], axis=1).astype(np.float64)
    if x.shape[1] == 3:
        # Hasler & Suesstrunk (2003): M = sigma_rgyb + 0.3 mu_rgyb, with rg = R - G, yb = (R + G)/2 - B
        # and sigma_rgyb = sqrt(sigma_rg^2 + sigma_yb^2), mu_rgyb likewise.
        rgyb = np.einsum("kc,bchw->kbhw", _OPPONENT, x).reshape(2, *flat.shape)
        mean, std = _mean_std(rgyb)
        out["colourfulness"] = np.hypot(std[0], std[1]) + 0.3 * np.hypot(mean[0], mean[1])
        out["saturation"] = np.ptp(u, axis=1).reshape(flat.shape).mean(axis=1, dtype=np.float64)
    size = np.array([s[:2] for s in sources], dtype=np.float64).reshape(-1, 2)
    out["width"], out["height"] = size[:, 0], size[:, 1]
    out["aspect"] = size[:, 0] / np.maximum(size[:, 1], 1.0)
    return out


def formats(sources: Sequence[Source]) -> list[str]:
    """Each file's format as Pillow names it ("JPEG", "PNG", ...; "" for arrays)."""
    return [s[3] for s in sources]
