"""Duplicates and leaks (duplicates.py): perceptual hashes, the near bound, the nearest-hash search."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import PHOTO_SIDE as SIDE
from conftest import photo
from vae_anomaly.images.duplicates import (
    NEAR_BITS,
    DuplicateFinder,
    Fingerprints,
    _nearest,
    calibrate_bound,
    fingerprints,
    hamming,
)


def _fp(exact: list[int], near: list[int]) -> Fingerprints:
    return Fingerprints(np.array(exact, np.uint64), np.array(near, np.uint64))


def test_the_near_bound_is_lowered_where_training_images_look_alike() -> None:
    rng = np.random.default_rng(5)
    ids = np.arange(1000, dtype=np.uint64)
    distinct = rng.integers(0, 2**63, 1000, dtype=np.int64).astype(np.uint64)
    assert calibrate_bound(Fingerprints(ids, distinct)) == NEAR_BITS
    alike = distinct.copy()
    alike[:30] = alike[30:60] ^ np.uint64(0b1111)  # 6% of them 4 bits from another: look-alikes, not copies
    assert calibrate_bound(Fingerprints(ids, alike)) == 3
    same = np.zeros(1000, np.uint64)
    assert calibrate_bound(Fingerprints(ids, same)) == -1, "identical hashes of distinct images: exact only"
    assert calibrate_bound(Fingerprints(np.zeros(1000, np.uint64), same)) == NEAR_BITS, "exact copies do not count"


def test_hamming_counts_differing_bits() -> None:
    a = np.array([0b1011, 2**64 - 1], np.uint64)
    b = np.array([0, 0b1], np.uint64)
    assert hamming(a, b).tolist() == [[3, 2], [64, 63]]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 600), st.integers(0, 9000), st.integers(1, 3))
def test_the_blocked_search_finds_the_nearest_hash_as_the_full_comparison_does(
    seed: int, m: int, n: int, parts: int
) -> None:
    rng = np.random.default_rng(seed)
    store = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) << np.uint64(rng.integers(0, 2))
    queries = rng.integers(0, 2**63, m, dtype=np.int64).astype(np.uint64)
    if n:
        queries[: m // 2] = store[rng.integers(0, n, m // 2)] ^ np.uint64(rng.integers(0, 2**8))
    d, where = _nearest(queries, np.array_split(store, parts))
    if n == 0:
        assert (d == 65).all()
        return
    full = hamming(queries, store)
    assert np.array_equal(d, full.min(axis=1)) and np.array_equal(where, full.argmin(axis=1))


def test_duplicates_name_the_earliest_copy_and_prefer_a_training_image() -> None:
    train = _fp([11, 12], [0b0, 2**40])
    finder = DuplicateFinder(train, ["train/a.png", "train/b.png"], near_bits=3)
    far = 0xFFFF_FFFF_0000_0000  # 32 bits from train/a's hash, 24 from train/b's
    first = finder.find(_fp([11, 20, 21, 20], [0b0, far, far + 0b111, far]), ["x", "y", "z", "w"])
    assert first[0] is not None and (first[0].of, first[0].kind, first[0].training) == ("train/a.png", "exact", True)
    assert first[1] is None, "the first of a group is not a copy"
    assert first[2] is not None and (first[2].of, first[2].kind, first[2].distance) == ("y", "near", 3)
    assert first[3] is not None and (first[3].of, first[3].kind) == ("y", "exact")
    later = finder.find(_fp([20, 30], [far, 2**40 + 1]), ["v", "u"])
    assert later[0] is not None and later[0].of == "y", "copies are found across batches"
    assert later[1] is not None and (later[1].of, later[1].kind) == ("train/b.png", "near")


def test_distinct_hashes_are_not_duplicates() -> None:
    rng = np.random.default_rng(0)
    near = rng.integers(0, 2**63, 2000, dtype=np.int64).astype(np.uint64)
    finder = DuplicateFinder(Fingerprints(np.arange(1000, dtype=np.uint64), near[:1000]), [str(i) for i in range(1000)])
    found = finder.find(
        Fingerprints(np.arange(5000, 6000, dtype=np.uint64), near[1000:]), [f"n{i}" for i in range(1000)]
    )
    assert not any(found), "random 64-bit hashes lie about 32 bits apart"


def test_near_fingerprints_survive_re_encoding_but_not_a_different_picture() -> None:
    rng = np.random.default_rng(3)
    a, b = photo(rng), photo(rng)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=80)
    a2 = np.asarray(Image.open(buf).convert("RGB"))
    fp = fingerprints(np.stack([a, a2, b]).transpose(0, 3, 1, 2), [(SIDE, SIDE, True, "")] * 3)
    d = hamming(fp.near, fp.near)
    assert d[0, 1] <= 4 < d[0, 2]
    assert fp.exact[0] != fp.exact[1]
