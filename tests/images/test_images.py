"""Finding and decoding image files; bad files become records, not crashes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_anomaly.errors import InputPathError
from vae_anomaly.images.batching import iter_batches
from vae_anomaly.images.decoding import (
    PNG_LEVEL,
    WORKING_SIZE,
    Preprocessing,
    decode_image,
    infer_preprocessing,
    unlike_kinds,
)
from vae_anomaly.images.listing import find_images

GREY8 = Preprocessing(1, 8)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    img = Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))
    for rel in ["z.png", "a.jpg", "b/c.bmp", "b/deeper/d.gif", "b/e.tiff", "f.webp", ".hidden/x.png", ".dot.png"]:
        img.save(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folders_are_walked_recursively_in_sorted_order_skipping_hidden_and_non_images(folder: Path) -> None:
    listing = find_images([folder])
    rel = [p.relative_to(folder).as_posix() for p in listing.files]
    assert rel == ["a.jpg", "f.webp", "z.png", "b/c.bmp", "b/e.tiff", "b/deeper/d.gif"]
    assert listing.ignored == 3  # .hidden/, .dot.png, notes.txt


def test_several_inputs_keep_their_order_without_duplicates(folder: Path) -> None:
    listing = find_images([folder / "z.png", folder, folder / "a.jpg"])
    assert listing.files[0].name == "z.png" and len(listing.files) == 6


def test_missing_path_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InputPathError, match="nope"):
        find_images([tmp_path / "nope"])


def test_every_supported_format_decodes_to_the_model_shape(folder: Path) -> None:
    for p in find_images([folder]).files:
        arr = decode_image(p, GREY8)
        assert arr.shape == (1, 8, 8) and arr.dtype == np.uint8


def test_bad_files_become_records_with_reasons(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(good)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    batches = list(iter_batches(find_images([tmp_path]).files, GREY8, batch_size=2))
    paths = [p for b in batches for p in b.paths]
    errors = {Path(e.path).name: e.reason for b in batches for e in b.errors}
    assert [Path(p).name for p in paths] == ["good.png"]
    assert errors["empty.png"] == "empty file (0 bytes)"
    assert "not a readable image" in errors["text.jpg"]
    assert "not a readable image" in errors["noise.png"]
    assert "truncated" in errors["cut.png"] or "corrupt" in errors["cut.png"]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[0, :, :] = 255  # a white top row
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = tmp_path / "rot.png"
    Image.fromarray(arr).save(p, exif=exif)
    out = decode_image(p, GREY8)[0]
    assert out[:, -1].min() > 200 and out[0, :4].max() < 60  # the top row became the right column
    tall = tmp_path / "tall.jpg"
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(tall, exif=exif)  # 12 wide, 8 high, shown turned
    source: dict[str, object] = {}
    decode_image(tall, GREY8, source)
    assert source["size"] == (8, 12), "width and height as shown: boxes in records are in these pixels"


def test_modes_are_converted_not_refused(tmp_path: Path) -> None:
    rgba = Image.fromarray(np.full((10, 10, 4), 100, np.uint8), "RGBA")
    i16 = Image.fromarray(np.full((10, 10), 65535, np.uint16))
    cmyk = Image.new("CMYK", (10, 10), (0, 0, 0, 0))
    pal = Image.new("P", (10, 10), 3)
    for name, img in [("rgba.png", rgba), ("i16.png", i16), ("cmyk.jpg", cmyk), ("pal.gif", pal)]:
        img.save(tmp_path / name)
        assert decode_image(tmp_path / name, GREY8).shape == (1, 8, 8)
        assert decode_image(tmp_path / name, Preprocessing(3, 8)).shape == (3, 8, 8)
    assert decode_image(tmp_path / "i16.png", GREY8).min() == 255  # 16-bit white stays white


def test_grey_or_colour_and_size_are_decided_from_the_data(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(tmp_path / "greyish_rgb.png")
    prep, errors = infer_preprocessing([tmp_path / "greyish_rgb.png"])
    assert prep == Preprocessing(1, 12, sides=(12, 12)) and not errors
    colour = np.zeros((12, 12, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp_path / "red.png")
    prep, _ = infer_preprocessing([tmp_path / "greyish_rgb.png", tmp_path / "red.png"])
    assert prep.channels == 3
    prep, _ = infer_preprocessing([tmp_path / "red.png"], image_size=20)
    assert prep.size == 20


def test_photos_larger_than_the_working_size_are_worked_on_at_it_and_small_images_keep_their_size(
    tmp_path: Path,
) -> None:
    for i, (w, h) in enumerate([(200, 120), (96, 300), (256, 256)]):
        Image.fromarray(np.full((h, w, 3), (40 * i, 90, 200), np.uint8)).save(tmp_path / f"p{i}.jpg")
    prep, _ = infer_preprocessing(sorted(tmp_path.glob("p*.jpg")))
    assert (prep.size, prep.channels, prep.sides) == (WORKING_SIZE, 3, (96, 300))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    # A model file from before the PNG level was stored was calibrated at level 9, and is scored at it.
    old = {k: v for k, v in prep.to_dict().items() if k not in ("png_level", "sides")}
    assert Preprocessing.from_dict(old) == Preprocessing(3, WORKING_SIZE, png_level=9)
    assert prep.png_level == PNG_LEVEL
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "small.png")
    assert infer_preprocessing([tmp_path / "small.png"])[0].size == 30
    # Far from the training files' sides, not from the working size: a 300 px photo is not "far" from them.
    assert unlike_kinds(300, 200, True, prep) == []
    assert unlike_kinds(30, 20, True, prep) == [
        "images far from the size of the training images (with sides 96 to 300 px), resized"
    ]
