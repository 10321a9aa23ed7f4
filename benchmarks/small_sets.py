"""Small training sets: the default decision beside the one it replaced, from the same fits and scores.

Per dataset, training size n and repetition r: fit a `Detector` with default settings (FitConfig(seed=r),
--folds K if given) on n normal images, score held-out normals and obvious anomalies once, and compare,
from those scores,
  new:   the default decision (`det.decide`, fpr 0.01): one conformal test of the combined evidence
         of the score, its kl guard and the image checks (`combination.py`), floor 1/(n+1);
  today: the rule of fc067ad (`previous_rule.py`): T = (rho, d), every check two-sided;
on detection, false-positive rate, ROC-AUC, and CI gates over 20 dirty batches (190 normals + 10
anomalies) and 20 clean ones (200 normals): A = Benjamini-Hochberg at q 0.05, fail on any flag
(`--fdr 0.05 --max-anomalies 0`); B = fail where the beta-binomial exceedance p-value is <= 0.01.

Datasets: shapes (one bright disc on a noisy ground; squares, crosses, outlines, blank, noise),
mnist (digits; inverted, crosses, squares, blank, noise), digits (sklearn's 8x8 digits, all classes),
digit (sklearn's 8x8 digits of one class, r mod 10; the other classes incoming, no gates: too few
normals), photos (JPEG crops of packaged photographs, files as a user has them: `photo_crops.py`).

    python benchmarks/small_sets.py --data ../shared/data/mnist [--datasets shapes,mnist,digits,digit,photos]
        [--sizes 50,100,300] [--reps 3] [--folds K] [--threads 2] [--models DIR] [--work DIR]

--models DIR keeps each fitted model file there and loads it on the next run instead of fitting
again (the decision is recomputed from fresh scores every run); --work DIR keeps the photo files.

Writes benchmarks/results/small_sets.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import tempfile
import time
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist
from photo_crops import build as build_photos
from previous_rule import previous_p_values
from provenance import provenance, write_results

from vae_anomaly import Detector, FitConfig
from vae_anomaly.config import CROSS_FIT_BELOW, DEFAULT_FOLDS
from vae_anomaly.decision.batch_tests import exceedance_test
from vae_anomaly.decision.checks import PREFIX
from vae_anomaly.decision.rule import DecisionRule
from vae_anomaly.decision.thresholds import benjamini_hochberg
from vae_anomaly.model.inference import ScoreResult

RESULTS = Path(__file__).resolve().parent / "results"
FPR, FDR, GATE_P = 0.01, 0.05, 0.01
MIN_HELD, MAX_HELD, PER_KIND, BATCHES, BATCH, DIRTY = 300, 2000, 100, 20, 200, 10
PHOTO_HELD, PHOTO_PER_KIND = 400, 40
DATASETS = ("shapes", "mnist", "digits", "digit", "photos")


def figures(kind: str, m: int, size: int, rng: np.random.Generator, background: float) -> np.ndarray:
    """m uint8 frames (m, size, size): one bright shape each (disc, square, cross, outline, line cross), dark ground."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    s = size / 32
    r = rng.uniform(5 * s, 11 * s, m)[:, None, None]
    cx = rng.uniform(r, size - 1 - r)
    cy = rng.uniform(r, size - 1 - r)
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    box, w = np.maximum(dx, dy), max(0.5, s)
    mask = {
        "disc": dx**2 + dy**2 <= r**2,
        "square": box <= 0.9 * r,
        "cross": ((dx <= w) & (dy <= r)) | ((dy <= w) & (dx <= r)),
        # The thin crosses of the tests and of the issue's own example: lines across the whole frame.
        "line cross": (dx <= w / 2) | (dy <= w / 2),
        "outline": (box <= r) & (box >= r - max(1.0, 2 * s)),
    }[kind]
    bright = rng.uniform(150, 255, m)[:, None, None]
    bg = np.clip(rng.normal(background, background / 2.5, (m, size, size)), 0, 255) if background else 0.0
    out: np.ndarray = np.where(mask, bright, bg).round().astype(np.uint8)
    return out


def anomalies(held: np.ndarray, kinds: tuple[str, ...], rng: np.random.Generator, bg: float) -> dict[str, np.ndarray]:
    """~PER_KIND obvious anomalies of each kind, at the normal images' size."""
    size = held.shape[-1]
    out = {
        "blank": np.zeros((PER_KIND, size, size), np.uint8),
        "uniform noise": rng.integers(0, 256, (PER_KIND, size, size)).astype(np.uint8),
    }
    if "inverted" in kinds:
        out["inverted"] = 255 - held[rng.choice(len(held), PER_KIND, replace=False)]
    out |= {k: figures(k, PER_KIND, size, rng, bg) for k in kinds if k != "inverted"}
    return out


Images = np.ndarray | list[str]


def draw(name: str, pools: dict[str, Any], n: int, r: int, work: Path) -> tuple[Images, Images, dict[str, Images]]:
    """(n training normals, held-out normals, anomalies by kind), seeded by r and n."""
    rng = np.random.default_rng([r, n, sum(map(ord, name))])
    if name == "photos":
        return build_photos(work / f"photos-n{n}-r{r}", n, PHOTO_HELD, PHOTO_PER_KIND, seed=r)
    if name == "shapes":
        train = figures("disc", n, 32, rng, 20.0)
        held = figures("disc", MAX_HELD, 32, rng, 20.0)
        return train, held, anomalies(held, ("square", "cross", "outline", "line cross"), rng, 20.0)
    if name == "mnist":
        x_tr, x_te = pools["mnist"]
        train = x_tr[rng.choice(len(x_tr), n, replace=False)]
        held = x_te[rng.choice(len(x_te), MAX_HELD, replace=False)]
        return train, held, anomalies(held, ("inverted", "cross", "square"), rng, 0.0)
    x, labels = pools["digits"]
    if name == "digit":  # one class normal, every other class incoming
        digit = r % 10
        own = rng.permutation(np.nonzero(labels == digit)[0])
        return x[own[:n]], x[own[n:]], {"other digits": x[labels != digit]}
    order = rng.permutation(len(x))
    train, held = x[order[:n]], x[order[n:][:MAX_HELD]]
    return train, held, anomalies(held, ("inverted", "cross", "outline"), rng, 0.0)


def load_pools(names: list[str], data: str | None) -> dict[str, Any]:
    pools: dict[str, Any] = {}
    if "mnist" in names:
        if data is None:
            raise SystemExit("the mnist dataset needs --data (the folder of the MNIST IDX files)")
        pools["mnist"] = (load_mnist(data, "train")[0], load_mnist(data, "test")[0])
    if "digits" in names or "digit" in names:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pools["digits"] = (np.rint(digits.images * 255 / 16).astype(np.uint8), digits.target)
    return pools


def available(name: str, pools: dict[str, Any], n: int) -> int:
    """The largest training size <= n that leaves MIN_HELD held-out normals."""
    if name == "mnist":
        return min(n, len(pools["mnist"][0]))
    if name == "digit":  # about 180 of each class: half to train at most
        return min(n, 90)
    return n if name in ("shapes", "photos") else min(n, len(pools["digits"][0]) - MIN_HELD)


def today_p_values(det: Detector, res: ScoreResult) -> np.ndarray:
    """fc067ad's rule on the same scores: the score, its guard and every calibrated check, all
    two-sided but the local statistic (`previous_rule.py`)."""
    cal = det.calibration
    assert res.guard is not None, "the default score comes with its guard"
    checked = det.checked(res) or {}
    names = [k[len(PREFIX) :] for k in cal.scores if k.startswith(PREFIX) and k[len(PREFIX) :] in checked]
    stats = [res.score, res.guard.score, *(PREFIX + k for k in names)]
    tails = ["two-sided", "two-sided", *("upper" if k == "local" else "two-sided" for k in names)]
    k_models = cal.models

    def per_model(r: ScoreResult) -> np.ndarray:
        return np.asarray(r.model_scores if k_models > 1 else r.scores[None], dtype=np.float64)

    values = [per_model(res), per_model(res.guard)]
    values += [np.repeat(np.asarray(checked[k], dtype=np.float64)[None], k_models, axis=0) for k in names]
    folds = cal.folds if k_models > 1 else np.zeros(len(cal.of(res.score)), np.int64)
    return previous_p_values(cal.stacked(stats), folds, np.stack(values, axis=1), tails)


def gates(
    p: np.ndarray,
    flags: np.ndarray,
    level: float,
    q: float,
    n_cal: int,
    dirty: list[np.ndarray],
    clean: list[np.ndarray],
) -> dict[str, dict[str, int]]:
    """Gate A (BH at q, fail on any flag) and B (beta-binomial p <= GATE_P): dirty batches failing, clean passing."""

    def fails(idx: np.ndarray) -> tuple[bool, bool]:
        exceed = exceedance_test(int(flags[idx].sum()), len(idx), n_cal, level).p_value
        return bool(benjamini_hochberg(p[idx], q)[0].any()), exceed <= GATE_P

    d, c = np.array([fails(i) for i in dirty]), np.array([fails(i) for i in clean])
    return {g: {"dirty_fail": int(d[:, j].sum()), "clean_pass": int((~c[:, j]).sum())} for j, g in enumerate("AB")}


def fitted(
    name: str, train: Images, n: int, r: int, folds: int | None, budget: float | None, models: Path | None
) -> tuple[Detector, float]:
    """A detector fitted with default settings, and the fit's wall seconds (kept beside a cached model file)."""
    k = folds or (DEFAULT_FOLDS if n < CROSS_FIT_BELOW else 1)  # what FitConfig(folds=None) does
    path = None if models is None else models / f"{name}-n{n}-r{r}-folds{k}.vae"
    if path is not None and path.exists() and budget is None:
        return Detector.load(path), float(json.loads(path.with_suffix(".json").read_text())["fit_seconds"])
    t0 = time.perf_counter()
    det = Detector(FitConfig(seed=r, folds=folds, time_budget=budget)).fit(train)
    fit_s = time.perf_counter() - t0
    if path is not None and budget is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        det.save(path)
        path.with_suffix(".json").write_text(json.dumps({"fit_seconds": fit_s}))
    return det, fit_s


def _joined(held: Images, kinds: dict[str, Images]) -> Images:
    if isinstance(held, list):
        return [*held, *(p for v in kinds.values() for p in v)]  # type: ignore[union-attr]
    return np.concatenate([held, *kinds.values()])  # type: ignore[list-item]


def run_one(
    name: str,
    pools: dict[str, Any],
    n: int,
    r: int,
    folds: int | None,
    budget: float | None,
    models: Path | None,
    work: Path,
) -> dict[str, Any]:
    train, held, kinds = draw(name, pools, n, r, work)
    det, fit_s = fitted(name, train, n, r, folds, budget, models)
    kind_of = np.concatenate([np.full(len(held), "normal"), *[np.full(len(v), k) for k, v in kinds.items()]])
    normal = kind_of == "normal"
    res = det.score(_joined(held, kinds))
    assert not res.errors, res.errors
    d = det.decide(res)
    n_cal = d.n_calibration
    p = {"new": d.p_values, "today": today_p_values(det, res)}
    level = d.threshold.alpha  # both rules flag at the same level (raised to the floor alike)
    flags = {"new": d.flags, "today": p["today"] <= level + 1e-12}
    rng = np.random.default_rng([r, n, 7])
    norm_idx, anom_idx = np.nonzero(normal)[0], np.nonzero(~normal)[0]
    per_rule = None
    if len(norm_idx) >= BATCH:
        dirty = [
            np.r_[rng.choice(norm_idx, BATCH - DIRTY, replace=False), rng.choice(anom_idx, DIRTY, replace=False)]
            for _ in range(BATCHES)
        ]
        clean = [rng.choice(norm_idx, BATCH, replace=False) for _ in range(BATCHES)]
        q, fpr = DecisionRule(fdr=FDR).applied(n_cal), DecisionRule().applied_fpr(n_cal)
        per_rule = {rule: gates(p[rule], flags[rule], fpr, q, n_cal, dirty, clean) for rule in RULES}
    y = (~normal).astype(int)
    return {
        "dataset": name,
        "n": n,
        "rep": r,
        "models": det.n_models,
        "n_calibration": n_cal,
        "fit_seconds": fit_s,
        "epochs": det.metadata_["training"]["epochs_run"],
        "stopped": det.metadata_["training"]["stopped"],
        "held_out_normals": int(normal.sum()),
        "anomalies": {k: len(v) for k, v in kinds.items()},
        "level": level,
        "floor": d.floor,
        "guarantee": d.guarantee,
        "warnings": d.warnings,
        "detection": {
            rule: {"all": float(f[~normal].mean()), **{k: float(f[kind_of == k].mean()) for k in kinds}}
            for rule, f in flags.items()
        },
        "fpr": {rule: float(f[normal].mean()) for rule, f in flags.items()},
        "roc_auc": {rule: float(roc_auc_score(y, -pv)) for rule, pv in p.items()},
        "batches": None if per_rule is None else {g: {a: per_rule[a][g] for a in RULES} for g in "AB"},
    }


RULES = ("new", "today")


def _mean(rows: list[dict[str, Any]], *keys: str) -> float:
    return float(np.mean([reduce(operator.getitem, keys, r) for r in rows]))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, n): means over repetitions; FPR also its 95th percentile and standard error."""
    out = []
    for name, n in dict.fromkeys((r["dataset"], r["n"]) for r in rows):
        rs = [r for r in rows if (r["dataset"], r["n"]) == (name, n)]
        fields = ("dirty_fail", "clean_pass")
        fpr: dict[str, Any] = {}
        for rule in RULES:
            f = np.array([r["fpr"][rule] for r in rs])
            fpr[rule] = {
                "mean": float(f.mean()),
                "p95": float(np.percentile(f, 95)),
                # Between repetitions: each fit's calibration sets its own rate, which varies far
                # more than the binomial error of the held-out images.
                "se": float(f.std(ddof=1) / np.sqrt(len(f))) if len(f) > 1 else float("nan"),
            }
        batches = None
        if rs[0]["batches"] is not None:
            batches = {g: {a: {f: _mean(rs, "batches", g, a, f) for f in fields} for a in RULES} for g in "AB"}
        out.append(
            {
                "dataset": name,
                "n": n,
                "reps": len(rs),
                "models": rs[0]["models"],
                **{k: _mean(rs, k) for k in ("n_calibration", "level", "floor", "fit_seconds", "held_out_normals")},
                "detection": {a: {k: _mean(rs, "detection", a, k) for k in rs[0]["detection"][a]} for a in RULES},
                "fpr": fpr,
                "batches": batches,
                "roc_auc": {a: _mean(rs, "roc_auc", a) for a in RULES},
                "guarantee": rs[0]["guarantee"],
                "warnings": rs[0]["warnings"],
            }
        )
    return out


def pct(v: float) -> str:
    return f"{v:.1%}"


def _pair(values: dict[str, float], fmt: str = "{:.1%}") -> str:
    return " / ".join(fmt.format(values[rule]) for rule in RULES)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Small training sets, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
        f"Per n: {doc['reps']} repetition(s), each a fit with default settings (folds {doc['folds'] or 'default'}"
        + (f", time budget {doc['time_budget']:g} s" if doc["time_budget"] else "")
        + "); means over repetitions. Every pair is **new / today**: the default decision (one conformal test "
        "of the combined evidence, `combination.py`) / the rule of fc067ad (`previous_rule.py`), from the same "
        f"scores, both at fpr {FPR} raised to the floor 1/(n+1) where below it.",
        "",
        "- detection: share of the anomalies flagged (all kinds pooled; per kind below).",
        "- FPR: held-out normals flagged, mean over repetitions (95th percentile) ± standard error between "
        "repetitions; the level: what the rule states.",
        f"- gate A (`--fdr {FDR} --max-anomalies 0`: BH at q {FDR}, fail on any flag) and gate B (beta-binomial "
        f"exceedance p <= {GATE_P}): of {BATCHES} dirty batches ({BATCH - DIRTY} normals + {DIRTY} anomalies) "
        f"how many fail, of {BATCHES} clean batches ({BATCH} normals) how many pass.",
        "- ROC-AUC: held-out normals against all anomalies, ranked by the p-value.",
    ]
    if doc["notes"]:
        lines += ["", *[f"Note: {note}" for note in doc["notes"]]]
    for name in dict.fromkeys(s["dataset"] for s in doc["summary"]):
        rows = [s for s in doc["summary"] if s["dataset"] == name]
        kinds = [k for k in rows[0]["detection"]["new"] if k != "all"]
        lines += [
            "",
            f"## {name} ({', '.join(str(round(s['held_out_normals'])) for s in rows)} held-out normals by n)",
            "",
            "| n | models, cal | level | detection | FPR new | FPR today | A dirty fail | A clean pass "
            "| B dirty fail | B clean pass | ROC-AUC | fit s |",
            "| --- " * 12 + "|",
        ]
        for s in rows:
            f, b = s["fpr"], s["batches"]

            def gate(g: str, field: str, b: dict[str, Any] | None = b) -> str:
                return "-" if b is None else " / ".join(f"{b[g][rule][field]:.1f}" for rule in RULES)

            lines.append(
                f"| {s['n']} | {s['models']}, {s['n_calibration']:.0f} | {s['level']:.4g} | "
                f"{_pair({r: s['detection'][r]['all'] for r in RULES})} | "
                f"{f['new']['mean']:.2%} ({f['new']['p95']:.2%}) ± {f['new']['se']:.2%} | "
                f"{f['today']['mean']:.2%} | {gate('A', 'dirty_fail')} | {gate('A', 'clean_pass')} | "
                f"{gate('B', 'dirty_fail')} | {gate('B', 'clean_pass')} | {_pair(s['roc_auc'], '{:.4f}')} | "
                f"{s['fit_seconds']:.0f} |"
            )
        lines += ["", "| n | " + " | ".join(kinds) + " |", "| --- " * (len(kinds) + 1) + "|"]
        lines += [
            f"| {s['n']} | " + " | ".join(_pair({r: s["detection"][r][k] for r in RULES}) for k in kinds) + " |"
            for s in rows
        ]
        lines += ["", *[f"- n = {s['n']}: {s['guarantee']}" for s in rows]]
        lines += [f"- n = {s['n']}: {w}" for s in rows for w in s["warnings"]]
    return "\n".join(lines) + "\n"


def _line(row: dict[str, Any]) -> str:
    det, fpr = row["detection"], row["fpr"]
    return (
        f"{row['dataset']} n={row['n']} rep={row['rep']}: fit {row['fit_seconds']:.1f} s ({row['models']} model(s), "
        f"{row['n_calibration']} cal, {row['epochs']} epochs, {row['stopped']}); detection new {det['new']['all']:.1%} "
        f"today {det['today']['all']:.1%}; FPR new {fpr['new']:.2%} today {fpr['today']:.2%} "
        f"({row['held_out_normals']} held-out normals)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with the MNIST IDX files (for the mnist dataset)")
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--sizes", default="50,100,300")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--folds", type=int, default=None, help="FitConfig(folds=K); default: the library's")
    ap.add_argument("--time-budget", type=float, default=None, help="fit time budget in s (smoke tests only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "small_sets")
    ap.add_argument("--models", type=Path, default=None, help="keep fitted model files here and reuse them")
    ap.add_argument("--work", type=Path, default=None, help="folder for the photo files (default: a temporary one)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = args.datasets.split(",")
    unknown = set(names) - set(DATASETS)
    if unknown:
        raise SystemExit(f"unknown dataset(s) {', '.join(sorted(unknown))}; use {', '.join(DATASETS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="small-sets-"))
    pools = load_pools(names, args.data)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for name in names:
        done: set[int] = set()
        for asked in (int(s) for s in args.sizes.split(",")):
            n = available(name, pools, asked)
            if n in done:
                continue
            done.add(n)
            if n != asked:
                notes.append(f"{name}: n = {asked} asked, {n} used (so that {MIN_HELD} held-out normals remain)")
            for r in range(args.reps):
                row = run_one(name, pools, n, r, args.folds, args.time_budget, args.models, work)
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
    doc = {
        **provenance(f"torch threads {args.threads}"),
        "reps": args.reps,
        "folds": args.folds,
        "time_budget": args.time_budget,
        "wall_seconds": time.perf_counter() - t0,
        "notes": notes,
        "summary": summarise(rows),
        "rows": rows,
    }
    write_results(args.out, doc, markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
