"""Model files that were damaged or edited: loaded whole or refused with the file named, never half-used."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import cli_run as run
from vae_anomaly import Detector
from vae_anomaly.errors import ModelFileError


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10**7),
)
def test_mutated_model_files_load_or_fail_cleanly(model_file: Path, tmp_path: Path, edits: list, cut: int) -> None:
    data = bytearray(model_file.read_bytes())
    for pos, val in edits:
        data[pos % len(data)] = val
    p = tmp_path / "fuzz.vae"
    p.write_bytes(bytes(data[: len(data) if cut % 3 else cut % len(data)]))
    try:
        Detector.load(p, device="cpu")
    except ModelFileError as exc:
        assert "fuzz.vae" in str(exc)


@pytest.mark.parametrize("prep", [{"size": 20}, {"channels": 0}, {"size": 0}, {"resize": "crop"}])
def test_a_model_file_with_a_valid_checksum_but_impossible_settings_is_refused(
    fitted: object, data_dir: Path, tmp_path: Path, prep: dict
) -> None:
    from vae_anomaly.model import artifact

    path = tmp_path / "m.vae"
    fitted.save(path)  # type: ignore[attr-defined]
    mf = artifact.load(path)
    mf.metadata["preprocessing"].update(prep)
    artifact.save(path, mf.metadata, mf.state_dict, mf.calibration)  # a fresh, valid checksum
    code, _, err = run("score", data_dir / "incoming", "-m", path)
    assert code == 2 and f"{path}: the weights or settings inside do not fit together" in err, err
