"""Decoding in worker processes, the decoded-pixel cache, and streaming: fast paths that must give
exactly what plain in-process decoding gives."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import crosses, disks, write_pngs
from vae_anomaly import Detector
from vae_anomaly.errors import ImageReadError
from vae_anomaly.images import decoding
from vae_anomaly.images.batching import DecodeOptions, ImageBatch, iter_batches, read_images
from vae_anomaly.images.decoding import Preprocessing, decode_image, png_bits
from vae_anomaly.images.listing import find_images
from vae_anomaly.images.pixel_cache import PixelCache
from vae_anomaly.model import scores
from vae_anomaly.model.scores import latent_noise, score_batch

# Each score's own documented function, against which the fused pass is checked.
SCORE_FUNCTIONS = {
    "elbo": scores.negative_elbo,
    "elbo-ic": scores.complexity_corrected_elbo,
    "kl": scores.latent_kl,
    "iwae": scores.iwae_bound,
    "recon-prob": scores.reconstruction_probability,
}

GREY16 = Preprocessing(1, 16)
INLINE = DecodeOptions(workers=0, cache=False)


@pytest.fixture
def mixed(tmp_path: Path) -> list[Path]:
    """Good images of several kinds, with broken ones among them."""
    folder = tmp_path / "mixed"
    write_pngs(folder, disks(30, seed=5))
    Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (40, 40, 1))).save(folder / "red_big.png")
    Image.fromarray(np.full((4, 4), 90, np.uint8)).save(folder / "tiny.jpg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "img_0003.png").write_bytes((folder / "img_0003.png").read_bytes()[:60])  # truncated
    return find_images([folder]).files


def _same(a: list[ImageBatch], b: list[ImageBatch]) -> None:
    assert [x.paths for x in a] == [x.paths for x in b]
    assert [x.errors for x in a] == [x.errors for x in b]
    assert [x.unlike for x in a] == [x.unlike for x in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.pixels, y.pixels)
        np.testing.assert_array_equal(x.bits, y.bits)


def test_worker_processes_decode_exactly_what_the_main_process_decodes(mixed: list[Path]) -> None:
    inline = list(iter_batches(mixed, GREY16, 7, options=INLINE, bits=True))
    parallel = list(iter_batches(mixed, GREY16, 7, options=DecodeOptions(workers=2, cache=False), bits=True))
    _same(inline, parallel)
    assert sum(len(b.errors) for b in parallel) == 3
    assert any("colour" in kind for b in parallel for kind in b.unlike)


def test_png_bits_come_with_the_pixels_they_measure(mixed: list[Path]) -> None:
    for batch in iter_batches(mixed, GREY16, 8, options=DecodeOptions(workers=1, cache=False), bits=True):
        assert batch.bits is not None
        np.testing.assert_array_equal(batch.bits, png_bits(batch.pixels))


def test_png_lengths_are_taken_at_the_level_the_model_was_calibrated_with(mixed: list[Path], tmp_path: Path) -> None:
    legacy = Preprocessing(1, 16, png_level=9)
    for cache in (False, True):  # the cache keeps one folder per level: a length at level 1 is never reused
        options = DecodeOptions(workers=0, cache=cache, cache_dir=str(tmp_path))
        for batch in iter_batches(mixed, GREY16, 8, options=options, bits=True):
            np.testing.assert_array_equal(batch.bits, png_bits(batch.pixels, 1))
        for batch in iter_batches(mixed, legacy, 8, options=options, bits=True):
            np.testing.assert_array_equal(batch.bits, png_bits(batch.pixels, 9))
    assert png_bits(disks(5, seed=1)[:, None], 9).sum() < png_bits(disks(5, seed=1)[:, None], 1).sum()


def test_the_cache_returns_the_same_pixels_and_is_used_on_the_second_run(mixed: list[Path], tmp_path: Path) -> None:
    options = DecodeOptions(workers=0, cache=True, cache_dir=str(tmp_path / "cache"))
    inline = list(iter_batches(mixed, GREY16, 8, options=INLINE, bits=True))
    first = list(iter_batches(mixed, GREY16, 8, options=options, bits=True))
    cache = PixelCache(tmp_path / "cache", GREY16)
    hits, _ = cache.lookup(mixed)
    cache.close()
    second = list(iter_batches(mixed, GREY16, 8, options=options, bits=True))
    _same(inline, first)
    _same(inline, second)
    assert len(hits) == len(mixed) - 3  # every readable file; unreadable ones are tried again


def test_a_changed_file_is_decoded_again_not_read_from_the_cache(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(5, seed=1))
    options = DecodeOptions(workers=0, cache=True, cache_dir=str(tmp_path / "cache"))
    read_images(files, GREY16, options=options)
    Image.fromarray(crosses(1, seed=2)[0]).save(files[2])
    st = os.stat(files[2])
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even if written in the same tick
    again = read_images(files, GREY16, options=options)
    np.testing.assert_array_equal(again.pixels[2, 0], crosses(1, seed=2)[0])
    np.testing.assert_array_equal(again.pixels, read_images(files, GREY16, options=INLINE).pixels)


def test_bits_missing_from_cached_rows_are_computed_and_kept(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(6, seed=1))
    options = DecodeOptions(workers=0, cache=True, cache_dir=str(tmp_path / "cache"))
    read_images(files, GREY16, options=options)  # cached without bits
    with_bits = read_images(files, GREY16, options=options, bits=True)
    assert with_bits.bits is not None
    np.testing.assert_array_equal(with_bits.bits, png_bits(with_bits.pixels))
    cache = PixelCache(tmp_path / "cache", GREY16)
    hits, _ = cache.lookup(files)
    assert all(h.bits is not None for h in hits.values())


def test_no_cache_writes_nothing(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(4, seed=1))
    read_images(files, GREY16, options=DecodeOptions(workers=0, cache=False, cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()


def test_a_broken_cache_warns_once_and_decoding_goes_on(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(20, seed=1))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    said: list[str] = []
    options = DecodeOptions(workers=0, cache=True, cache_dir=str(blocker))
    batch = read_images(files, GREY16, options=options, on_warning=said.append)
    np.testing.assert_array_equal(batch.pixels, read_images(files, GREY16, options=INLINE).pixels)
    assert len(said) == 1 and "cache" in said[0] and "--no-cache" in said[0]


def test_a_corrupt_cache_index_is_survived(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(10, seed=1))
    options = DecodeOptions(workers=0, cache=True, cache_dir=str(tmp_path / "cache"))
    read_images(files, GREY16, options=options)
    for index in (tmp_path / "cache").rglob("index.sqlite"):
        index.write_bytes(b"garbage" * 100)
    said: list[str] = []
    batch = read_images(files, GREY16, options=options, on_warning=said.append)
    np.testing.assert_array_equal(batch.pixels, read_images(files, GREY16, options=INLINE).pixels)
    assert said and "cache" in said[0]


def test_streaming_decodes_at_most_a_few_batches_ahead(tmp_path: Path) -> None:
    """Bounded memory: with one worker, at most 1 + 2 batches are in flight when the first is used."""
    files = write_pngs(tmp_path / "imgs", disks(40, seed=1))
    batches = iter_batches(files, GREY16, 4, options=DecodeOptions(workers=1, cache=False))
    first = next(batches)
    for f in files[12:]:
        f.unlink()  # batches 3 and later were not decoded yet, so they now fail
    rest = list(batches)
    assert len(first.paths) == 4
    assert sum(len(b.paths) for b in rest) == 8
    assert sum(len(b.errors) for b in rest) == 28


def test_the_workers_start_only_when_something_needs_decoding(tmp_path: Path) -> None:
    files = write_pngs(tmp_path / "imgs", disks(12, seed=1))
    options = DecodeOptions(workers=2, cache=True, cache_dir=str(tmp_path / "cache"))
    started: list[int] = []
    list(iter_batches(files, GREY16, 4, options=options, on_workers=started.append))
    list(iter_batches(files, GREY16, 4, options=options, on_workers=started.append))
    assert started == [2]  # the second pass found every file in the cache


def test_workers_default_to_none_for_small_inputs_and_leave_cpus_for_scoring() -> None:
    auto = DecodeOptions()
    assert auto.workers_for(100) == 0
    assert auto.workers_for(10_000) >= 1
    assert auto.workers_for(10_000, reserve=1000) == 1
    assert DecodeOptions(workers=3).workers_for(5) == 3
    with pytest.raises(ValueError):
        DecodeOptions(workers=-1)


def test_one_fused_pass_gives_each_score_its_own_value() -> None:
    from vae_anomaly.model.vae import ConvVAE, VAEConfig

    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(1, 16, 4)).eval()
    x = torch.from_numpy(disks(9, seed=3)[:, None]).float() / 255
    noise = {"elbo": latent_noise(4, 1, 7), "elbo-ic": latent_noise(4, 1, 7), "kl": latent_noise(4, 1, 7)}
    noise |= {"iwae": latent_noise(4, 5, 8), "recon-prob": latent_noise(4, 5, 8)}
    fused = score_batch(model, x, noise)
    with torch.no_grad():
        for name, eps in noise.items():
            torch.testing.assert_close(fused[name], SCORE_FUNCTIONS[name](model, x, eps), rtol=0, atol=0)
    bits = torch.from_numpy(png_bits((x * 255).round().byte().numpy()))
    torch.testing.assert_close(score_batch(model, x, {"elbo-ic": noise["elbo"]}, bits)["elbo-ic"], fused["elbo-ic"])


def test_scores_from_workers_and_cache_equal_scores_from_plain_decoding(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    plain = Detector.load(model_file, "cpu", DecodeOptions(workers=0, cache=False))
    fast = Detector.load(model_file, "cpu", DecodeOptions(workers=2, cache=True, cache_dir=str(tmp_path / "c")))
    expected = plain.score([data_dir / "incoming"])
    threads = torch.get_num_threads()
    for _ in range(2):  # cold cache, then warm
        got = fast.score([data_dir / "incoming"])
        assert got.paths == expected.paths
        # Workers take a CPU from torch, and one thread sums float32 in another order than two:
        # equal to float32 precision, not bit for bit (the pixels themselves are compared exactly above).
        np.testing.assert_allclose(got.scores, expected.scores, rtol=2e-6, atol=1e-4)
        assert got.guard is not None and expected.guard is not None
        np.testing.assert_allclose(got.guard.scores, expected.guard.scores, rtol=2e-6, atol=1e-4)
    assert torch.get_num_threads() == threads  # the CPUs lent to the workers are given back


def test_workers_start_only_if_the_caller_says_decoding_is_worth_moving(tmp_path: Path) -> None:
    """The first two batches are decoded here and timed; `worth_it` then decides about workers."""
    files = write_pngs(tmp_path / "imgs", disks(24, seed=1))
    plain = list(iter_batches(files, GREY16, 4, options=INLINE))
    for answer in (False, True):
        asked: list[float] = []
        started: list[int] = []

        def worth_it(cost: float, answer: bool = answer, asked: list[float] = asked) -> bool:
            asked.append(cost)
            return answer

        options = DecodeOptions(workers=2, cache=False)
        got = list(iter_batches(files, GREY16, 4, options=options, on_workers=started.append, worth_it=worth_it))
        _same(plain, got)
        assert len(asked) == 1 and asked[0] > 0
        assert started == ([2] if answer else [])


@pytest.fixture
def jpegs(tmp_path: Path) -> dict[str, Path]:
    """JPEG files of the kinds photos come in, and a few that the fast path must leave to Pillow."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:300, 0:400]
    rgb = np.stack([xx * 255 // 400, yy * 255 // 300, (xx + yy) % 256], -1).astype(np.uint8)
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    paths = {name: tmp_path / f"{name}.jpg" for name in ("big", "small", "progressive", "grey", "rotated", "cmyk")}
    img.save(paths["big"], quality=90)  # 400x300: decoded at 1/4 scale for 48 px, 1/8 for 16 px
    img.crop((0, 0, 130, 100)).save(paths["small"], quality=90)
    img.save(paths["progressive"], quality=85, progressive=True)
    img.convert("L").save(paths["grey"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(paths["rotated"], quality=90, exif=exif)
    img.convert("CMYK").save(paths["cmyk"], quality=90)
    return paths


@pytest.mark.parametrize("prep", [Preprocessing(3, 48), Preprocessing(1, 48), Preprocessing(3, 16), GREY16])
def test_the_fast_jpeg_path_gives_exactly_the_pixels_pillow_gives(
    jpegs: dict[str, Path], prep: Preprocessing, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast = {name: decode_image(path, prep) for name, path in jpegs.items()}
    monkeypatch.setattr(decoding, "_simplejpeg", None)
    for name, path in jpegs.items():
        np.testing.assert_array_equal(fast[name], decode_image(path, prep), err_msg=name)
    assert fast["rotated"].shape == (prep.channels, prep.size, prep.size)


def test_plain_jpegs_take_the_fast_path_and_rotated_or_cmyk_ones_do_not(
    jpegs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = decoding._simplejpeg.decode_jpeg
    calls: list[int] = []

    def counting(data: bytes, **kw: object) -> np.ndarray:
        calls.append(len(data))
        return original(data, **kw)

    monkeypatch.setattr(decoding._simplejpeg, "decode_jpeg", counting)
    for name in ("big", "small", "progressive", "grey"):
        decode_image(jpegs[name], Preprocessing(3, 48))
    assert len(calls) == 4
    for name in ("rotated", "cmyk"):
        decode_image(jpegs[name], Preprocessing(3, 48))
    assert len(calls) == 4


def test_a_truncated_jpeg_is_explained_as_pillow_explains_it(jpegs: dict[str, Path]) -> None:
    data = jpegs["big"].read_bytes()
    jpegs["big"].write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt image data"):
        decode_image(jpegs["big"], Preprocessing(3, 48))
