"""The local statistic: how far an image's most unusual patch lies from every normal patch.

A whole-image score averages a small defect away: a hole, stain or scratch
over 2% of a texture moves -ELBO by less than normal images vary. This
statistic looks at patches instead (SPADE and PatchCore do the same with
pretrained features; here the descriptor is learnt from the normal images
alone, since no weights can be downloaded). At the working size S, each
image is cut into patches of p = max(4, round(S / 6)) px at stride
ceil(p / 2); each patch v (pixels in [0, 1]) gets the descriptor

    phi(v) = [ W (v - m),  c * (t(v) - t_mean) / t_std ]

W, m: the first D = 16 principal axes and the mean of normal patches; t(v):
the patch's texture, its mean absolute gradient and its standard deviation
(what blur and flat fills change), standardised on normal patches and
scaled by c = 3 sigma_W / sqrt(2), sigma_W the root-mean-square length of
the projected part (a prototype on the defect benchmark's materials, 2 and
5% defects at 48 px, not kept: texture weights 0, 1 and 3 gave mean
ROC-AUC 0.82, 0.89 and 0.91). A patch's
distance is that to its nearest neighbour in a bank of normal patches,

    d(v) = min_j || phi(v) - b_j ||,

the bank a coreset of BANK patches chosen by greedy k-center selection
(each next patch the one farthest from those already chosen, as PatchCore
does: Roth et al., CVPR 2022), so that rare normal patches are covered as
well as common ones (a random sample leaves them out and calls them
unusual; benchmarks/README.md, "Local defects", has the measurement);
and the image's local statistic is its largest patch distance, in units of
the region bound b (the 99th percentile of held-out normal patch
distances), so that it compares with the same statistic on tiles (tiles.py):

    s_local(x) = max over patches v of x of d(v) / b.

Cross-fitted like the models: bank k holds patches of the images model k
trained on, never of its own held-out (calibration) images, so the
calibration values are what a new normal image would get; a new image is
measured against one bank, k = crc32(its working-size pixels) mod K (`bank_of`):
bank k never saw it nor fold k's calibration images, so its value is
exchangeable with theirs, as the mean over the K banks (used until 2026-12-03)
was not quite, and it costs 1/K of the search. `checks.py` calibrates it as the check
"local" (one-sided: only too far is odd) and the decision takes it into its
one test. No torch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage
from sklearn.utils.extmath import randomized_svd

NAME = "local"  # the check's name (calibration entry "property:local")
PREFIX = "local:"  # the bank's arrays in the model file's calibration tensors
FEATURES = 16  # principal axes of the pixel part
TEXTURE_WEIGHT = 3.0
BANK = 2048  # normal patches per bank (per cross-fitted model)
CANDIDATES = 131_072  # patches a bank's coreset is chosen from, at most (1.6 s on one core)
FIT_PATCHES = 20_000  # patches the principal axes are fitted on
CHUNK = 256  # patches per distance block (a 2 MB float32 matrix against the bank)
IMAGES = 256  # images described at once (25 MB of patches at 48x48 RGB)


def geometry(size: int) -> tuple[int, int]:
    """(patch side, stride) at the working size."""
    p = max(4, round(size / 6))
    return p, math.ceil(p / 2)


def _windows(a: np.ndarray, p: int, stride: int) -> np.ndarray:
    """(N, G, G, C, p, p) views of every patch of (N, C, S, S) images."""
    views: np.ndarray = sliding_window_view(a, (p, p), axis=(2, 3))[:, :, ::stride, ::stride]
    out: np.ndarray = views.transpose(0, 2, 3, 1, 4, 5)
    return out


def _raw(pixels: np.ndarray, p: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Each patch's pixels (N, G, G, C*p*p) and texture (N, G, G, 2), float32."""
    x = np.asarray(pixels, dtype=np.float32) / 255.0
    x = x[:, None] if x.ndim == 3 else x  # (N, H, W) grey
    grad = np.abs(np.diff(x, axis=2, append=x[:, :, -1:])) + np.abs(np.diff(x, axis=3, append=x[:, :, :, -1:]))
    win = _windows(x, p, stride)
    n, g, d = win.shape[0], win.shape[1], win.shape[3] * p * p
    flat = win.reshape(n, g, g, d)
    texture = np.stack([_windows(grad, p, stride).reshape(n, g, g, d).mean(-1), flat.std(-1)], -1)
    return flat, texture


@dataclass(frozen=True)
class PatchBank:
    """The descriptor (principal axes, texture scaling) and the K banks of normal patch descriptors."""

    size: int
    mean: np.ndarray  # (C*p*p,)
    axes: np.ndarray  # (D, C*p*p)
    texture: np.ndarray  # (3, 2): mean, std, scale row-wise
    banks: tuple[np.ndarray, ...]  # K x (BANK, D + 2)
    bound: float  # 99th percentile of calibration patch distances: where a region counts as unusual

    def descriptors(self, pixels: np.ndarray) -> np.ndarray:
        """phi of every patch, (N, G, G, D + 2) float32."""
        p, stride = geometry(self.size)
        flat, texture = _raw(pixels, p, stride)
        t_mean, t_std, scale = self.texture
        part = (flat - self.mean) @ self.axes.T
        return np.concatenate([part, (texture - t_mean) / t_std * scale], -1).astype(np.float32)

    def bank_of(self, pixels: np.ndarray) -> np.ndarray:
        """The bank each image is measured against, (N,): a hash of its pixels mod K, so that an image
        gets the same value in every run, order and shard, and copies of it the same value."""
        if len(self.banks) <= 1:  # one model: nothing to pick, no hashing on the hot path
            return np.zeros(len(pixels), np.int64)
        return np.array([zlib.crc32(np.ascontiguousarray(a).tobytes()) % len(self.banks) for a in pixels], np.int64)

    def distances(self, pixels: np.ndarray, fold: int | np.ndarray | None = None) -> np.ndarray:
        """d(v) of every patch, (N, G, G), each image against one bank: `fold` (one for all, or one per
        image), by default the one `bank_of` picks; in blocks of IMAGES images, so that memory stays
        bounded whatever N."""
        folds = self.bank_of(pixels) if fold is None else np.broadcast_to(np.asarray(fold, np.int64), (len(pixels),))
        if len(pixels) > IMAGES:
            return np.concatenate(
                [self.distances(pixels[i : i + IMAGES], folds[i : i + IMAGES]) for i in range(0, len(pixels), IMAGES)]
            )
        phi = self.descriptors(pixels)
        shape = phi.shape[:3]
        picked = np.unique(folds)
        if len(picked) == 1:  # every image against one bank (always so with one model): no copies
            return _nearest(phi.reshape(-1, phi.shape[-1]), self.banks[int(picked[0])]).reshape(shape)
        out = np.zeros(shape, np.float64)
        for k in picked:
            rows = np.nonzero(folds == k)[0]
            out[rows] = _nearest(phi[rows].reshape(-1, phi.shape[-1]), self.banks[k]).reshape(len(rows), *shape[1:])
        return out

    def statistic(self, pixels: np.ndarray, fold: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """s_local of each image in units of `bound` (so that scales compare: tiles.py), and the box
        (x0, y0, x1, y1, in working-size pixels) of its most unusual region: the patches connected to
        the farthest one whose distance passes `bound`."""
        d = self.distances(pixels, fold)
        return (d.reshape(len(d), -1).max(1) / self.bound if len(d) else np.zeros(0)), self._regions(d)

    def _regions(self, d: np.ndarray) -> np.ndarray:
        return np.array([region(g, self.size, self.bound) for g in d], np.int64).reshape(-1, 4)

    def maps(self, pixels: np.ndarray, fold: int | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel maps (N, S, S) at the working size, each pixel the largest distance of the patches
        covering it (stretched back over the file, a heat map at its own resolution), and each image's
        region as `statistic` gives it, from one search (`fold` as `distances` takes it)."""
        d = self.distances(pixels, fold)
        p, stride = geometry(self.size)
        out = np.zeros((len(d), self.size, self.size))
        for gy in range(d.shape[1]):
            for gx in range(d.shape[2]):
                y, x = gy * stride, gx * stride
                view = out[:, y : y + p, x : x + p]
                np.maximum(view, d[:, gy, gx, None, None], out=view)
        return out, self._regions(d)

    def describe_rule(self) -> dict[str, Any]:
        """The statistic's settings, for `info`."""
        p, stride = geometry(self.size)
        return {
            "patch": p,
            "stride": stride,
            "working_size": self.size,
            "features": int(self.axes.shape[0]) + 2,
            "banks": len(self.banks),
            "bank_patches": int(self.banks[0].shape[0]) if self.banks else 0,
            "region_bound": self.bound,
        }

    def arrays(self, prefix: str = PREFIX) -> dict[str, np.ndarray]:
        """What the model file keeps, by name (under `prefix`)."""
        out = {
            "size": np.array([self.size], np.float64),
            "mean": self.mean,
            "axes": self.axes,
            "texture": self.texture,
            "bound": np.array([self.bound]),
        }
        out.update({f"bank{k}": b for k, b in enumerate(self.banks)})
        return {prefix + k: np.asarray(v, np.float64) for k, v in out.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], prefix: str = PREFIX) -> PatchBank | None:
        """The bank a model file keeps under `prefix`, or None in files written before it. Raises
        ValueError when its arrays do not fit together."""
        a = {k[len(prefix) :]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
        if not a:
            return None
        size = int(a["size"][0])
        p, _ = geometry(size)
        k = sum(1 for name in a if name.startswith("bank"))
        banks = tuple(a[f"bank{i}"].astype(np.float32) for i in range(k))
        axes = a["axes"].astype(np.float32)
        if axes.shape[1] % (p * p) or a["mean"].shape != (axes.shape[1],) or a["texture"].shape != (3, 2):
            raise ValueError(f"local statistic: axes {axes.shape} do not fit {p}-px patches")
        if not banks or any(b.shape[1] != axes.shape[0] + 2 for b in banks):
            raise ValueError("local statistic: the banks do not fit its descriptor")
        texture = a["texture"].astype(np.float32)
        return cls(size, a["mean"].astype(np.float32), axes, texture, banks, float(a["bound"][0]))


def _nearest(flat: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Each row's distance to its nearest row of `bank`: ||f - b||^2 = ||f||^2 + min_j (||b_j||^2 -
    2 f.b_j), one product and one in-place add per block of CHUNK rows, small enough to stay in cache
    (3x faster than whole 4,096-row blocks)."""
    out = np.empty(len(flat), np.float64)
    f2 = (flat * flat).sum(1)
    b2, minus2 = (bank * bank).sum(1), -2.0 * bank.T
    for i in range(0, len(flat), CHUNK):
        d2 = flat[i : i + CHUNK] @ minus2
        d2 += b2
        out[i : i + CHUNK] = np.sqrt(np.maximum(d2.min(1) + f2[i : i + CHUNK], 0.0))
    return out


def region(grid: np.ndarray, size: int, bound: float) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) in working-size pixels of the patches connected (8-neighbours) to the
    farthest one among those past `bound`; where none passes it, the farthest patch (with any equally
    far ones connected to it: a flat image's patches are all alike)."""
    p, stride = geometry(size)
    top = np.unravel_index(int(np.argmax(grid)), grid.shape)
    past = grid >= min(bound, float(grid[top]))
    if np.count_nonzero(past) > 1:  # a lone patch (most normal images) needs no connected components
        labels, _ = ndimage.label(past, structure=np.ones((3, 3)))
        past = labels == labels[top]
    ys, xs = np.nonzero(past)
    return int(xs.min() * stride), int(ys.min() * stride), int(xs.max() * stride + p), int(ys.max() * stride + p)


def native_box(box: Sequence[int], size: int, width: int, height: int) -> list[int]:
    """A working-size box in the file's own pixels (the working size stretches the whole image)."""
    sx, sy = width / size, height / size
    x0, y0, x1, y1 = box
    return [int(x0 * sx), int(y0 * sy), min(width, math.ceil(x1 * sx)), min(height, math.ceil(y1 * sy))]


def fit_banks(pixels: np.ndarray, training: Sequence[np.ndarray], rng: np.random.Generator) -> PatchBank:
    """The descriptor, fitted on patches of (a sample of) the images in `training`, and one bank per
    entry of `training` (positions into `pixels`, (N, C, S, S)) from those images only; no bound yet."""
    size = pixels.shape[-1]
    p, stride = geometry(size)
    train_all = np.unique(np.concatenate(list(training)))
    sample = np.sort(rng.choice(train_all, min(len(train_all), 512), replace=False))
    per_image = ((size - p) // stride + 1) ** 2  # patches of one image
    pick = np.sort(rng.choice(len(sample) * per_image, min(len(sample) * per_image, FIT_PATCHES), replace=False))
    # The sample's patches in blocks of IMAGES images, keeping only the picked ones' pixels: at 128 px
    # (the backbone's size) all of them would take 330 MB, twice over.
    picked, textures = [], []
    for i in range(0, len(sample), IMAGES):
        flat, texture = _raw(pixels[sample[i : i + IMAGES]], p, stride)
        flat = flat.reshape(-1, flat.shape[-1])
        first = i * per_image
        rows = pick[(pick >= first) & (pick < first + len(flat))] - first
        picked.append(flat[rows])
        textures.append(texture.reshape(-1, 2))
    chosen_flat, texture = np.concatenate(picked), np.concatenate(textures)
    mean = chosen_flat.mean(0)
    centred = chosen_flat - mean
    axes = principal_axes(centred, FEATURES, rng)
    rms = float(np.sqrt(((centred @ axes.T) ** 2).sum(1).mean()))
    t_std = np.maximum(texture.std(0), 1e-6)
    tex = np.stack([texture.mean(0), t_std, np.full(2, TEXTURE_WEIGHT * rms / np.sqrt(2))]).astype(np.float32)
    bank = PatchBank(size, mean.astype(np.float32), axes.astype(np.float32), tex, (), math.inf)
    banks = []
    for train in training:
        chosen = np.sort(rng.choice(train, min(len(train), 1024), replace=False))
        phi = np.concatenate([bank.descriptors(pixels[chosen[i : i + IMAGES]]) for i in range(0, len(chosen), IMAGES)])
        phi = phi.reshape(-1, phi.shape[-1])
        if len(phi) > CANDIDATES:
            phi = phi[rng.choice(len(phi), CANDIDATES, replace=False)]
        banks.append(phi[coreset(phi, BANK, rng)])
    return PatchBank(size, bank.mean, bank.axes, tex, tuple(banks), math.inf)


EXACT_UP_TO = 512  # patch lengths whose principal axes come from a full SVD (48-px RGB patches: 192)


def principal_axes(centred: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """The first k principal axes (k, L) of centred rows: a full SVD for short patches, randomized SVD
    (Halko et al. 2011) for long ones (128-px RGB patches are 1,323 values: 11 s for the full SVD of
    20,000 of them on 2 cores, against well under a second)."""
    k = min(k, *centred.shape)
    if centred.shape[1] <= EXACT_UP_TO:
        return np.linalg.svd(centred, full_matrices=False)[2][:k]
    seed = int(rng.integers(2**31))
    return np.asarray(randomized_svd(centred, k, n_iter=5, random_state=seed)[2])


def coreset(phi: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of m rows of phi chosen by greedy k-center selection: from a random start, each next
    row the one farthest from those chosen (its distance to them is the coverage radius it closes).
    Every row when there are no more than m."""
    if len(phi) <= m:
        return np.arange(len(phi))
    x = np.asarray(phi, np.float32)
    sq = (x * x).sum(1)
    chosen = np.empty(m, np.int64)
    chosen[0] = int(rng.integers(len(x)))
    nearest = sq - 2.0 * (x @ x[chosen[0]]) + sq[chosen[0]]  # squared distance to the chosen set
    for i in range(1, m):
        j = int(np.argmax(nearest))
        chosen[i] = j
        np.minimum(nearest, sq - 2.0 * (x @ x[j]) + sq[j], out=nearest)
    return chosen


def bound_of(distances: Sequence[np.ndarray]) -> float:
    """The region bound: the 99th percentile of held-out normal patch distances (inf without any)."""
    every = np.concatenate([d.ravel() for d in distances]) if len(distances) else np.zeros(0)
    return float(np.percentile(every, 99)) if len(every) else math.inf


def fit(
    pixels: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator
) -> tuple[PatchBank, np.ndarray]:
    """The bank of the normal images `pixels` (N, C, S, S) cross-fitted as the models are (`folds`:
    (training, held-out) positions per model), and the local statistic of every held-out image against
    the bank that never saw it, in the order of the concatenated held-out positions."""
    bank = fit_banks(pixels, [t for t, _ in folds], rng)
    grids = [bank.distances(pixels[h], fold=k) if len(h) else np.zeros((0, 1, 1)) for k, (_, h) in enumerate(folds)]
    bank = replace(bank, bound=bound_of(grids))
    values = [g.reshape(len(g), -1).max(1) / bank.bound if len(g) else np.zeros(0) for g in grids]
    return bank, np.concatenate(values)
