"""`evaluate`: figures equal sklearn.metrics on the same scores; CSV labels and folders agree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn import metrics as skm

from vae_anomaly import Detector
from vae_anomaly.cli import main
from vae_anomaly.decision.calibration import p_values
from vae_anomaly.errors import LabelsError
from vae_anomaly.evaluation import evaluate_detector, labelled_folders, labels_csv


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="session")
def labelled(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lab/normal (40 disks), lab/anomaly (40 crosses), and csv/labels.csv naming the same files
    (relative to the CSV's folder, one of them absolute)."""
    root = tmp_path_factory.mktemp("labelled")
    rows = ["path,label"]
    for i, p in enumerate(sorted((data_dir / "incoming").glob("*.png"))):
        sub = "anomaly" if p.name.startswith("cross") else "normal"
        (root / "lab" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "lab" / sub / p.name)
        where = (root / "lab" / sub / p.name).resolve() if i == 0 else f"../lab/{sub}/{p.name}"
        rows.append(f"{where},{int(sub == 'anomaly')}")
    (root / "csv").mkdir()
    (root / "csv" / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_figures_equal_sklearn_on_the_same_scores(fitted: Detector, labelled: Path) -> None:
    ev = evaluate_detector(fitted, labelled_folders(labelled / "lab"), fpr=0.05, tail="two-sided", checks=False)
    y = ev.labels
    assert (int((y == 0).sum()), int((y == 1).sum())) == (40, 40)
    assert list(ev.results) == ["elbo-ic-nn", "elbo", "elbo-ic", "kl", "iwae", "recon-prob"]
    for name, r in ev.results.items():
        s = fitted.score([Path(p) for p in ev.paths], score=name).scores  # plain scoring gives the same
        np.testing.assert_allclose(r.scores, s, rtol=1e-6)
        m = r.metrics
        assert m.roc_auc == pytest.approx(skm.roc_auc_score(y, s))
        assert m.average_precision == pytest.approx(skm.average_precision_score(y, s))
        pred = s >= m.best_f1_threshold
        assert m.best_f1 == pytest.approx(skm.f1_score(y, pred))
        assert (m.best_f1_precision, m.best_f1_recall) == pytest.approx(
            (skm.precision_score(y, pred), skm.recall_score(y, pred))
        )
        f, t, _ = skm.roc_curve(y, s)
        assert m.tpr_at_fpr_1pct == pytest.approx(t[f <= 0.01].max())
        assert m.tpr_at_fpr_5pct == pytest.approx(t[f <= 0.05].max())
        p = p_values(fitted.calibration_[name], s, "two-sided")
        if name != "kl":  # the default rule: one test with the kl guard, as `score` applies it
            kl = fitted.score([Path(q) for q in ev.paths], score="kl", guard=None).scores
            p = np.minimum(1, 2 * np.minimum(p, p_values(fitted.calibration_["kl"], kl, "two-sided")))
        flags = p <= 0.05
        tn, fp, fn, tp = skm.confusion_matrix(y, flags).ravel()
        assert r.confusion.to_dict() == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
        if name != "kl":  # the latent term alone does not rank crosses above disks; it is a component
            assert m.roc_auc >= 0.9, "a quality floor on shapes the model never saw"


def test_labels_csv_and_folder_layout_give_the_same_result(model_file: Path, labelled: Path) -> None:
    code_f, out_f, err_f = run("evaluate", labelled / "lab", "--model", model_file, "--format", "json")
    code_c, out_c, err_c = run(
        "evaluate", "--labels", labelled / "csv" / "labels.csv", "--model", model_file, "--format", "json"
    )
    assert (code_f, code_c) == (0, 0), err_f + err_c
    assert "evaluated 80 images (40 normal, 40 anomalous)" in err_f and "evaluated 80" in err_c
    doc_f, doc_c = json.loads(out_f), json.loads(out_c)
    assert doc_f["schema"] == "vae-anomaly/evaluate" and doc_f["schema_version"] == 1
    assert doc_f["source"].startswith("folders") and doc_c["source"].startswith("labels")
    assert (doc_f["n_normal"], doc_f["n_anomaly"]) == (doc_c["n_normal"], doc_c["n_anomaly"]) == (40, 40)
    for a, b in zip(doc_f["results"], doc_c["results"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6) if isinstance(a[key], float) else a[key] == b[key]


def test_score_option_picks_types_and_the_table_shows_them(model_file: Path, labelled: Path) -> None:
    code, out, err = run("evaluate", labelled / "lab", "-m", model_file, "--score", "iwae", "--score", "elbo")
    assert code == 0, err
    assert "ROC-AUC" in out and "iwae (16)" in out and "elbo (1)" in out and "recon-prob" not in out
    assert "auto rule: TN / FP" in out and "TPR at FPR 5%" in out
    assert "evaluated 80" in err and "evaluated" not in out


def test_plots_are_written(model_file: Path, labelled: Path, tmp_path: Path) -> None:
    code, out, err = run("evaluate", labelled / "lab", "-m", model_file, "--score", "elbo", "--plots", tmp_path / "p")
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert names == ["histogram_elbo.png", "pr.png", "roc.png"]
    assert all((tmp_path / "p" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    assert "wrote" in err and "wrote" not in out


def test_unreadable_labelled_files_exit_3_unless_skipped(model_file: Path, labelled: Path, tmp_path: Path) -> None:
    root = tmp_path / "lab"
    shutil.copytree(labelled / "lab", root)
    (root / "anomaly" / "broken.png").write_bytes(b"not a png")
    code, out, err = run("evaluate", root, "-m", model_file, "--format", "json", "--score", "elbo")
    doc = json.loads(out)
    assert code == 3 and doc["unreadable"][0]["path"].endswith("broken.png") and "unreadable:" in err
    assert doc["n_anomaly"] == 40
    code, _, _ = run("evaluate", root, "-m", model_file, "--score", "elbo", "--skip-unreadable")
    assert code == 0


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("file,y\na.png,1\n", "header 'path,label'"),
        ("path,label\n../lab/normal/disk_0000.png,maybe\n", "line 2: label 'maybe'"),
        ("path,label\nnowhere.png,1\n", "line 2:"),
        ("path,label\n", "no rows"),
    ],
)
def test_bad_labels_files_are_usage_errors(
    model_file: Path, labelled: Path, csv_text: str, message: str, tmp_path: Path
) -> None:
    f = labelled / "csv" / f"bad_{abs(hash(csv_text))}.csv"
    f.write_text(csv_text)
    code, out, err = run("evaluate", "--labels", f, "-m", model_file)
    assert code == 2 and out == "" and message in err and f.name in err


def test_path_and_labels_are_exclusive_and_the_layout_is_checked(model_file: Path, labelled: Path) -> None:
    code, out, err = run("evaluate", "-m", model_file)
    assert code == 2 and out == "" and "either PATH" in err
    code, _, err = run("evaluate", labelled / "lab" / "normal", "-m", model_file)
    assert code == 2 and "no normal/ and no anomaly/ subfolder" in err


def test_one_class_only_is_refused(fitted: Detector, labelled: Path, tmp_path: Path) -> None:
    (tmp_path / "only.csv").write_text(f"path,label\n{next((labelled / 'lab' / 'normal').glob('*.png'))},0\n")
    with pytest.raises(LabelsError, match="at least one of each"):
        evaluate_detector(fitted, labels_csv(tmp_path / "only.csv"), scores=["elbo"])


def test_evaluate_counts_exactly_the_images_score_threshold_auto_flags(model_file: Path, labelled: Path) -> None:
    """README: evaluate's confusion matrix shows what `score --threshold auto` flags (guard included)."""
    _, out, _ = run("score", labelled / "lab", "--model", model_file, "--format", "json", "--fpr", "0.05")
    flagged = [r["path"] for r in json.loads(out)["records"] if r["flagged"]]
    tp = sum("/anomaly/" in p for p in flagged)
    code, out, _ = run("evaluate", labelled / "lab", "--model", model_file, "--format", "json", "--fpr", "0.05")
    by_score = {r["score"]: r for r in json.loads(out)["results"]}
    assert code == 0 and len(flagged) > 0
    assert by_score["elbo-ic"]["confusion"]["tp"] == tp
    assert by_score["elbo-ic"]["confusion"]["fp"] == len(flagged) - tp
    args = ("evaluate", labelled / "lab", "-m", model_file, "--format", "json", "--fpr", "0.05", "--no-checks")
    _, out, _ = run(*args)
    model_only = {r["score"]: r for r in json.loads(out)["results"]}["elbo-ic"]["confusion"]
    _, out, _ = run(*args, "--guard=none")
    unguarded = {r["score"]: r for r in json.loads(out)["results"]}["elbo-ic"]["confusion"]
    assert unguarded != model_only, "the guard changes what is flagged on these images"


def test_the_table_keeps_every_label_and_header_whole_at_80_columns(model_file: Path, labelled: Path) -> None:
    """Six score columns in an 80-column terminal: values may wrap, labels and headers are never cut."""
    scores = ["elbo-ic-nn", "elbo-ic", "elbo", "kl", "iwae", "recon-prob"]
    args = ["evaluate", str(labelled / "lab"), "-m", str(model_file), *(a for s in scores for a in ("--score", s))]
    result = CliRunner().invoke(main, args, catch_exceptions=False, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.stderr
    table = result.stdout.split("ROC-AUC, AP")[0]
    assert "…" not in table and "..." not in table, table
    for label in ("average precision", "  precision / recall", "auto rule: FPR / TPR", "TPR at FPR 5%"):
        assert label in table, f"{label!r} cut: {table}"
    assert max(len(line) for line in table.splitlines() if line[:1] in "┏┃┡│└") <= 80, "the title may be longer"
