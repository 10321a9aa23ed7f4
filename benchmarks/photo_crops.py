"""A photo set as a new user meets it: JPEG crops of packaged photographs, and obviously bad images.

Normal images and clean incoming images are drawn the same way (exchangeable): crops of 100-250 px a
side, mixed aspect ratios, anywhere in scikit-image's astronaut, coffee, chelsea and rocket. The bad
ones are crops drawn the same way and then spoiled as a photo pipeline spoils them:

    dark (x 0.10-0.20), grey (saved as RGB), tiny (a 24-px thumbnail), blurred (Gaussian, sigma 3% of
    the short side), rotated (90, 180 or 270 degrees), other photo (crops of photographs not in the set).

Nothing is downloaded: every photograph ships inside scikit-image. `benchmarks/small_sets.py` uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

NORMAL_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
OTHER_PHOTOS = ("hubble_deep_field.jpg", "motorcycle_left.png", "retina.jpg", "ihc.png")
# The kinds the targets name ("dark, grey and tiny"); the others are reported beside them.
OBVIOUS = ("dark", "grey", "tiny")


def _photos(names: tuple[str, ...]) -> list[Image.Image]:
    import skimage

    folder = Path(skimage.__file__).resolve().parent / "data"
    return [Image.open(folder / name).convert("RGB") for name in names]


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of 100-250 px a side, anywhere in the photo."""
    w, h = img.size
    cw, ch = (int(rng.integers(100, min(250, side) + 1)) for side in (w, h))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _scale(img: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) * factor + 0.5, 0, 255).astype(np.uint8))


def _tiny(img: Image.Image, _rng: np.random.Generator) -> Image.Image:
    s = 24 / max(img.size)
    return img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.LANCZOS)


SPOIL: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "dark": lambda im, rng: _scale(im, rng.uniform(0.10, 0.20)),
    "grey": lambda im, rng: im.convert("L").convert("RGB"),
    "tiny": _tiny,
    "blurred": lambda im, rng: im.filter(ImageFilter.GaussianBlur(0.03 * min(im.size))),
    "rotated": lambda im, rng: im.transpose(
        (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[int(rng.integers(3))]
    ),
}
KINDS = (*SPOIL, "other photo")


def write(folder: Path, kind: str, images: list[Image.Image]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        path = folder / f"{kind.replace(' ', '_')}_{i:05d}.jpg"
        im.save(path, quality=90)
        paths.append(str(path))
    return paths


def build(
    folder: Path, n_train: int, n_held: int, per_kind: int, seed: int
) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(training files, held-out clean files, bad files by kind), written under `folder`."""
    rng = np.random.default_rng(seed)
    photos, others = _photos(NORMAL_PHOTOS), _photos(OTHER_PHOTOS)

    def crops(m: int, pool: list[Image.Image]) -> list[Image.Image]:
        return [crop(pool[int(rng.integers(len(pool)))], rng) for _ in range(m)]

    train = write(folder / "train", "normal", crops(n_train, photos))
    held = write(folder / "incoming", "clean", crops(n_held, photos))
    bad = {
        kind: write(folder / "incoming", kind, [fn(im, rng) for im in crops(per_kind, photos)])
        for kind, fn in SPOIL.items()
    }
    bad["other photo"] = write(folder / "incoming", "other photo", crops(per_kind, others))
    return train, held, bad
