"""Finding image files and decoding them safely into uint8 arrays.

A file that cannot be decoded becomes a `ReadError` with a reason a person
can act on; nothing here raises on a bad image. Only a missing input path
raises (`InputPathError`), because that is a usage mistake, not bad data.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
GREY_MODES: frozenset[str] = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})
DEFAULT_MAX_IMAGE_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
RESIZE_RULE = "stretch-bilinear"  # resize to size x size, aspect not kept; Pillow antialiases


class InputPathError(Exception):
    """An input path does not exist or holds no images: the user's mistake to fix."""


class ImageReadError(Exception):
    """A single file could not be decoded; its message is the reason."""


@dataclass(frozen=True)
class ReadError:
    """One file that could not be used, and why."""

    path: str
    reason: str


@dataclass
class FileListing:
    """The image files found under the inputs, in a repeatable order."""

    files: list[Path] = field(default_factory=list)
    ignored: int = 0  # hidden files and files without an image extension


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable form of any file name, including ones that are not UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(paths: Sequence[str | os.PathLike[str]]) -> FileListing:
    """Files named directly, and image files under folders, walked recursively.

    Folders are walked in sorted order so the listing is the same on every
    machine; hidden files and folders are skipped and counted as ignored,
    like non-image files. A file named directly is always kept, whatever its
    extension, so that a bad one is reported rather than silently skipped.
    """
    listing = FileListing()
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            listing.files.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for root, dirs, files in os.walk(p, followlinks=False):
                hidden_dirs = [d for d in dirs if d.startswith(".")]
                listing.ignored += len(hidden_dirs)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or not _is_image_name(name):
                        listing.ignored += 1
                    else:
                        add(Path(root) / name)
        elif p.exists() or p.is_symlink():
            add(p)
        else:
            raise InputPathError(
                f"{display_path(p)}: no such file or folder. Check the path, or quote it if it has spaces."
            )
    return listing


def require_images(listing: FileListing) -> list[Path]:
    """The listing's files, or the usage error every command gives for inputs without images."""
    if not listing.files:
        raise InputPathError(
            f"no image files found in the inputs ({listing.ignored} hidden or non-image files ignored); "
            "supported: PNG, JPEG, BMP, GIF, TIFF, WebP"
        )
    return listing.files


@dataclass(frozen=True)
class Preprocessing:
    """How files become model inputs; stored in the model file and replayed at score time."""

    channels: int  # 1 = grey, 3 = RGB
    size: int  # square side in pixels
    resize: str = RESIZE_RULE
    scaling: str = "x/255"  # uint8 -> [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(int(d["channels"]), int(d["size"]), str(d["resize"]), str(d["scaling"]))


def _open(path: Path) -> Image.Image:
    """Open lazily, refusing decompression bombs from the header alone.

    Pillow's other warnings (corrupt EXIF and the like) are silenced: the
    image either decodes or becomes an error record.
    """
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
    if isinstance(exc, FileNotFoundError):
        return "file not found (a dangling symbolic link?)"
    if isinstance(exc, PermissionError):
        return "permission denied: make the file readable"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image: unknown format or corrupt header"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (
            f"refused before decoding: the header declares more pixels than the limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} (a decompression bomb?); --max-image-pixels raises the limit ({exc})"
        )
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


def set_max_image_pixels(limit: int | None) -> None:
    """Raise or lower the decompression-bomb limit (Pillow's, default 89,478,485 pixels).

    Files whose header declares more pixels are refused before any pixel is
    decoded. None restores Pillow's default.
    """
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS if limit is None else int(limit)


def decode_image(path: Path, prep: Preprocessing, source: dict[str, Any] | None = None) -> np.ndarray:
    """One file -> uint8 (C, size, size). EXIF orientation applied, first frame only.

    Raises `ImageReadError` with a human reason on any failure. If `source`
    is given, it receives the file's own size and whether it was colour, so
    callers can warn about images unlike the training ones.
    """
    try:
        with _open(path) as img, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.seek(0)
            if source is not None:
                source["size"] = img.size
                source["colour"] = img.mode not in GREY_MODES
            if img.format == "JPEG":
                # Decode a huge JPEG at a reduced scale straight away (still >= the target size).
                img.draft("L" if prep.channels == 1 else "RGB", (prep.size, prep.size))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, prep.channels)
            if img.size != (prep.size, prep.size):
                img = img.resize((prep.size, prep.size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:
        raise ImageReadError(_explain(path, exc)) from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _is_colour(img: Image.Image) -> bool:
    if img.mode in GREY_MODES:
        return False
    rgb = np.asarray(img.convert("RGB"), dtype=np.int16)
    return bool(np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]))


def infer_preprocessing(
    files: Sequence[Path], image_size: int | None = None, channels: int | None = None
) -> tuple[Preprocessing, list[ReadError]]:
    """Decide grey or colour and the input size from the training images.

    Colour if any image really holds colour (an RGB file of grey pixels is
    grey). Size: the images' common size when they share one, else the
    median shorter side, kept within [8, 128] so training stays affordable.
    """
    sizes: list[int] = []
    colour = False
    errors: list[ReadError] = []
    for path in files:
        try:
            with _open(path) as img:
                w, h = img.size
                if channels is None and not colour:
                    colour = _is_colour(img)
        except Exception as exc:
            errors.append(ReadError(display_path(path), _explain(path, exc)))
            continue
        sizes.append(min(w, h) if w != h else w)
    if not sizes:
        return Preprocessing(channels or 1, image_size or 28), errors
    if image_size is None:
        if len(set(sizes)) == 1 and 4 <= sizes[0] <= 256:
            image_size = sizes[0]
        else:
            image_size = int(np.clip(np.median(sizes), 8, 128))
    return Preprocessing(channels or (3 if colour else 1), int(image_size)), errors


@dataclass
class ImageBatch:
    """Decoded pixels of the readable files of one batch, and the unreadable ones."""

    paths: list[str]
    pixels: np.ndarray  # uint8 (B, C, H, W)
    errors: list[ReadError]
    # Images unlike what the model expects, converted anyway: kind -> (count, an example path).
    unlike: dict[str, tuple[int, str]] = field(default_factory=dict)


def iter_batches(files: Sequence[Path], prep: Preprocessing, batch_size: int = 256) -> Iterator[ImageBatch]:
    """Decode files in batches, so memory stays bounded whatever the folder's size."""
    for start in range(0, len(files), batch_size):
        paths: list[str] = []
        arrays: list[np.ndarray] = []
        errors: list[ReadError] = []
        unlike: dict[str, tuple[int, str]] = {}
        for path in files[start : start + batch_size]:
            source: dict[str, Any] = {}
            try:
                arrays.append(decode_image(path, prep, source))
                paths.append(display_path(path))
            except ImageReadError as exc:
                errors.append(ReadError(display_path(path), str(exc)))
                continue
            for kind in _unlike(source, prep):
                count, example = unlike.get(kind, (0, paths[-1]))
                unlike[kind] = (count + 1, example)
        pixels = np.stack(arrays) if arrays else np.zeros((0, prep.channels, prep.size, prep.size), dtype=np.uint8)
        yield ImageBatch(paths, pixels, errors, unlike)


def unlike_warnings(unlike: dict[str, tuple[int, str]]) -> list[str]:
    """One warning per kind of input unlike the training images: kind -> (count, first example)."""
    return [
        f"{count} {kind} (e.g. {example}); scores of such images are less reliable"
        for kind, (count, example) in unlike.items()
    ]


def _unlike(source: dict[str, Any], prep: Preprocessing) -> list[str]:
    """How an input differs from what the model was trained on, beyond a plain resize."""
    kinds = []
    if source.get("colour") and prep.channels == 1:
        kinds.append("colour images converted to grey")
    if not source.get("colour", True) and prep.channels == 3:
        kinds.append("grey images converted to colour")
    w, h = source.get("size", (prep.size, prep.size))
    if max(w, h) > 4 * prep.size or min(w, h) < prep.size / 2:
        kinds.append(f"images far from the trained size {prep.size}x{prep.size}, resized")
    return kinds


def read_images(files: Sequence[Path], prep: Preprocessing) -> ImageBatch:
    """All files at once into one contiguous uint8 array (for training)."""
    batches = list(iter_batches(files, prep, batch_size=4096))
    return ImageBatch(
        [p for b in batches for p in b.paths],
        np.concatenate([b.pixels for b in batches])
        if batches
        else np.zeros((0, prep.channels, prep.size, prep.size), np.uint8),
        [e for b in batches for e in b.errors],
    )
