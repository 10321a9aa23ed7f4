"""The library's one entry per command: `pipeline.fit` owns what `fit` does around training (the
output checks, the save, the checkpoint), `score_report` hands its heat maps to the writers once."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import disks, write_pngs
from vae_anomaly import FitConfig
from vae_anomaly.errors import OutputError
from vae_anomaly.pipeline import FitJob, FitWatch, ScoreConfig, fit, score_report
from vae_anomaly.reports.outputs import Outputs

TINY = FitConfig(epochs=2, latent_dim=4, folds=1, features="pixels", device="cpu", seed=0)


def test_fit_writes_the_model_file_and_leaves_no_checkpoint(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(60, seed=3))
    output = tmp_path / "model.vae"
    phases: list[str] = []
    run = fit(FitJob((tmp_path / "normal",), output, TINY, checkpoint_every=0.0), FitWatch(on_phase=phases.append))
    assert output.is_file() and not run.stopped
    assert not (tmp_path / "model.vae.ckpt").exists(), "a finished fit drops its checkpoint"
    assert run.summary.startswith(f"wrote {output}") and run.detector.fingerprint in run.summary
    assert any(p.startswith("read 60 images") for p in phases)


def test_a_stopped_fit_writes_the_best_model_so_far_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    write_pngs(tmp_path / "normal", disks(60, seed=3))
    output = tmp_path / "model.vae"
    epochs: list[object] = []  # a stop asked for in the second epoch, after a checkpoint
    watch = FitWatch(on_epoch=epochs.append, should_stop=lambda: bool(epochs))
    run = fit(FitJob((tmp_path / "normal",), output, TINY, checkpoint_every=0.0), watch)
    assert run.stopped and output.is_file() and len(epochs) == 2
    assert (tmp_path / "model.vae.ckpt").is_file(), "`fit --resume` continues from it"


def test_fit_refuses_to_write_the_model_over_a_training_image_before_training(tmp_path: Path) -> None:
    (first, *_) = write_pngs(tmp_path / "normal", disks(20, seed=3))
    trained: list[object] = []
    with pytest.raises(OutputError, match="-o"):
        fit(FitJob((tmp_path / "normal",), first, TINY), FitWatch(on_epoch=trained.append))
    assert not trained


def test_score_computes_each_heat_map_once_and_the_writers_never_run_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_pngs(tmp_path / "normal", disks(60, seed=3))
    write_pngs(tmp_path / "incoming", disks(6, seed=9))
    model = tmp_path / "model.vae"
    fit(FitJob((tmp_path / "normal",), model, TINY))
    from vae_anomaly.detector import Detector

    drawn: list[str] = []
    heatmap = Detector.heatmap

    def counted(self: Detector, data: list[Path], **kw: object) -> object:
        drawn.extend(str(p) for p in data)
        return heatmap(self, data, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Detector, "heatmap", counted)
    outputs = Outputs(html=tmp_path / "r.html", html_top=6, heatmaps=tmp_path / "maps")
    run = score_report(ScoreConfig((tmp_path / "incoming",), model, outputs=outputs))
    assert (tmp_path / "r.html").is_file()
    assert len(drawn) == len(set(drawn)) == 6, "the page's six rows, each drawn once (flagged ones included)"
    assert run.report.summary.scored == 6
