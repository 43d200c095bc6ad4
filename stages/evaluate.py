"""Stage evaluate: sample quality of stage 1 (KDE) and stage 2 (refined), the debiasing gain
between them, and memorization (DESIGN 2.5).

Both stages are scored on the same first n samples (identical seeds, so sample s of the refined
set is the debiased sample s of the KDE set), against the reference artifact. Every statistic
is also given for real held-out data (prefix `real_`): the floor it should be read against at
this sample size. Metric keys are flat (`<set>_<metric>`) for `dvc metrics diff`.

Images: FID and KID (clean-fid's clean resize, TF-Inception pool3), IS from the full network only
(else null with the reason), precision/recall (k-NN balls in Inception space), memorization
(d1/d2 to the two nearest training images in pixel space against every training image, and in
Inception space against the reference subset; the fraction whose nearest training image is the
sample's own KDE anchor and its distance), sharpness (Laplacian energy relative to real images).
Points: distance to the true manifold, MMD^2 (unbiased, Gaussian kernel: near 0 or slightly
negative for equal laws; key `*_mmd`) and sliced Wasserstein against held-out points, the same
memorization statistics in the plane. For points the distribution floor (`real_mmd`,
`real_sliced_wasserstein`, `real_mean_distance_to_manifold`) is n training points scored against
the held-out points; the memorization floor (`real_copy_fraction`, `real_nn_distance`) is the
held-out points against the training points, as for images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from dkgm.errors import DKGMError
from dkgm.figures import labeled_grid, new_figure, save_figure, write_png
from dkgm.kinds import KINDS
from stages.artifacts import (
    KDE_SAMPLES,
    PREPARED,
    REFERENCE,
    REFINED,
    Prepared,
    load_samples,
)
from stages.common import log, staged_outputs, write_metrics, write_parquet
from stages.contract import Out, Stage
from stages.gates import Check, EnforcedSection, Gate, check
from stages.scoring import EvaluateParams, Scorer

METRICS = "reports/eval/metrics.json"
PER_SAMPLE = "reports/eval/per_sample.parquet"  # per sample: nearest training items, distances, anchor match
NEAREST = "reports/eval/nearest.png"
MEMORIZATION = "reports/eval/memorization.png"
SETS = ("kde", "refined")


def run(cfg: EvaluateParams, root: Path) -> dict[str, Any]:
    kde_x, kde_man, _ = load_samples(root, KDE_SAMPLES, "KDE samples")
    ref_x, ref_man, ref_smeta = load_samples(root, REFINED, "refined samples")
    n = min(cfg.n_samples, len(kde_x), len(ref_x))
    if not np.array_equal(kde_man["seed"].to_numpy()[:n], ref_man["seed"].to_numpy()[:n]):
        raise DKGMError(f"{REFINED} does not hold the debiased {KDE_SAMPLES} (seeds differ): re-run refine")
    scorer = Scorer(cfg, root, n)
    prepared, kind = scorer.prepared, scorer.kind
    sets = {"kde": scorer.as_float(kde_x), "refined": scorer.as_float(ref_x)}
    anchors = kde_man["anchor_index"].to_numpy()[:n]

    t0 = time.perf_counter()
    m: dict[str, Any] = {"kind": kind.name, "n_samples": n, "n_reference": len(scorer.ref["train_rows"]),
                         "n_real": len(scorer.real), "n_train": len(scorer.train), "weights": "ema",
                         "nfe": int(ref_smeta.get("nfe", 0)), "copy_ratio": cfg.copy_ratio}
    scored, near = scorer.score(sets)
    m.update(scored)
    per_sample: dict[str, list] = {k: [] for k in ("set", "sample_id", "nn_row", "d1", "d2", "anchor_row", "anchor_match",
                                                   "anchor_distance")}
    scale = scorer.scale
    ratios = {"real": scorer.real_d1 / np.maximum(scorer.real_d2, 1e-12)}
    anchor_d: dict[str, np.ndarray] = {}
    for name, x in sets.items():  # descriptive: the own KDE anchor (in high dimension nearly always the nearest)
        d1, d2, nn = near[name]
        nn_row = scorer.train_rows[nn]
        match = nn_row == anchors
        ad = np.sqrt(((x - prepared.items(anchors)) ** 2).reshape(n, -1).mean(1))
        anchor_d[name] = ad
        ratios[name] = d1 / np.maximum(d2, 1e-12)
        m[f"{name}_anchor_fraction"] = float(match.mean())
        m[f"{name}_anchor_distance"] = float(np.median(ad))
        for key, col in (("set", [name] * n), ("sample_id", kde_man["sample_id"].to_numpy()[:n]), ("nn_row", nn_row),
                         ("d1", d1 / scale), ("d2", d2 / scale), ("anchor_row", anchors), ("anchor_match", match),
                         ("anchor_distance", ad)):
            per_sample[key].extend(col)
    m["anchor_distance_ratio"] = m["refined_anchor_distance"] / max(m["real_nn_distance"], 1e-12)
    primary = kind.primary_metric
    kde_p, ref_p = m[f"kde_{primary}"], m[f"refined_{primary}"]
    m["primary_metric"] = primary
    m["debias_gain"] = (1.0 - ref_p / kde_p) if kde_p and kde_p > 0 else None
    if kind.pixels:
        m["fid_gain"] = m["kde_fid"] - m["refined_fid"]
        # FID read against the held-out floor at the same n: a number that travels across datasets
        m["refined_fid_ratio"] = m["refined_fid"] / m["real_fid"] if m.get("real_fid") else None
        m["kid_gain"] = m["kde_kid"] - m["refined_kid"]
    m["seconds"] = time.perf_counter() - t0

    with staged_outputs(root, "evaluate") as outs:
        write_parquet(outs.path(PER_SAMPLE), per_sample)
        if kind.pixels:
            _nearest_images(outs.path(NEAREST), sets, per_sample, prepared, n, cfg.nn_rows)
        else:
            _nearest_points(outs.path(NEAREST), sets["refined"], per_sample, prepared, n)
        _memorization_plot(outs.path(MEMORIZATION), ratios, anchor_d, scorer.real_d1 / scale, cfg.copy_ratio)
        write_metrics(outs, METRICS, m)
    log.info("evaluate: n=%d, %s KDE %.4g -> refined %.4g (real %.4g); pixel Z_U KDE %.1f refined %.1f (real %.1f); "
             "copies KDE %.1f%% refined %.1f%% real %.1f%%", n, primary, kde_p, ref_p,
             m.get(f"real_{primary}") or float("nan"), m["kde_zu_pixel"], m["refined_zu_pixel"],
             m.get("real_zu_pixel", float("nan")), 100 * m["kde_copy_fraction"], 100 * m["refined_copy_fraction"],
             100 * m["real_copy_fraction"])
    return m


# ----------------------------------------------------------------------------- figures


def _nearest_images(path: Path, sets: dict, per_sample: dict, prepared: Prepared, n: int, rows: int) -> None:
    """Per row: KDE sample | its nearest training image | refined sample | its nearest | its anchor,
    in the data's own colours, labelled at a readable size (dkgm.figures.labeled_grid); the row label
    gives both samples' d1 (distance to the nearest training image, RMS per pixel)."""
    rows = min(rows, n)
    nn = {name: np.asarray(per_sample["nn_row"][i * n : (i + 1) * n]) for i, name in enumerate(SETS)}
    d1 = {name: np.asarray(per_sample["d1"][i * n : (i + 1) * n]) for i, name in enumerate(SETS)}
    anchors = np.asarray(per_sample["anchor_row"][:n])
    kind = prepared.kind
    grid, labels = [], []
    for r in range(rows):
        grid.append(np.stack([kind.store(sets["kde"][r]), prepared.data[nn["kde"][r]], kind.store(sets["refined"][r]),
                              prepared.data[nn["refined"][r]], prepared.data[anchors[r]]]))
        same = " *" if nn["refined"][r] == anchors[r] else ""
        labels.append(f"{d1['kde'][r]:.2f} -> {d1['refined'][r]:.2f}{same}")
    write_png(path, labeled_grid(grid, labels, ["KDE", "nearest", "refined", "nearest", "anchor"]))


def _nearest_points(path: Path, refined: np.ndarray, per_sample: dict, prepared: Prepared, n: int) -> None:
    train = prepared.data[prepared.split_rows("train")].astype(np.float32)
    nn = np.asarray(per_sample["nn_row"][n : 2 * n])
    fig, ax = new_figure(5, 5)
    ax.scatter(train[:, 0], train[:, 1], s=2, c="grey", alpha=0.3, label="train")
    k = min(n, 300)
    near = prepared.data[nn[:k]].astype(np.float32)
    for a, b in zip(refined[:k], near):
        ax.plot([a[0], b[0]], [a[1], b[1]], "r-", lw=0.5, alpha=0.6)
    ax.scatter(refined[:k, 0], refined[:k, 1], s=3, c="C0", label="refined (red: to nearest training point)")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    save_figure(fig, path)


def _memorization_plot(path: Path, ratios: dict[str, np.ndarray], anchor_d: dict[str, np.ndarray],
                       real_nn: np.ndarray, copy_ratio: float) -> None:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    bins = np.linspace(0, 1, 41)
    for name, color in (("real", "k"), ("kde", "C1"), ("refined", "C0")):
        a1.hist(ratios[name], bins=bins, histtype="step", density=True, color=color,
                label={"real": "held-out real", "kde": "KDE samples", "refined": "refined samples"}[name])
    a1.axvline(copy_ratio, color="r", ls="--", lw=1, label=f"copy threshold {copy_ratio:.2f}")
    a1.set_xlabel("d1 / d2 (nearest / second-nearest training item)")
    a1.set_ylabel("density")
    a1.legend(fontsize=7)
    hi = float(max(np.quantile(real_nn, 0.99), *(np.quantile(v, 0.99) for v in anchor_d.values())))
    bins = np.linspace(0, hi, 41)
    a2.hist(real_nn, bins=bins, histtype="step", density=True, color="k", label="held-out real: to nearest training")
    a2.hist(anchor_d["kde"], bins=bins, histtype="step", density=True, color="C1", label="KDE: to own anchor")
    a2.hist(anchor_d["refined"], bins=bins, histtype="step", density=True, color="C0", label="refined: to own anchor")
    a2.set_xlabel("RMS distance per coordinate")
    a2.legend(fontsize=7)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- gate eval


class EvalGateParams(EnforcedSection):
    max_fid_ratio: float | None = Field(
        2.5, gt=0.0,
        description="FID of the refined samples over the held-out floor's at the same n (images only; null: "
                    "off)",
    )
    max_fid: float | None = Field(
        None, gt=0.0,
        description="the same FID as an absolute number (null: off; it means different things on different "
                    "datasets)",
    )
    min_debias_gain: float = Field(
        0.0,
        description="1 - refined / KDE of the primary distance (FID; points: distance to the manifold)",
    )
    min_zu_pixel: float = Field(
        -3.0,
        description="data copying: Z_U in pixel space (< 0: closer to the training data than fresh data); "
                    "calibrate reads it",
    )
    min_zu_inception: float = Field(-3.0, description="the same in Inception space (images only)")
    copy_floor_factor: float = Field(
        2.0, ge=0.0,
        description="copy fraction (d1/d2 < copy_ratio) <= max(factor x held-out floor, allowance)",
    )
    copy_allowance: float = Field(0.01, ge=0.0, le=1.0, description="the copy limit never goes below this fraction")
    max_authenticity_drop: float = Field(
        0.1, ge=0.0, le=1.0,
        description="pixel authenticity >= the held-out images' - this",
    )


def eval_checks(metrics: dict[str, Any], cfg: EvalGateParams) -> list[Check]:
    key = "gates.eval"
    copy_limit = max(cfg.copy_floor_factor * metrics.get("real_copy_fraction", 0.0), cfg.copy_allowance)
    checks = [
        check(metrics, "debias_gain", ">=", cfg.min_debias_gain, f"{key}.min_debias_gain",
              failure="stage 2 does not improve on the KDE samples"),
        check(metrics, "refined_zu_pixel", ">=", cfg.min_zu_pixel, f"{key}.min_zu_pixel",
              failure="the refined samples lie closer to their training images than held-out images do: "
              "the generator copies its training data"),
        check(metrics, "refined_copy_fraction", "<=", copy_limit, f"{key}.copy_allowance", cfg.copy_allowance,
              failure="too many refined samples are near-copies of one training image"),
        check(metrics, "refined_authenticity_pixel", ">=", metrics.get("real_authenticity_pixel", 0.0)
              - cfg.max_authenticity_drop, f"{key}.max_authenticity_drop", cfg.max_authenticity_drop,
              failure="fewer refined samples than held-out images are farther from the training set than its own "
              "neighbours are"),
    ]
    kind = KINDS.get(metrics.get("kind"))
    if kind is not None and kind.pixels:  # FID and Inception features have no meaning for point data
        fid = []
        if cfg.max_fid_ratio is not None:
            fid.append(check(metrics, "refined_fid_ratio", "<=", cfg.max_fid_ratio, f"{key}.max_fid_ratio",
                             failure="the refined samples do not look like the data (FID too many times the "
                             "held-out floor's at the same n)"))
        if cfg.max_fid is not None:
            fid.append(check(metrics, "refined_fid", "<=", cfg.max_fid, f"{key}.max_fid",
                             failure="the refined samples do not look like the data (FID above the limit)"))
        checks[:0] = fid
        checks.insert(len(fid) + 1, check(metrics, "refined_zu_inception", ">=", cfg.min_zu_inception,
                                          f"{key}.min_zu_inception",
                                          failure="in Inception features the refined samples lie closer to the "
                                          "training set than held-out images do (copying)"))
    return checks


GATE = Gate("eval", METRICS, EvalGateParams, eval_checks,
            doc="go/no-go on the samples: FID, debiasing gain and data copying (Z_U, copies, authenticity) of the refined samples")

STAGES = (
    Stage(
        name="evaluate",
        doc="score both stages (FID, KID, IS, precision/recall, memorization, sharpness) against held-out real data",
        section="evaluate",
        params=EvaluateParams,
        deps=(PREPARED, REFERENCE, KDE_SAMPLES, REFINED),
        outs=(
            Out(METRICS, "metrics"),
            Out(PER_SAMPLE, "table"),
            Out(NEAREST, "figure", "Nearest-neighbour pairs",
                "per row: KDE sample, its nearest training image, refined sample, its nearest, its KDE anchor; "
                "the row label: d1 (distance to the nearest training image, RMS per pixel) of the KDE sample -> of the "
                "refined one, * where the refined sample's nearest is its own anchor",
                "refined points joined to their nearest training points"),
            Out(MEMORIZATION, "figure", "Memorization histograms",
                "d1/d2 to the two nearest training items, and distance to the own anchor, against held-out real data"),
        ),
        run=run,
    ),
    GATE.stage,
)
