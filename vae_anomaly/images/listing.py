"""Finding image files under the inputs, in an order that is the same on every machine.

Nothing here opens an image: `decoding.py` does that, file by file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputPathError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass
class FileListing:
    """The image files found under the inputs, in a repeatable order."""

    files: list[Path] = field(default_factory=list)
    ignored: int = 0  # hidden files and files without an image extension


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable, unambiguous and reversible form of any file name (`real_path` reverses it).

    Bytes that are not UTF-8 are written \\xHH and a backslash is doubled,
    so the name holding the byte 0xff and the name holding the four
    characters \\xff differ in every report. (On Windows, where names are
    text and the backslash separates folders, the path is shown as it is.)
    """
    if os.name == "nt":
        return os.fspath(path)
    text = os.fsencode(path).decode("utf-8", "surrogateescape")
    return _ESCAPES.sub(lambda m: "\\\\" if m[0] == "\\" else f"\\x{ord(m[0]) - 0xDC00:02x}", text)


_ESCAPES = re.compile("[\\\\\udc80-\udcff]")
_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2})")


def real_path(shown: str) -> Path:
    """The file a `display_path` names."""
    if os.name == "nt":
        return Path(shown)
    out = bytearray()
    pos = 0
    for m in _UNESCAPE.finditer(shown):
        out += shown[pos : m.start()].encode("utf-8", "surrogateescape")
        out += b"\\" if m[1] == "\\" else bytes([int(m[1][1:], 16)])
        pos = m.end()
    out += shown[pos:].encode("utf-8", "surrogateescape")
    return Path(os.fsdecode(bytes(out)))


def _is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(paths: Sequence[str | os.PathLike[str]]) -> FileListing:
    """Files named directly, and image files under folders, walked recursively.

    Folders are walked in sorted order so the listing is the same on every
    machine; hidden files and folders are skipped and counted as ignored,
    like non-image files. A file named directly is always kept, whatever its
    extension, so that a bad one is reported rather than silently skipped.

    Nothing under a folder vanishes unsaid: a folder that cannot be read is
    listed itself, so that it becomes an unreadable record with its reason
    (exit 3); links to folders are followed, and a folder reached a second
    time (a link loop, or two links to one folder) is walked once, the
    repeats counted as ignored. What is listed need not be a regular file:
    decoding refuses FIFOs, sockets and devices without opening them.
    """
    listing = FileListing()
    seen: set[Path] = set()

    def add(p: Path) -> None:
        if p not in seen:
            seen.add(p)
            listing.files.append(p)

    def unreadable(error: OSError) -> None:
        add(Path(error.filename))

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            walked: set[tuple[int, int]] = set()
            for root, dirs, files in os.walk(p, onerror=unreadable, followlinks=True):
                try:
                    st = os.stat(root)
                except OSError:  # gone or unreadable since it was listed: a record with its reason
                    add(Path(root))
                    dirs[:] = []
                    continue
                if (st.st_dev, st.st_ino) in walked:  # reached again through a link
                    listing.ignored += 1
                    dirs[:] = []
                    continue
                walked.add((st.st_dev, st.st_ino))
                hidden_dirs = [d for d in dirs if d.startswith(".")]
                listing.ignored += len(hidden_dirs)
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or not _is_image_name(name):
                        listing.ignored += 1
                    else:
                        add(Path(root) / name)
        elif p.exists() or p.is_symlink():
            add(p)
        else:
            raise InputPathError(
                f"{display_path(p)}: no such file or folder. Check the path, or quote it if it has spaces."
            )
    return listing


def require_images(listing: FileListing) -> list[Path]:
    """The listing's files, or the usage error every command gives for inputs without images."""
    if not listing.files:
        raise InputPathError(
            f"no image files found in the inputs ({listing.ignored} hidden or non-image files ignored); "
            "supported: PNG, JPEG, BMP, GIF, TIFF, WebP"
        )
    return listing.files
