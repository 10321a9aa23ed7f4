"""The model file: one file, safe to load from strangers, written atomically.

Layout (a `torch.save` zip holding only tensors, strings and numbers, so
it loads with `weights_only=True` and never unpickles arbitrary objects):

    format          "vae-anomaly-model"
    format_version  2
    metadata        JSON text: VAEConfig, preprocessing, training summary,
                    calibration settings, library versions, and "models": K
    state_dict      {"model<k>.<name>": tensor}  the weights of model k, k = 0..K-1
    calibration     {score: tensor}  held-out normal scores per score type, the
                    property checks' values ("property:NAME", same images),
                    {"fold": int64 tensor}: the model that did not see each image,
                    and "train:exact", "train:near": every training image's
                    duplicate fingerprints (int64 bits of uint64 hashes)
    checksum        SHA-256 over all of the above, to catch bit flips and edits

K = 1 is one model trained on a split (calibration = the held-out part);
K > 1 are cross-fitted models (model k trained without fold k, whose images
it scored; calibration = every image). Both fit in one layout, so one
loader serves both and a K-model file is still a single, checksummed file.

Format 1 (version 0.1.0 before cross-fitting) is still read: one model,
unprefixed weight names, no "fold" entry. Files are always written as 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelFileError, OutputError

FORMAT_NAME = "vae-anomaly-model"
FORMAT_VERSION = 2
FOLD_KEY = "fold"  # in `calibration`: the fold (= model) of each calibration score
# In `calibration`: every training image's duplicate fingerprints (duplicates.py), uint64 bits as
# int64; their names are the metadata's checks.training_files. Older files have neither.
TRAIN_EXACT_KEY = "train:exact"
TRAIN_NEAR_KEY = "train:near"


def model_prefix(k: int) -> str:
    """Weight names of model k in a format-2 file start with this."""
    return f"model{k}."


@dataclass
class ModelFile:
    """The decoded contents of a model file, before any module is built."""

    metadata: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    calibration: dict[str, torch.Tensor]
    checksum: str
    version: int = FORMAT_VERSION


def split_models(mf: ModelFile) -> list[dict[str, torch.Tensor]]:
    """The K models' state dicts, in order.

    Raises KeyError or ValueError when the names do not fit the declared count.
    """
    k_models = int(mf.metadata["models"])
    if k_models < 1:
        raise ValueError(f"model count {k_models} < 1")
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(k_models)]
    for name, t in mf.state_dict.items():
        head, _, rest = name.partition(".")
        if not head.startswith("model") or not head[5:].isdigit() or int(head[5:]) >= k_models:
            raise ValueError(f"weight {name!r} belongs to no model of {k_models}")
        states[int(head[5:])][rest] = t
    return states


def pack_fingerprints(exact: np.ndarray, near: np.ndarray) -> dict[str, torch.Tensor]:
    """The training images' uint64 fingerprints, bit for bit as int64 tensors (torch saves no uint64)."""
    return {
        TRAIN_EXACT_KEY: torch.from_numpy(np.asarray(exact, np.uint64).view(np.int64).copy()),
        TRAIN_NEAR_KEY: torch.from_numpy(np.asarray(near, np.uint64).view(np.int64).copy()),
    }


def unpack_fingerprints(mf: ModelFile) -> tuple[np.ndarray, np.ndarray] | None:
    """The training images' (exact, near) fingerprints as uint64, or None in files written before them.

    Raises ValueError when their count is not that of the training file names."""
    exact, near = mf.calibration.get(TRAIN_EXACT_KEY), mf.calibration.get(TRAIN_NEAR_KEY)
    if exact is None or near is None:
        return None
    names = mf.metadata.get("checks", {}).get("training_files", [])
    if not len(names) == len(exact) == len(near):
        raise ValueError(f"{len(names)} training file names for {len(exact)} and {len(near)} fingerprints")
    return exact.numpy().view(np.uint64), near.numpy().view(np.uint64)


def _digest(metadata_json: str, state: dict[str, torch.Tensor], cal: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(metadata_json.encode("utf-8"))
    for prefix, tensors in (("w:", state), ("c:", cal)):
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{prefix}{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()


def _atomic_torch_save(path: Path, payload: dict[str, Any]) -> None:
    """Temporary file in the same folder, fsync, `os.replace`, fsync the folder.

    The file gets the mode the umask gives a new file (mkstemp's 0600 would hide a model from a CI job's
    other users, as reports are not hidden); the temporary files a killed run left for this path
    (`.NAME.*.tmp`, never finished, so never the file itself) are removed first.
    """
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f".{glob_escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the replace is still atomic


def save(
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    calibration: dict[str, torch.Tensor],
) -> str:
    """Write atomically (temporary file, fsync, `os.replace`); returns the checksum.

    A crash at any moment leaves either the old file or the new one.
    """
    path = Path(path)
    meta_json = json.dumps(metadata, sort_keys=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    cal = {k: v.detach().cpu().contiguous() for k, v in calibration.items()}
    checksum = _digest(meta_json, state, cal)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "metadata": meta_json,
        "state_dict": state,
        "calibration": cal,
        "checksum": checksum,
    }
    try:
        _atomic_torch_save(path, payload)
    except OSError as exc:
        raise OutputError(f"cannot write the model file to {os.fsdecode(path)}: {exc.strerror or exc}.") from None
    return checksum


def load(path: str | os.PathLike[str]) -> ModelFile:
    """Read and verify a model file; every failure is a `ModelFileError` naming the file."""
    path = Path(path)
    name = os.fsdecode(path)
    if not path.exists():
        raise ModelFileError(f"{name}: no such model file. Train one with `vae-anomaly fit DIR -o {name}`.")
    if path.is_dir():
        raise ModelFileError(f"{name}: is a folder, not a model file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # Not torch's own text: it advises loading the file with weights_only=False, which would run it.
        raise ModelFileError(
            f"{name}: not a vae-anomaly model file, and not loaded: it holds Python objects that loading would "
            "run. Only model files written by vae-anomaly are read; re-fit, or use the model file you meant."
        ) from None
    except Exception as exc:  # zip, pickle-opcode, size and decode errors of a damaged file alike
        detail = str(exc).splitlines()[0][:160] if str(exc) else "no detail"
        if "weights_only" in detail:  # torch's advice to load it unchecked: never ours to give
            detail = "it holds Python objects; not loaded"
        raise ModelFileError(
            f"{name}: not a readable vae-anomaly model file, and not loaded: truncated, corrupted or of another "
            f"kind ({type(exc).__name__}: {detail})."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{name}: not a vae-anomaly model file (no '{FORMAT_NAME}' header).")
    version = payload.get("format_version")
    if not isinstance(version, int):
        raise ModelFileError(f"{name}: damaged model file: the format version is missing.")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{name}: written by a newer vae-anomaly (model format {version}; this one reads up to "
            f"{FORMAT_VERSION}). Upgrade with `pip install -U vae-anomaly`."
        )
    if version < 1:
        raise ModelFileError(f"{name}: unknown model format version {version}.")
    if version == 1:  # no calibration of the checks, no folds, no local statistic: nothing to decide with
        raise ModelFileError(
            f"{name}: model format 1 (vae-anomaly before cross-fitting) is no longer read; re-fit it with "
            "`vae-anomaly fit` on the same images."
        )
    meta_json = payload.get("metadata")
    state = payload.get("state_dict")
    cal = payload.get("calibration")
    checksum = payload.get("checksum")
    if not (
        isinstance(meta_json, str)
        and isinstance(state, dict)
        and isinstance(cal, dict)
        and isinstance(checksum, str)
        and all(isinstance(v, torch.Tensor) for v in (*state.values(), *cal.values()))
    ):
        raise ModelFileError(f"{name}: damaged model file: a required part is missing or of the wrong type.")
    if _digest(meta_json, state, cal) != checksum:
        raise ModelFileError(
            f"{name}: the model file was altered or corrupted (checksum mismatch). "
            "Copy it again from its source, or re-train it."
        )
    try:
        metadata = json.loads(meta_json)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{name}: damaged model file: metadata is not JSON ({exc}).") from None
    return ModelFile(metadata, state, cal, checksum, version)


CHECKPOINT_FORMAT = "vae-anomaly-checkpoint"


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, not after training, when the model file's folder cannot take a file."""
    directory = Path(path).parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".probe", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"cannot write the model file to {os.fsdecode(path)}: {exc.strerror or exc}; choose another -o"
        ) from None


def save_checkpoint(path: str | os.PathLike[str], identity: str, state: dict[str, Any]) -> None:
    """A resumable training state (tensors and plain values only), written atomically.

    `identity` names the data and options it belongs to, so that `--resume`
    never continues a run on other data.
    """
    _atomic_torch_save(
        Path(path),
        {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "identity": identity, "state": state},
    )


def load_checkpoint(path: str | os.PathLike[str], identity: str) -> dict[str, Any]:
    name = os.fsdecode(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{name}: no checkpoint to resume from; run fit without --resume.") from None
    except Exception as exc:
        raise ModelFileError(
            f"{name}: the checkpoint cannot be read ({type(exc).__name__}); delete it and run fit without --resume."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{name}: not a vae-anomaly checkpoint; delete it and run fit without --resume.")
    if payload.get("identity") != identity:
        raise ModelFileError(
            f"{name}: the checkpoint belongs to other images or other fit options; run fit with the same "
            "inputs and options to resume, or delete it to start afresh."
        )
    state: dict[str, Any] = payload["state"]
    return state
