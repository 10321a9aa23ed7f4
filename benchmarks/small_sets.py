"""Small training sets: the default decision against the old one, from the same fits and scores.

Per dataset (shapes, mnist, digits), training size n and repetition r: fit a `Detector` with default
settings (FitConfig(seed=r), --folds K if given) on n normal images, score held-out normals (up to
2,000) and obvious anomalies (~100 per kind) once, and compare, from those scores,
  new: the default decision (`det.decide`, fpr 0.01): one conformal test of elbo-ic-nn and its kl
       guard (`typicality_p_values`), floor 1/(n+1);
  old: the rule of the previous release: two two-sided (cross-)conformal p-values, Bonferroni,
       p = min(1, 2 min(p_score, p_kl)), floor 4/(n+1); flag p <= 0.01, or at the floor where
       0.01 is below it (as that release did without --strict-fpr);
on detection, false-positive rate, ROC-AUC, and CI gates over 20 dirty batches (190 normals + 10
anomalies) and 20 clean ones (200 normals): A = Benjamini-Hochberg at q 0.05, fail on any flag;
B = fail where the beta-binomial exceedance p-value is <= 0.01.

    python benchmarks/small_sets.py --data ../shared/data/mnist [--datasets shapes,mnist,digits]
        [--sizes 50,100,200,400,1000] [--reps 3] [--folds K] [--threads 2] [--models DIR]

--models DIR keeps each fitted model file there and loads it on the next run instead of fitting
again (the decision is recomputed from fresh scores every run).

Writes benchmarks/results/small_sets.json and .md (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
import time
from functools import partial, reduce
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist import load_mnist
from provenance import provenance, write_results

from vae_anomaly import Detector, FitConfig
from vae_anomaly.batch_tests import exceedance_test
from vae_anomaly.calibration import cross_conformal_p_values, p_values
from vae_anomaly.config import CROSS_FIT_BELOW, DEFAULT_FOLDS
from vae_anomaly.decision import DecisionRule
from vae_anomaly.inference import ScoreResult
from vae_anomaly.thresholds import benjamini_hochberg

RESULTS = Path(__file__).resolve().parent / "results"
FPR, FDR, GATE_P, OLD_TESTS = 0.01, 0.05, 0.01, 4  # old floor: 2 tests x 2 sides, 4/(n+1)
MIN_HELD, MAX_HELD, PER_KIND, BATCHES, BATCH, DIRTY = 300, 2000, 100, 20, 200, 10


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


def draw(name: str, pools: dict[str, Any], n: int, r: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(n training normals, held-out normals, anomalies by kind), seeded by r and n."""
    rng = np.random.default_rng([r, n, sum(map(ord, name))])
    if name == "shapes":
        train = figures("disc", n, 32, rng, 20.0)
        held = figures("disc", MAX_HELD, 32, rng, 20.0)
        return train, held, anomalies(held, ("square", "cross", "outline", "line cross"), rng, 20.0)
    if name == "mnist":
        x_tr, x_te = pools["mnist"]
        train = x_tr[rng.choice(len(x_tr), n, replace=False)]
        held = x_te[rng.choice(len(x_te), MAX_HELD, replace=False)]
        return train, held, anomalies(held, ("inverted", "cross", "square"), rng, 0.0)
    x = pools["digits"]
    order = rng.permutation(len(x))
    train, held = x[order[:n]], x[order[n:][:MAX_HELD]]
    return train, held, anomalies(held, ("inverted", "cross", "outline"), rng, 0.0)


def load_pools(names: list[str], data: str | None) -> dict[str, Any]:
    pools: dict[str, Any] = {}
    if "mnist" in names:
        if data is None:
            raise SystemExit("the mnist dataset needs --data (the folder of the MNIST IDX files)")
        pools["mnist"] = (load_mnist(data, "train")[0], load_mnist(data, "test")[0])
    if "digits" in names:
        from sklearn.datasets import load_digits

        pools["digits"] = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    return pools


def available(name: str, pools: dict[str, Any], n: int) -> int:
    """The largest training size <= n that leaves MIN_HELD held-out normals."""
    if name == "mnist":
        return min(n, len(pools["mnist"][0]))
    return n if name == "shapes" else min(n, len(pools["digits"]) - MIN_HELD)


def old_p_values(det: Detector, res: ScoreResult) -> np.ndarray:
    """The old rule: two-sided conformal p of the score and of the kl guard, Bonferroni."""
    cal, parts = det.calibration, []
    for r in (res, res.guard):
        assert r is not None, "the default score comes with its guard"
        if cal.models > 1:
            parts.append(cross_conformal_p_values(cal.of(r.score), cal.folds, np.asarray(r.model_scores), "two-sided"))
        else:
            parts.append(p_values(cal.of(r.score), r.scores, "two-sided"))
    p: np.ndarray = np.minimum(1.0, 2.0 * np.minimum(*parts))
    return p


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
    name: str, train: np.ndarray, n: int, r: int, folds: int | None, budget: float | None, models: Path | None
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


def run_one(
    name: str, pools: dict[str, Any], n: int, r: int, folds: int | None, budget: float | None, models: Path | None
) -> dict[str, Any]:
    train, held, kinds = draw(name, pools, n, r)
    det, fit_s = fitted(name, train, n, r, folds, budget, models)
    x = np.concatenate([held, *kinds.values()])
    kind_of = np.concatenate([np.full(len(held), "normal"), *[np.full(len(v), k) for k, v in kinds.items()]])
    normal = kind_of == "normal"
    res = det.score(x)
    d = det.decide(res)
    n_cal = d.n_calibration
    p_new, p_old = d.p_values, old_p_values(det, res)
    old_floor = OLD_TESTS / (n_cal + 1)
    old_level, old_fdr = max(FPR, old_floor), max(FDR, old_floor)
    old_flags = p_old <= old_level + 1e-12
    rng = np.random.default_rng([r, n, 7])
    norm_idx, anom_idx = np.nonzero(normal)[0], np.nonzero(~normal)[0]
    dirty = [
        np.r_[rng.choice(norm_idx, BATCH - DIRTY, replace=False), rng.choice(anom_idx, DIRTY, replace=False)]
        for _ in range(BATCHES)
    ]
    clean = [rng.choice(norm_idx, BATCH, replace=False) for _ in range(BATCHES)]
    new_fdr, new_fpr = DecisionRule(fdr=FDR).applied(n_cal), DecisionRule().applied_fpr(n_cal)
    per_rule = {
        "new": gates(p_new, d.flags, new_fpr, new_fdr, n_cal, dirty, clean),
        "old": gates(p_old, old_flags, old_level, old_fdr, n_cal, dirty, clean),
    }
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
        "level": d.threshold.alpha,
        "floor": d.floor,
        "old_floor": old_floor,
        "old_level": old_level,
        "guarantee": d.guarantee,
        "warnings": d.warnings,
        "detection": {
            rule_name: {"all": float(f[~normal].mean()), **{k: float(f[kind_of == k].mean()) for k in kinds}}
            for rule_name, f in (("new", d.flags), ("old", old_flags))
        },
        "fpr": {"new": float(d.flags[normal].mean()), "old": float(old_flags[normal].mean())},
        "roc_auc": {"new": float(roc_auc_score(y, -p_new)), "old": float(roc_auc_score(y, -p_old))},
        "batches": {g: {a: per_rule[a][g] for a in per_rule} for g in "AB"},
    }


def _mean(rows: list[dict[str, Any]], *keys: str) -> float:
    return float(np.mean([reduce(operator.getitem, keys, r) for r in rows]))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (dataset, n): means over repetitions; FPR also its 95th percentile and binomial standard error."""
    out = []
    for name, n in dict.fromkeys((r["dataset"], r["n"]) for r in rows):
        rs = [r for r in rows if (r["dataset"], r["n"]) == (name, n)]
        fpr = np.array([r["fpr"]["new"] for r in rs])
        m, held = float(fpr.mean()), sum(r["held_out_normals"] for r in rs)
        rules, fields = ("new", "old"), ("dirty_fail", "clean_pass")
        out.append(
            {
                "dataset": name,
                "n": n,
                "reps": len(rs),
                "models": rs[0]["models"],
                **{
                    k: _mean(rs, k)
                    for k in ("n_calibration", "level", "old_level", "floor", "fit_seconds", "held_out_normals")
                },
                "detection": {a: {k: _mean(rs, "detection", a, k) for k in rs[0]["detection"][a]} for a in rules},
                "fpr": {
                    "new_mean": m,
                    "new_p95": float(np.percentile(fpr, 95)),
                    # Between repetitions: each fit's calibration sets its own rate, which varies far
                    # more than the binomial error of 2,000 held-out images (Beta(j, n + 1 - j)).
                    "new_se": float(fpr.std(ddof=1) / np.sqrt(len(fpr))) if len(fpr) > 1 else float("nan"),
                    "new_binomial_se": float(np.sqrt(m * (1 - m) / held)),
                    "old_mean": _mean(rs, "fpr", "old"),
                },
                "batches": {g: {a: {f: _mean(rs, "batches", g, a, f) for f in fields} for a in rules} for g in "AB"},
                "roc_auc": {a: _mean(rs, "roc_auc", a) for a in rules},
                "guarantee": rs[0]["guarantee"],
            }
        )
    return out


def _pair(batches: dict[str, Any], gate: str, field: str) -> str:
    return f"{batches[gate]['new'][field]:.1f} / {batches[gate]['old'][field]:.1f}"


def pct(v: float) -> str:
    return f"{v:.1%}"


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Small training sets, {doc['date']}, {doc['machine']}, commit {doc['commit']}",
        "",
        f"    {doc['command']}",
        "",
        f"Per n: {doc['reps']} repetition(s), each a fit with default settings (folds {doc['folds'] or 'default'}"
        + (f", time budget {doc['time_budget']:g} s" if doc["time_budget"] else "")
        + "); "
        "means over repetitions. **new**: the default decision (one conformal test of elbo-ic-nn and its kl guard, "
        f"floor 1/(n+1), fpr {FPR}); **old**: the previous release's rule, two two-sided conformal tests, "
        f"Bonferroni, floor 4/(n+1), flagging at that floor where {FPR} is below it, from the same scores.",
        "",
        "- models, cal: models fitted (K cross-fitted or 1) and calibration scores.",
        "- detection: share of the anomalies flagged (all kinds pooled; per kind below).",
        "- FPR new: mean over repetitions (95th percentile over repetitions) ± standard error of that mean between "
        "repetitions (each fit's calibration sets its own rate: this, not the binomial error, dominates).",
        "- level: the level the new rule flags at (`decision.threshold.alpha`, raised to its floor where below it).",
        f"- gate A (BH at q {FDR}, fail on any flag) and gate B (beta-binomial exceedance p <= {GATE_P} of the count "
        "at p <= level; levels raised to the floor as each rule does): of "
        f"{BATCHES} dirty batches ({BATCH - DIRTY} normals + {DIRTY} anomalies) how many fail, of {BATCHES} clean "
        f"batches ({BATCH} normals) how many pass; new / old.",
        "- ROC-AUC: held-out normals against all anomalies, ranked by the new p-value.",
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
            "| n | models, cal | detection new / old | FPR new | FPR old | level new / old | A dirty fail "
            "| A clean pass | B dirty fail | B clean pass | ROC-AUC | fit s |",
            "| --- " * 12 + "|",
        ]
        for s in rows:
            det, f = s["detection"], s["fpr"]
            pair = partial(_pair, s["batches"])
            lines.append(
                f"| {s['n']} | {s['models']}, {s['n_calibration']:.0f} | {pct(det['new']['all'])} / "
                f"{pct(det['old']['all'])} | {f['new_mean']:.2%} ({f['new_p95']:.2%}) ± {f['new_se']:.2%} | "
                f"{f['old_mean']:.2%} | {s['level']:.4g} / {s['old_level']:.4g} | {pair('A', 'dirty_fail')} | "
                f"{pair('A', 'clean_pass')} | "
                f"{pair('B', 'dirty_fail')} | {pair('B', 'clean_pass')} | {s['roc_auc']['new']:.4f} | "
                f"{s['fit_seconds']:.0f} |"
            )
        lines += ["", "| n | " + " | ".join(f"{k} new / old" for k in kinds) + " |", "| --- " * (len(kinds) + 1) + "|"]
        lines += [
            f"| {s['n']} | "
            + " | ".join(f"{pct(s['detection']['new'][k])} / {pct(s['detection']['old'][k])}" for k in kinds)
            + " |"
            for s in rows
        ]
        lines += ["", *[f"- n = {s['n']}: {s['guarantee']}" for s in rows]]
    return "\n".join(lines) + "\n"


def _line(row: dict[str, Any]) -> str:
    det, fpr = row["detection"], row["fpr"]
    return (
        f"{row['dataset']} n={row['n']} rep={row['rep']}: fit {row['fit_seconds']:.1f} s ({row['models']} model(s), "
        f"{row['n_calibration']} cal, {row['epochs']} epochs, {row['stopped']}); detection new {det['new']['all']:.1%} "
        f"old {det['old']['all']:.1%}; FPR new {fpr['new']:.2%} old {fpr['old']:.2%} "
        f"({row['held_out_normals']} held-out normals)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with the MNIST IDX files (for the mnist dataset)")
    ap.add_argument("--datasets", default="shapes,mnist,digits")
    ap.add_argument("--sizes", default="50,100,200,400,1000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--folds", type=int, default=None, help="FitConfig(folds=K); default: the library's")
    ap.add_argument("--time-budget", type=float, default=None, help="fit time budget in s (smoke tests only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "small_sets")
    ap.add_argument("--models", type=Path, default=None, help="keep fitted model files here and reuse them")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    names = args.datasets.split(",")
    unknown = set(names) - {"shapes", "mnist", "digits"}
    if unknown:
        raise SystemExit(f"unknown dataset(s) {', '.join(sorted(unknown))}; use shapes, mnist, digits")
    pools = load_pools(names, args.data)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    t0 = time.perf_counter()
    for name in names:
        for asked in (int(s) for s in args.sizes.split(",")):
            n = available(name, pools, asked)
            if n != asked:
                notes.append(f"{name}: n = {asked} asked, {n} used (so that {MIN_HELD} held-out normals remain)")
            for r in range(args.reps):
                row = run_one(name, pools, n, r, args.folds, args.time_budget, args.models)
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
