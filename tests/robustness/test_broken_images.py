"""Broken, odd and hostile image files: each becomes a record with its reason, never a crash or a hang."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import disks, write_pngs
from vae_anomaly.cli import main
from vae_anomaly.errors import ImageReadError
from vae_anomaly.images.batching import iter_batches
from vae_anomaly.images.decoding import Preprocessing, decode_image
from vae_anomaly.images.listing import find_images

GREY16 = Preprocessing(1, 16)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size in its header but holds almost no data: a bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of messy input a real folder holds, next to good files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8))
    png, jpg = _encoded(grey, "PNG"), _encoded(grey, "JPEG")
    files: dict[str, bytes] = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "random.png": rng.bytes(500),
        "random.webp": rng.bytes(64),
        "text.jpg": b"this is a text file, not a JPEG\n",
        "bomb.png": _png_header_only(60_000, 60_000),
        "good one with spaces.png": png,
        "<img src=x onerror=alert(1)>.png": png,
        "one-by-one.png": _encoded(Image.new("L", (1, 1), 128), "PNG"),
        "large.jpg": _encoded(Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)), "JPEG"),
        "sixteen.png": _encoded(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"),
        "cmyk.jpg": _encoded(Image.new("CMYK", (20, 20), (10, 20, 30, 40)), "JPEG"),
        "palette.png": _encoded(grey.convert("P"), "PNG"),
        "alpha.png": _encoded(Image.new("RGBA", (20, 20), (10, 200, 30, 100)), "PNG"),
        "image.tiff": _encoded(grey, "TIFF"),
        "image.webp": _encoded(grey, "WEBP"),
        ".hidden.png": png,
        "notes.txt": b"not an image",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    frames = [Image.new("L", (20, 20), v) for v in (10, 200)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (root / "folder.png").mkdir()  # a folder with an image name is walked, not read
    os.symlink(root / "does-not-exist.png", root / "dangling.png")
    os.symlink(root / "loop-b.png", root / "loop-a.png")
    os.symlink(root / "loop-a.png", root / "loop-b.png")
    fd = os.open(os.fsencode(root) + b"/not-utf8-\xff\xfe.png", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, png)
    os.close(fd)
    return root


GOOD = {
    "good one with spaces.png",
    "<img src=x onerror=alert(1)>.png",
    "one-by-one.png",
    "large.jpg",
    "sixteen.png",
    "cmyk.jpg",
    "palette.png",
    "alpha.png",
    "image.tiff",
    "image.webp",
    "animated.gif",
    "not-utf8-\\xff\\xfe.png",
}
BAD = {
    "empty.png": "empty file",
    "truncated.png": "truncated",
    "truncated.jpg": "truncated",
    "random.png": "not a readable image",
    "random.webp": "not a readable image",
    "text.jpg": "not a readable image",
    "bomb.png": "refused",
    "dangling.png": "not found",
    "loop-a.png": "symbolic links",
    "loop-b.png": "symbolic links",
}


def test_every_bad_input_becomes_a_record_and_every_good_one_is_read(bad_corpus: Path) -> None:
    listing = find_images([bad_corpus])
    assert listing.ignored == 2  # .hidden.png and notes.txt
    batches = list(iter_batches(listing.files, GREY16, batch_size=7))
    read = {Path(p).name for b in batches for p in b.paths}
    errors = {Path(e.path).name: e.reason for b in batches for e in b.errors}
    assert read == GOOD
    assert set(errors) == set(BAD)
    for name, words in BAD.items():
        assert words in errors[name], (name, errors[name])
    assert "89,478,485" in errors["bomb.png"] and "--max-image-pixels" in errors["bomb.png"]
    assert all(b.pixels.shape[1:] == (1, 16, 16) for b in batches)


def test_animated_gif_gives_its_first_frame(bad_corpus: Path) -> None:
    assert decode_image(bad_corpus / "animated.gif", GREY16).max() == 10


def test_bomb_limit_can_be_raised(bad_corpus: Path) -> None:
    from vae_anomaly.images.decoding import set_max_image_pixels

    set_max_image_pixels(10)
    try:
        with pytest.raises(ImageReadError, match="refused"):
            decode_image(bad_corpus / "palette.png", GREY16)  # 400 pixels > 10
    finally:
        set_max_image_pixels(None)
    decode_image(bad_corpus / "palette.png", GREY16)


def test_permission_denied_is_a_record_even_where_root_could_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI runs as root, who reads any file: the reader's handling is checked by making open() refuse."""
    import vae_anomaly.images.decoding as images_mod

    p = tmp_path / "locked.png"
    Image.new("L", (4, 4)).save(p)

    def refuse(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_mod.Image, "open", refuse)
    batch = next(iter_batches([p], GREY16))
    assert batch.errors[0].reason == "permission denied: make the file readable"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions_are_a_record(tmp_path: Path) -> None:
    p = tmp_path / "locked.png"
    Image.new("L", (4, 4)).save(p)
    p.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        decode_image(p, GREY16)


def test_score_cli_lists_every_bad_file_and_exits_3(bad_corpus: Path, model_file: Path) -> None:
    r = CliRunner().invoke(main, ["score", str(bad_corpus), "-m", str(model_file), "--format", "json"])
    assert r.exit_code == 3, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"]["unreadable"] == len(BAD) and doc["summary"]["scored"] == len(GOOD)
    assert doc["summary"]["ignored"] == 2
    assert "colour images converted to grey" in r.stderr and "far from the size of the training images" in r.stderr
    args = ["score", str(bad_corpus), "-m", str(model_file), "--skip-unreadable", "--format", "csv"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0
    names = {Path(row["path"]).name for row in csv.DictReader(io.StringIO(r.stdout))}
    assert names == GOOD | set(BAD)


def test_fit_skips_unreadable_training_images_with_a_warning(bad_corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "train"
    write_pngs(folder, disks(40, seed=3))
    (folder / "broken.png").write_bytes(b"junk")
    args = ["fit", str(folder), "-o", str(tmp_path / "m.vae"), "--epochs", "1", "--quiet", "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable training image" in r.stderr and "broken.png" in r.stderr
    r = CliRunner().invoke(main, [*args, "--max-unreadable-fraction", "0.01"])
    assert r.exit_code == 2 and "--max-unreadable-fraction" in r.stderr
    r = CliRunner().invoke(
        main, ["fit", str(bad_corpus / "empty.png"), str(bad_corpus / "text.jpg"), "-o", str(tmp_path / "x.vae")]
    )
    assert r.exit_code == 2 and "none of the 2 training image files could be read" in r.stderr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_crash_the_reader(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "fuzz.png"
    p.write_bytes(data)
    try:
        arr = decode_image(p, GREY16)
    except ImageReadError as exc:
        assert str(exc)
    else:
        assert arr.shape == (1, 16, 16) and arr.dtype == np.uint8


_SEEDS = {
    fmt: _encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (12, 12), dtype=np.uint8)), fmt)
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(_SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_mutated_real_images_never_crash_the_reader(
    tmp_path: Path, fmt: str, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(_SEEDS[fmt])
    for pos, val in edits:
        data[pos % len(data)] = val
    p = tmp_path / f"fuzz.{fmt.lower()}"
    p.write_bytes(bytes(data[: max(1, cut % (len(data) + 1))]))
    try:
        decode_image(p, GREY16)
    except ImageReadError as exc:
        assert str(exc)
