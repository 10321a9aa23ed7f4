"""Running the fitted models over images: scores, calibration scores and heat maps.

With K cross-fitted models every new image is scored by each model, and
its score is their mean; calibration image i is scored only by the model
that did not train on it. Heat maps average the K models too, so that a
map's sum plus the KL term is the image's reported `elbo` score.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import ConfigError
from ..images.batching import DecodeOptions, ImageBatch, iter_batches, tile_threads
from ..images.decoding import Preprocessing, ReadError, Unlike, merge_unlike, png_bits, unlike_warnings
from ..images.facts import ImageFacts
from ..images.listing import FileListing, find_images, require_images
from ..local.tiles import Scales
from . import neighbours
from .devices import ThreadShare, to_device
from .distributed import World
from .neighbours import LatentBank
from .scores import kl_to_standard_normal, pixel_nll_map, score_batch
from .vae import VAE

ImageInput = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | np.ndarray


@dataclass
class ScoreResult:
    """Scores of the readable images, in input order, and the unreadable ones."""

    paths: list[str]
    scores: np.ndarray  # float64 (N,)
    errors: list[ReadError]
    score: str
    samples: int
    ignored: int = 0  # hidden and non-image files skipped in folders
    # (K, N) scores under each of K cross-fitted models; `scores` is their mean.
    # None for a single model.
    model_scores: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)  # inputs unlike the training images
    # The guard statistic's scores of the same images (see Detector.score), or None.
    guard: ScoreResult | None = None
    # Inputs unlike the training images, converted anyway. `warnings` says the same in words;
    # `vae-anomaly merge` adds up the shards' counts.
    unlike: Unlike = field(default_factory=dict)
    # Each scored image's properties, file format and duplicate fingerprints (checks.py reads them).
    facts: ImageFacts | None = None


@dataclass
class HeatMaps:
    """Per-pixel anomaly maps of the readable images, in input order.

    `maps[i]` is -log p(x|z) per pixel (summed over channels, in nats),
    averaged over the Monte Carlo draws and over the K cross-fitted models;
    `maps[i].sum() + kl[i]` is the image's -ELBO (its `elbo` score).
    `images` and `reconstructions` are uint8 (N, C, H, W) at the model's
    input size, i.e. what the model saw and gave back.
    """

    paths: list[str]
    images: np.ndarray
    reconstructions: np.ndarray
    maps: np.ndarray  # float64 (N, H, W)
    kl: np.ndarray  # float64 (N,)
    errors: list[ReadError]
    # The local statistic's map (local.PatchBank.maps): each pixel the largest distance to normal
    # patches of the patches covering it, and each image's most unusual region (x0, y0, x1, y1) in
    # working-size pixels; None for model files without the local statistic.
    local: np.ndarray | None = None
    regions: np.ndarray | None = None


def as_uint8_images(arr: np.ndarray) -> np.ndarray:
    """Accept (N, H, W) grey or (N, C, H, W) with C in {1, 3}; uint8 only."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        raise ConfigError(f"images must be uint8 (0-255), got {a.dtype}")
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[2] != a.shape[3]:
        raise ConfigError(f"images must be (N, H, W) or (N, C, H, W) square with C in (1, 3), got {a.shape}")
    return np.ascontiguousarray(a)


def as_paths(data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str | os.PathLike[str]]:
    if isinstance(data, (str, os.PathLike)):
        return [data]
    return list(data)


def batches(
    data: ImageInput | FileListing,
    prep: Preprocessing,
    batch_size: int,
    decode: DecodeOptions,
    *,
    bits: bool = False,
    on_warning: Callable[[str], None] | None = None,
    threads: ThreadShare | None = None,
    local: Scales | None = None,
) -> tuple[Iterator[ImageBatch], int]:
    """Batches of pixels at the model's input size from files, folders, a listing or an array; and `ignored`.
    With `local`, each batch carries the local statistic (measured where it is decoded)."""
    if isinstance(data, np.ndarray):
        pixels = as_uint8_images(data)
        if pixels.shape[1:] != (prep.channels, prep.size, prep.size):
            raise ConfigError(
                f"array images are {pixels.shape[1:]}, the model expects "
                f"{(prep.channels, prep.size, prep.size)}; pass files to have them converted"
            )
        # Arrays have no file: their size is the working size, their format "".
        source = (prep.size, prep.size, prep.channels == 3, "")
        it = (
            ImageBatch(
                [f"[{i + j}]" for j in range(len(chunk))],
                chunk,
                [],
                bits=png_bits(chunk, prep.png_level) if bits else None,
                sources=[source] * len(chunk),
            ).measured(local)
            for i in range(0, len(pixels), batch_size)
            for chunk in [pixels[i : i + batch_size]]
        )
        return it, 0
    if isinstance(data, FileListing):
        # Already listed by the caller, e.g. one shard of a listing (`score --shard`): scored as
        # given, even when empty, since a small folder can leave a shard without files.
        listing, files = data, data.files
    else:
        listing = find_images(as_paths(data))
        files = require_images(listing)
    stream = iter_batches(
        files,
        prep,
        batch_size,
        options=decode,
        bits=bits,
        on_warning=on_warning,
        reserve=threads.reserve if threads is not None else 0,
        on_workers=threads.share if threads is not None else None,
        # An explicit --workers N is obeyed; only the default asks whether workers pay.
        worth_it=threads.worth_it if threads is not None and decode.workers is None else None,
        local=local,
    )
    return stream, listing.ignored


def score_pixels(
    model: VAE,
    x: torch.Tensor,
    noise: Mapping[str, torch.Tensor],
    bits: np.ndarray | None,
    bank: LatentBank | None = None,
) -> dict[str, np.ndarray]:
    """Every asked-for score of one batch under one model, as float64 arrays."""
    b = None if bits is None else torch.from_numpy(np.asarray(bits, dtype=np.float64))
    return {k: v.double().cpu().numpy() for k, v in score_batch(model, x, noise, b, bank).items()}


def _bank(banks: Sequence[LatentBank] | None, k: int) -> LatentBank | None:
    return None if banks is None else banks[k]


def latent_banks(
    models: Sequence[VAE],
    pixels: np.ndarray,
    rows: Sequence[np.ndarray],
    eps: torch.Tensor,
    device: torch.device,
    bits: np.ndarray | None,
    rng: np.random.Generator,
    batch_size: int = 128,
) -> tuple[LatentBank, ...]:
    """Each model's bank (neighbours.py): the latent means of the images it trained on (`rows[k]`), and
    S_ic on at most SCALE_SAMPLE of them, scored with the draws `eps` of `elbo-ic`."""
    banks = []
    for model, idx in zip(models, rows, strict=True):
        means = []
        with torch.no_grad():
            for i in range(0, len(idx), batch_size):
                x = to_device(torch.from_numpy(np.require(pixels[idx[i : i + batch_size]], requirements=["W"])), device)
                means.append(model.encode(x)[0].float().cpu().numpy())
        sample = np.sort(rng.choice(idx, min(len(idx), neighbours.SCALE_SAMPLE), replace=False))
        ic = []
        for i in range(0, len(sample), batch_size):
            part = sample[i : i + batch_size]
            x = to_device(torch.from_numpy(np.require(pixels[part], requirements=["W"])), device)
            ic.append(score_pixels(model, x, {"elbo-ic": eps}, None if bits is None else bits[part])["elbo-ic"])
        banks.append(LatentBank.build(np.concatenate(means), np.concatenate(ic), rng))
    return tuple(banks)


DECODED_PER_BATCH = 2**24  # decoded pixel values per calibration batch (64 MB per float32 activation)


def calibration_scores(
    models: Sequence[VAE],
    pixels: np.ndarray,
    folds: Sequence[np.ndarray],
    noise: Mapping[str, torch.Tensor],
    device: torch.device,
    world: World,
    bits: np.ndarray | None = None,
    batch_size: int = 512,
    banks: Sequence[LatentBank] | None = None,
) -> dict[str, np.ndarray]:
    """Every score type of every calibration image, by the model that did not train on it.

    `folds[k]` are the images model k held out. All score types of a batch
    come from one encoder pass. Several processes take every W-th batch,
    leave zeros elsewhere, and sum: exact (x + 0 = x), and each batch is the
    one a single process scores.
    """
    offsets = np.cumsum([0] + [len(c) for c in folds])
    names = list(noise)
    # Every score type of a batch comes from one encoder pass and one decoder pass per draw: the
    # decoder's activations grow with draws x batch x pixels (1 GB at 512 48x48 RGB images x 16 draws).
    draws = max(len(e) for e in noise.values())
    batch_size = max(1, min(batch_size, DECODED_PER_BATCH // (draws * int(np.prod(pixels.shape[1:])))))
    out = {name: np.zeros(offsets[-1]) for name in names}
    task = 0
    for k, idx in enumerate(folds):
        for i in range(0, len(idx), batch_size):
            if task % world.size == world.rank:
                rows = idx[i : i + batch_size]
                x = to_device(torch.from_numpy(np.require(pixels[rows], requirements=["W"])), device)
                scores = score_pixels(models[k], x, noise, None if bits is None else bits[rows], _bank(banks, k))
                for name in names:
                    out[name][offsets[k] + i : offsets[k] + i + len(rows)] = scores[name]
            task += 1
    if world.size > 1:
        summed = world.all_reduce_sum(torch.from_numpy(np.concatenate([out[n] for n in names]))).numpy()
        out = dict(zip(names, np.split(summed, len(names)), strict=True))
    return out


def score_all(
    models: Sequence[VAE],
    batches: Iterator[ImageBatch],
    noise: Mapping[str, torch.Tensor],
    device: torch.device,
    threads: ThreadShare,
    on_batch: Callable[[int, int], None] | None = None,
    banks: Sequence[LatentBank] | None = None,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], list[str], list[ReadError], Unlike, ImageFacts]:
    """(K, N) scores of every asked-for type, the scored paths, the unreadable files, the unlike counts
    and what the checks read of each image (with the local statistic, its region and tile, where the
    batches carry them: `batches(local=...)`). With `features` (the backbone), the models see each
    batch's feature vectors, computed once for all K."""
    paths: list[str] = []
    parts: dict[str, list[np.ndarray]] = {name: [] for name in noise}
    errors: list[ReadError] = []
    unlike: list[Unlike] = []
    measured: list[ImageBatch] = []
    regions: list[np.ndarray] = []
    worst: list[np.ndarray] = []
    with threads:
        for batch in batches:
            unlike.append(batch.unlike)
            if batch.boxes is not None:
                regions.append(batch.boxes[:, :4])
                worst.append(batch.boxes[:, 4:])
            measured.append(replace(batch, pixels=batch.pixels[:0], bits=None))  # keep the facts, not the pixels
            if len(batch.pixels):
                t0 = time.perf_counter()
                x = to_device(torch.from_numpy(model_inputs(batch.pixels, features)), device)
                per_model = [score_pixels(m, x, noise, batch.bits, _bank(banks, k)) for k, m in enumerate(models)]
                for name in noise:
                    parts[name].append(np.stack([s[name] for s in per_model]))
                threads.observe(time.perf_counter() - t0, len(batch.pixels))
            paths += batch.paths
            errors += batch.errors
            if on_batch is not None:
                on_batch(len(batch.paths), len(batch.errors))
    k = len(models)
    scores = {name: np.concatenate(p, axis=1) if p else np.zeros((k, 0)) for name, p in parts.items()}
    return scores, paths, errors, merge_unlike(unlike), ImageFacts.of(measured, regions, worst)


def results(
    scores: Mapping[str, np.ndarray],
    paths: list[str],
    errors: list[ReadError],
    unlike: Unlike,
    samples: Mapping[str, int],
    ignored: int,
    facts: ImageFacts | None = None,
) -> dict[str, ScoreResult]:
    """One `ScoreResult` per score type from the (K, N) scores of `score_all`."""
    warnings = unlike_warnings(unlike)
    out: dict[str, ScoreResult] = {}
    for name, per_model in scores.items():
        k = per_model.shape[0]
        out[name] = ScoreResult(
            list(paths),
            per_model.mean(axis=0) if k > 1 else per_model[0],
            list(errors),
            name,
            samples[name],
            ignored,
            model_scores=per_model if k > 1 else None,
            warnings=list(warnings),
            unlike=dict(unlike),
            facts=facts,
        )
    return out


def model_inputs(pixels: np.ndarray, features: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """What the models take for a batch: its uint8 pixels, or the backbone's feature vectors of them."""
    return np.require(pixels if features is None else features(pixels), requirements=["W"])


def heat_maps(
    models: Sequence[VAE],
    batches: Iterator[ImageBatch],
    eps: torch.Tensor,
    device: torch.device,
    prep: Preprocessing,
    local: Scales | None = None,
    features: Callable[[np.ndarray], np.ndarray] | None = None,
) -> HeatMaps:
    """Per-pixel -log p(x|z), reconstructions and KL, each averaged over the draws and the K models; and,
    with `local`, the local statistic's map over both its scales (tiles.maps_batch).

    A VAE over the backbone's features has no pixels to explain: its `maps` are the local statistic's
    map (zeros without one), its reconstructions the images themselves, its KL that of the features."""
    paths: list[str] = []
    images, maps, recons, kls, local_maps, regions = [], [], [], [], [], []
    errors: list[ReadError] = []
    for batch in batches:
        paths += batch.paths
        errors += batch.errors
        if not len(batch.pixels):
            continue
        x = to_device(torch.from_numpy(model_inputs(batch.pixels, features)), device)
        k = len(models)
        kl = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        with torch.no_grad():
            for model in models:
                mu, logvar = model.encode(x)
                kl += kl_to_standard_normal(mu, logvar).double()
        kls.append((kl / k).cpu().numpy())
        images.append(batch.pixels)
        local_map = None
        if local is not None:
            local_map, region = local.maps(batch.pixels, batch.paths, batch.sources, tile_threads())
            local_maps.append(local_map)
            regions.append(region)
        if features is not None:
            side = batch.pixels.shape[-2:]
            maps.append(np.zeros((len(x), *side)) if local_map is None else np.asarray(local_map, np.float64))
            recons.append(batch.pixels)
            continue
        heat = torch.zeros_like(x, dtype=torch.float64)
        recon = torch.zeros_like(x, dtype=torch.float64)
        with torch.no_grad():
            for model in models:
                m, r = pixel_nll_map(model, x, eps)  # (B, C, H, W) each
                heat += m.double()
                recon += r.double()
        maps.append((heat / k).sum(1).cpu().numpy())
        recons.append((recon / k).clamp(0, 1).mul(255).round().byte().cpu().numpy())
    empty = np.zeros((0, prep.channels, prep.size, prep.size), np.uint8)
    return HeatMaps(
        paths,
        np.concatenate(images) if images else empty,
        np.concatenate(recons) if recons else empty,
        np.concatenate(maps) if maps else np.zeros((0, prep.size, prep.size)),
        np.concatenate(kls) if kls else np.zeros(0),
        errors,
        None if local is None else np.concatenate(local_maps) if local_maps else np.zeros((0, prep.size, prep.size)),
        None if local is None else np.concatenate(regions) if regions else np.zeros((0, 4), np.int64),
    )
