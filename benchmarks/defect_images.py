"""Textures and slide tiles with pasted defects of known masks, for benchmarks/defects.py.

Normal material: images that ship inside scikit-image and that no other benchmark uses (brick,
grass, gravel: grey textures; ihc: an immunohistochemistry slide, RGB). Each normal image is a
random square crop of one material, randomly flipped and rotated by a multiple of 90 degrees,
resized to the benchmark's side (256 px: a crop of 256 px, native; 1,024 px: a crop of 384 px
upsampled 2.67 times with Lanczos, since no bundled texture has 1,024 px of its own).

Defects, each with a boolean mask of its pixels, at an area of `area` times the image's:

    scratch       a thin straight band (1% of the side wide, at least 2 px), lighter or darker by 60-90 levels
    stain         an ellipse darkened to 55-70% and tinted, with a soft edge
    hole          a disc of near-black (0-20)
    colour spot   a disc of one saturated colour (grey materials see its luma)
    blur patch    a disc replaced by the same region blurred (Gaussian, sigma 3% of the side)
    foreign patch a square cut from another material, pasted in
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

MATERIALS = ("brick", "grass", "gravel", "ihc")
KINDS = ("scratch", "stain", "hole", "colour spot", "blur patch", "foreign patch")
AREAS = (0.01, 0.02, 0.05, 0.10)
# The largest crop of a 512-px material: images of more pixels are crops of this side upsampled, so
# that normal images still differ (a 512-px crop of a 512-px picture is the picture itself).
CROP = 384


def material(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 (H, W) or (H, W, 3), read from its file (no download)."""
    import skimage

    path = Path(skimage.__file__).resolve().parent / "data" / f"{name}.png"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB" if im.mode not in ("L", "I", "I;16") else "L"))


def normal_image(src: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """One normal image of `side` px: a random crop of `src`, flipped and rotated at random."""
    crop = min(side, CROP, src.shape[0], src.shape[1])
    y = int(rng.integers(0, src.shape[0] - crop + 1))
    x = int(rng.integers(0, src.shape[1] - crop + 1))
    a = np.rot90(src[y : y + crop, x : x + crop], int(rng.integers(4)))
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = np.ascontiguousarray(a)
    if crop != side:
        a = np.asarray(Image.fromarray(a).resize((side, side), Image.Resampling.LANCZOS))
    return a


def _disc(side: int, area: float, rng: np.random.Generator, aspect: float = 1.0) -> np.ndarray:
    """An ellipse of `area` x side^2 pixels at a random place wholly inside the image."""
    r = np.sqrt(area * side * side / np.pi)
    ry, rx = r * np.sqrt(aspect), r / np.sqrt(aspect)
    cy = rng.uniform(ry, side - ry)
    cx = rng.uniform(rx, side - rx)
    yy, xx = np.mgrid[:side, :side]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _band(side: int, area: float, rng: np.random.Generator) -> np.ndarray:
    """A straight band 1% of the side wide (>= 2 px) whose area is `area` x side^2 (widened if a
    diagonal is too short for it)."""
    width = max(2.0, 0.01 * side)
    length = area * side * side / width
    if length > 0.7 * side:
        length = 0.7 * side
        width = area * side * side / length
    angle = rng.uniform(0, np.pi)
    d = np.array([np.cos(angle), np.sin(angle)])
    half = np.minimum(0.5 * length * np.abs(d) + width, side / 2)
    c = np.array([rng.uniform(half[0], side - half[0]), rng.uniform(half[1], side - half[1])])
    yy, xx = np.mgrid[:side, :side]
    rel = np.stack([xx - c[0], yy - c[1]], -1)
    along = rel @ d
    across = rel @ np.array([-d[1], d[0]])
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)


def _colour(a: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    return rgb if a.ndim == 3 else np.array([0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]])


def _paint(a: np.ndarray, mask: np.ndarray, value: np.ndarray) -> np.ndarray:
    out = a.astype(np.float64)
    out[mask] = value if a.ndim == 3 else value[0] if value.ndim else value
    return out


def defect(
    a: np.ndarray, kind: str, area: float, rng: np.random.Generator, foreign: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(`a` with one defect of `kind` covering `area` of it, the defect's mask)."""
    side = a.shape[0]
    f = a.astype(np.float64)
    if kind == "scratch":
        mask = _band(side, area, rng)
        f[mask] = np.clip(f[mask] + rng.choice([-1, 1]) * rng.uniform(60, 90), 0, 255)
    elif kind == "stain":
        mask = _disc(side, area, rng, aspect=rng.uniform(0.5, 2.0))
        soft = ndimage.gaussian_filter(mask.astype(np.float64), 0.01 * side)
        tint = _colour(a, np.array([0.65, 0.55, 0.45]) * rng.uniform(0.85, 1.1))
        shade = 1.0 - soft[..., None] * (1.0 - tint) if a.ndim == 3 else 1.0 - soft * (1.0 - tint[0])
        f = f * shade
        mask = soft > 0.5
    elif kind == "hole":
        mask = _disc(side, area, rng)
        f[mask] = rng.uniform(0, 20)
    elif kind == "colour spot":
        mask = _disc(side, area, rng)
        rgb = np.array([[230, 40, 40], [40, 200, 60], [50, 80, 230], [240, 220, 30]][int(rng.integers(4))], float)
        f[mask] = _colour(a, rgb) if a.ndim == 3 else _colour(a, rgb)[0]
    elif kind == "blur patch":
        mask = _disc(side, area, rng)
        sigma = (0.03 * side, 0.03 * side, 0) if a.ndim == 3 else 0.03 * side
        f[mask] = ndimage.gaussian_filter(f, sigma)[mask]
    elif kind == "foreign patch":
        s = round(float(np.sqrt(area)) * side)
        y, x = (int(v) for v in rng.integers(0, side - s + 1, 2))
        patch = normal_image(foreign, side, rng)[:s, :s].astype(np.float64)
        if a.ndim == 3 and patch.ndim == 2:
            patch = np.repeat(patch[..., None], 3, -1)
        elif a.ndim == 2 and patch.ndim == 3:
            patch = patch @ np.array([0.299, 0.587, 0.114])
        f[y : y + s, x : x + s] = patch
        mask = np.zeros((side, side), bool)
        mask[y : y + s, x : x + s] = True
    else:
        raise ValueError(f"unknown defect kind {kind!r}")
    return np.clip(f + 0.5, 0, 255).astype(np.uint8), mask


def foreign_material(name: str) -> str:
    """The material a foreign patch is cut from: the next one in MATERIALS."""
    return MATERIALS[(MATERIALS.index(name) + 1) % len(MATERIALS)]
