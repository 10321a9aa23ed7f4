"""Decoding one image file safely into a uint8 array, and what it says about the file.

A file that cannot be decoded raises `ImageReadError` with a reason a person
can act on; batching turns it into a `ReadError` record, so nothing here
stops a run on a bad image. No torch: decoding workers import this module.
"""

from __future__ import annotations

import errno
import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, ImageReadError
from .listing import display_path

try:  # libjpeg-turbo with DCT scaling: the fast path for JPEG files (see _turbo); Pillow without it
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    _simplejpeg = None
_ORIENTATION = 0x0112  # the EXIF tag `exif_transpose` applies

GREY_MODES: frozenset[str] = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})
DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
RESIZE_RULE = "stretch-bilinear"  # resize to size x size, aspect not kept; Pillow antialiases
# The largest side the global model sees by default (`fit --image-size` overrides). Measured on
# benchmarks/photos.py (benchmarks/README.md): 48 px ranks photo anomalies as 32 px does and 0.02
# ROC-AUC below 64 px, while its network scores 2.7x faster than at 64 px, which keeps `score` at
# 1,000 photos/s on 2 cores.
WORKING_SIZE = 48
LEGACY_PNG_LEVEL = 9  # what model files without a png_level were calibrated with
# Deflate level of the complexity term L(x) (png_bits): measured to rank as level 9 does at half its
# cost (benchmarks/one_class.py and photos.py --png-levels, benchmarks/README.md).
PNG_LEVEL = 1


# What the decoder read from each file's header: width, height, colour, format (Pillow's name, "" for arrays).
Source = tuple[int, int, bool, str]


@dataclass(frozen=True)
class ReadError:
    """One file that could not be used, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Preprocessing:
    """How files become model inputs; stored in the model file and replayed at score time."""

    channels: int  # 1 = grey, 3 = RGB
    size: int  # square side in pixels
    resize: str = RESIZE_RULE
    scaling: str = "x/255"  # uint8 -> [0, 1]
    # The training files' shortest and longest side in pixels (None for arrays and older model files):
    # what "far from the training images' size" is measured against, not the working size.
    sides: tuple[int, int] | None = None
    # Deflate level of the complexity term's PNG length (png_bits); model files written before it was
    # stored used level 9, and are scored with it.
    png_level: int = PNG_LEVEL

    def __post_init__(self) -> None:
        # Checked here, not only in fit: a model file can carry any values under a valid checksum.
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 4 <= self.size <= 1024:
            raise ConfigError(f"preprocessing size must be a whole number from 4 to 1024, got {self.size!r}")
        ok = self.sides is None or (
            len(self.sides) == 2 and all(isinstance(v, int) for v in self.sides) and 1 <= self.sides[0] <= self.sides[1]
        )
        if not ok:
            raise ConfigError(f"preprocessing sides must be (shortest, longest) in pixels, got {self.sides!r}")
        if isinstance(self.png_level, bool) or self.png_level not in range(10):
            raise ConfigError(f"preprocessing png_level must be a whole number from 0 to 9, got {self.png_level!r}")
        if self.resize != RESIZE_RULE or self.scaling != "x/255":
            raise ConfigError(
                f"preprocessing {self.resize!r} with scaling {self.scaling!r} is not one this version applies "
                f"({RESIZE_RULE!r}, 'x/255')"
            )

    def describe(self, backbone: bool = False) -> str:
        """The working-size rule as applied to this model, in words (`info` shows it); with `backbone`,
        the size is the backbone's input and there is no complexity term."""
        colour = "grey" if self.channels == 1 else "RGB"
        text = f"{colour} {self.size}x{self.size}, stretched (bilinear, aspect not kept), pixels x/255"
        if self.sides is not None:
            shortest, longest = self.sides
            rule = (
                "the backbone's input size"
                if backbone
                else f"their native size up to {WORKING_SIZE} px unless --image-size set it"
            )
            text += f"; training files {shortest}-{longest} px a side; the working size is {rule}"
        return text if backbone else text + f"; complexity term: PNG at deflate level {self.png_level}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.sides is None:
            del d["sides"]  # a model file without it reads as before
        else:
            d["sides"] = list(self.sides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        sides = d.get("sides")
        pair = None if sides is None else (int(sides[0]), int(sides[1]))
        level = int(d.get("png_level", LEGACY_PNG_LEVEL))
        return cls(int(d["channels"]), int(d["size"]), str(d["resize"]), str(d["scaling"]), pair, level)


# What `_open` refuses to open, by the file type `os.stat` reports (after following links).
_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _open(path: Path) -> Image.Image:
    """Open lazily, refusing decompression bombs from the header alone, and anything but a regular file.

    A FIFO would block the read forever, a device would stream without end;
    both are refused from `os.stat` without being opened. Pillow's other
    warnings (corrupt EXIF and the like) are silenced: the image either
    decodes or becomes an error record.
    """
    kind = stat.S_IFMT(os.stat(path).st_mode)
    if kind in _NOT_REGULAR:
        raise ImageReadError(f"not a regular file but {_NOT_REGULAR[kind]}: only regular files are read")
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fsdecode(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def _explain(path: Path, exc: BaseException) -> str:
    """Turn a decoding failure into a reason a person can act on."""
    try:
        if path.is_file() and path.stat().st_size == 0:
            return "empty file (0 bytes)"
    except OSError:
        pass
    if isinstance(exc, ImageReadError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "file not found (a dangling symbolic link?)"
    if isinstance(exc, PermissionError):
        return "permission denied: make the file readable"
    if isinstance(exc, IsADirectoryError):
        try:
            os.listdir(path)
        except OSError as listing:  # the listing named it because it could not walk it
            return f"a folder that cannot be read ({listing.strerror}): its images were not scored; make it readable"
        return "is a folder, not an image file"
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image: unknown format or corrupt header"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return bomb_reason()
    msg = str(exc).strip() or type(exc).__name__
    if "truncated" in msg.lower() or isinstance(exc, EOFError):
        return f"truncated or corrupt image data ({msg})"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot read file: {os.strerror(exc.errno)}"
    return f"cannot decode image: {msg}"


def _to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Grey or RGB, with 16-bit and float grey rescaled rather than clipped."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if arr.max(initial=0.0) <= 1.0 else 255.0
        else:
            top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if channels == 1:
        return img.convert("L")
    return img.convert("RGB")


def bomb_reason(pixels: int | None = None) -> str:
    """Why a file whose header declares too many pixels is refused: one limit, ours (Pillow's own text
    names twice it, where its error starts)."""
    declared = "more pixels" if pixels is None else f"{pixels:,} pixels, more"
    return (
        f"refused before decoding: the header declares {declared} than the limit of {Image.MAX_IMAGE_PIXELS:,} "
        "(a decompression bomb?); --max-image-pixels raises the limit"
    )


def over_pixel_limit(width: int, height: int) -> bool:
    """Whether a file of this size is refused by the decompression-bomb limit now in force."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > limit


def set_max_image_pixels(limit: int | None) -> None:
    """Raise or lower the decompression-bomb limit (Pillow's, default 89,478,485 pixels).

    Files whose header declares more pixels are refused before any pixel is
    decoded. None restores Pillow's default.
    """
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS if limit is None else int(limit)


def decode_image(path: Path, prep: Preprocessing, source: dict[str, Any] | None = None) -> np.ndarray:
    """One file -> uint8 (C, size, size). EXIF orientation applied, first frame only.

    Raises `ImageReadError` with a human reason on any failure. If `source`
    is given, it receives the file's own size, whether it was colour and its
    format, so callers can warn about images unlike the training ones and
    measure their properties (properties.py).
    """
    try:
        with _open(path) as img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            if source is not None:
                # The size as the image is shown: a quarter turn (EXIF orientations 5-8) swaps the sides,
                # so that width, height and every box in a record are in the upright image's pixels.
                w, h = img.size
                source["size"] = (h, w) if img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8) else (w, h)
                source["colour"] = img.mode not in GREY_MODES
                source["format"] = img.format or ""
            fast = None
            if img.format == "JPEG":
                # Decode a big JPEG at a reduced DCT scale straight away (still >= the target size):
                # `draft` sets the scale and the reduced size, and decodes nothing yet.
                img.draft("L" if prep.channels == 1 else "RGB", (prep.size, prep.size))
                fast = _turbo(img, prep)
            if fast is not None:
                img = fast
            else:
                img.load()
                img = ImageOps.exif_transpose(img)
                img = _to_mode(img, prep.channels)
            if img.size != (prep.size, prep.size):
                img = img.resize((prep.size, prep.size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # a corrupt file makes Pillow raise almost anything: each becomes a reason
        raise ImageReadError(_explain(path, exc)) from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def read_upright(path: Path, channels: int, reduce: float = 1.0) -> tuple[Image.Image, float]:
    """One file as an upright (EXIF applied) grey or RGB image, and how many file pixels each of its
    pixels spans: a JPEG is decoded at the largest DCT reduction that keeps its sides >= 1/`reduce` of
    the file's (tiles.py asks for just the detail its tiles keep). Raises `ImageReadError`."""
    try:
        with _open(path) as img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            width = img.size[0]
            if img.format == "JPEG" and reduce > 1:
                wanted = (math.ceil(img.size[0] / reduce), math.ceil(img.size[1] / reduce))
                img.draft("L" if channels == 1 else "RGB", wanted)
            img.load()
            scale = width / img.size[0]
            out = _to_mode(ImageOps.exif_transpose(img), channels)
    except Exception as exc:  # as decode_image: every failure becomes a reason
        raise ImageReadError(_explain(path, exc)) from exc
    return out, scale


def _turbo(img: Image.Image, prep: Preprocessing) -> Image.Image | None:
    """A drafted JPEG's pixels from simplejpeg (libjpeg-turbo) at the size `draft` set, or None for Pillow's path.

    Measured 1.4-3x faster than Pillow's open-draft-load on 96-256 px photos
    (benchmarks/README.md), and the same pixels: the same libjpeg scaling, colour
    conversion and upsampling. Pillow has already parsed the header (the
    decompression-bomb check, the mode, EXIF); anything but a plain RGB or
    grey JPEG with no rotation, and any error, goes to Pillow, whose
    message then explains the failure.
    """
    if _simplejpeg is None or img.mode not in ("RGB", "L") or img.getexif().get(_ORIENTATION, 1) != 1:
        return None
    if not isinstance(img, ImageFile.ImageFile) or img.fp is None:
        return None
    try:  # the smallest libjpeg scale that gives at least the drafted size is the drafted scale itself
        img.fp.seek(0)  # Pillow's open file, read from the start: the file is not opened a second time
        arr = _simplejpeg.decode_jpeg(
            img.fp.read(),
            colorspace="GRAY" if prep.channels == 1 else "RGB",
            min_height=img.height,
            min_width=img.width,
        )
    except Exception:  # a file simplejpeg refuses is decoded (or explained) by Pillow
        return None
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def _is_colour(img: Image.Image) -> bool:
    if img.mode in GREY_MODES:
        return False
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))


def infer_preprocessing(
    files: Sequence[Path], image_size: int | None = None, channels: int | None = None, largest: int = WORKING_SIZE
) -> tuple[Preprocessing, list[ReadError]]:
    """Decide grey or colour and the working size from the training images.

    Colour if any image really holds colour (an RGB file of grey pixels is
    grey). Size: the images' native size (their common side when they are
    all one square size, else the median shorter side), at most
    `largest` (WORKING_SIZE): small images (digits, icons) keep every pixel, and
    larger ones are stretched to WORKING_SIZE x WORKING_SIZE.
    """
    sizes: list[int] = []  # each file's shorter side
    longest = 0
    colour = False
    errors: list[ReadError] = []
    for path in files:
        try:
            with _open(path) as img:
                w, h = img.size
                if channels is None and not colour:
                    colour = _is_colour(img)
        except Exception as exc:  # as in decode_image: a bad file is a record, never a crash
            errors.append(ReadError(display_path(path), _explain(path, exc)))
            continue
        sizes.append(min(w, h))
        longest = max(longest, w, h)
    if not sizes:
        return Preprocessing(channels or 1, image_size or 28), errors
    if image_size is None:
        native = sizes[0] if len(set(sizes)) == 1 else int(np.median(sizes))
        image_size = int(np.clip(native, 4, largest))
    sides = (min(sizes), longest)
    return Preprocessing(channels or (3 if colour else 1), int(image_size), sides=sides), errors


def png_bits(pixels: np.ndarray, level: int = PNG_LEVEL) -> np.ndarray:
    """Lossless PNG length of each uint8 (C, H, W) image, in bits, at deflate `level`.

    The generic compressor of Serra et al. (2020): its code length L(x) is
    an estimate of the image's complexity that knows nothing of the data set.
    It lives here, not in scores.py, so that decoding workers compute it
    without importing torch.
    """
    out = np.empty(len(pixels))
    for i, img in enumerate(pixels):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=level)
        out[i] = 8 * buf.getbuffer().nbytes
    return out


# Inputs unlike the training images, converted anyway: kind -> (count, an example path).
Unlike = dict[str, tuple[int, str]]


def unlike_kinds(width: int, height: int, colour: bool, prep: Preprocessing) -> list[str]:
    """How an input differs from what the model was trained on, beyond a plain resize."""
    kinds = []
    if colour and prep.channels == 1:
        kinds.append("colour images converted to grey")
    if not colour and prep.channels == 3:
        kinds.append("grey images converted to colour")
    shortest, longest = prep.sides or (prep.size, prep.size)
    if max(width, height) > 4 * longest or min(width, height) < shortest / 2:
        trained = f"{prep.size}x{prep.size}" if prep.sides is None else f"with sides {shortest} to {longest} px"
        kinds.append(f"images far from the size of the training images ({trained}), resized")
    return kinds


def merge_unlike(
    parts: Iterable[Mapping[str, tuple[int, str]]], position: Callable[[str], int] | None = None
) -> Unlike:
    """Counts of several parts (batches, shards) added up; each kind's example is its first image.

    Without `position` the parts come in listing order, so the first example
    seen wins. Shards come in shard order: `position(path)` gives an
    example's place in the whole listing, and the earliest one wins. Kinds
    are listed in the order of their examples, as one pass over the listing
    reports them.
    """
    best: dict[str, list[Any]] = {}  # kind -> [count, example, sort key]
    seq = 0
    for part in parts:
        for kind, (count, example) in part.items():
            key = (position(example) if position is not None else 0, seq)
            seq += 1
            if kind not in best:
                best[kind] = [count, example, key]
                continue
            best[kind][0] += count
            if key < best[kind][2]:
                best[kind][1:] = [example, key]
    ranked = sorted(best.items(), key=lambda kv: kv[1][2])
    return {kind: (v[0], v[1]) for kind, v in ranked}


def unlike_warnings(unlike: Mapping[str, tuple[int, str]]) -> list[str]:
    """One warning per kind of input unlike the training images: kind -> (count, first example)."""
    return [
        f"{count} {kind} (e.g. {example}); scores of such images are less reliable"
        for kind, (count, example) in unlike.items()
    ]
