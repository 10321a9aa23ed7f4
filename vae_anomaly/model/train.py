"""The training loop. It knows the model only through `forward` and
`pixel_log_likelihood`, and reports progress through a callback.

Given a `World` of several processes (torchrun), it trains with
DistributedDataParallel and the same arithmetic as one process: every
process shuffles with the same seeded generator, draws the reparameterisation
noise of the whole batch, and trains on its contiguous slice of the batch;
the losses are weighted so that DDP's averaged gradient is the gradient of
the whole batch's mean. One small all-reduce per step (loss, KL, stop votes)
keeps the NaN check, the time budget and Ctrl-C in lock-step, and the
held-out loss is summed over the processes, so early stopping agrees too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import TrainingError
from .devices import model_input
from .distributed import World
from .scores import kl_to_standard_normal, latent_noise, negative_elbo
from .train_config import TrainConfig
from .train_state import Checkpoints, EpochStats, Reached
from .vae import VAE

# On a GPU the loss is read back (NaN check, running mean) every this many steps, not every
# step: each read waits for the GPU to finish, which would leave it idle while Python queues more.
GPU_SYNC_EVERY = 20


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_val_loss: float | None
    final_train_loss: float
    stopped: str  # "epochs", "early-stopping", "time-budget" or "interrupted"
    seconds: float
    images_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def elbo_terms(model: VAE, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-ELBO and its KL term per image (B,), one reparameterised sample (Kingma & Welling 2014, Eq. 10)."""
    out, mu, logvar = model(x, eps)
    nll = -model.pixel_log_likelihood(x, out).flatten(1).sum(-1)
    kl = kl_to_standard_normal(mu, logvar)
    return nll + kl, kl


def elbo_loss(model: VAE, x: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean -ELBO over the batch, and the mean KL so progress can show how much the latent code costs."""
    neg_elbo, kl = elbo_terms(model, x, eps)
    return neg_elbo.mean(), kl.mean()


def default_epochs(n_train: int, batch_size: int, min_steps: int) -> int:
    """50 epochs, or more on small sets so that training takes at least `min_steps` optimiser steps.

    30 epochs of 100 images would be only 30 steps: too few for Adam to
    converge, whatever early stopping says.
    """
    return max(50, math.ceil(min_steps / max(1, math.ceil(n_train / batch_size))))


class _Objective(nn.Module):
    """The per-image loss as one module call. DDP reduces the gradients of what its module's
    forward computes; the decoder scale enters the loss outside `VAE.forward`."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return elbo_terms(self.model, x, eps)


def _wrap(model: VAE, device: torch.device) -> DistributedDataParallel:
    """DDP around the objective: one process per GPU (device_ids), or CPU tensors with gloo."""
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(_Objective(model), device_ids=ids)


def _shard_step(
    net: DistributedDataParallel,
    pixels: torch.Tensor,
    idx: torch.Tensor,
    eps: torch.Tensor,
    device: torch.device,
    world: World,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's part of one step: (loss to backpropagate, its [loss, KL sum] share).

    With B images in the batch, b on this process and W processes, the loss is
    the slice's mean times b * W / B: DDP averages gradients over W, which
    then gives the gradient of the mean over all B images, also when the last
    batch does not split evenly (the factor is exactly 1 when it does). A
    process whose slice is empty (a last batch smaller than W) still runs one
    image at weight 0, because DDP needs every process's gradients.
    """
    lo, hi = world.shard(len(idx))
    weight = (hi - lo) * world.size / len(idx)
    if hi == lo:
        lo, hi = 0, 1
    neg_elbo, kl = net(_to_float(pixels[idx[lo:hi]], device), eps[lo:hi])
    loss = neg_elbo.mean() * weight
    # Summed over the processes: the batch's mean loss times W, and the batch's KL sum.
    share = torch.stack([loss.detach(), kl.detach().sum() * (weight > 0)])
    return loss, share


def _diverged(value: float, epoch: int, first: int, last: int) -> None:
    where = f"step {last}" if first == last else f"steps {first}-{last}"
    raise TrainingError(
        f"the loss became {value} at epoch {epoch}, {where}: the optimiser diverged "
        "(a learning rate too high for this data, or images that are all one value). Try a smaller "
        "--learning-rate (e.g. 3e-4), a different --seed, or --likelihood bernoulli."
    )


def _resident(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On a GPU: the whole uint8 set in GPU memory when it takes under a quarter of what is free
    (batches are then sliced there, with no copy per step), else in page-locked memory so
    each batch's copy runs asynchronously."""
    if device.type != "cuda":
        return pixels
    free, _ = torch.cuda.mem_get_info(device)
    if pixels.numel() < free // 4:
        return pixels.to(device)
    return pixels.pin_memory()


def _to_float(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model_input(pixels.to(device, non_blocking=True))


@torch.no_grad()
def held_out_loss(
    model: VAE, pixels: torch.Tensor, device: torch.device, batch_size: int = 512, world: World | None = None
) -> float:
    """Mean -ELBO on held-out images with fixed draws, so epochs compare fairly.

    Several processes take every W-th batch and sum: each gets the same value
    (early stopping must decide alike everywhere), from the same batches as one process.
    """
    world = world or World()
    was_training = model.training
    model.eval()
    eps = latent_noise(model.config.latent_dim, 1, seed=12345)
    total = 0.0
    for j, i in enumerate(range(0, len(pixels), batch_size)):
        if j % world.size == world.rank:
            total += float(negative_elbo(model, _to_float(pixels[i : i + batch_size], device), eps).sum())
    if world.size > 1:
        total = float(world.all_reduce_sum(torch.tensor(total, dtype=torch.float64)))
    model.train(was_training)
    return total / max(len(pixels), 1)


def train(
    model: VAE,
    train_pixels: torch.Tensor,
    val_pixels: torch.Tensor | None,
    config: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    checkpoint_every: float = 30.0,
    resume: dict[str, Any] | None = None,
    world: World | None = None,
) -> TrainResult:
    """Adam on -ELBO, batches sliced from one uint8 tensor; keeps the best held-out state.

    `train_pixels` and `val_pixels` are uint8 (N, C, H, W). Without held-out
    images there is no early stopping and the last state is kept.

    `should_stop` is asked after every step (Ctrl-C in the CLI): training then
    ends with the best state so far. `on_checkpoint` receives, at the end of
    an epoch and at most every `checkpoint_every` seconds, a dict of tensors
    and plain values from which `resume` continues exactly where it was
    (`train_state.Reached`).

    With a `world` of several processes (see the module's docstring), every
    process passes the same images and config; `on_checkpoint` should then
    be given on rank 0 only, whose state is every process's state.
    """
    if len(train_pixels) == 0:
        raise TrainingError("no training images left after the calibration split")
    loop = _Loop(model, train_pixels, config, world or World(), should_stop)
    reached = Reached() if resume is None else Reached.resumed(resume, model, loop.opt, loop.gen)
    if val_pixels is not None:
        val_pixels = _resident(val_pixels, loop.device)
    checkpoints = Checkpoints(on_checkpoint, checkpoint_every)
    epochs = config.epochs or default_epochs(loop.n, config.batch_size, config.min_steps)
    start = time.perf_counter() - reached.elapsed
    loop.start = start
    stopped = "epochs"
    for epoch in range(reached.epoch + 1, epochs + 1):
        run = loop.epoch(epoch)
        reached.seen += run.count
        val = None
        if val_pixels is not None and len(val_pixels):
            val = held_out_loss(model, val_pixels, loop.device, world=loop.world)
        elapsed = time.perf_counter() - start
        remaining = max(0.0, config.time_budget - elapsed) if config.time_budget is not None else None
        if remaining is None:
            remaining = elapsed / epoch * (epochs - epoch)
        kl = float(run.kl_sum) / run.count
        stats = EpochStats(epoch, epochs, run.loss_sum / run.count, kl, val, reached.seen / elapsed, elapsed, remaining)
        reached.record(stats, model)
        if on_epoch is not None:
            on_epoch(stats)
        checkpoints.epoch_end(lambda: reached.state(model, loop.opt, loop.gen), run.interrupted)
        stopped = "interrupted" if run.interrupted else "time-budget" if run.out_of_time else stopped
        if run.interrupted or run.out_of_time:
            break
        if reached.stale >= config.patience:
            stopped = "early-stopping"
            break
    if reached.best_state is not None:
        model.load_state_dict(reached.best_state)
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        epochs_run=reached.epoch,
        best_epoch=reached.best_epoch if reached.best_state is not None else reached.epoch,
        best_val_loss=None if reached.best_state is None else reached.best_val,
        final_train_loss=reached.train_loss,
        stopped=stopped,
        seconds=seconds,
        images_per_s=reached.seen / seconds if seconds > 0 else 0.0,
        history=reached.history,
    )


@dataclass
class _Epoch:
    """One epoch's sums (the KL on the device until the epoch ends) and why it ended early, if it did."""

    kl_sum: torch.Tensor
    pending: torch.Tensor  # on a GPU: the loss sum not yet read back
    loss_sum: float = 0.0
    count: int = 0
    out_of_time: bool = False
    interrupted: bool = False


class _Loop:
    """The optimiser, the random streams and the steps of one training run, on one process or several."""

    def __init__(
        self,
        model: VAE,
        pixels: torch.Tensor,
        config: TrainConfig,
        world: World,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.model, self.config, self.world, self.should_stop = model, config, world, should_stop
        self.device = torch.device(config.device)
        model.to(self.device).train()
        self.opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.n = len(pixels)
        self.steps = max(1, math.ceil(self.n / config.batch_size))
        self.net = _wrap(model, self.device) if world.size > 1 else None
        self.pixels = _resident(pixels, self.device)
        self.cuda = self.device.type == "cuda"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
        self.start = time.perf_counter()

    def late(self) -> bool:
        return self.config.time_budget is not None and time.perf_counter() - self.start >= self.config.time_budget

    def epoch(self, epoch: int) -> _Epoch:
        """The steps of one epoch, until its end, the time budget or a stop request."""
        order = torch.randperm(self.n, generator=self.gen).to(self.pixels.device)
        zero = torch.zeros((), device=self.device)
        run = _Epoch(zero.clone(), torch.zeros((), device=self.device, dtype=torch.float64))
        size = self.config.batch_size
        step = 0
        for step in range(self.steps):
            idx = order[step * size : (step + 1) * size]
            # The whole batch's draws, from the CPU generator (which checkpoints hold), on every
            # process alike: each trains on its slice, so W processes use the numbers one would.
            eps = torch.randn(len(idx), self.model.config.latent_dim)
            eps = eps.pin_memory().to(self.device, non_blocking=True) if self.cuda else eps
            if self.net is None:
                loss, kl_batch, value = self._step(idx, eps, step, run)
            else:
                loss, kl_batch, value = self._shared_step(idx, eps, run)
            if value is not None and not math.isfinite(value):
                first = step + 1 if not self.cuda or self.net is not None else step + 2 - GPU_SYNC_EVERY
                _diverged(value, epoch, first, step + 1)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.opt.step()
            run.kl_sum += kl_batch  # stays on the device until the epoch ends
            run.count += len(idx)
            if self.net is not None:
                if run.out_of_time or run.interrupted:
                    run.interrupted = run.interrupted and not run.out_of_time
                    break
                continue
            if self.late():
                run.out_of_time = True
                break
            if self.should_stop is not None and self.should_stop():
                run.interrupted = True
                break
        if self.cuda and self.net is None:
            rest = float(run.pending)
            if not math.isfinite(rest):
                _diverged(rest, epoch, step + 1 - step % GPU_SYNC_EVERY, step + 1)
            run.loss_sum += rest
        return run

    def _step(
        self, idx: torch.Tensor, eps: torch.Tensor, step: int, run: _Epoch
    ) -> tuple[torch.Tensor, torch.Tensor | float, float | None]:
        """One process: the loss, the batch's KL sum, and its mean loss where read back at this step."""
        with self.autocast:
            loss, kl = elbo_loss(self.model, _to_float(self.pixels[idx], self.device), eps)
        kl_batch = kl.detach().float() * len(idx)
        value: float | None = None
        if not self.cuda:
            value = float(loss.detach())  # the step's one device sync: the NaN check and the running mean
            run.loss_sum += value * len(idx)
        else:
            run.pending += loss.detach() * len(idx)
            if (step + 1) % GPU_SYNC_EVERY == 0:
                value = float(run.pending)
                run.loss_sum, run.pending = run.loss_sum + value, torch.zeros_like(run.pending)
        return loss, kl_batch, value

    def _shared_step(
        self, idx: torch.Tensor, eps: torch.Tensor, run: _Epoch
    ) -> tuple[torch.Tensor, float, float | None]:
        """Several processes: this one's slice; whether any must stop is asked before the gradients are
        reduced (time budget, Ctrl-C), so that all stop after this same step. One all-reduce, one sync."""
        with self.autocast:
            loss, share = _shard_step(self.net, self.pixels, idx, eps, self.device, self.world)  # type: ignore[arg-type]
        votes = [self.late(), self.should_stop is not None and self.should_stop()]
        local = torch.cat([share.double(), torch.tensor(votes, dtype=torch.float64, device=self.device)])
        loss_total, kl_batch, late, stop = self.world.all_reduce_sum(local).tolist()
        value = loss_total / self.world.size
        run.loss_sum += value * len(idx)
        run.out_of_time, run.interrupted = late > 0, stop > 0
        return loss, kl_batch, value
