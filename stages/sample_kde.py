"""Stage sample_kde: draw the first-stage samples x = x_anchor + h * u (DESIGN 2.1), at the
generation bandwidth h = s * h_kde: the density bandwidth of fit_kde times the operating point's
scale s (chosen by calibrate, or pinned with sample_kde.bandwidth_scale).

Sample s uses seed + s for its anchor and its kernel noise, so any sample can be regenerated
alone and the result does not depend on the batch size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from dkgm.figures import labeled_grid, write_png
from dkgm.kinds import DataKind
from stages.artifacts import (
    BANDWIDTH,
    KDE_SAMPLES,
    OPERATING_POINT,
    PREPARED,
    load_bandwidth,
    load_point,
    load_prepared,
    resolve_value,
)
from stages.common import Progress, log, open_npy, staged_outputs, write_json, write_metrics, write_parquet
from stages.contract import AutoOr, Out, Section, Stage, auto_or_number
from stages.gates import gate_token

GRID = "reports/sample_kde/grid.png"
METRICS = "reports/sample_kde/metrics.json"


class SampleKDEParams(Section):
    bandwidth_scale: AutoOr = Field(
        "auto",
        description="s: samples are drawn at h = s x h_kde; auto: calibrate's operating point | a number "
                    "(pinned)",
    )
    n_samples: int = Field(1000, ge=1, description="first-stage samples to draw")
    kernel: Literal["gaussian", "epanechnikov"] = Field(
        "gaussian",
        description="gaussian | epanechnikov (both unit variance per coordinate)",
    )
    seed: int = Field(1_000_000, ge=0, description="sample s uses seed + s")
    batch_size: int = Field(500, ge=1, description="speed only: samples do not depend on it")
    grid_samples: int = Field(32, ge=1, description="samples shown (with their anchors) in reports/sample_kde/grid.png")

    _scale = field_validator("bandwidth_scale", mode="before")(
        classmethod(lambda cls, v: auto_or_number(v, 0.0, lo_open=True)))


def run(cfg: SampleKDEParams, root: Path) -> dict[str, Any]:
    import torch

    import dkgm.kde as kde

    prepared = load_prepared(root)
    bw = load_bandwidth(root, prepared)
    scale, scale_source = resolve_value(cfg.bandwidth_scale, load_point(root), "scale", "sample_kde.bandwidth_scale")
    train = prepared.split("train")
    h = scale * float(bw["h"])
    train_t = torch.from_numpy(train)
    train_rows = prepared.split_rows("train")
    train_labels = prepared.split_labels("train")

    seeds = cfg.seed + np.arange(cfg.n_samples, dtype=np.int64)
    anchors = np.empty(cfg.n_samples, dtype=np.int64)
    d = int(np.prod(train.shape[1:]))
    roll = prepared.manifold()  # points: the true spiral; images: None
    sq_offset, outside, manifold_distance = 0.0, 0, 0.0  # streamed: no second copy of the samples
    with staged_outputs(root, "sample_kde") as out:
        base = out.path(KDE_SAMPLES)
        base.mkdir()
        # written batch by batch into the staged file: memory holds one batch, not n_samples x d
        samples = open_npy(base / "samples.npy", np.float32, (cfg.n_samples, *train.shape[1:]))
        t0 = time.perf_counter()
        bar = Progress("sample_kde", cfg.n_samples)
        for s in range(0, cfg.n_samples, cfg.batch_size):
            batch = seeds[s : s + cfg.batch_size].tolist()
            x, a = kde.sample_kde(train_t, h, batch, cfg.kernel)
            x_np = x.numpy()
            samples[s : s + len(batch)], anchors[s : s + len(batch)] = x_np, a.numpy()
            sq_offset += float(np.square((x_np - train[a.numpy()]).astype(np.float64)).sum())
            if roll is None:
                outside += int(np.count_nonzero(np.abs(x_np) > 1.0))
            else:
                manifold_distance += float(roll.distance(x_np).sum())
            bar(s + len(batch))
        bar.close()
        seconds = time.perf_counter() - t0
        samples.flush()

        metrics: dict[str, Any] = {
            "n_samples": cfg.n_samples,
            "h": h,
            "h_kde": float(bw["h"]),
            "bandwidth_scale": scale,
            "bandwidth_scale_source": scale_source,
            "kernel": cfg.kernel,
            "rms_offset_over_h": float(np.sqrt(sq_offset / (cfg.n_samples * d)) / h),
            "distinct_anchors": int(len(np.unique(anchors))),
            "samples_per_second": cfg.n_samples / max(seconds, 1e-9),
            "seconds": seconds,
        }
        if roll is None:
            metrics["fraction_outside_range"] = outside / (cfg.n_samples * d)
        else:
            metrics["mean_distance_to_manifold"] = manifold_distance / cfg.n_samples
            metrics["train_mean_distance_to_manifold"] = float(roll.distance(train).mean())

        write_parquet(
            base / "manifest.parquet",
            {
                "sample_id": np.arange(cfg.n_samples),
                "seed": seeds,
                "anchor_index": train_rows[anchors],
                "anchor_label": train_labels[anchors],
            },
        )
        write_json(base / "meta.json", {"h": h, "h_kde": float(bw["h"]), "bandwidth_scale": scale, "kernel": cfg.kernel, "n": cfg.n_samples, "shape": list(train.shape[1:]),
                                        "seed": cfg.seed, "dataset": prepared.meta["dataset"], "dim": d})
        _figure(out.path(GRID), prepared.kind, samples, train, anchors, cfg, h)
        del samples  # close the map before the staged folder is published
        write_metrics(out, METRICS, metrics)
    log.info("sample_kde: %d %s samples at h=%.4g (scale %.3g, %s; %.0f samples/s)", cfg.n_samples, cfg.kernel, h, scale,
             scale_source, metrics["samples_per_second"])
    return metrics


def _figure(path: Path, kind: DataKind, samples: np.ndarray, train: np.ndarray, anchors: np.ndarray, cfg,
            h: float) -> None:
    if not kind.pixels:
        kind.sample_figure(path, samples, train, f"KDE samples ({cfg.kernel}, h={h:.3g})")
        return
    # two rows per row of the figure: samples above, their anchors below
    k = min(cfg.grid_samples, len(samples))
    ncol = min(8, k)
    rows, labels = [], []
    for s in range(0, k, ncol):
        rows += [kind.store(samples[s : s + ncol]), kind.store(train[anchors[s : s + ncol]])]
        labels += [f"KDE samples {s}-{min(s + ncol, k) - 1}", "their anchors"]
    write_png(path, labeled_grid(rows, labels))


STAGES = (
    Stage(
        name="sample_kde",
        doc="draw the first-stage samples x = x_anchor + h * u, one seed per sample",
        section="sample_kde",
        params=SampleKDEParams,
        deps=(PREPARED, BANDWIDTH, OPERATING_POINT, gate_token("calibrate")),
        outs=(
            Out(KDE_SAMPLES),
            Out(GRID, "figure", "KDE samples (stage 1)", "first-stage samples x = x_anchor + h·u beside their anchors",
                "first-stage samples"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        summary=(("bandwidth_scale", "bandwidth scale s"), ("bandwidth_scale_source", "s from"), ("h", "h = s x h_kde"),
                 ("n_samples", "samples"), ("kernel", "kernel"), ("distinct_anchors", "distinct anchors"),
                 ("samples_per_second", "samples/s")),
    ),
)
