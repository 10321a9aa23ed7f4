"""Tiles (tiles.py): large files are also measured in tiles at their own resolution, where a defect that
stretching to the working size erases is found, boxed, and its tile named."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from vae_anomaly import Detector, FitConfig
from vae_anomaly.cli import main
from vae_anomaly.errors import ConfigError
from vae_anomaly.images.batching import DecodeOptions, iter_batches, read_images
from vae_anomaly.images.decoding import Preprocessing, read_upright
from vae_anomaly.local.patches import fit as fit_whole
from vae_anomaly.local.tiles import (
    CHUNK,
    Scales,
    TileBank,
    boxes,
    fit,
    maps_batch,
    measure_batch,
    read_tiles,
    tile_side,
)

SIDE = 384  # px: eight working sizes, so tiled by the automatic rule (t = 128)
DEFECT = (200, 120, 236, 156)  # x0, y0, x1, y1: 0.9% of the area, 4.5 px at the working size


def fine_texture(rng: np.random.Generator, blur: bool = False) -> np.ndarray:
    """Fine grain (a 1-px correlation length), uint8 (SIDE, SIDE); with `blur`, DEFECT smoothed away:
    stretched to 48 px both average to the same flat grey."""
    f = ndimage.gaussian_filter(rng.normal(size=(SIDE, SIDE)), 0.8)
    f = np.clip(128 + 40 * f / f.std(), 0, 255)
    if blur:
        x0, y0, x1, y1 = DEFECT
        f[y0:y1, x0:x1] = ndimage.gaussian_filter(f, 6)[y0:y1, x0:x1]
    return f.astype(np.uint8)


def overlaps(a: Sequence[int], b: Sequence[int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def write(folder: Path, name: str, a: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    Image.fromarray(a).save(path)
    return path


@pytest.fixture(scope="module")
def grain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("grain")
    rng = np.random.default_rng(0)
    return {
        "normal": [write(root / "normal", f"n{i:02d}", fine_texture(rng)) for i in range(40)],
        "clean": [write(root / "clean", f"c{i:02d}", fine_texture(rng)) for i in range(12)],
        "blurred": [write(root / "blurred", f"b{i:02d}", fine_texture(rng, blur=True)) for i in range(12)],
    }


def test_the_automatic_rule_tiles_files_of_four_working_sizes_in_about_three_tiles_a_side() -> None:
    assert tile_side(191, 191, 48, None) == 0 and tile_side(192, 100, 48, None) == 96
    assert tile_side(1024, 768, 48, None) == 342 and tile_side(4000, 500, 48, None) == 500, "at most the short side"
    assert tile_side(1024, 1024, 48, 0) == 0, "0: never"
    assert tile_side(100, 100, 48, 64) == 64 and tile_side(64, 64, 48, 64) == 0, "N: every larger file"


def test_tiles_cover_the_file_overlap_by_a_quarter_and_end_flush_with_its_edges() -> None:
    every = boxes(1000, 700, 300)
    covered = np.zeros((700, 1000), bool)
    for x0, y0, x1, y1 in every:
        assert x1 - x0 == 300 and y1 - y0 == 300 and x0 >= 0 and y0 >= 0 and x1 <= 1000 and y1 <= 700
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    xs = sorted(set(every[:, 0].tolist()))
    assert xs == [0, 225, 450, 675, 700], "steps of 3/4 of a tile, the last one flush"


def test_a_jpeg_is_read_at_reduced_scale_and_its_tiles_are_boxed_in_file_pixels(tmp_path: Path) -> None:
    a = np.full((900, 1200, 3), 90, np.uint8)
    a[600:700, 900:1000] = 250  # a bright square in the last tile row and column
    path = tmp_path / "big.jpg"
    Image.fromarray(a).save(path, quality=95)
    _, scale = read_upright(path, 3, 400 / 48)
    assert scale == 8.0, "the largest DCT reduction that keeps 48 px a tile"
    chunks = list(read_tiles(path, 3, 48, 400))
    where = np.concatenate([b for b, _ in chunks])
    pixels = np.concatenate([p for _, p in chunks])
    assert pixels.shape[1:] == (3, 48, 48) and all(len(b) <= CHUNK for b, _ in chunks)
    brightest = where[int(np.argmax(pixels.reshape(len(pixels), -1).mean(1)))]
    x0, y0, x1, y1 = brightest
    assert x0 <= 900 and x1 >= 1000 and y0 <= 600 and y1 >= 700


def test_a_blur_the_working_size_cannot_see_is_found_in_its_tile_and_boxed(grain: dict[str, list[Path]]) -> None:
    normal = grain["normal"]
    sides = np.full((len(normal), 2), SIDE)
    folds = [(np.arange(0, 30), np.arange(30, 40))]
    bank, held = fit(normal, sides, 1, 48, folds, None, np.random.default_rng(0))
    assert bank is not None and held.shape == (10,) and np.all(held > 0)
    clean = [bank.measure(p, SIDE, SIDE, 0) for p in grain["clean"]]
    blurred = [bank.measure(p, SIDE, SIDE, 0) for p in grain["blurred"]]
    assert all(m is not None for m in clean + blurred)
    v_clean = np.array([m.value for m in clean if m is not None])
    v_blur = np.array([m.value for m in blurred if m is not None])
    auc_tiles = roc_auc_score(np.r_[np.zeros(12), np.ones(12)], np.r_[v_clean, v_blur])
    assert auc_tiles >= 0.95
    for m in blurred:
        assert m is not None
        rx0, ry0, rx1, ry1 = m.region
        tx0, ty0, tx1, ty1 = m.tile
        assert overlaps(m.region, DEFECT), "the region overlaps the blur"
        assert tx0 <= rx0 and ty0 <= ry0 and rx1 <= tx1 and ry1 <= ty1, "inside its tile"

    # The same images stretched to the working size: the blur is gone.
    def small(paths: list[Path]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(p).resize((48, 48), Image.Resampling.BILINEAR))[None] for p in paths])

    whole, _ = fit_whole(small(normal), [(np.arange(0, 30), np.arange(30, 40))], np.random.default_rng(0))
    w_clean, w_blur = whole.statistic(small(grain["clean"]))[0], whole.statistic(small(grain["blurred"]))[0]
    auc_whole = roc_auc_score(np.r_[np.zeros(12), np.ones(12)], np.r_[w_clean, w_blur])
    assert auc_whole < auc_tiles - 0.2, f"the whole image alone ranks it {auc_whole:.2f}"


def test_each_tile_bank_holds_tiles_of_its_models_training_files_only(grain: dict[str, list[Path]]) -> None:
    normal = grain["normal"]
    folds = [(np.arange(0, 20), np.arange(20, 40)), (np.arange(20, 40), np.arange(0, 20))]
    bank, held = fit(normal, np.full((40, 2), SIDE), 1, 48, folds, None, np.random.default_rng(1))
    assert bank is not None and len(bank.bank.banks) == 2 and held.shape == (40,)
    for k, (train, out) in enumerate(folds):

        def nearest(i: int, fold: int = k) -> float:
            grids = [bank.bank.distances(p, fold) for _, p in read_tiles(normal[i], 1, 48, 128)]
            return float(min(g.min() for g in grids))

        assert np.mean([nearest(i) < 1e-3 for i in train]) > 0.5, f"bank {k} holds its training tiles"
        assert all(nearest(i) > 1e-3 for i in out), "and none of its held-out files' tiles"


def test_a_files_tiles_are_measured_against_the_fold_its_whole_image_picks(grain: dict[str, list[Path]]) -> None:
    """Both scales of a file search one fold's banks (PatchBank.bank_of of its working-size pixels):
    one search a tile instead of K, and the tile scale exchangeable with that fold's calibration."""
    normal = grain["normal"]
    prep = Preprocessing(1, 48)
    folds = [(np.arange(0, 20), np.arange(20, 40)), (np.arange(20, 40), np.arange(0, 20))]
    whole, _ = fit_whole(read_images(normal, prep).pixels, folds, np.random.default_rng(0))
    tiled, _ = fit(normal, np.full((40, 2), SIDE), 1, 48, folds, None, np.random.default_rng(0))
    assert tiled is not None
    files = grain["blurred"] + grain["clean"]
    pixels = read_images(files, prep).pixels
    picks = whole.bank_of(pixels)
    assert set(picks.tolist()) == {0, 1}
    sources = [(SIDE, SIDE, True, "PNG")] * len(files)
    values, _, _ = measure_batch(whole, tiled, pixels, [str(p) for p in files], sources)
    for j, path in enumerate(files):
        at = tiled.measure(path, SIDE, SIDE, int(picks[j]))
        assert at is not None
        assert values[j] == pytest.approx(max(whole.statistic(pixels[j : j + 1])[0][0], at.value)), files[j].name


def test_a_tile_side_below_the_least_is_refused() -> None:
    with pytest.raises(ConfigError, match="tile"):
        FitConfig(tile=8)
    assert FitConfig(tile=0).tile == 0 and FitConfig().tile is None


@pytest.mark.slow
def test_fit_tiles_large_files_keeps_the_banks_and_score_names_the_worst_tile(
    grain: dict[str, list[Path]], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    folder = grain["normal"][0].parent
    model = tmp_path / "m.vae"
    runner = CliRunner()
    done = runner.invoke(
        main, ["fit", str(folder), "-o", str(model), "--epochs", "1", "-q", "--seed", "0", "--features", "pixels"]
    )
    assert done.exit_code == 0, done.output
    det = Detector.load(model)
    assert isinstance(det.tiles_, TileBank) and det.tiles_.tile is None and det.info()["tiles"]["overlap"] == 0.25
    got = runner.invoke(main, ["score", str(grain["blurred"][0].parent), "-m", str(model), "--format", "json"])
    records = json.loads(got.stdout)["records"]
    assert all(r["tile"] is not None for r in records), "every blurred file was found by a tile"
    assert all(overlaps(r["region"], DEFECT) for r in records)
    off = tmp_path / "off.vae"
    done = runner.invoke(
        main, ["fit", str(folder), "-o", str(off), "--epochs", "1", "-q", "--tile", "0", "--features", "pixels"]
    )
    assert done.exit_code == 0 and Detector.load(off).tiles_ is None
    bad = runner.invoke(main, ["fit", str(folder), "-o", str(off), "--tile", "5"])
    assert bad.exit_code == 2 and "at least 16 px" in bad.output


def test_workers_and_the_pixel_cache_give_the_local_statistic_the_parent_gives(
    grain: dict[str, list[Path]], tmp_path: Path
) -> None:
    """Measured where files are decoded (workers), or here for rows the pixel cache already holds: the
    same values, regions and tiles either way."""
    normal = grain["normal"]
    prep = Preprocessing(1, 48)
    pixels = read_images(normal, prep).pixels
    folds = [(np.arange(0, 30), np.arange(30, 40))]
    whole, _ = fit_whole(pixels, folds, np.random.default_rng(0))
    tiled, _ = fit(normal, np.full((40, 2), SIDE), 1, 48, folds, None, np.random.default_rng(0))
    files = grain["clean"] + grain["blurred"]

    def run(options: DecodeOptions) -> tuple[np.ndarray, np.ndarray]:
        batches = list(iter_batches(files, prep, 8, options=options, local=Scales(whole, tiled)))
        assert all(b.boxes is not None for b in batches)
        return np.concatenate([b.properties["local"] for b in batches]), np.concatenate([b.boxes for b in batches])

    here = run(DecodeOptions(workers=0, cache=False))
    there = run(DecodeOptions(workers=2, cache=False))
    cache = str(tmp_path / "cache")
    run(DecodeOptions(workers=0, cache=True, cache_dir=cache))
    cached = run(DecodeOptions(workers=0, cache=True, cache_dir=cache))  # every row from the cache
    for other in (there, cached):
        assert np.allclose(here[0], other[0]) and np.array_equal(here[1], other[1])
    assert np.all(here[1][12:, 4] >= 0), "the blurred files' regions were found in tiles"


def test_tiles_read_on_several_threads_give_what_one_thread_gives_in_input_order(
    grain: dict[str, list[Path]],
) -> None:
    """The parent reads a batch's tiles on a thread per CPU (tiles._scan_all): each file's value, region,
    tile and painted heat map are its own, whichever thread got it."""
    normal = grain["normal"]
    prep = Preprocessing(1, 48)
    folds = [(np.arange(0, 30), np.arange(30, 40))]
    whole, _ = fit_whole(read_images(normal, prep).pixels, folds, np.random.default_rng(0))
    tiled, _ = fit(normal, np.full((40, 2), SIDE), 1, 48, folds, None, np.random.default_rng(0))
    files = grain["blurred"] + grain["clean"]  # regions in the blur first, elsewhere after
    pixels = read_images(files, prep).pixels
    paths, sources = [str(p) for p in files], [(SIDE, SIDE, False, "PNG")] * len(files)
    one = measure_batch(whole, tiled, pixels, paths, sources, threads=1)
    four = measure_batch(whole, tiled, pixels, paths, sources, threads=4)
    for a, b in zip(one, four, strict=True):
        assert np.array_equal(a, b)
    assert all(overlaps(r, DEFECT) for r in one[1][:12]) and not all(overlaps(r, DEFECT) for r in one[1][12:])
    maps_one, boxes_one = maps_batch(whole, tiled, pixels, paths, sources, threads=1)
    maps_four, boxes_four = maps_batch(whole, tiled, pixels, paths, sources, threads=4)
    assert np.array_equal(maps_one, maps_four) and np.array_equal(boxes_one, boxes_four)
    assert not np.array_equal(maps_one[0], maps_one[12]), "each file painted its own map"
