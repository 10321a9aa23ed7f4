"""The decoded-pixel cache damaged, stale or edited: never a changed score or check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import cli_run as run
from conftest import crosses, disks, write_pngs


# ------------------------------------------------------------- the decoded-pixel cache
def _scores(model: Path, folder: Path, *cache: str | Path) -> tuple[dict[str, float], str]:
    code, out, err = run("score", folder, "-m", model, "--format", "json", "--workers", "0", *cache)
    assert code == 0, err
    return {r["path"]: r["score"] for r in json.loads(out)["records"]}, err


@pytest.mark.slow
def test_a_damaged_or_stale_pixel_cache_never_changes_a_score(model_file: Path, tmp_path: Path) -> None:
    import sqlite3

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for i, im in enumerate(disks(30, seed=67)):
        Image.fromarray(im).save(a / f"{i:02d}.bmp")  # BMP: every file of these the same size
    write_pngs(b, crosses(30, seed=68))
    cache = ("--cache-dir", tmp_path / "cache")
    truth, _ = _scores(model_file, a, "--no-cache")
    assert _scores(model_file, a, *cache)[0] == truth  # cold: fills the cache
    (folder,) = (tmp_path / "cache").glob("pixels-v*")
    data, index = folder / "pixels.u8", folder / "index.sqlite"

    raw = bytearray(data.read_bytes())  # 1. flipped bytes
    raw[100:4000] = bytes(255 - v for v in raw[100:4000])
    data.write_bytes(bytes(raw))
    got, err = _scores(model_file, a, *cache)
    assert got == truth and "failed their check" in err

    with sqlite3.connect(index) as db:  # 2. index rows pointed at other files' pixels
        db.execute("UPDATE files SET row = (row + 1) % 30")
    got, err = _scores(model_file, a, *cache)
    assert got == truth and "failed their check" in err

    with open(data, "r+b") as fh:  # 3. truncated, then refilled with another folder's pixels
        fh.truncate(data.stat().st_size // 3)
    _scores(model_file, b, *cache)
    assert _scores(model_file, a, *cache)[0] == truth

    target = a / "05.bmp"  # 4. rewritten with the same size and modification time
    st = target.stat()
    Image.fromarray(crosses(1, seed=69)[0]).save(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size and target.stat().st_mtime_ns == st.st_mtime_ns
    truth, _ = _scores(model_file, a, "--no-cache")
    assert _scores(model_file, a, *cache)[0] == truth, "the new pixels, not the cached ones"


def test_edited_cache_columns_never_change_a_score_or_a_check(cli_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """The PNG length (read by elbo-ic-nn), width and format (checks) are covered by digests: an edit is
    computed or decoded again, never used."""
    import sqlite3

    def records(*cache: str | Path) -> tuple[list[dict], str]:
        args = ("--format", "json", "--workers", "0", *cache)
        code, out, err = run("score", data_dir / "incoming", "-m", cli_model, *args)
        assert code in (0, 1), err
        keep = ("path", "score", "p_value", "flagged", "atypical")
        return [{k: r[k] for k in keep} for r in json.loads(out)["records"]], err

    truth, _ = records("--no-cache")
    cache = ("--cache-dir", tmp_path / "cache")
    assert records(*cache)[0] == truth  # cold: fills the cache
    (folder,) = (tmp_path / "cache").glob("pixels-v*")
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("UPDATE files SET bits = bits + 5000 WHERE rowid % 2 = 0")
    assert records(*cache)[0] == truth, "an edited PNG length is computed again"
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("UPDATE files SET width = 5000, format = 'TIFF' WHERE rowid % 3 = 0")
    got, err = records(*cache)
    assert got == truth and "failed their check" in err, "an edited width or format: decoded again"
