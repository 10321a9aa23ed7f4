"""The model file: identical scores after a round trip, clear errors for bad files."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import disks
from vae_anomaly import Detector
from vae_anomaly.errors import ModelFileError
from vae_anomaly.images.decoding import PNG_LEVEL
from vae_anomaly.model import artifact


def test_saved_and_reloaded_model_gives_identical_scores(fitted: Detector, model_file: Path) -> None:
    x = disks(50, seed=7)
    loaded = Detector.load(model_file, device="cpu")
    for name in ("elbo", "elbo-ic", "kl", "iwae", "recon-prob"):
        np.testing.assert_array_equal(fitted.score(x, score=name).scores, loaded.score(x, score=name).scores)
        np.testing.assert_array_equal(fitted.calibration_[name], loaded.calibration_[name])
    assert loaded.preprocessing_ == fitted.preprocessing_


def test_model_file_holds_everything_design_lists(model_file: Path) -> None:
    info = Detector.load(model_file, device="cpu").info()
    assert info["config"]["latent_dim"] == 8
    assert info["preprocessing"] == {
        "channels": 1,
        "size": 16,
        "resize": "stretch-bilinear",
        "scaling": "x/255",
        "png_level": PNG_LEVEL,
    }
    plan = info["training"]["plan"]
    assert plan["models"] == 1 and plan["epochs"] >= 1 and plan["expected"] > 0 and plan["seconds"] > 0
    tr = info["training"]
    assert tr["images"] == 1000 and tr["calibration_images"] == 400 and tr["seed"] == 0
    assert len(tr["data_fingerprint"]) == 16 and tr["epochs_run"] >= 1 and tr["final_train_loss"] is not None
    # Fitted on an array: the pixel checks of a grey model, no file header to check (width, format, ...).
    grey = ("brightness", "highlights", "shadows", "contrast", "sharpness", "entropy", "balance-x", "balance-y")
    checked = {f"property:{name}" for name in (*grey, "local")}
    assert set(info["calibration"]) == {"elbo-ic-nn", "elbo", "elbo-ic", "kl", "iwae", "recon-prob"} | checked
    assert info["checks"]["training_files"] == 1000 and info["checks"]["formats"] == {"": 1.0}
    assert {"vae_anomaly", "torch", "numpy", "python"} <= set(info["versions"])


def test_truncated_file_is_a_clear_error_naming_it(model_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.vae"
    data = model_file.read_bytes()
    for cut in (0, 10, len(data) // 2, len(data) - 5):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=r"cut\.vae"):
            Detector.load(bad)


def test_altered_weights_are_caught_by_the_checksum(model_file: Path, tmp_path: Path) -> None:
    payload = torch.load(model_file, weights_only=True)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name] + 1e-3
    bad = tmp_path / "edited.vae"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="altered or corrupted"):
        Detector.load(bad)


def test_flipped_byte_never_loads_silently(model_file: Path, tmp_path: Path) -> None:
    data = bytearray(model_file.read_bytes())
    rng = np.random.default_rng(0)
    bad = tmp_path / "flip.vae"
    for pos in rng.integers(0, len(data), 20):
        mutated = bytearray(data)
        mutated[pos] ^= 0x40
        bad.write_bytes(bytes(mutated))
        try:
            Detector.load(bad)
        except ModelFileError as exc:
            assert "flip.vae" in str(exc)
        # A flip inside zip padding or an unread field may leave the model intact; that is fine.


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.vae"
    with bad.open("wb") as fh:
        torch.save({"format": "vae-anomaly-model", "x": Exploit()}, fh, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ModelFileError, match="not a vae-anomaly model file, and not loaded"):
        Detector.load(bad)
    assert not marker.exists()


def test_newer_format_version_asks_for_an_upgrade(model_file: Path, tmp_path: Path) -> None:
    payload = torch.load(model_file, weights_only=True)
    payload["format_version"] = artifact.FORMAT_VERSION + 1
    bad = tmp_path / "future.vae"
    torch.save(payload, bad)
    with pytest.raises(ModelFileError, match="newer vae-anomaly"):
        Detector.load(bad)


def test_weights_that_do_not_match_the_config_are_refused(model_file: Path, tmp_path: Path) -> None:
    mf = artifact.load(model_file)
    meta = dict(mf.metadata)
    meta["config"] = {**meta["config"], "latent_dim": 9}
    bad = tmp_path / "mismatch.vae"
    artifact.save(bad, meta, mf.state_dict, mf.calibration)
    with pytest.raises(ModelFileError, match="do not fit together"):
        Detector.load(bad)


def test_other_files_are_not_model_files(tmp_path: Path) -> None:
    for name, content in [("empty.vae", b""), ("text.vae", b"hello"), ("json.vae", json.dumps({}).encode())]:
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ModelFileError, match=name):
            Detector.load(p)
    zp = tmp_path / "zip.vae"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(ModelFileError, match=r"zip\.vae"):
        Detector.load(zp)
    with pytest.raises(ModelFileError, match="no such model file"):
        Detector.load(tmp_path / "missing.vae")


def test_save_is_atomic_and_leaves_no_temporary_files(fitted: Detector, tmp_path: Path) -> None:
    target = tmp_path / "m.vae"
    target.write_bytes(b"old")
    fitted.save(target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.vae"]
    Detector.load(target)
