"""The decoded-pixel cache: decoded pixels on disk, reused by later runs.

Only a speed-up: on any error it turns itself off and decoding goes on
without it. No torch: decoding workers may import this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from .decoding import Preprocessing, Source
from .listing import display_path

# 2: inode, ctime and a digest per row; 3: each file's format (older folders are left alone);
# 5: the digest covers the file's header facts, and the PNG length has a digest of its own
CACHE_FORMAT = 5


def default_cache_dir() -> Path:
    """$VAE_ANOMALY_CACHE_DIR, else $XDG_CACHE_HOME/vae-anomaly, else ~/.cache/vae-anomaly."""
    if os.environ.get("VAE_ANOMALY_CACHE_DIR"):
        return Path(os.environ["VAE_ANOMALY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vae-anomaly"


# Absolute path, size in bytes, modification time, inode, and status-change time in ns. The ctime
# moves on every write and cannot be set back (`touch -r` sets the mtime only), so a file rewritten
# with the same size and modification time is still decoded afresh.
FileKey = tuple[bytes, int, int, int, int]


@dataclass(frozen=True)
class CacheHit:
    row: int
    bits: float | None  # None where it was never stored, or its digest does not match (computed again)
    source: Source
    digest: bytes  # of the file's key, the row's pixels and its header facts, checked on every read


def row_digest(key: FileKey, pixels: np.ndarray, source: Source) -> bytes:
    """BLAKE2b of the file's key, its decoded pixels and its header facts (width, height, colour, format):
    a row edited, shifted or read for another file fails it, and so does an edited width or format."""
    h = hashlib.blake2b(repr((key, tuple(source))).encode(), digest_size=16)
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.digest()


def bits_digest(key: FileKey, bits: float) -> bytes:
    """BLAKE2b of the file's key and its PNG length, which `fit` and `score` read as a statistic."""
    return hashlib.blake2b(repr((key, float(bits))).encode(), digest_size=16).digest()


class PixelCache:
    """Decoded pixels on disk, reused by later runs: one uint8 file of rows plus an SQLite index.

    A file is found again by its absolute path, size, modification time,
    inode and status-change time; if any of these changed it is decoded
    afresh. Every row carries a digest of its file's key, pixels and header
    facts, checked when it is read: a row flipped, truncated, shifted, pointed
    at another file's pixels or with an edited width or format is decoded
    again (and counted in `corrupt`), never used; a PNG length whose own
    digest fails is computed again. Every column that feeds a score or a
    check is covered. One cache folder per
    preprocessing (channels, size, resize rule) and Pillow version, since
    either changes the pixels. Rows are only appended, under SQLite's write
    lock, so several processes can share a cache; a crash mid-write leaves
    unindexed bytes that are never read. It is only a speed-up: on any
    error it turns itself off (see `broken`) and decoding goes on without it.
    Deleting the folder is always safe.
    """

    def __init__(self, root: str | os.PathLike[str], prep: Preprocessing) -> None:
        self.broken: str | None = None
        self.hits = self.misses = self.corrupt = 0
        self.shape = (prep.channels, prep.size, prep.size)
        self.row_bytes = prep.channels * prep.size * prep.size
        scaling = "".join(c for c in prep.scaling if c.isalnum())
        self.dir = Path(root) / (
            f"pixels-v{CACHE_FORMAT}-c{prep.channels}-s{prep.size}-{prep.resize}-{scaling}-png{prep.png_level}"
            f"-pillow{PIL.__version__}"
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
                "ino INTEGER, ctime_ns INTEGER, row INTEGER, digest BLOB, bits REAL, width INTEGER, height INTEGER, "
                "colour INTEGER, format TEXT, bits_digest BLOB)"
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
        return os.fsencode(os.path.abspath(path)), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns

    def lookup(self, files: Sequence[Path]) -> tuple[dict[int, CacheHit], dict[int, FileKey]]:
        """Positions of the files found unchanged, and every file's key (taken before decoding)."""
        keys = {i: k for i, f in enumerate(files) if (k := self.key(f)) is not None}
        hits: dict[int, CacheHit] = {}
        if self._db is None or not keys:
            return hits, keys
        try:
            marks = ",".join("?" * len(keys))
            rows = self._db.execute(
                "SELECT path, size, mtime_ns, ino, ctime_ns, row, digest, bits, width, height, colour, format, "
                f"bits_digest FROM files WHERE path IN ({marks})",
                [k[0] for k in keys.values()],
            ).fetchall()
            on_disk = self._data.stat().st_size // self.row_bytes
        except (OSError, sqlite3.Error) as exc:
            self._fail(exc)
            return hits, keys
        found = {r[0]: r for r in rows}
        for i, key in keys.items():
            r = found.get(key[0])
            if r is not None and tuple(r[:5]) == key and 0 <= r[5] < on_disk and isinstance(r[6], bytes):
                bits = r[7] if r[7] is not None and r[12] == bits_digest(key, r[7]) else None
                hits[i] = CacheHit(int(r[5]), bits, (int(r[8]), int(r[9]), bool(r[10]), str(r[11] or "")), r[6])
        self.hits += len(hits)
        self.misses += len(files) - len(hits)
        return hits, keys

    def verify(self, keys: Sequence[FileKey], hits: Sequence[CacheHit], pixels: np.ndarray) -> np.ndarray:
        """Which rows read back are the pixels and header facts stored for their file (by digest); counts
        the others."""
        good = np.array(
            [row_digest(k, px, h.source) == h.digest for k, h, px in zip(keys, hits, pixels, strict=True)], bool
        )
        self.corrupt += int((~good).sum())
        return good

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
        sources: Sequence[Source],
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
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                *k,
                                first + j,
                                row_digest(k, pixels[j], source),
                                None if bits is None else float(bits[j]),
                                *source,
                                None if bits is None else bits_digest(k, float(bits[j])),
                            )
                            for j, (k, source) in enumerate(zip(keys, sources, strict=True))
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
                "UPDATE files SET bits = ?, bits_digest = ? WHERE path = ?",
                [(float(b), bits_digest(k, float(b)), k[0]) for k, b in zip(keys, bits, strict=True)],
            )
        except sqlite3.Error as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._mm = None
