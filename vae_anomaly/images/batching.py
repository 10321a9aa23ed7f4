"""Files to batches of pixels: worker processes, the pixel cache, input order, bounded memory.

Every command that reads images goes through `iter_batches`; training
reads all of them at once through `read_images`. No torch: the worker
processes this module starts import nothing heavier than Pillow.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from ..errors import ConfigError, ImageReadError
from .decoding import (
    Preprocessing,
    ReadError,
    Source,
    Unlike,
    bomb_reason,
    decode_image,
    merge_unlike,
    over_pixel_limit,
    png_bits,
    unlike_kinds,
)
from .duplicates import Fingerprints
from .facts import Facts, ImageFacts, LocalMeasure, Rows, measure
from .listing import display_path
from .pixel_cache import CacheHit, FileKey, PixelCache, default_cache_dir


@dataclass
class ImageBatch:
    """Decoded pixels of the readable files of one batch, and the unreadable ones."""

    paths: list[str]
    pixels: np.ndarray  # uint8 (B, C, H, W)
    errors: list[ReadError]
    # Images unlike what the model expects, converted anyway: kind -> (count, an example path).
    unlike: Unlike = field(default_factory=dict)
    bits: np.ndarray | None = None  # png_bits of each image's pixels, when asked for
    # Each readable file's header (width, height, colour, format), its properties (properties.py)
    # and its duplicate fingerprints (duplicates.py), in the order of `paths`.
    sources: list[Source] = field(default_factory=list)
    properties: dict[str, np.ndarray] = field(default_factory=dict)
    fingerprints: Fingerprints = field(default_factory=Fingerprints.empty)
    # With a model's local statistic (tiles.Scales): each image's most unusual region and the tile it
    # lies in, (B, 8) int64, -1 where there is none; its value is properties["local"].
    boxes: np.ndarray | None = None

    def measured(self, local: LocalMeasure | None = None) -> ImageBatch:
        """This batch with its properties and fingerprints (and, with `local`, the local statistic)
        computed from its pixels and sources."""
        self.properties, self.fingerprints, self.boxes = measure(
            self.pixels, self.sources, self.paths, local, tile_threads()
        )
        return self


# ---------------------------------------------------------------- decoding in worker processes

# Batches decoded in this process, timed, before `worth_it` is asked (the least time counts:
# the first batch also pays one-time costs).
PROBE_BATCHES = 4
# Below this many files, starting worker processes costs more than it saves.
PARALLEL_FROM = 1024
MAX_WORKERS = 8


# Threads that read a batch's tiles (tiles.measure_batch): None, one per CPU (up to MAX_WORKERS);
# a decode worker has one (`_worker_init`), the other workers have the other CPUs.
_TILE_THREADS: int | None = None


def tile_threads() -> int:
    return _TILE_THREADS or min(available_cpus(), MAX_WORKERS)


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
        if self.workers is not None and (isinstance(self.workers, bool) or not 0 <= self.workers <= 256):
            raise ConfigError(
                f"workers must be a whole number from 0 to 256, or None (automatic); got {self.workers!r}"
            )
        if not isinstance(self.cache, bool):
            raise ConfigError(f"cache must be True or False, got {self.cache!r}")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ConfigError(f"cache_dir must be a folder path or None (the default), got {self.cache_dir!r}")

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
    sources: list[Source]  # each readable file's own width, height, colour, format
    bits: np.ndarray | None
    errors: list[tuple[int, str]]  # (position, reason)
    # Their properties and fingerprints, measured in the worker too: there they overlap the parent's
    # scoring instead of adding to it (about 110 us an image at 48x48 RGB).
    facts: Facts


def _decode_chunk(
    files: Sequence[Path], prep: Preprocessing, bits: bool, local: LocalMeasure | None = None
) -> _Decoded:
    index: list[int] = []
    arrays: list[np.ndarray] = []
    sources: list[Source] = []
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
        sources.append((int(w), int(h), bool(source.get("colour", False)), str(source.get("format", ""))))
    pixels = np.stack(arrays) if arrays else np.zeros((0, prep.channels, prep.size, prep.size), np.uint8)
    lengths = png_bits(pixels, prep.png_level) if bits else None
    shown = [display_path(files[i]) for i in index]
    return _Decoded(index, pixels, sources, lengths, errors, measure(pixels, sources, shown, local, tile_threads()))


def _worker_init(max_image_pixels: int | None) -> None:
    # Ctrl-C reaches the whole process group; the parent decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    # One BLAS thread a worker (the local statistic's products): the parent and the other workers
    # have the other CPUs, and threads competing for them run slower than one each.
    threadpool_limits(1)
    global _TILE_THREADS
    _TILE_THREADS = 1


def _pool(workers: int) -> ProcessPoolExecutor:
    """Forked workers on Linux (they start in milliseconds and import nothing); spawned elsewhere."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(Image.MAX_IMAGE_PIXELS,))


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
    local: LocalMeasure | None = None  # the model's local statistic, measured with the other facts


def _assemble(p: _Pending, prep: Preprocessing, bits: bool, cache: PixelCache | None) -> ImageBatch:
    """One batch in input order, from cached rows and freshly decoded files; new ones go into the cache."""
    batch = _Assembly(len(p.chunk), prep)
    # A cached file is held to the pixel limit now in force, as decoding it would be.
    refused = {i for i, h in p.hits.items() if over_pixel_limit(h.source[0], h.source[1])}
    for i in refused:
        batch.reasons[i] = bomb_reason(p.hits[i].source[0] * p.hits[i].source[1])
    hits = {i: h for i, h in p.hits.items() if i not in refused}
    if hits:
        _from_cache(batch, p, hits, prep, bits, cache)
    if p.decoded is not None:
        decoded = p.decoded.result() if isinstance(p.decoded, Future) else p.decoded
        placed = batch.put(p.misses, decoded)
        if cache is not None:
            _cache_add(cache, p.keys, placed, decoded)
    if bits:
        missing = np.nonzero(batch.ok & np.isnan(batch.bits))[0]
        if len(missing):  # cached without them
            batch.bits[missing] = png_bits(batch.pixels[missing], prep.png_level)
            if cache is not None:
                keyed = [int(i) for i in missing if int(i) in p.keys]
                cache.set_bits([p.keys[i] for i in keyed], batch.bits[keyed])
    return batch.done(p.chunk, prep, bits, p.local)


def _from_cache(
    batch: _Assembly,
    p: _Pending,
    hits: dict[int, CacheHit],
    prep: Preprocessing,
    bits: bool,
    cache: PixelCache | None,
) -> None:
    """The cached rows whose digests hold; the others (or all, where the cache broke between lookup and
    read) decoded here, and their bad rows replaced."""
    rows = cache.read([h.row for h in hits.values()]) if cache is not None else None
    good = list(hits)
    if rows is not None and cache is not None:
        valid = cache.verify([p.keys[i] for i in hits], list(hits.values()), rows)
        good, rows = [i for i, v in zip(hits, valid, strict=True) if v], rows[valid]
        batch.pixels[good] = rows
        batch.ok[good] = True
        for i in good:
            batch.sources[i] = hits[i].source
            if hits[i].bits is not None:
                batch.bits[i] = hits[i].bits
    kept = set(good)
    redo_pos = [i for i in hits if i not in kept] if rows is not None else list(hits)
    if redo_pos:
        redo = _decode_chunk([p.chunk[i] for i in redo_pos], prep, bits, p.local)
        placed = batch.put(redo_pos, redo)
        if cache is not None and rows is not None:
            _cache_add(cache, p.keys, placed, redo)


def _cache_add(cache: PixelCache, keys: dict[int, FileKey], placed: list[int], decoded: _Decoded) -> None:
    """Freshly decoded images into the cache (those with a file key: not arrays, not changed files)."""
    keyed = [j for j, i in enumerate(placed) if i in keys]
    cache.add(
        [keys[placed[j]] for j in keyed],
        decoded.pixels[keyed],
        None if decoded.bits is None else decoded.bits[keyed],
        [decoded.sources[j] for j in keyed],
    )


class _Assembly:
    """A batch being put together in input order: pixels, which are readable, PNG lengths, facts,
    sources, and why the others are not."""

    def __init__(self, n: int, prep: Preprocessing) -> None:
        self.pixels = np.empty((n, prep.channels, prep.size, prep.size), np.uint8)
        self.ok = np.zeros(n, bool)
        self.bits = np.full(n, np.nan)
        self.facts = Rows(n)
        self.sources: dict[int, Source] = {}
        self.reasons: dict[int, str] = {}

    def put(self, positions: Sequence[int], decoded: _Decoded) -> list[int]:
        """Decoded files at `positions` (`decoded.index` picks the readable ones); returns where they went."""
        for j, reason in decoded.errors:
            self.reasons[positions[j]] = reason
        placed = [positions[j] for j in decoded.index]
        self.pixels[placed] = decoded.pixels
        self.ok[placed] = True
        self.facts.put(placed, decoded.facts)
        for j, i in enumerate(placed):
            self.sources[i] = decoded.sources[j]
            if decoded.bits is not None:
                self.bits[i] = decoded.bits[j]
        return placed

    def done(self, chunk: Sequence[Path], prep: Preprocessing, bits: bool, local: LocalMeasure | None) -> ImageBatch:
        """The batch: readable images in order, the others as errors, inputs unlike the training images
        counted, and the facts of images read from the cache measured here."""
        ok, sources = self.ok, self.sources
        paths: list[str] = []
        errors: list[ReadError] = []
        unlike: Unlike = {}
        for i, path in enumerate(chunk):
            if not ok[i]:
                errors.append(ReadError(display_path(path), self.reasons.get(i, "cannot decode image")))
                continue
            paths.append(display_path(path))
            for kind in unlike_kinds(*sources[i][:3], prep):
                count, example = unlike.get(kind, (0, paths[-1]))
                unlike[kind] = (count + 1, example)
        readable = [sources[i] for i in range(len(chunk)) if ok[i]]
        unmeasured = [i for i in range(len(chunk)) if ok[i] and not self.facts.have[i]]
        if unmeasured:
            shown = [display_path(chunk[i]) for i in unmeasured]
            measured = measure(self.pixels[unmeasured], [sources[i] for i in unmeasured], shown, local, tile_threads())
            self.facts.put(unmeasured, measured)
        found, prints, boxes = self.facts.rows(ok)
        return ImageBatch(
            paths, self.pixels[ok], errors, unlike, self.bits[ok] if bits else None, readable, found, prints, boxes
        )


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
    local: LocalMeasure | None = None,
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
    left to it. With `local` (a model's local statistic), each image's value,
    region and tile are measured where it is decoded, beside its properties.
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
                    decoded = _decode_chunk(todo, prep, bits, local)
                    probes.append((time.perf_counter() - t0) / len(todo))
                    pending.append(_Pending(chunk, hits, keys, misses, decoded, local))
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
                    decoded = _decode_chunk(todo, prep, bits, local)
                else:
                    with warnings.catch_warnings():  # Python >= 3.12 warns about forking a threaded process
                        warnings.simplefilter("ignore", DeprecationWarning)
                        decoded = pool.submit(_decode_chunk, todo, prep, bits, local)
            pending.append(_Pending(chunk, hits, keys, misses, decoded, local))
            if len(pending) > depth:
                yield _assemble(pending.popleft(), prep, bits, _usable(cache, on_warning))
        while pending:
            yield _assemble(pending.popleft(), prep, bits, _usable(cache, on_warning))
        if cache is not None and cache.corrupt and on_warning is not None:
            on_warning(
                f"{cache.corrupt} row(s) of the decoded-pixel cache in {display_path(cache.dir)} failed their "
                "check (edited or damaged); those files were decoded again and their rows replaced"
            )
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
    facts = ImageFacts.of(batches)
    return ImageBatch(
        [p for b in batches for p in b.paths],
        np.concatenate([b.pixels for b in batches])
        if batches
        else np.zeros((0, prep.channels, prep.size, prep.size), np.uint8),
        [e for b in batches for e in b.errors],
        merge_unlike(b.unlike for b in batches),
        (np.concatenate([b.bits for b in batches if b.bits is not None]) if batches else np.zeros(0)) if bits else None,
        [s for b in batches for s in b.sources],
        facts.properties,
        facts.fingerprints,
    )
