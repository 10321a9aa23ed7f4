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

import copy
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
from .vae import VAE

# On a GPU the loss is read back (NaN check, running mean) every this many steps, not every
# step: each read waits for the GPU to finish, which would leave it idle while Python queues more.
GPU_SYNC_EVERY = 20


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
    and plain values from which `resume` continues exactly where it was:
    same weights, optimiser moments and random streams, so a resumed run
    ends identical to an uninterrupted one.

    With a `world` of several processes (see the module's docstring), every
    process passes the same images and config; `on_checkpoint` should then
    be given on rank 0 only, whose state is every process's state.
    """
    world = world or World()
    device = torch.device(config.device)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    gen = torch.Generator().manual_seed(config.seed)
    n = len(train_pixels)
    if n == 0:
        raise TrainingError("no training images left after the calibration split")
    steps_per_epoch = max(1, math.ceil(n / config.batch_size))
    epochs = config.epochs or default_epochs(n, config.batch_size, config.min_steps)
    best_val, best_epoch, best_state = math.inf, 0, None
    history: list[dict[str, Any]] = []
    stopped, seen, stale, first_epoch, before = "epochs", 0, 0, 1, 0.0
    train_loss = math.nan
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        best_val = resume["best_val"]
        best_epoch, stale, seen = resume["best_epoch"], resume["stale"], resume["seen"]
        best_state = resume["best_state"] or None
        history = list(resume["history"])
        first_epoch, before = resume["epoch"] + 1, resume["elapsed"]
        train_loss = history[-1]["train_loss"] if history else math.nan
    net = _wrap(model, device) if world.size > 1 else None
    train_pixels = _resident(train_pixels, device)
    if val_pixels is not None:
        val_pixels = _resident(val_pixels, device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    start = time.perf_counter() - before
    last_checkpoint = time.perf_counter()
    snapshot: dict[str, Any] | None = None
    written = True
    last_snapshot = -math.inf
    epoch = first_epoch - 1
    for epoch in range(first_epoch, epochs + 1):
        order = torch.randperm(n, generator=gen).to(train_pixels.device)
        loss_sum = 0.0
        kl_sum = torch.zeros((), device=device)
        pending = torch.zeros((), device=device, dtype=torch.float64)  # GPU: loss sum not yet read back
        count = 0
        out_of_time = interrupted = False
        for step in range(steps_per_epoch):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            # The whole batch's draws, from the CPU generator (which checkpoints hold), on every
            # process alike: each trains on its slice, so W processes use the numbers one would.
            eps = torch.randn(len(idx), model.config.latent_dim)
            eps = eps.pin_memory().to(device, non_blocking=True) if cuda else eps
            value: float | None = None  # the batch's mean loss, where read back at this step
            if net is None:
                with autocast:
                    loss, kl = elbo_loss(model, _to_float(train_pixels[idx], device), eps)
                kl_batch = kl.detach().float() * len(idx)
                if not cuda:
                    value = float(loss.detach())  # the step's one device sync: the NaN check and the running mean
                    loss_sum += value * len(idx)
                else:
                    pending += loss.detach() * len(idx)
                    if (step + 1) % GPU_SYNC_EVERY == 0:
                        value = float(pending)
                        loss_sum, pending = loss_sum + value, torch.zeros_like(pending)
            else:
                with autocast:
                    loss, share = _shard_step(net, train_pixels, idx, eps, device, world)
                # Ask before the gradients are reduced whether any process must stop (time budget,
                # Ctrl-C): all then stop after this same step. One all-reduce, one device sync.
                votes = [
                    config.time_budget is not None and time.perf_counter() - start >= config.time_budget,
                    should_stop is not None and should_stop(),
                ]
                local = torch.cat([share.double(), torch.tensor(votes, dtype=torch.float64, device=device)])
                loss_total, kl_batch, late, stop = world.all_reduce_sum(local).tolist()
                value = loss_total / world.size
                loss_sum += value * len(idx)
                out_of_time, interrupted = late > 0, stop > 0
            if value is not None and not math.isfinite(value):
                first = step + 1 if not cuda or net is not None else step + 2 - GPU_SYNC_EVERY
                _diverged(value, epoch, first, step + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            kl_sum += kl_batch  # stays on the device until the epoch ends
            count += len(idx)
            if net is not None:
                if out_of_time or interrupted:
                    interrupted = interrupted and not out_of_time
                    break
                continue
            if config.time_budget is not None and time.perf_counter() - start >= config.time_budget:
                out_of_time = True
                break
            if should_stop is not None and should_stop():
                interrupted = True
                break
        if cuda and net is None:
            rest = float(pending)
            if not math.isfinite(rest):
                _diverged(rest, epoch, step + 1 - step % GPU_SYNC_EVERY, step + 1)
            loss_sum += rest
        seen += count
        train_loss = loss_sum / count
        val = None
        if val_pixels is not None and len(val_pixels):
            val = held_out_loss(model, val_pixels, device, world=world)
        elapsed = time.perf_counter() - start
        if config.time_budget is not None:
            remaining = max(0.0, config.time_budget - elapsed)
        else:
            remaining = elapsed / epoch * (epochs - epoch)
        stats = EpochStats(epoch, epochs, train_loss, float(kl_sum) / count, val, seen / elapsed, elapsed, remaining)
        history.append(asdict(stats))
        if val is None or val < best_val:
            best_val, best_epoch, stale = (val if val is not None else math.inf), epoch, 0
            best_state = copy.deepcopy(model.state_dict()) if val is not None else None
        else:
            stale += 1
        if on_epoch is not None:
            on_epoch(stats)
        due = time.perf_counter() - last_checkpoint >= checkpoint_every
        if on_checkpoint is not None and not interrupted and (due or time.perf_counter() - last_snapshot >= 1.0):
            # A snapshot at an epoch end at most every second (tiny epochs would otherwise spend
            # their time copying), written every `checkpoint_every` seconds and on an
            # interruption, so a stop loses at most a second of training.
            last_snapshot = time.perf_counter()
            snapshot = {
                "epoch": epoch,
                "model": copy.deepcopy(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "best_val": best_val,
                "best_epoch": best_epoch,
                "best_state": best_state or {},
                "stale": stale,
                "seen": seen,
                "history": list(history),
                "elapsed": elapsed,
            }
            written = False
            if due:
                on_checkpoint(snapshot)
                last_checkpoint, written = time.perf_counter(), True
        if interrupted:
            if on_checkpoint is not None and snapshot is not None and not written:
                on_checkpoint(snapshot)
            stopped = "interrupted"
            break
        if out_of_time:
            stopped = "time-budget"
            break
        if stale >= config.patience:
            stopped = "early-stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    seconds = time.perf_counter() - start
    return TrainResult(
        epochs_run=epoch,
        best_epoch=best_epoch if best_state is not None else epoch,
        best_val_loss=None if best_state is None else best_val,
        final_train_loss=train_loss,
        stopped=stopped,
        seconds=seconds,
        images_per_s=seen / seconds if seconds > 0 else 0.0,
        history=history,
    )
