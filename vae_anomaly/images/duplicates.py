"""Exact and near duplicates, within a batch and against the training images (train/test leakage).

Each image gets two 64-bit fingerprints where it is decoded:

- exact: BLAKE2b of the file's own width and height and its decoded pixels
  at the working size; equal for byte-identical files and for lossless
  re-encodings of one picture (and, at large sizes, for two files of one
  size whose pixels differ only in detail the working size does not keep).
- near: the perceptual hash of `imagehash.phash` (the 8x8 lowest DCT
  frequencies of a 32x32 grey version, each above or below their median),
  computed from the working-size pixels. Two images are near duplicates when
  their hashes differ in at most `NEAR_BITS` of 64 bits (Hamming distance),
  a bound measured by benchmarks/quality_checks.py: re-encoded, resized and
  slightly brightened copies fall within it, distinct images do not.

The model file keeps the training images' fingerprints and names, never
their pixels. Comparisons are vectorised: XOR and a popcount
(`np.bitwise_count`) of blocks of new hashes against every stored one, about
47 us per image against 100,000 training images, with no Python loop over
pairs. (Multi-index hashing, bound + 1 exact-match chunks, was tried: with
7-bit chunks it gathers thousands of candidates per query and measured no
faster.)
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from .decoding import Source

# The largest Hamming distance (of 64 bits) at which two perceptual hashes are taken for one picture:
# on benchmarks/quality_checks.py's photos, re-encoded, resized and brightened copies all lie within 8
# bits of their source and no distinct photo within 9 (benchmarks/README.md, "Checks and duplicates beside
# CleanVision").
NEAR_BITS = 8
# `fit` lowers the bound for its own images (`calibrate_bound`): at most this share of the training
# images may have another, distinct training image within it. Simple images (digits, icons, scans of
# forms) share perceptual hashes: there, near duplicates would mostly be look-alikes.
LOOK_ALIKE_SHARE = 0.01
_QUERIES, _HASHES = 256, 4096  # one block of the Hamming search: 8 MB of XORs, 1 MB of counts
_BOUND_SAMPLE = 2000  # training images whose nearest distinct neighbour calibrates the bound
_RUN_BLOCK = 1024  # images of a run compared at once with the training images and the run so far


@dataclass(frozen=True)
class Fingerprints:
    """The exact and near fingerprints of a run of images, as uint64 arrays (N,)."""

    exact: np.ndarray
    near: np.ndarray

    @classmethod
    def empty(cls) -> Fingerprints:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    @classmethod
    def concat(cls, parts: Sequence[Fingerprints]) -> Fingerprints:
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.exact for p in parts]), np.concatenate([p.near for p in parts]))


def fingerprints(
    pixels: np.ndarray, sources: Sequence[Source], near_hash: Callable[[Image.Image], Any] = imagehash.phash
) -> Fingerprints:
    """Both fingerprints of each uint8 (C, H, W) image of a batch at the working size (`near_hash`: an
    `imagehash` function of 64 bits; benchmarks/quality_checks.py compares them)."""
    exact = np.empty(len(pixels), np.uint64)
    near = np.empty(len(pixels), np.uint64)
    for i, img in enumerate(pixels):
        h = hashlib.blake2b(struct.pack("<qq", *sources[i][:2]), digest_size=8)
        h.update(np.ascontiguousarray(img).tobytes())
        exact[i] = int.from_bytes(h.digest(), "little")
        arr = img[0] if img.shape[0] == 1 else np.ascontiguousarray(img.transpose(1, 2, 0))
        bits = near_hash(Image.fromarray(arr)).hash.ravel()
        near[i] = int.from_bytes(np.packbits(bits).tobytes(), "big")
    return Fingerprints(exact, near)


def calibrate_bound(prints: Fingerprints, most: int = NEAR_BITS, share: float = LOOK_ALIKE_SHARE) -> int:
    """The near-duplicate bound for these training images: the largest d <= `most` at which at most
    `share` of them have a distinct training image (another exact fingerprint) within d bits; -1 when
    even identical perceptual hashes are that common (only exact copies are then reported).

    Leave-one-out: how often a new, distinct image like these would be taken for a copy of one of
    them. Measured on at most `_BOUND_SAMPLE` of them (seeded), each against all: a share near 1% is
    then known to about 0.2%, and 100,000 training images cost a fraction of a second.
    """
    n = len(prints.near)
    if n < 2:
        return most
    picked = np.sort(np.random.default_rng(0).permutation(n)[:_BOUND_SAMPLE])
    nearest = np.full(len(picked), 65, np.int64)
    for i in range(0, len(picked), _QUERIES):
        rows = picked[i : i + _QUERIES]
        for j in range(0, n, _HASHES):
            part = slice(j, j + _HASHES)
            dist = np.bitwise_count(np.bitwise_xor.outer(prints.near[rows], prints.near[part]))
            dist[prints.exact[rows][:, None] == prints.exact[part][None, :]] = 65  # itself and its exact copies
            nearest[i : i + len(rows)] = np.minimum(nearest[i : i + len(rows)], dist.min(axis=1))
    return max([d for d in range(most + 1) if np.mean(nearest <= d) <= share], default=-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between each hash of `a` (m,) and each of `b` (n,): (m, n)."""
    out: np.ndarray = np.bitwise_count(np.bitwise_xor.outer(a, b)).astype(np.int64)
    return out


@dataclass(frozen=True)
class Duplicate:
    """The earlier image a scored one copies: its name, `exact` or `near`, and where it is."""

    of: str
    kind: str  # "exact" or "near"
    training: bool  # a training image (leakage) rather than an earlier image of the batch
    distance: int  # Hamming distance of the perceptual hashes (0 for exact)


@dataclass
class DuplicateFinder:
    """Finds, for each scored image, a training image or an earlier image of the run it copies.

    Exact copies come first (of a training image, then of an earlier image of
    the run), then the nearest perceptual hash within `near_bits` (a training
    image on a tie: a leak is the worse finding). Within the run the earliest
    copy in input order is named, so the first of a group of copies is never
    itself a duplicate.
    """

    training: Fingerprints
    training_names: list[str]
    near_bits: int = NEAR_BITS
    _exact_seen: dict[int, str] = field(default_factory=dict, init=False)
    _near_seen: list[np.ndarray] = field(default_factory=list, init=False)
    _names_seen: list[str] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if len(self.training_names) != len(self.training.exact):
            raise ValueError(f"{len(self.training_names)} names for {len(self.training.exact)} training fingerprints")
        order = np.argsort(self.training.exact, kind="stable")
        self._train_exact_sorted = self.training.exact[order]
        self._train_exact_order = order

    def find(self, fp: Fingerprints, names: Sequence[str]) -> list[Duplicate | None]:
        """Each image's duplicate, or None; then the images join the run's seen set."""
        out: list[Duplicate | None] = [None] * len(names)
        if len(self._train_exact_sorted):  # exact, against the training images: a sorted search
            pos = np.minimum(np.searchsorted(self._train_exact_sorted, fp.exact), len(self._train_exact_sorted) - 1)
            for i in np.nonzero(self._train_exact_sorted[pos] == fp.exact)[0].tolist():
                out[i] = Duplicate(self.training_names[int(self._train_exact_order[pos[i]])], "exact", True, 0)
        for i, name in enumerate(names):  # exact, against the run so far, in input order
            key = int(fp.exact[i])
            if out[i] is None and key in self._exact_seen:
                out[i] = Duplicate(self._exact_seen[key], "exact", False, 0)
            self._exact_seen.setdefault(key, name)
        todo = [i for i in range(len(names)) if out[i] is None]
        if todo:
            queries = fp.near[todo]
            d_train, i_train = _nearest(queries, [self.training.near])
            earlier = self._near_seen
            d_run, i_run = _nearest(queries, [np.concatenate(earlier)] if earlier else [])
            within = hamming(queries, fp.near)
            for row, i in enumerate(todo):
                best, who, training = int(d_train[row]), int(i_train[row]), True
                if int(d_run[row]) < best:
                    best, who, training = int(d_run[row]), int(i_run[row]), False
                prior = within[row, :i]
                if len(prior) and int(prior.min()) < best:
                    j = int(np.argmin(prior))
                    best, who, training = int(prior[j]), -1 - j, False
                if best > self.near_bits:
                    continue
                if training:
                    of = self.training_names[who]
                else:
                    of = names[-1 - who] if who < 0 else self._names_seen[who]
                out[i] = Duplicate(of, "near", training, best)
        self._near_seen.append(fp.near.copy())
        self._names_seen += list(names)
        return out


def find_duplicates(
    fp: Fingerprints, paths: Sequence[str], training: Fingerprints, names: list[str], near_bits: int
) -> list[Duplicate | None]:
    """Each image's copy (`DuplicateFinder`), the run taken in blocks of `_RUN_BLOCK` images."""
    finder = DuplicateFinder(training, names, near_bits)
    found: list[Duplicate | None] = []
    for start in range(0, len(paths), _RUN_BLOCK):
        part = slice(start, start + _RUN_BLOCK)
        found += finder.find(Fingerprints(fp.exact[part], fp.near[part]), paths[part])
    return found


def _nearest(queries: np.ndarray, stores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The smallest Hamming distance of each query to the stored hashes (several arrays, in order; 65
    when there are none), and the index of the first hash at that distance in their concatenation.

    Blocks of 256 queries x 4,096 hashes, XORed and popcounted into reused uint8 buffers that stay
    in cache: about 47 us per query against 100,000 hashes on one core, 3.4x the plain outer product.
    """
    q = np.asarray(queries, dtype=np.uint64)
    best = np.full(len(q), 65, np.int64)
    where = np.zeros(len(q), np.int64)
    xor = np.empty((_QUERIES, _HASHES), np.uint64)
    bits = np.empty((_QUERIES, _HASHES), np.uint8)
    offset = 0
    for store in stores:
        for i in range(0, len(q), _QUERIES):
            block = q[i : i + _QUERIES]
            rows = np.arange(len(block))
            for j in range(0, len(store), _HASHES):
                part = store[j : j + _HASHES]
                x, c = xor[: len(block), : len(part)], bits[: len(block), : len(part)]
                np.bitwise_xor(block[:, None], part[None, :], out=x)
                np.bitwise_count(x, out=c)
                k = c.argmin(axis=1)
                d = c[rows, k].astype(np.int64)
                better = d < best[i : i + len(block)]
                best[i : i + len(block)][better] = d[better]
                where[i : i + len(block)][better] = offset + j + k[better]
        offset += len(store)
    return best, where
