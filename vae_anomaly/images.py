"""Finding image files and decoding them safely into uint8 arrays.

A file that cannot be decoded becomes a `ReadError` with a reason a person
can act on; nothing here raises on a bad image. Only a missing input path
raises (`InputPathError`), because that is a usage mistake, not bad data.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import signal
import sqlite3
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
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


def png_bits(pixels: np.ndarray) -> np.ndarray:
    """Lossless PNG length of each uint8 (C, H, W) image, in bits (deflate level 9).

    The generic compressor of Serra et al. (2020): its code length L(x) is
    an estimate of the image's complexity that knows nothing of the data set.
    It lives here, not in scores.py, so that decoding workers compute it
    without importing torch.
    """
    out = np.empty(len(pixels))
    for i, img in enumerate(pixels):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=9)
        out[i] = 8 * buf.getbuffer().nbytes
    return out


@dataclass
class ImageBatch:
    """Decoded pixels of the readable files of one batch, and the unreadable ones."""

    paths: list[str]
    pixels: np.ndarray  # uint8 (B, C, H, W)
    errors: list[ReadError]
    # Images unlike what the model expects, converted anyway: kind -> (count, an example path).
    unlike: dict[str, tuple[int, str]] = field(default_factory=dict)
    bits: np.ndarray | None = None  # png_bits of each image's pixels, when asked for


# ---------------------------------------------------------------- decoding in worker processes

# Batches decoded in this process, timed, before `worth_it` is asked (the least time counts:
# the first batch also pays one-time costs).
PROBE_BATCHES = 4
# Below this many files, starting worker processes costs more than it saves.
PARALLEL_FROM = 1024
MAX_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (a container's quota, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class DecodeOptions:
    """How files become pixels: worker processes, and the on-disk cache of decoded pixels."""

    # None: one per CPU left after `reserve` (up to 8), for >= PARALLEL_FROM files; 0: decode in this process
    workers: int | None = None
    cache: bool = True
    cache_dir: str | None = None  # None: default_cache_dir()

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")

    def workers_for(self, n_files: int, reserve: int = 0) -> int:
        """Worker processes for `n_files`, leaving `reserve` CPUs to the caller's own work (scoring)."""
        if self.workers is not None:
            return self.workers
        if n_files < PARALLEL_FROM:
            return 0
        return max(1, min(available_cpus() - reserve, MAX_WORKERS))


@dataclass
class _Decoded:
    """One chunk's results, as a worker sends them back (plain arrays pickle cheaply)."""

    index: list[int]  # positions in the chunk of the readable files
    pixels: np.ndarray  # uint8 (len(index), C, H, W)
    sources: list[tuple[int, int, bool]]  # each readable file's own width, height, colour
    bits: np.ndarray | None
    errors: list[tuple[int, str]]  # (position, reason)


def _decode_chunk(files: Sequence[Path], prep: Preprocessing, bits: bool) -> _Decoded:
    index: list[int] = []
    arrays: list[np.ndarray] = []
    sources: list[tuple[int, int, bool]] = []
    errors: list[tuple[int, str]] = []
    for i, path in enumerate(files):
        source: dict[str, Any] = {}
        try:
            arrays.append(decode_image(path, prep, source))
        except ImageReadError as exc:
            errors.append((i, str(exc)))
            continue
        index.append(i)
        w, h = source.get("size", (prep.size, prep.size))
        sources.append((int(w), int(h), bool(source.get("colour", False))))
    pixels = np.stack(arrays) if arrays else np.zeros((0, prep.channels, prep.size, prep.size), np.uint8)
    return _Decoded(index, pixels, sources, png_bits(pixels) if bits else None, errors)


def _worker_init(max_image_pixels: int | None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.MAX_IMAGE_PIXELS = max_image_pixels


def _pool(workers: int) -> ProcessPoolExecutor:
    """Forked workers on Linux (they start in milliseconds and import nothing); spawned elsewhere."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(Image.MAX_IMAGE_PIXELS,))


# ------------------------------------------------------------------ the decoded-pixel cache

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$VAE_ANOMALY_CACHE_DIR, else $XDG_CACHE_HOME/vae-anomaly, else ~/.cache/vae-anomaly."""
    if os.environ.get("VAE_ANOMALY_CACHE_DIR"):
        return Path(os.environ["VAE_ANOMALY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vae-anomaly"


FileKey = tuple[bytes, int, int]  # absolute path, size in bytes, modification time in ns


@dataclass(frozen=True)
class CacheHit:
    row: int
    bits: float | None
    source: tuple[int, int, bool]


class PixelCache:
    """Decoded pixels on disk, reused by later runs: one uint8 file of rows plus an SQLite index.

    A file is found again by its absolute path, size and modification time;
    if any of these changed it is decoded afresh. One cache folder per
    preprocessing (channels, size, resize rule) and Pillow version, since
    either changes the pixels. Rows are only appended, under SQLite's write
    lock, so several processes can share a cache; a crash mid-write leaves
    unindexed bytes that are never read. It is only a speed-up: on any
    error it turns itself off (see `broken`) and decoding goes on without it.
    Deleting the folder is always safe.
    """

    def __init__(self, root: str | os.PathLike[str], prep: Preprocessing) -> None:
        self.broken: str | None = None
        self.hits = self.misses = 0
        self.shape = (prep.channels, prep.size, prep.size)
        self.row_bytes = prep.channels * prep.size * prep.size
        scaling = "".join(c for c in prep.scaling if c.isalnum())
        self.dir = Path(root) / (
            f"pixels-v{CACHE_FORMAT}-c{prep.channels}-s{prep.size}-{prep.resize}-{scaling}-pillow{PIL.__version__}"
        )
        self._data = self.dir / "pixels.u8"
        self._mm: np.ndarray | None = None
        self._db: sqlite3.Connection | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._data.touch(exist_ok=True)
            db = sqlite3.connect(self.dir / "index.sqlite", timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            # No fsync per batch: with WAL this cannot corrupt the index, and a power cut loses
            # at most the last rows, which are decoded again next time.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "row INTEGER, bits REAL, width INTEGER, height INTEGER, colour INTEGER)"
            )
            self._db = db
        except (OSError, sqlite3.Error) as exc:
            self._fail(exc)

    @property
    def usable(self) -> bool:
        return self.broken is None

    def _fail(self, exc: BaseException) -> None:
        self.broken = (
            f"the decoded-pixel cache in {display_path(self.dir)} is turned off ({exc}); --no-cache hides this"
        )
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
        self._db = None

    @staticmethod
    def key(path: Path) -> FileKey | None:
        try:
            st = os.stat(path)
        except OSError:
            return None  # decoding will say what is wrong with it
        return os.fsencode(os.path.abspath(path)), st.st_size, st.st_mtime_ns

    def lookup(self, files: Sequence[Path]) -> tuple[dict[int, CacheHit], dict[int, FileKey]]:
        """Positions of the files found unchanged, and every file's key (taken before decoding)."""
        keys = {i: k for i, f in enumerate(files) if (k := self.key(f)) is not None}
        hits: dict[int, CacheHit] = {}
        if self._db is None or not keys:
            return hits, keys
        try:
            marks = ",".join("?" * len(keys))
            rows = self._db.execute(
                f"SELECT path, size, mtime_ns, row, bits, width, height, colour FROM files WHERE path IN ({marks})",
                [k[0] for k in keys.values()],
            ).fetchall()
            on_disk = self._data.stat().st_size // self.row_bytes
        except (OSError, sqlite3.Error) as exc:
            self._fail(exc)
            return hits, keys
        found = {r[0]: r for r in rows}
        for i, (path, size, mtime) in keys.items():
            r = found.get(path)
            if r is not None and r[1] == size and r[2] == mtime and r[3] < on_disk:
                hits[i] = CacheHit(int(r[3]), r[4], (int(r[5]), int(r[6]), bool(r[7])))
        self.hits += len(hits)
        self.misses += len(files) - len(hits)
        return hits, keys

    def read(self, rows: Sequence[int]) -> np.ndarray | None:
        try:
            if self._mm is None or max(rows) >= len(self._mm):
                n = self._data.stat().st_size // self.row_bytes
                self._mm = np.memmap(self._data, np.uint8, "r", shape=(n, *self.shape)) if n else None
            if self._mm is None:
                raise ValueError("the pixel file is empty")
            return np.asarray(self._mm[np.asarray(rows)])
        except (OSError, ValueError, IndexError) as exc:
            self._fail(exc)
            return None

    def add(
        self,
        keys: Sequence[FileKey],
        pixels: np.ndarray,
        bits: np.ndarray | None,
        sources: Sequence[tuple[int, int, bool]],
    ) -> None:
        if self._db is None or not len(keys):
            return
        db = self._db
        try:
            with open(self._data, "ab") as f:
                db.execute("BEGIN IMMEDIATE")  # one writer at a time allocates rows
                try:
                    size = os.fstat(f.fileno()).st_size
                    first = -(-size // self.row_bytes)
                    f.write(b"\0" * (first * self.row_bytes - size))  # after a torn write: realign
                    f.write(np.ascontiguousarray(pixels).tobytes())
                    f.flush()
                    db.executemany(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (p, s, m, first + j, None if bits is None else float(bits[j]), w, h, int(c))
                            for j, ((p, s, m), (w, h, c)) in enumerate(zip(keys, sources, strict=True))
                        ],
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except (OSError, sqlite3.Error) as exc:
            self._fail(exc)

    def set_bits(self, keys: Sequence[FileKey], bits: np.ndarray) -> None:
        if self._db is None or not len(keys):
            return
        try:
            self._db.executemany(
                "UPDATE files SET bits = ? WHERE path = ?", [(float(b), k[0]) for k, b in zip(keys, bits, strict=True)]
            )
        except sqlite3.Error as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._mm = None


def open_cache(options: DecodeOptions, prep: Preprocessing) -> PixelCache | None:
    if not options.cache:
        return None
    return PixelCache(options.cache_dir or default_cache_dir(), prep)


# ------------------------------------------------------------------------------- batching


@dataclass
class _Pending:
    chunk: list[Path]
    hits: dict[int, CacheHit]
    keys: dict[int, FileKey]
    misses: list[int]  # positions in the chunk sent to be decoded
    decoded: Future[_Decoded] | _Decoded | None


def _assemble(p: _Pending, prep: Preprocessing, bits: bool, cache: PixelCache | None) -> ImageBatch:
    """One batch in input order, from cached rows and freshly decoded files; new ones go into the cache."""
    n = len(p.chunk)
    pixels = np.empty((n, prep.channels, prep.size, prep.size), np.uint8)
    ok = np.zeros(n, bool)
    out_bits = np.full(n, np.nan)
    sources: dict[int, tuple[int, int, bool]] = {}
    reasons: dict[int, str] = {}
    hits = p.hits
    if hits:
        rows = cache.read([h.row for h in hits.values()]) if cache is not None else None
        if rows is None:  # the cache broke between lookup and read: decode these here
            redo = _decode_chunk([p.chunk[i] for i in hits], prep, bits)
            rows, hit_pos = redo.pixels, [list(hits)[j] for j in redo.index]
            for j, reason in redo.errors:
                reasons[list(hits)[j]] = reason
            for j, i in enumerate(hit_pos):
                sources[i] = redo.sources[j]
                if redo.bits is not None:
                    out_bits[i] = redo.bits[j]
        else:
            hit_pos = list(hits)
            for i in hit_pos:
                sources[i] = hits[i].source
                if hits[i].bits is not None:
                    out_bits[i] = hits[i].bits
        pixels[hit_pos] = rows
        ok[hit_pos] = True
    if p.decoded is not None:
        d = p.decoded.result() if isinstance(p.decoded, Future) else p.decoded
        pos = [p.misses[j] for j in d.index]
        pixels[pos] = d.pixels
        ok[pos] = True
        for j, i in enumerate(pos):
            sources[i] = d.sources[j]
            if d.bits is not None:
                out_bits[i] = d.bits[j]
        for j, reason in d.errors:
            reasons[p.misses[j]] = reason
        if cache is not None:
            fresh = [j for j, i in enumerate(pos) if i in p.keys]
            cache.add(
                [p.keys[pos[j]] for j in fresh],
                d.pixels[fresh],
                None if d.bits is None else d.bits[fresh],
                [d.sources[j] for j in fresh],
            )
    if bits:
        missing = np.nonzero(ok & np.isnan(out_bits))[0]
        if len(missing):  # cached without them
            out_bits[missing] = png_bits(pixels[missing])
            if cache is not None:
                keyed = [i for i in missing if i in p.keys]
                cache.set_bits([p.keys[i] for i in keyed], out_bits[keyed])
    paths: list[str] = []
    errors: list[ReadError] = []
    unlike: dict[str, tuple[int, str]] = {}
    for i, path in enumerate(p.chunk):
        if not ok[i]:
            errors.append(ReadError(display_path(path), reasons.get(i, "cannot decode image")))
            continue
        paths.append(display_path(path))
        w, h, colour = sources[i]
        for kind in _unlike({"size": (w, h), "colour": colour}, prep):
            count, example = unlike.get(kind, (0, paths[-1]))
            unlike[kind] = (count + 1, example)
    return ImageBatch(paths, pixels[ok], errors, unlike, out_bits[ok] if bits else None)


def iter_batches(
    files: Sequence[Path],
    prep: Preprocessing,
    batch_size: int = 256,
    *,
    options: DecodeOptions | None = None,
    bits: bool = False,
    on_warning: Callable[[str], None] | None = None,
    reserve: int = 0,
    on_workers: Callable[[int], None] | None = None,
    worth_it: Callable[[float], bool] | None = None,
) -> Iterator[ImageBatch]:
    """Decode files in batches, in input order, so memory stays bounded whatever the folder's size.

    With workers, the next batches are decoded in other processes while the
    caller works on this one (at most 2 per worker in flight). Files found
    unchanged in the pixel cache are read from it instead. `bits` adds each
    image's `png_bits`, computed where it is decoded. The workers start with
    the first batch that needs decoding (never, when the cache holds every
    file), and `on_workers(n)` is called then, so that the caller can fit
    its own threads into the CPUs the workers leave (`reserve`). With
    `worth_it`, the first batches to decode are decoded here and timed, and
    `worth_it(seconds per file)` decides whether workers start at all: where
    the caller's own work per image dwarfs decoding, the CPUs are better
    left to it.
    """
    options = options or DecodeOptions(cache=False)
    files = list(files)
    workers = options.workers_for(len(files), reserve)
    cache = open_cache(options, prep)
    _usable(cache, on_warning)
    pool: ProcessPoolExecutor | None = None
    pending: deque[_Pending] = deque()
    depth = 2 * workers
    probes: list[float] = []  # seconds per file of decoding here, when `worth_it` asks
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            hits, keys = cache.lookup(chunk) if cache is not None and cache.usable else ({}, {})
            misses = [i for i in range(len(chunk)) if i not in hits]
            todo = [chunk[i] for i in misses]
            decoded: Future[_Decoded] | _Decoded | None = None
            if todo and workers > 0 and pool is None:
                if worth_it is not None and len(probes) < PROBE_BATCHES:
                    # Decode this batch here, timed, and hand it over at once, so that the caller
                    # has worked on it before being asked whether workers would pay.
                    t0 = time.perf_counter()
                    decoded = _decode_chunk(todo, prep, bits)
                    probes.append((time.perf_counter() - t0) / len(todo))
                    pending.append(_Pending(chunk, hits, keys, misses, decoded))
                    while pending:
                        yield _assemble(pending.popleft(), prep, bits, _usable(cache, on_warning))
                    continue
                if worth_it is None or worth_it(min(probes, default=0.0)):
                    pool = _pool(workers)
                    if on_workers is not None:
                        on_workers(workers)
                else:
                    workers = depth = 0
            if todo:
                if pool is None:
                    decoded = _decode_chunk(todo, prep, bits)
                else:
                    with warnings.catch_warnings():  # Python >= 3.12 warns about forking a threaded process
                        warnings.simplefilter("ignore", DeprecationWarning)
                        decoded = pool.submit(_decode_chunk, todo, prep, bits)
            pending.append(_Pending(chunk, hits, keys, misses, decoded))
            if len(pending) > depth:
                yield _assemble(pending.popleft(), prep, bits, _usable(cache, on_warning))
        while pending:
            yield _assemble(pending.popleft(), prep, bits, _usable(cache, on_warning))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if cache is not None:
            cache.close()


def _usable(cache: PixelCache | None, on_warning: Callable[[str], None] | None) -> PixelCache | None:
    if cache is None:
        return None
    if not cache.usable:
        if on_warning is not None and cache.broken:
            on_warning(cache.broken)
            cache.broken = ""  # said once
        return None
    return cache


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


def read_images(
    files: Sequence[Path],
    prep: Preprocessing,
    *,
    options: DecodeOptions | None = None,
    bits: bool = False,
    on_warning: Callable[[str], None] | None = None,
) -> ImageBatch:
    """All files at once into one contiguous uint8 array (for training)."""
    batches = list(iter_batches(files, prep, 1024, options=options, bits=bits, on_warning=on_warning))
    unlike: dict[str, tuple[int, str]] = {}
    for b in batches:
        for kind, (count, example) in b.unlike.items():
            unlike[kind] = (unlike.get(kind, (0, example))[0] + count, unlike.get(kind, (0, example))[1])
    return ImageBatch(
        [p for b in batches for p in b.paths],
        np.concatenate([b.pixels for b in batches])
        if batches
        else np.zeros((0, prep.channels, prep.size, prep.size), np.uint8),
        [e for b in batches for e in b.errors],
        unlike,
        (np.concatenate([b.bits for b in batches if b.bits is not None]) if batches else np.zeros(0)) if bits else None,
    )
