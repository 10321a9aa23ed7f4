"""One scoring path: the places that used to re-derive part of it agree with `score`, and errors map
to their documented exit codes in one place. Each test here failed on the code before the restructuring."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import crosses, disks
from vae_anomaly import Detector, FitConfig
from vae_anomaly.cli import main


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_html_shows_the_same_p_value_floor_as_the_json_guard_included(
    cli_model: Path, data_dir: Path, tmp_path: Path
) -> None:
    page = tmp_path / "r.html"
    code, out, _ = run("score", data_dir / "incoming", "-m", cli_model, "--format", "json", "--html", page)
    floor = json.loads(out)["summary"]["smallest_p_value"]
    assert code == 0 and floor == 1 / 406, "one test of score and kl guard, 405 calibration scores"
    shown = re.search(r"<dt>p-value floor</dt><dd>([0-9.e-]+) \((.*?)\): an image", html.unescape(page.read_text()))
    assert shown is not None
    assert float(shown[1]) == pytest.approx(floor, rel=1e-3) and shown[2].startswith("1/(n+1)")


def test_heat_maps_of_cross_fitted_models_sum_to_the_reported_score(crossfit: Detector) -> None:
    assert crossfit.n_models == 5
    x = np.concatenate([disks(4, seed=40), crosses(4, seed=41)])
    hm = crossfit.heatmap(x)
    elbo = crossfit.score(x, score="elbo", guard=None).scores  # the mean over the five models
    np.testing.assert_allclose(hm.maps.sum(axis=(1, 2)) + hm.kl, elbo, rtol=1e-5, atol=1e-3)


def test_a_numeric_threshold_with_fdr_is_refused_by_the_library_too(fitted: Detector) -> None:
    result = fitted.score(crosses(5, seed=3))
    with pytest.raises(ValueError, match="--fdr chooses the flags itself"):
        fitted.decide(result, threshold=5.0, fdr=0.05)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_decision_options_refuse_nan_and_infinity(fitted: Detector, value: float) -> None:
    result = fitted.score(crosses(5, seed=3))
    for options in ({"fpr": value}, {"fdr": value}, {"threshold": value}):
        with pytest.raises(ValueError, match=r"must be a number in"):
            fitted.decide(result, **options)


@pytest.mark.parametrize(
    ("field", "value", "allowed", "got"),
    [
        ("latent_dim", 0, "from 1 to 4096", "got 0"),
        ("seed", -1, "from 0 to", "got -1"),
        ("batch_size", 0, ">= 1", "got 0"),
        ("patience", 0, ">= 1", "got 0"),
        ("epochs", 0, ">= 1", "got 0"),
        ("time_budget", math.nan, "(0, inf)", "got nan"),
        ("learning_rate", 2.0, "(0, 1)", "got 2.0"),
        ("image_size", 2, "from 4 to 1024", "got 2"),
        ("hidden_channels", (16, 0), "from 1 to 4096", "got 0"),
        ("samples", {"iwae": 0}, "from 1 to 10000", "got 0"),
        ("samples", {"nope": 3}, "one of elbo", "got 'nope'"),
        ("likelihood", "poisson", "one of bernoulli, gaussian", "got 'poisson'"),
        ("folds", 21, "from 1 to 20", "got 21"),
        ("calibration_fraction", 1.0, "(0, 1)", "got 1.0"),
    ],
)
def test_fit_config_checks_every_field_before_any_image_is_read(
    field: str, value: object, allowed: str, got: str
) -> None:
    with pytest.raises(ValueError) as caught:
        FitConfig(**{field: value})  # type: ignore[arg-type]
    message = str(caught.value)
    assert field in message and allowed in message and message.endswith(got), "the field, its range, the value"


def test_a_bad_latent_dim_from_the_library_fails_before_decoding(tmp_path: Path) -> None:
    """The config refuses it on construction: no folder is listed, so a missing one is never reported."""
    with pytest.raises(ValueError, match="latent_dim"):
        Detector(FitConfig(latent_dim=-3)).fit(tmp_path / "does-not-exist")


@pytest.mark.parametrize("option", ["--html", "--plots", "--heatmaps"])
def test_an_output_that_cannot_be_written_exits_2_with_the_path(
    cli_model: Path, data_dir: Path, tmp_path: Path, option: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = blocker / ("r.html" if option == "--html" else "out")
    args = ["score", data_dir / "incoming", "-m", cli_model, option, target, "--threshold", "-1e9"]
    code, _, err = run(*args)
    assert code == 2, "1 means the gate failed; a failed write is an error of the run"
    assert "Error: cannot write" in err and str(blocker) in err


def test_a_bug_is_not_passed_off_as_a_usage_error(
    cli_model: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not the user's mistake")

    monkeypatch.setattr(Detector, "load", broken)
    with pytest.raises(ValueError, match="a bug"):
        run("score", data_dir / "incoming", "-m", cli_model)
