"""What a training run has reached and how it is checkpointed: the best held-out state, the history,
the counters, and the snapshots `fit --resume` continues from (same weights, optimiser moments and
random streams, so a resumed run ends identical to an uninterrupted one)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class EpochStats:
    """What a progress display needs after each epoch (or partial epoch)."""

    epoch: int
    epochs: int
    train_loss: float  # mean -ELBO per image, nats
    train_kl: float  # mean KL per image, nats
    val_loss: float | None
    images_per_s: float
    elapsed: float
    remaining: float | None  # seconds, estimated


@dataclass
class Reached:
    """How far training has come; `state` is what a checkpoint holds, `resumed` reads it back."""

    best_val: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, Any] | None = None  # None: no held-out images, the last state is kept
    stale: int = 0  # epochs since the held-out loss last improved
    seen: int = 0  # images trained on, over every epoch
    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0  # the last epoch finished
    elapsed: float = 0.0  # seconds of training, those before a resume included

    @classmethod
    def resumed(
        cls, state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator
    ) -> Reached:
        """A checkpoint's state, loaded back into the model, optimiser and random streams."""
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return cls(
            state["best_val"],
            state["best_epoch"],
            state["best_state"] or None,
            state["stale"],
            state["seen"],
            list(state["history"]),
            state["epoch"],
            state["elapsed"],
        )

    @property
    def train_loss(self) -> float:
        return float(self.history[-1]["train_loss"]) if self.history else math.nan

    def record(self, stats: EpochStats, model: nn.Module) -> None:
        """An epoch's figures; the model's state kept when its held-out loss is the best so far."""
        self.history.append(asdict(stats))
        self.epoch, self.elapsed = stats.epoch, stats.elapsed
        val = stats.val_loss
        if val is None or val < self.best_val:
            self.best_val, self.best_epoch, self.stale = (val if val is not None else math.inf), stats.epoch, 0
            self.best_state = copy.deepcopy(model.state_dict()) if val is not None else None
        else:
            self.stale += 1

    def state(self, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> dict[str, Any]:
        """Tensors and plain values from which `resumed` continues exactly where this is."""
        return {
            "epoch": self.epoch,
            "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state or {},
            "stale": self.stale,
            "seen": self.seen,
            "history": list(self.history),
            "elapsed": self.elapsed,
        }


class Checkpoints:
    """A snapshot at an epoch end at most every second (tiny epochs would otherwise spend their time
    copying), written every `every` seconds and on an interruption, so a stop loses at most a second."""

    def __init__(
        self,
        write: Callable[[dict[str, Any]], None] | None,
        every: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.write, self.every, self.clock = write, every, clock
        self.last_written, self.last_snapshot = clock(), -math.inf
        self.snapshot: dict[str, Any] | None = None
        self.written = True

    def epoch_end(self, take: Callable[[], dict[str, Any]], interrupted: bool) -> None:
        """After an epoch: maybe snapshot (`take`), maybe write; on an interruption, write what is pending."""
        if self.write is None:
            return
        if interrupted:
            if self.snapshot is not None and not self.written:
                self.write(self.snapshot)
            return
        due = self.clock() - self.last_written >= self.every
        if due or self.clock() - self.last_snapshot >= 1.0:
            self.last_snapshot = self.clock()
            self.snapshot, self.written = take(), False
            if due:
                self.write(self.snapshot)
                self.last_written, self.written = self.clock(), True
