"""Tiles: the local statistic at the file's own resolution, for images much larger than the working size.

Stretched to the working size S = 48, a 1,024-px image keeps one pixel in
21 along each side: a 2% defect is a few pixels, and a blurred or foreign
patch of the same colours is not there at all. So a file whose long side L
is at least TILE_FROM x S is also cut into square tiles of t file pixels,
overlapping by a quarter, and each tile is read at S x S and described as
local.py describes a whole image, against banks of tiles of the normal
images (cross-fitted alike: bank k holds tiles of model k's training
images only). The image's local statistic takes the larger of the two
scales, each in units of its own region bound b (the 99th percentile of
held-out normal patch distances at that scale):

    s_local(x) = max( max_v d(v) / b,  max over tiles T of x, v in T of d_T(v) / b_T )

t = max(2 S, ceil(L / 3)) unless `tile` (`fit --tile`) gives one: three
to four tiles a side, each with at least twice the detail of the whole
image. Chosen by measurement (a prototype on the defect benchmark's four
materials, 2 and 5% defects, mean ROC-AUC of the local statistic): at
256 px, whole image 0.898, with 96-px tiles 0.912 (the rule's t); at
1,024 px 0.925, with 384-px tiles 0.944 (the rule gives 342) and 192-px
tiles 0.955 at four times the tiles. Tiles alone did worse (0.867 at 256,
0.85 at 1,024): a stain or hole larger than a tile looks normal within
it. A JPEG is decoded only at the detail its tiles keep (Pillow's DCT
reduction), and at most CHUNK tiles are held at once. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from ..errors import ImageReadError
from ..images.decoding import read_upright
from ..images.listing import real_path
from . import patches as local
from .patches import PatchBank

PREFIX = "tiles:"  # the tile banks' arrays in the model file's calibration tensors
TILE_FROM = 4  # automatic tiling from a long side of this many working sizes
PER_SIDE = 3  # automatic tile side: the long side over this (and at least 2 working sizes)
OVERLAP = 0.25
CHUNK = 64  # tiles read and described at once
FIT_IMAGES = 512  # training images whose tiles feed the banks
FIT_TILES = 4  # tiles drawn from each of them
MIN_TILED = 10  # fewer tiled training images than this: no tile banks
BOUND_SAMPLE = 2048  # patch distances per chunk of a held-out file's tiles kept for the region bound


def tile_side(width: int, height: int, size: int, tile: int | None) -> int:
    """The tile side in file pixels for a width x height file, 0 where it is not tiled. `tile`: None
    for the automatic rule, 0 for never, N for tiles of N px (for any file larger than that)."""
    long, short = max(width, height), min(width, height)
    if tile == 0 or (tile is None and long < TILE_FROM * size):
        return 0
    t = min(max(2 * size, math.ceil(long / PER_SIDE)) if tile is None else tile, short)
    return t if t < long else 0  # one tile would be the whole image, which the first scale sees


def boxes(width: int, height: int, t: int) -> np.ndarray:
    """(n, 4) tiles (x0, y0, x1, y1) of side t covering the file, overlapping by OVERLAP, the last
    of each row and column flush with the edge."""
    step = max(1, math.floor(t * (1 - OVERLAP)))

    def starts(n: int) -> list[int]:
        s = list(range(0, max(1, n - t + 1), step))
        return s if s[-1] == max(0, n - t) else [*s, max(0, n - t)]

    return np.array([(x, y, x + t, y + t) for y in starts(height) for x in starts(width)], np.int64).reshape(-1, 4)


def read_tiles(
    path: Path, channels: int, size: int, t: int, sample: tuple[int, np.random.Generator] | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(boxes in file pixels, uint8 (n, C, size, size)) of a file's tiles of side t, CHUNK at a time;
    with `sample` (n, rng), n of them drawn at random. Raises `ImageReadError`."""
    img, scale = read_upright(path, channels, t / size)
    width, height = round(img.size[0] * scale), round(img.size[1] * scale)
    every = boxes(width, height, min(t, width, height))
    if sample is not None:
        n, rng = sample
        every = every[np.sort(rng.choice(len(every), min(n, len(every)), replace=False))]
    for start in range(0, len(every), CHUNK):
        part = every[start : start + CHUNK]
        arrays = []
        for box in part:
            x0, y0, x1, y1 = (round(float(v) / scale) for v in box)
            crop = img.crop((x0, y0, x1, y1))
            a = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0), np.uint8)
            arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        yield part, np.stack(arrays)


@dataclass(frozen=True)
class Tiled:
    """One file's tile scale: its largest patch distance over b_T, the most unusual region (local.region)
    and the tile it lies in, both (x0, y0, x1, y1) in the file's pixels."""

    value: float
    region: tuple[int, int, int, int]
    tile: tuple[int, int, int, int]
    sides: tuple[int, int]  # the upright file's width and height (EXIF orientation applied)


@dataclass(frozen=True)
class TileBank:
    """The tile scale of the local statistic: its descriptor and banks (a PatchBank of tiles) and the
    tiling setting it was fitted with."""

    bank: PatchBank
    tile: int | None  # None: automatic
    channels: int

    def side(self, width: int, height: int) -> int:
        return tile_side(width, height, self.bank.size, self.tile)

    def _grids(self, path: Path, t: int, fold: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for part, pixels in read_tiles(path, self.channels, self.bank.size, t):
            yield part, self.bank.distances(pixels, fold)

    def measure(self, path: Path, width: int, height: int, fold: int, paint: np.ndarray | None = None) -> Tiled | None:
        """The file's tile scale against tile bank `fold` (the one its whole image is measured against:
        `PatchBank.bank_of`), or None where it is not tiled; with `paint`, a working-size map (S, S)
        of the whole file in units of each scale's bound, raised to the tiles' patch distances where
        they are larger (heat maps). Raises `ImageReadError`."""
        t = self.side(width, height)
        if not t:
            return None
        size, bound = self.bank.size, self.bank.bound
        parts, grids = zip(*self._grids(path, t, fold), strict=True)
        every, d = np.concatenate(parts), np.concatenate(grids) / bound
        j = int(np.argmax(d.reshape(len(d), -1).max(1)))
        x0, y0, x1, y1 = (int(v) for v in every[j])
        sides = int(every[:, 2].max()), int(every[:, 3].max())  # the last tiles end flush with the edges
        region = _in_tile(local.region(d[j], size, 1.0), every[j], size)
        if paint is not None:
            _paint(paint, every, d, *sides)
        return Tiled(float(d[j].max()), region, (x0, y0, x1, y1), sides)

    def describe_rule(self) -> dict[str, Any]:
        """The tiling's settings, for `info`."""
        size = self.bank.size
        rule = (
            f"files of {TILE_FROM * size} px or more: side max({2 * size}, long side / {PER_SIDE})"
            if self.tile is None
            else f"files larger than {self.tile} px: side {self.tile}"
        )
        return {"tiles": rule, "overlap": OVERLAP, **self.bank.describe_rule()}

    def arrays(self) -> dict[str, np.ndarray]:
        """What the model file keeps, by name (under PREFIX)."""
        setting = np.array([-1.0 if self.tile is None else float(self.tile), float(self.channels)])
        return {**self.bank.arrays(PREFIX), PREFIX + "setting": setting}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TileBank | None:
        """The tile banks a model file keeps, or None (no tiling, or files written before it)."""
        bank = PatchBank.from_arrays(arrays, PREFIX)
        if bank is None:
            return None
        tile, channels = (int(v) for v in np.asarray(arrays[PREFIX + "setting"]))
        return cls(bank, None if tile < 0 else tile, channels)


def _paint(out: np.ndarray, tiles: np.ndarray, grids: np.ndarray, width: int, height: int) -> None:
    """Raise `out` (S, S), a map of the whole width x height file, to each tile patch's value."""
    s = out.shape[0]
    p, stride = local.geometry(s)
    fx, fy = s / width, s / height
    for box, grid in zip(tiles, grids, strict=True):
        k = (box[2] - box[0]) / s  # file pixels per tile pixel
        for gy in range(grid.shape[0]):
            for gx in range(grid.shape[1]):
                x0, y0 = box[0] + gx * stride * k, box[1] + gy * stride * k
                xs = slice(int(x0 * fx), max(int(x0 * fx) + 1, math.ceil((x0 + p * k) * fx)))
                ys = slice(int(y0 * fy), max(int(y0 * fy) + 1, math.ceil((y0 + p * k) * fy)))
                np.maximum(out[ys, xs], grid[gy, gx], out=out[ys, xs])


def _some(d: np.ndarray, rng: np.random.Generator, n: int = BOUND_SAMPLE) -> np.ndarray:
    """At most n of a chunk's patch distances, at random: enough for the 99th percentile, whatever the
    number of tiles."""
    flat = d.ravel()
    return flat if len(flat) <= n else rng.choice(flat, n, replace=False)


def _in_tile(box: Sequence[int], tile: np.ndarray, size: int) -> tuple[int, int, int, int]:
    """A working-size box inside a tile, in the file's pixels."""
    k = (int(tile[2]) - int(tile[0])) / size
    x0, y0, x1, y1 = box
    return (
        int(tile[0] + x0 * k),
        int(tile[1] + y0 * k),
        math.ceil(tile[0] + x1 * k),
        math.ceil(tile[1] + y1 * k),
    )


def fit(
    files: Sequence[Path],
    sides: np.ndarray,
    channels: int,
    size: int,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    tile: int | None,
    rng: np.random.Generator,
) -> tuple[TileBank | None, np.ndarray]:
    """The tile banks of the normal files (`sides`: (N, 2) widths and heights; `folds` as local.fit),
    and each held-out image's tile scale in the order of the concatenated held-out positions (0 where
    it is not tiled, so that the image's statistic is its whole-image scale). None, and zeros, where
    fewer than MIN_TILED training files are large enough to tile, or none are files (arrays)."""
    held_order = np.concatenate([h for _, h in folds])
    none = (None, np.zeros(len(held_order)))
    if not files:
        return none
    tiled = np.array([tile_side(int(w), int(h), size, tile) > 0 for w, h in sides], bool)
    training = np.unique(np.concatenate([t for t, _ in folds]))
    candidates = training[tiled[training]]
    if len(candidates) < MIN_TILED:
        return none
    pixels, owner = [], []
    for i in np.sort(rng.choice(candidates, min(len(candidates), FIT_IMAGES), replace=False)):
        try:
            t = tile_side(int(sides[i][0]), int(sides[i][1]), size, tile)
            pixels.append(np.concatenate([p for _, p in read_tiles(files[i], channels, size, t, (FIT_TILES, rng))]))
        except ImageReadError:
            continue  # changed since it was read: its whole-image scale stands
        owner += [i] * len(pixels[-1])
    owners = np.array(owner, np.int64)
    members = [np.nonzero(np.isin(owners, t))[0] for t, _ in folds]
    if not pixels or any(len(m) == 0 for m in members):
        return none
    bank = local.fit_banks(np.concatenate(pixels), members, rng)
    raw, grids = np.zeros(len(held_order)), []
    position = 0
    for k, (_, held) in enumerate(folds):
        for i in held:
            t = tile_side(int(sides[i][0]), int(sides[i][1]), size, tile)
            if t:
                try:
                    tops = [(g.max(), _some(g, rng)) for _, g in TileBank(bank, tile, channels)._grids(files[i], t, k)]
                except ImageReadError:
                    tops = []
                if tops:
                    raw[position] = max(top for top, _ in tops)
                    grids += [some for _, some in tops]
            position += 1
    bank = replace(bank, bound=local.bound_of(grids))
    return TileBank(bank, tile, channels), raw / bank.bound


@dataclass(frozen=True)
class Scales:
    """A model's local statistic: its whole-image scale and, where it has one, its tile scale. Called on a
    decoded batch, it measures the batch (`measure_batch`); the decode workers receive it pickled."""

    patches: PatchBank
    tiles: TileBank | None = None
    name: str = local.NAME  # the key of its values among an image's properties

    def __call__(
        self, pixels: np.ndarray, paths: Sequence[str], sources: Sequence[Any], threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return measure_batch(self.patches, self.tiles, pixels, paths, sources, threads)

    def maps(
        self, pixels: np.ndarray, paths: Sequence[str], sources: Sequence[Any], threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        return maps_batch(self.patches, self.tiles, pixels, paths, sources, threads)


def _scan(tiles: TileBank, path: str, source: Any, fold: int, paint: np.ndarray | None = None) -> Tiled | None:
    """One scored file's tile scale against tile bank `fold` (`path` as `display_path` writes it); None
    for an array's image (no file) or a file changed since it was decoded (its whole-image scale stands)."""
    if not source[3]:
        return None
    try:
        return tiles.measure(real_path(path), int(source[0]), int(source[1]), fold % len(tiles.bank.banks), paint)
    except ImageReadError:
        return None


def _scan_all(
    tiles: TileBank | None,
    paths: Sequence[str],
    sources: Sequence[Any],
    folds: np.ndarray,
    paints: np.ndarray | None = None,
    threads: int = 1,
) -> list[Tiled | None]:
    """`_scan` of every file against the tile bank of its whole image's `folds` (each painting its own
    row of `paints`), on `threads` threads of one BLAS thread each: a file's tiles are too small for
    BLAS to use two cores (32 against 35 ms for 16 tiles at 48 px, measured against five banks), while
    NumPy's products and Pillow's decoding release the GIL, so two files at once run 1.6 times as fast
    on 2 cores (benchmarks/README.md, "Local defects")."""
    if tiles is None:
        return [None] * len(paths)
    paint = [None] * len(paths) if paints is None else list(paints)
    jobs = list(zip(paths, sources, (int(k) for k in folds), paint, strict=True))
    if threads <= 1 or len(jobs) <= 1:
        return [_scan(tiles, *job) for job in jobs]
    with threadpool_limits(1), ThreadPoolExecutor(min(threads, len(jobs))) as pool:
        return list(pool.map(lambda job: _scan(tiles, *job), jobs))


def measure_batch(
    patches: PatchBank,
    tiles: TileBank | None,
    pixels: np.ndarray,
    paths: Sequence[str],
    sources: Sequence[Any],
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's local statistic (both scales), its most unusual region in the file's pixels, and
    the tile that region lies in ((-1,) * 4 where the whole-image scale found it); `paths` as
    `display_path` writes them, `sources` each file's (width, height, ...); tiles read on `threads`."""
    folds = patches.bank_of(pixels)  # both scales of an image against the same fold's banks
    values, boxes = patches.statistic(pixels, folds)
    regions = np.array(
        [local.native_box(b, patches.size, s[0], s[1]) for b, s in zip(boxes, sources, strict=True)], np.int64
    ).reshape(-1, 4)
    worst = np.full((len(values), 4), -1, np.int64)
    for j, got in enumerate(_scan_all(tiles, paths, sources, folds, threads=threads)):
        if got is not None and got.value > values[j]:
            values[j], regions[j], worst[j] = got.value, got.region, got.tile
    return values, regions, worst


def maps_batch(
    patches: PatchBank,
    tiles: TileBank | None,
    pixels: np.ndarray,
    paths: Sequence[str],
    sources: Sequence[Any],
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Working-size maps (N, S, S) of both scales in units of their bounds, and each image's region in
    working-size pixels, where `measure_batch` puts it."""
    folds = patches.bank_of(pixels)
    maps, boxes = patches.maps(pixels, folds)
    maps = maps / patches.bound
    values = maps.reshape(len(maps), -1).max(1) if len(maps) else np.zeros(0)
    for j, got in enumerate(_scan_all(tiles, paths, sources, folds, maps, threads)):
        if got is not None and got.value > values[j]:
            s, (x0, y0, x1, y1) = patches.size, got.region
            w, h = got.sides
            boxes[j] = (int(x0 * s / w), int(y0 * s / h), min(s, math.ceil(x1 * s / w)), min(s, math.ceil(y1 * s / h)))
    return maps, boxes
