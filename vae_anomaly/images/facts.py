"""What is measured of each image where it is decoded: its properties (properties.py), its duplicate
fingerprints (duplicates.py) and, when scoring, a model's local statistic (handed in as a `LocalMeasure`,
so that decoding knows nothing of patch banks); and what the checks read of each scored image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import properties
from .decoding import Source
from .duplicates import Fingerprints, fingerprints


class LocalMeasure(Protocol):
    """A model's local statistic measured on a decoded batch (local/tiles.Scales): each image's value, its
    most unusual region and the tile it lies in. Passed in, and pickled to the decode workers, so that
    decoding knows nothing of patch banks."""

    @property
    def name(self) -> str:
        """The key of its values among an image's properties."""
        ...

    def __call__(
        self, pixels: np.ndarray, paths: Sequence[str], sources: Sequence[Any], threads: int = ...
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class Measured(Protocol):
    """A decoded batch with its facts (batching.ImageBatch)."""

    properties: dict[str, np.ndarray]
    sources: list[Source]
    fingerprints: Fingerprints


# What is measured of each image where it is decoded: properties, fingerprints, and the local
# statistic's boxes (region and tile) when a model's scales were given.
Facts = tuple[dict[str, np.ndarray], Fingerprints, np.ndarray | None]


@dataclass
class ImageFacts:
    """What the checks read of each scored image, in the order of the scored paths."""

    properties: dict[str, np.ndarray]  # properties.measure, and the local statistic (local.py)
    formats: list[str]  # each file's format, "" for arrays
    fingerprints: Fingerprints
    # The most unusual region of each image (local.py): (x0, y0, x1, y1) in the file's own pixels;
    # None where the model has no local statistic.
    regions: np.ndarray | None = None
    # The tile that region lies in (tiles.py), the same way; rows of -1 where the whole image found it.
    tiles: np.ndarray | None = None

    @classmethod
    def of(
        cls, batches: Sequence[Measured], regions: Sequence[np.ndarray] = (), tiles: Sequence[np.ndarray] = ()
    ) -> ImageFacts:
        keys = batches[0].properties if batches else {}
        return cls(
            {k: np.concatenate([b.properties[k] for b in batches]) for k in keys},
            [s[3] for b in batches for s in b.sources],
            Fingerprints.concat([b.fingerprints for b in batches]),
            np.concatenate(regions).reshape(-1, 4) if len(regions) else None,
            np.concatenate(tiles).reshape(-1, 4) if len(tiles) else None,
        )


def measure(
    pixels: np.ndarray, sources: Sequence[Source], paths: Sequence[str], local: LocalMeasure | None, threads: int = 1
) -> Facts:
    """The properties and duplicate fingerprints of decoded images (properties.py, duplicates.py), and
    with `local` their local statistic (tiles.measure_batch): measured in the decode workers, where
    it overlaps the parent's scoring, or here with a thread per CPU for the tiles."""
    found = properties.measure(pixels, sources)
    boxes = None
    if local is not None:
        found[local.name], region, tile = local(pixels, paths, sources, threads)
        boxes = np.concatenate([region, tile], 1)
    return found, fingerprints(pixels, sources), boxes


class Rows:
    """A batch's properties and fingerprints, row by row, as decoded and cached rows come in."""

    def __init__(self, n: int) -> None:
        self.have = np.zeros(n, bool)
        self.values: dict[str, np.ndarray] = {}
        self.exact = np.zeros(n, np.uint64)
        self.near = np.zeros(n, np.uint64)
        self.boxes: np.ndarray | None = None

    def put(self, rows: Sequence[int], facts: Facts) -> None:
        found, prints, boxes = facts
        for name, v in found.items():
            self.values.setdefault(name, np.full(len(self.have), np.nan))[rows] = v
        self.exact[rows], self.near[rows] = prints.exact, prints.near
        if boxes is not None:
            if self.boxes is None:
                self.boxes = np.full((len(self.have), 8), -1, np.int64)
            self.boxes[rows] = boxes
        self.have[rows] = True

    def rows(self, ok: np.ndarray) -> Facts:
        boxes = None if self.boxes is None else self.boxes[ok]
        return {k: v[ok] for k, v in self.values.items()}, Fingerprints(self.exact[ok], self.near[ok]), boxes
