"""`Detector`: the Python API. Fit on normal images, score new ones, decide.

    det = Detector(FitConfig(epochs=20)).fit("normal_imgs/")
    result = det.score("incoming/")
    decision = det.decide(result, threshold="auto", fpr=0.01)
    det.save("model.vae")

A thin facade: reading the training images and planning folds live in
`crossfit.py`, running the models in `inference.py`, the decision rule in
`decision.py`, devices and threads in `devices.py`, the model file in
`artifact.py`. Fitted state lives in attributes ending in `_` (PyOD's
convention). Nothing here imports click or rich.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from . import crossfit, fit_steps
from .config import FitConfig
from .decision import checks
from .decision.batch_tests import BatchTest, run_batch_tests
from .decision.calibration import Calibration
from .decision.checks import Reason
from .decision.rule import Decision, DecisionRule
from .errors import UsageError
from .fitted import Fitted
from .images.batching import DecodeOptions
from .images.decoding import Preprocessing
from .images.duplicates import NEAR_BITS, Duplicate, Fingerprints, find_duplicates
from .images.listing import FileListing
from .local import patches as local
from .local.patches import PatchBank
from .local.tiles import Scales, TileBank
from .model import backbone, budget, inference, neighbours
from .model.budget import FitPlan
from .model.devices import ThreadShare, resolve_device, training_device
from .model.distributed import current
from .model.feature_vae import FeatureVAE
from .model.features import NOT_TESTED
from .model.inference import HeatMaps, ImageInput, ScoreResult
from .model.neighbours import LatentBank
from .model.score_table import DEFAULT_GUARD, DEFAULT_SCORE, SCORE_NAMES, SCORE_SPECS
from .model.scores import NEEDS_BITS, latent_noise
from .model.train_state import EpochStats
from .model.vae import VAE
from .validation import check_choice


class Detector:
    """A VAE anomaly detector: `fit` on normal images, then `score` and `decide`."""

    def __init__(self, config: FitConfig | None = None) -> None:
        self.config = config or FitConfig()
        self.models_: list[VAE] = []  # K models: 1, or K cross-fitted ones
        self.calibration_folds_: np.ndarray = np.zeros(0, np.int64)  # fold (= model) of each calibration score
        self.calibration_: dict[str, np.ndarray] = {}
        # Every training image's duplicate fingerprints (None for model files written before them).
        self.training_fingerprints_: Fingerprints | None = None
        # The local statistic's patch banks (local.py); None for model files written before it.
        self.patches_: PatchBank | None = None
        # Its tile scale (tiles.py); None where the training images were too small to tile, or not files.
        self.tiles_: TileBank | None = None
        # Each model's training latents for the default score elbo-ic-nn (neighbours.py); None in files before it.
        self.neighbours_: tuple[LatentBank, ...] | None = None
        self.metadata_: dict[str, Any] = {}
        self._features: backbone.Features | None = None  # the backbone, made when first needed
        self.checksum_: str | None = None
        self.device_ = torch.device("cpu")
        self.decode = self.config.decode  # how files are read when scoring, too

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: ImageInput,
        *,
        on_epoch: Callable[[EpochStats], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
        on_model: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
        checkpoint_every: float = 30.0,
        on_plan: Callable[[FitPlan], None] | None = None,
        started: float | None = None,
        on_phase: Callable[[str], None] | None = None,
    ) -> Detector:
        """Train on normal images (paths, folders, or a uint8 array) and calibrate.

        With folds K > 1 (the default below CROSS_FIT_BELOW images) this trains
        K models, calling `on_model(k, K)` before each. `checkpoint` and
        `resume` write and continue a resumable state; `should_stop` (asked
        after every step) ends training early (see `crossfit.train_models`).
        Under torchrun every process calls `fit` alike (see `distributed.py`).
        Before training, `on_plan` receives the `FitPlan`: the epochs that fit
        the time budget and the expected seconds (see `budget.py`), counted
        from `started` (a `time.perf_counter()` value; default: now), so
        that a command's budget can include its own start-up. `on_phase`
        receives a line as each phase starts and ends (reading, features,
        local banks, training, calibration); their seconds go in the model
        file (`training.phases`).
        """
        started = time.perf_counter() if started is None else started
        cfg, world = self.config, current()
        hooks = crossfit.Hooks(on_epoch, on_model, should_stop, checkpoint, resume, checkpoint_every, on_warning)
        warn = on_warning or (lambda _msg: None)
        phases = fit_steps.Phases(on_phase)
        phases.start("reading", "reading the training images")
        images = crossfit.read_training_images(data, cfg, warn)
        phases.end(f"read {len(images.pixels):,} images at {images.prep.size} px; the VAE models {images.features} "
                   f"({images.why})")  # fmt: skip
        rng = np.random.default_rng(cfg.seed)
        plans = crossfit.plan(len(images.pixels), cfg, rng, images.features)
        n_calibration = sum(len(c) for _, c in plans)
        warning = crossfit.calibration_warning(n_calibration, len(plans))
        if warning is not None:
            warn(warning)
        device = training_device(cfg.device, world)
        inputs, bits, vae_cfg, self._features = fit_steps.model_inputs(images, cfg, device, phases)
        seed = crossfit.noise_seed(cfg)
        noise = {name: latent_noise(vae_cfg.latent_dim, n, seed) for name, n in cfg.samples.items()}
        self.patches_, self.tiles_, local_values = fit_steps.local_banks(images, cfg, plans, rng.spawn(1)[0], phases)
        fit_plan = fit_steps.fit_plan(cfg, vae_cfg, inputs, noise, device, plans, started)
        if on_plan is not None:
            on_plan(fit_plan)
        deadline = None if cfg.budget is None else started + cfg.budget
        data_fp, ident, settings = crossfit.identity(images.pixels, cfg)
        speed = fit_plan.speed
        schedule = (fit_plan.default_epochs, deadline, budget.reserve(n_calibration, speed))
        phases.start("training", "training")
        models, results, sizes = crossfit.train_models(
            inputs, plans, cfg, vae_cfg, device, world, ident, hooks, rng, schedule
        )
        phases.end("training done")
        phases.start("calibration", f"calibrating on {n_calibration:,} held-out images")
        self.models_, self.preprocessing_, self.device_ = models, images.prep, device
        trained = (plans, results, sizes)
        self.metadata_ = crossfit.training_metadata(vae_cfg, images, cfg, trained, settings, data_fp, device, world)
        self.calibration_folds_ = np.concatenate([np.full(len(c), k, np.int64) for k, (_, c) in enumerate(plans)])
        self.neighbours_, self.calibration_ = fit_steps.calibration(
            models, inputs, bits, plans, noise, device, rng.spawn(1)[0]
        )
        order = np.concatenate([c for _, c in plans])
        images.facts.properties[local.NAME] = np.zeros(len(images.pixels))
        images.facts.properties[local.NAME][order] = local_values
        self._calibrate_checks(images, order, warn)
        phases.end("calibrated")
        self.metadata_["training"]["plan"] = {**fit_plan.to_dict(), "seconds": time.perf_counter() - started}
        self.metadata_["training"]["phases"] = phases.seconds
        self.checksum_ = None
        return self

    def _calibrate_checks(
        self, images: crossfit.TrainingImages, order: np.ndarray, warn: Callable[[str], None]
    ) -> None:
        """The checks' calibration entries, the format shares and near-duplicate bound, every training
        image's name and fingerprints (checks.calibrate)."""
        entries, meta = checks.calibrate(images.facts, order, images.paths, warn)
        # Over a backbone's features some checks only dilute the evidence (features.NOT_TESTED): they are
        # still measured and explained, not tested.
        meta["sides"] = {k: v for k, v in meta["sides"].items() if k not in NOT_TESTED[images.features]}
        self.calibration_.update(entries)
        self.metadata_["checks"] = meta
        self.training_fingerprints_ = images.facts.fingerprints

    # ---------------------------------------------------------------- state
    @property
    def model_(self) -> VAE | None:
        """The first (or only) model; all K are in `models_`."""
        return self.models_[0] if self.models_ else None

    @property
    def local_(self) -> Scales | None:
        """The local statistic's scales (whole image, tiles), or None for model files without it."""
        return None if self.patches_ is None else Scales(self.patches_, self.tiles_)

    @property
    def n_models(self) -> int:
        """K: 1 for a single model, K > 1 for cross-fitted models."""
        return max(1, len(self.models_))

    @property
    def calibration(self) -> Calibration:
        """The calibration scores of every statistic, with the model behind each."""
        sides = self.metadata_.get("checks", {}).get("sides")
        features = str(self.metadata_.get("features", {}).get("kind", "pixels"))
        return Calibration(self.calibration_, self.calibration_folds_, self.n_models, sides, features)

    @property
    def fingerprint(self) -> str | None:
        return self.checksum_[:16] if self.checksum_ else None

    @property
    def features_(self) -> backbone.Features | None:
        """The pretrained backbone whose features the VAE models; None for a pixel VAE."""
        if self._features is None and self.models_ and isinstance(self.models_[0], FeatureVAE):
            self._features = backbone.Features(self.device_)
        return self._features

    def _check_fitted(self) -> Preprocessing:
        if not self.models_ or self.preprocessing_ is None:
            raise UsageError("this Detector is not fitted: call fit() or Detector.load() first")
        return self.preprocessing_

    def default_samples(self, score: str) -> int:
        """The Monte Carlo sample count the model was calibrated with for `score`."""
        return int(self.metadata_.get("samples", {}).get(score, SCORE_SPECS[score].default_samples))

    def _noise(self, samples: int) -> torch.Tensor:
        return latent_noise(self.models_[0].config.latent_dim, samples, int(self.metadata_["noise_seed"]))

    # ---------------------------------------------------------------- score
    def score(
        self,
        data: ImageInput | FileListing,
        *,
        score: str = DEFAULT_SCORE,
        samples: int | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
        guard: str | None = DEFAULT_GUARD,
        on_warning: Callable[[str], None] | None = None,
    ) -> ScoreResult:
        """Score images (higher = more anomalous); unreadable files become error records.

        `guard` names a second statistic scored alongside (default: the latent
        KL), which the decision tests together with the score (one test): it
        catches inputs whose pixels the decoder explains but whose latent code
        no normal image has (shrunk, noisy, dimmed or blurred frames). None,
        or the score itself, turns it off. `samples` is for the score; the
        guard keeps the count it was calibrated with.
        """
        names = (score,) if guard in (None, score) else (score, guard)
        counts = {score: samples} if samples is not None else None
        out = self.score_many(
            data, scores=names, samples=counts, batch_size=batch_size, on_batch=on_batch, on_warning=on_warning
        )
        result = out[score]
        if len(names) == 2:
            result.guard = out[names[1]]
        return result

    def score_many(
        self,
        data: ImageInput | FileListing,
        *,
        scores: Sequence[str] = SCORE_NAMES,
        samples: int | Mapping[str, int] | None = None,
        batch_size: int = 256,
        on_batch: Callable[[int, int], None] | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> dict[str, ScoreResult]:
        """Several score types in one pass, so each file is decoded once (`evaluate` asks for all).

        With K cross-fitted models every image is scored by each; `scores` is
        their mean and `model_scores` keeps all K for cross-conformal p-values.
        """
        prep = self._check_fitted()
        for name in scores:
            check_choice("score", name, SCORE_NAMES)
        given = samples if isinstance(samples, Mapping) else dict.fromkeys(scores, samples)
        counts = {name: given.get(name) or self.default_samples(name) for name in scores}
        noise = {name: self._noise(n) for name, n in counts.items()}
        features = self.features_
        threads = ThreadShare(self.device_, backbone=features is not None)
        bits = features is None and not NEEDS_BITS.isdisjoint(scores)
        it, ignored = inference.batches(
            data, prep, batch_size, self.decode, bits=bits, on_warning=on_warning, threads=threads, local=self.local_
        )
        per_model, paths, errors, unlike, facts = inference.score_all(
            self.models_, it, noise, self.device_, threads, on_batch, self.neighbours_, features
        )
        return inference.results(per_model, paths, errors, unlike, counts, ignored, facts)

    def heatmap(
        self, data: ImageInput, *, score: str = "elbo", samples: int | None = None, batch_size: int = 256
    ) -> HeatMaps:
        """Where in each image the decoder was surprised: per-pixel -log p(x|z), averaged over z and the models.

        The draws are the score's own (same seed and count), so for `elbo` a
        map's sum plus its KL is exactly the image's score, also for K
        cross-fitted models (both are means over the K models).
        """
        prep = self._check_fitted()
        check_choice("score", score, SCORE_NAMES)
        eps = self._noise(samples or self.default_samples(score))
        it, _ = inference.batches(data, prep, batch_size, self.decode)
        return inference.heat_maps(self.models_, it, eps, self.device_, prep, self.local_, self.features_)

    # --------------------------------------------------------------- decide
    def rule(self, result: ScoreResult, **options: Any) -> DecisionRule:
        """The decision rule for a scored batch: its score and guard, and `options` (tail, threshold, fpr, fdr)."""
        rule = DecisionRule(result.score, None if result.guard is None else result.guard.score, **options)
        return rule.resolved(self.calibration.features)

    def decide(self, result: ScoreResult, rule: DecisionRule | None = None, **options: Any) -> Decision:
        """Conformal p-values against the calibration scores, and flags under the rule.

        Give a `DecisionRule`, or its options (threshold "auto" or a number,
        fpr, tail, fdr) for the rule of this result's score and guard.
        Cross-fitted models give cross-conformal p-values.
        """
        if rule is not None and options:
            raise UsageError(f"give a DecisionRule or its options, not both (got {', '.join(options)})")
        rule = rule or self.rule(result, **options)
        return rule.decide(self.calibration, result, self.default_samples(result.score), self.checked(result))

    def p_values(self, result: ScoreResult, tail: str = "two-sided", checks: bool = True) -> np.ndarray:
        """The decision's p-values of a scored batch: one test of the score, the guard and the checks."""
        guard = result.guard
        return self.rule(result, tail=tail, checks=checks).p_values(
            self.calibration,
            result.scores,
            result.model_scores,
            None if guard is None else guard.scores,
            None if guard is None else guard.model_scores,
            self.checked(result),
        )

    def checked(self, result: ScoreResult) -> dict[str, np.ndarray] | None:
        """The property checks' values of a scored batch (`checks.checked`), or None where it has none."""
        if result.facts is None:
            return None
        return checks.checked(result.facts, self.metadata_.get("checks", {}), self.calibration_)

    def explain(
        self, result: ScoreResult, decision: Decision, which: Sequence[int], level: float | None = None
    ) -> list[list[Reason]]:
        """The most atypical findings of the images `which` (positions in `result`), most atypical first:
        `checks.ATYPICAL` of them and every other at p <= `level`; `checks.kept` picks a flagged image's
        reasons at the decision's cut-off."""
        tail = decision.threshold.tail
        model = {result.score: (result.scores, self.calibration.of(result.score), tail)}
        if result.guard is not None:
            model[result.guard.score] = (result.guard.scores, self.calibration.of(result.guard.score), tail)
        formats = result.facts.formats if result.facts is not None else []
        shares = self.metadata_.get("checks", {}).get("formats", {})
        checked = self.checked(result) or {}
        return checks.explain(which, model, self.calibration_, checked, formats, shares, self.calibration.sides, level)

    @property
    def near_bits(self) -> int:
        """The near-duplicate bound `fit` calibrated on the training images (-1: exact copies only)."""
        return int(self.metadata_.get("checks", {}).get("near_bits", NEAR_BITS))

    def duplicates(self, result: ScoreResult) -> list[Duplicate | None]:
        """Each scored image's copy among the training images (a leak) or earlier in the batch, or None."""
        if result.facts is None:
            return [None] * len(result.paths)
        training = self.training_fingerprints_ or Fingerprints.empty()
        names = list(self.metadata_.get("checks", {}).get("training_files", [])) if len(training.exact) else []
        return find_duplicates(result.facts.fingerprints, result.paths, training, names, self.near_bits)

    def batch_tests(
        self,
        result: ScoreResult,
        decision: Decision,
        *,
        fpr: float = 0.01,
        baseline: np.ndarray | None = None,
    ) -> dict[str, BatchTest]:
        """Batch-level tests (see batch_tests.py), each a one-sided p-value: small = worse than normal."""
        return run_batch_tests(
            result.scores,
            decision.p_values,
            self.calibration.of(result.score),
            fpr=fpr,
            model_scores=result.model_scores if self.n_models > 1 else None,
            baseline=baseline,
        )

    def smallest_p_value(self, score: str) -> float:
        """The smallest p-value this model can give for `score`: 1/(n+1), whatever the tail and guard."""
        return DecisionRule(score, None).floor(len(self.calibration.of(score)))

    # ------------------------------------------------------------ save/load
    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the model file atomically; returns its checksum (the model's fingerprint)."""
        self._check_fitted()
        self.metadata_["models"] = self.n_models
        state = Fitted(
            self.models_,
            self.preprocessing_,
            self.metadata_,
            self.calibration_,
            self.calibration_folds_,
            self.training_fingerprints_,
            self.patches_,
            self.tiles_,
            self.neighbours_,
        )
        self.checksum_ = state.save(path)
        return self.checksum_

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto", decode: DecodeOptions | None = None) -> Detector:
        """The model file's fitted state (`Fitted.load`; every failure is a `ModelFileError`) on `device`.

        `decode` says how files will be read when scoring (workers, pixel cache).
        """
        state, checksum = Fitted.load(path)
        det = cls(FitConfig(decode=decode or DecodeOptions()))
        det.device_ = resolve_device(device)
        det.models_ = [m.to(det.device_).eval() for m in state.models]
        det.preprocessing_, det.metadata_, det.checksum_ = state.preprocessing, state.metadata, checksum
        det.calibration_, det.calibration_folds_ = state.calibration, state.folds
        det.training_fingerprints_ = state.fingerprints
        det.patches_, det.tiles_, det.neighbours_ = state.patches, state.tiles, state.neighbours
        return det

    def info(self) -> dict[str, Any]:
        """What the model was trained on and how, for `vae-anomaly info`."""
        self._check_fitted()
        meta = dict(self.metadata_)
        if "checks" in meta:  # the training files' names are counted, not listed (100,000 of them)
            meta["checks"] = {**meta["checks"], "training_files": len(meta["checks"].get("training_files", []))}
        return {
            "fingerprint": self.fingerprint,
            **meta,
            "models": self.n_models,
            **({"local": self.patches_.describe_rule()} if self.patches_ is not None else {}),
            **({"tiles": self.tiles_.describe_rule()} if self.tiles_ is not None else {}),
            **({"neighbours": neighbours.describe(self.neighbours_)} if self.neighbours_ is not None else {}),
            "calibration": {
                k: {
                    "n": len(v),
                    "samples": self.default_samples(k) if k in SCORE_SPECS else None,
                    "median": float(np.median(v)) if len(v) else None,
                }
                for k, v in self.calibration_.items()
            },
        }
