"""The two kinds of data DKGM models, as one small object each: images and points (the swiss roll).

Stages ask the kind instead of testing "images or points?" themselves. A kind knows
- how its items are stored (data/prepared/data.npy, samples.npy) and read back as model inputs;
- what "distance to the data" means while refining (images: RMS distance to the sample's KDE anchor;
  points: distance to the true manifold) and which summary that gives;
- which metrics apply: Inception features (FID, KID, precision/recall, Inception Z_U) only to images,
  the distance to the manifold only to points; the primary one the debiasing gain is read on;
- which networks fit it, and how a set of its samples is drawn.

numpy only at import (PIL and matplotlib where a figure is drawn).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dkgm import data as ds
from dkgm.errors import DKGMError


@dataclass(frozen=True)
class DataKind:
    name: str  # meta.json's "kind"
    storage: str  # numpy dtype of stored items
    storage_label: str  # how meta.json describes it
    distance_label: str  # what distance_to_data measures, as a figure's axis says it
    primary_metric: str  # the distance the debiasing gain is read on (evaluate's `kde_`/`refined_` prefix)
    pixels: bool  # items are pixel grids: drawn as image grids, scored with Inception features (FID, KID, P/R)
    archs: tuple[str, ...]  # debiaser.arch values that fit it
    _store: Callable[[np.ndarray], np.ndarray]
    _load: Callable[[np.ndarray], np.ndarray]

    def __str__(self) -> str:
        return self.name

    def store(self, x: np.ndarray) -> np.ndarray:
        """Model-space floats as stored (images: uint8 [0, 255], clipped and rounded)."""
        return self._store(x)

    def load(self, stored: np.ndarray) -> np.ndarray:
        """Stored items as float32 model inputs (images: [-1, 1])."""
        return self._load(stored)

    def as_saved(self, x: np.ndarray) -> np.ndarray:
        """Items as a user would save them, back as float32: stored items are read, floats are stored
        first (images quantized to uint8), so a score never sees precision a saved sample would not have."""
        return self.load(x if x.dtype == np.dtype(self.storage) else self.store(x))

    def check_arch(self, arch: str, dataset: str) -> None:
        if arch not in self.archs:
            raise DKGMError(f"debiaser.arch {arch} does not fit {dataset} ({self.name}): use {' or '.join(self.archs)}")

    def distance_to_data(self, x: np.ndarray, anchors: np.ndarray, manifold: Any) -> np.ndarray:
        """Per item: images, RMS distance to its anchor; points, distance to the manifold."""
        if manifold is not None:
            return manifold.distance(x)
        return np.sqrt(((x - anchors) ** 2).reshape(len(x), -1).mean(1))

    def progress_metrics(self, curve: np.ndarray, manifold: Any, train: Callable[[], np.ndarray]) -> dict[str, float]:
        """refine's summary of the mean distance to the data at k = 0 (the KDE input) and k = K; points
        add the training points' own mean distance to the manifold (`train()` loads them)."""
        if manifold is None:
            return {"kde_rms_distance_to_anchor": float(curve[0]), "rms_distance_to_anchor": float(curve[-1])}
        return {"kde_mean_distance_to_manifold": float(curve[0]), "mean_distance_to_manifold": float(curve[-1]),
                "manifold_distance_reduction": float(curve[0] / max(curve[-1], 1e-12)),
                "train_mean_distance_to_manifold": float(manifold.distance(train()).mean())}

    def sample_figure(self, path: Path, samples: np.ndarray, train: np.ndarray | None, label: str,
                      manifold: Any = None, title: str | None = None, limit: int | None = None) -> None:
        """A set of samples as a figure: images, a grid of the first `limit` (8 a row) as stored; points,
        all of them in a scatter over the training points in grey (and the true manifold in red, when given)."""
        from dkgm.figures import image_grid, new_figure, save_figure, write_png

        if self.pixels:
            write_png(path, image_grid(np.asarray(samples[:limit]), ncol=8))
            return
        fig, ax = new_figure(5, 5)
        if train is not None:
            ax.scatter(train[:, 0], train[:, 1], s=2, c="grey", alpha=0.3, label="train")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="C0", label=label)
        if manifold is not None:
            c = manifold.curve(np.linspace(manifold.t_min, manifold.t_max, 1000))
            ax.plot(c[:, 0], c[:, 1], "r-", lw=1, label="true spiral")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=8)
        if title:
            ax.set_title(title)
        save_figure(fig, path)


IMAGES = DataKind("images", "uint8", "uint8 [0, 255]", "RMS distance to the anchor (per pixel)", "fid", True, ("unet", "dae"), ds.to_uint8, ds.to_float)
POINTS = DataKind("points", "float32", "float32", "mean distance to the true spiral", "mean_distance_to_manifold", False, ("mlp",),
                  lambda x: np.asarray(x, dtype=np.float32), lambda x: np.asarray(x, dtype=np.float32))
KINDS = {k.name: k for k in (IMAGES, POINTS)}


def kind_of(name: str, where: str = "meta.json") -> DataKind:
    """The kind named in a metadata file; an unknown name is one line naming the file."""
    if name not in KINDS:
        raise DKGMError(f"{where}: unknown data kind {name!r} (known: {', '.join(KINDS)}): re-run prepare")
    return KINDS[name]
