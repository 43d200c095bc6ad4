"""The artifacts that stages hand to each other: where each lives and a validated reader for it.

An artifact read by more than one stage is declared here, next to its reader, so that the stage
that writes it and the stages that read it name the same path and check the same things. Outputs
only their own stage (and the report) read, such as figures and metrics files, are declared in the
stage module. Paths are relative to the project root.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dkgm.errors import DKGMError
from dkgm.kinds import DataKind, kind_of
from stages.common import check_finite, read_json, read_npy, read_npz, read_parquet

PREPARED = "data/prepared"  # data.npy, manifest.parquet (index, label, split), meta.json
BANDWIDTH = "data/kde/bandwidth.json"  # fit_kde's bandwidth record
KDE_SAMPLES = "data/samples/kde"  # samples.npy (float32), manifest.parquet (sample_id, seed, anchor_index, ...), meta.json
DEBIASER_SNAPSHOT = "models/debiaser/snapshot.pt"  # EMA weights + resolved config
DEBIASER_LOG = "reports/train/log.parquet"  # the debiaser's training log (the comparison reads its cost)
REFINED = "data/samples/refined"  # samples.npy (uint8 images / float32 points), manifest.parquet, meta.json
REFERENCE = "data/reference"  # features.npz, meta.json: Inception features of the real data
BASELINE_SNAPSHOT = "models/baseline/snapshot.pt"  # the diffusion baseline's EMA weights + config
BASELINE_LOG = "reports/train_baseline/log.parquet"  # its training log
BASELINE_SAMPLES = "data/samples/baseline"  # samples.npy (uint8 images / float32 points), manifest.parquet, meta.json
OPERATING_POINT = "data/calibrate/point.json"  # the bandwidth scale and eta chosen for novelty (stage calibrate)


# ----------------------------------------------------------------------------- prepared data


@dataclass(frozen=True)
class Prepared:
    """The prepare stage's artifact: items, manifest and metadata."""

    data: np.ndarray  # uint8 (N, C, H, W) images or float32 (N, 2) points
    manifest: Any  # pandas DataFrame: index, label, split
    meta: dict[str, Any]

    @property
    def kind(self) -> DataKind:
        return kind_of(self.meta["kind"])

    def split(self, name: str) -> np.ndarray:
        """Items of one split as float32 (images mapped to [-1, 1])."""
        return self.items(self.split_rows(name))

    def items(self, rows: np.ndarray) -> np.ndarray:
        """Rows of data/prepared as float32 (images mapped to [-1, 1])."""
        return self.kind.load(self.data[rows])

    def split_labels(self, name: str) -> np.ndarray:
        return self.manifest["label"].to_numpy()[self.manifest["split"].to_numpy() == name]

    def split_rows(self, name: str) -> np.ndarray:
        """Rows of data/prepared that belong to a split."""
        return self.manifest["index"].to_numpy()[self.manifest["split"].to_numpy() == name]

    def manifold(self):
        """The true manifold of point data (the swiss roll's spiral); None for images."""
        from dkgm.data import SwissRoll

        return SwissRoll.from_dict(self.meta["manifold"]) if "manifold" in self.meta else None


def load_prepared(root: Path) -> Prepared:
    base = root / PREPARED
    meta = read_json(base / "meta.json", "prepared dataset metadata")
    manifest = read_parquet(base / "manifest.parquet", "prepared dataset manifest")
    for key in ("kind", "dataset", "shape"):
        if key not in meta:
            raise DKGMError(f"{base / 'meta.json'} has no {key!r}: re-run prepare")
    for col in ("index", "label", "split"):
        if col not in manifest.columns:
            raise DKGMError(f"{base / 'manifest.parquet'} has no column {col!r}: re-run prepare")
    data = read_npy(base / "data.npy", "prepared data", dtypes=(kind_of(meta["kind"], str(base / "meta.json")).storage,),
                    shape=tuple(meta["shape"]), count=len(manifest))
    index = manifest["index"].to_numpy()
    if len(index) and (index.min() < 0 or index.max() >= len(data)):
        raise DKGMError(f"{base / 'manifest.parquet'} lists rows outside data.npy (0..{len(data) - 1}): re-run prepare")
    return Prepared(data=data, manifest=manifest, meta=meta)


# ----------------------------------------------------------------------------- bandwidth


def load_bandwidth(root: Path, prepared: Prepared) -> dict[str, Any]:
    """fit_kde's bandwidth record, checked against the prepared data it must belong to."""
    bw = read_json(root / BANDWIDTH, "bandwidth (fit_kde output)")
    n_train = int((prepared.manifest["split"].to_numpy() == "train").sum())
    if bw.get("dataset") != prepared.meta["dataset"] or bw.get("n_train") != n_train:
        raise DKGMError(
            f"{BANDWIDTH} was fitted on {bw.get('dataset')} ({bw.get('n_train')} training items) "
            f"but {PREPARED} holds {prepared.meta['dataset']} ({n_train}): re-run fit_kde"
        )
    return bw


# ----------------------------------------------------------------------------- operating point


def load_point(root: Path) -> dict[str, Any]:
    """calibrate's operating point: {"scale", "eta", "steps", "passed", ...}."""
    point = read_json(root / OPERATING_POINT, "operating point (calibrate output)")
    for key in ("scale", "eta"):
        if not isinstance(point.get(key), (int, float)):
            raise DKGMError(f"{OPERATING_POINT} has no numeric {key!r}: re-run calibrate (or `dvc repro`)")
    return point


def resolve_value(pinned: float | str, point: dict[str, Any], key: str, params_key: str) -> tuple[float, str]:
    """A value of the operating point: pinned in params.yaml, or calibrate's choice when `auto`.
    Returns (value, where it came from)."""
    if pinned != "auto":
        return float(pinned), f"pinned ({params_key})"
    return float(point[key]), "calibrate"


def check_noise_range(snapshot: dict[str, Any], sigma0: float, params_key: str) -> None:
    """The debiaser must have been trained up to the level the sampler starts at."""
    top = float(snapshot.get("sigma_max", float("inf")))
    if sigma0 > top * (1 + 1e-6):
        raise DKGMError(f"the sampler starts at sigma = {sigma0:.4g} but the debiaser was trained only up to "
                        f"sigma_max = {top:.4g}: lower {params_key}, or widen calibrate.scales (the debiaser's range follows them) and re-train")


# ----------------------------------------------------------------------------- sample sets


def load_samples(root: Path, rel: str, what: str, mmap: bool = False) -> tuple[np.ndarray, Any, dict[str, Any]]:
    """A sample set (data/samples/<name>): samples.npy, its manifest and meta. `mmap`: the
    samples memory-mapped read-only (a stage that streams them in batches never holds them all)."""
    base = root / rel
    meta = read_json(base / "meta.json", f"{what} metadata")
    manifest = read_parquet(base / "manifest.parquet", f"{what} manifest")
    if "n" in meta and int(meta["n"]) != len(manifest):
        raise DKGMError(f"{base / 'manifest.parquet'} lists {len(manifest)} samples but {base / 'meta.json'} says "
                        f"{meta['n']}: re-run the stage that wrote {rel}")
    x = read_npy(base / "samples.npy", what, dtypes=("uint8", "float32"),
                 shape=tuple(meta["shape"]) if "shape" in meta else None, count=len(manifest), mmap=mmap)
    return x, manifest, meta


# ----------------------------------------------------------------------------- reference features


def load_reference(root: Path, prepared: Prepared) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The reference artifact (arrays, meta), checked against the prepared data's split."""
    meta = read_json(root / REFERENCE / "meta.json", "reference metadata")
    if meta.get("dataset") != prepared.meta["dataset"] or meta.get("n_test") != len(prepared.split_rows("test")):
        raise DKGMError(f"{REFERENCE} was computed for {meta.get('dataset')} but {PREPARED} holds "
                        f"{prepared.meta['dataset']} with a different split: re-run reference (or `dvc repro`)")
    path = root / REFERENCE / "features.npz"
    ref = read_npz(path, "reference features")
    for key in ("train_rows", "test_rows"):
        if key not in ref:
            raise DKGMError(f"reference features {path} has no array {key!r}: re-run reference (or `dvc repro`)")
    for key, arr in ref.items():
        if arr.dtype.kind == "f":
            check_finite(arr, f"reference features {path} ({key})")
    if not (np.array_equal(ref["test_rows"], prepared.split_rows("test"))
            and np.array_equal(ref.get("val_rows", prepared.split_rows("val")), prepared.split_rows("val"))
            and np.isin(ref["train_rows"], prepared.split_rows("train")).all()):
        raise DKGMError(f"{REFERENCE} was computed for another train/test split of {PREPARED}: "
                        "re-run reference (or `dvc repro`)")
    return ref, meta
