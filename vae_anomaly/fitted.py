"""A fitted detector's state as its model file holds it: the K models' weights, the preprocessing, every
calibration value and fold, the training images' fingerprints, the local statistic's banks and the
latent neighbours, packed into named arrays for `model/artifact.py` and read back with every part
checked to fit the others."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelFileError
from .images.decoding import Preprocessing
from .images.duplicates import Fingerprints
from .local import patches as local
from .local import tiles
from .local.patches import PatchBank
from .local.tiles import TileBank
from .model import artifact, neighbours
from .model.neighbours import LatentBank
from .model.vae import VAE, build_model, config_from_dict


@dataclass
class Fitted:
    """What `Detector.fit` leaves and `Detector.load` restores."""

    models: Sequence[VAE]
    preprocessing: Preprocessing
    metadata: dict[str, Any]
    calibration: dict[str, np.ndarray]
    folds: np.ndarray  # which model scored each calibration image
    fingerprints: Fingerprints | None
    patches: PatchBank | None
    tiles: TileBank | None
    neighbours: tuple[LatentBank, ...] | None

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the model file atomically; returns its checksum."""
        arrays = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in self.calibration.items()}
        folds = self.folds
        n_cal = len(next(iter(self.calibration.values())))
        if len(folds) != n_cal:  # calibration scores set by hand: all from one model
            folds = np.zeros(n_cal, np.int64)
        arrays[artifact.FOLD_KEY] = torch.from_numpy(np.asarray(folds, dtype=np.int64))
        if self.fingerprints is not None:
            arrays.update(artifact.pack_fingerprints(self.fingerprints.exact, self.fingerprints.near))
        for bank in (self.patches, self.tiles):
            if bank is not None:
                arrays.update({k: torch.from_numpy(v) for k, v in bank.arrays().items()})
        if self.neighbours is not None:
            arrays.update({k: torch.from_numpy(v) for k, v in neighbours.arrays(self.neighbours).items()})
        weights = {
            f"{artifact.model_prefix(k)}{name}": t
            for k, m in enumerate(self.models)
            for name, t in m.state_dict().items()
        }
        return artifact.save(path, self.metadata, weights, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[Fitted, str]:
        """Rebuild config, then module, then weights, then every array; and the file's checksum."""
        mf = artifact.load(path)
        try:
            return cls._from(mf), mf.checksum
        except (KeyError, TypeError, ValueError, RuntimeError, StopIteration) as exc:
            raise ModelFileError(
                f"{os.fsdecode(Path(path))}: the weights or settings inside do not fit together "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}). "
                "The file is damaged or was edited; re-train it."
            ) from None

    @classmethod
    def _from(cls, mf: artifact.ModelFile) -> Fitted:
        meta = mf.metadata
        vae_cfg = config_from_dict(meta["config"])
        prep = Preprocessing.from_dict(meta["preprocessing"])
        if (prep.channels, prep.size) != (vae_cfg.in_channels, vae_cfg.image_size):
            raise ValueError(
                f"preprocessing gives {prep.channels} channel(s) at {prep.size} px, the network takes "
                f"{vae_cfg.in_channels} at {vae_cfg.image_size} px"
            )
        int(meta["noise_seed"])
        models = []
        for state in artifact.split_models(mf):
            model = build_model(vae_cfg)
            model.load_state_dict(state, strict=True)
            models.append(model)
        packed = artifact.unpack_fingerprints(mf)
        skip = {artifact.FOLD_KEY, artifact.TRAIN_EXACT_KEY, artifact.TRAIN_NEAR_KEY}
        arrays = {k: v.numpy() for k, v in mf.calibration.items()}
        cal = {
            k: v.double().numpy()
            for k, v in mf.calibration.items()
            if k not in skip and not k.startswith((local.PREFIX, tiles.PREFIX, neighbours.PREFIX))
        }
        n_cal = len(next(iter(cal.values())))
        fold_t = mf.calibration.get(artifact.FOLD_KEY)
        folds = np.zeros(n_cal, np.int64) if fold_t is None else fold_t.long().numpy()
        if len(folds) != n_cal or (len(folds) and int(folds.max()) >= len(models)):
            raise ValueError(f"{len(folds)} fold labels for {n_cal} calibration scores and {len(models)} models")
        return cls(
            models,
            prep,
            meta,
            cal,
            folds,
            None if packed is None else Fingerprints(*packed),
            PatchBank.from_arrays(arrays),
            TileBank.from_arrays(arrays),
            neighbours.from_arrays(arrays, len(models)),
        )
