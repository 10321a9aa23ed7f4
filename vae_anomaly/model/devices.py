"""Where the arithmetic runs: the torch device, and how CPUs are shared between decoding and scoring."""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..images.batching import available_cpus
from .distributed import World


def resolve_device(device: str) -> torch.device:
    """ "auto" is the GPU when torch sees one, else the CPU; asking for a missing GPU is a usage error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("device cuda was asked for, but torch sees no CUDA GPU here; use --device cpu")
    return torch.device(device)


def training_device(device: str, world: World) -> torch.device:
    """The fit option's device; in a process group, the group's: one GPU per process under NCCL."""
    if world.size == 1:
        return resolve_device(device)
    if world.device.type == "cuda":
        if device == "cpu":
            raise UsageError("device cpu was asked for, but the process group uses NCCL (GPUs); use gloo for CPU")
        return world.device
    if device.startswith("cuda"):
        raise UsageError("device cuda was asked for, but the process group uses gloo (CPU); start it with NCCL")
    return torch.device("cpu")


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A model's input on `device`: uint8 pixels as float in [0, 1], feature vectors (float) as they are;
    page-locked first on a GPU, so the copy runs asynchronously."""
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    return model_input(pixels.to(device, non_blocking=True))


def model_input(values: torch.Tensor) -> torch.Tensor:
    """What a model takes: uint8 pixels scaled to [0, 1], a backbone's feature vectors as float."""
    return values.float().div_(255.0) if values.dtype == torch.uint8 else values.float()


class ThreadShare:
    """Decoding workers beside scoring on the CPU: only where they pay, and with torch on the CPUs they leave.

    Two torch threads competing with a worker process for two cores run
    slower than one thread beside it (measured: 4,745 against 6,025 images/s
    for the default decision from 28x28 PNG files on 2 cores). And where
    scoring an image costs far more than decoding it, workers only take CPUs
    from torch. So the first batches are decoded and scored in this process,
    timed, and workers start only if decoding costs at least WORTH_IT times
    scoring (each the least over the probe batches: the first ones also pay
    one-time costs).
    """

    # Measured on 2 cores: 28x28 grey PNGs, decoding 1.3-1.9x scoring, workers win
    # (6,755 against 4,200 images/s over 200,000 files); 64x64 colour, 1.0-1.4x, workers
    # lose a little (700-790 against 786-874). A heuristic: `--workers 0` or `--workers N`
    # overrides it.
    WORTH_IT = 1.2
    # With the backbone, scoring is its forward pass under ONNX Runtime, which gains little from a second
    # thread: a worker decoding beside it pays even at 0.8x (2,000 128-px JPEGs on 2 cores: 99 against
    # 81 images/s).
    WORTH_IT_BACKBONE = 0.5

    def __init__(self, device: torch.device, backbone: bool = False) -> None:
        self.cpu = device.type == "cpu"
        self.worth = self.WORTH_IT_BACKBONE if backbone else self.WORTH_IT
        # Scoring on the CPU keeps half the CPUs; on a GPU it needs one to feed it.
        self.reserve = max(1, available_cpus() // 2) if self.cpu else 1
        self._before: int | None = None
        self.score_seconds: float | None = None  # per image, least seen, all threads

    def observe(self, seconds: float, images: int) -> None:
        """The least scoring time per image seen (the first batch also pays one-time costs)."""
        if images:
            self.score_seconds = min(self.score_seconds or math.inf, seconds / images)

    def worth_it(self, decode_seconds: float) -> bool:
        if not self.cpu or self.score_seconds is None:
            return True
        return decode_seconds >= self.worth * self.score_seconds

    def share(self, workers: int) -> None:
        if self.cpu:
            self._before = torch.get_num_threads()
            torch.set_num_threads(max(1, min(self._before, available_cpus() - workers)))

    def __enter__(self) -> ThreadShare:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None
