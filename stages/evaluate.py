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

from dkgm import data as ds
from dkgm import inception, novelty
from dkgm import metrics as mt
from dkgm.devices import resolve_device
from dkgm.errors import DKGMError
from stages.artifacts import (
    KDE_SAMPLES,
    PREPARED,
    REFERENCE,
    REFINED,
    Prepared,
    load_prepared,
    load_reference,
    load_samples,
)
from stages.common import (
    Progress,
    log,
    new_figure,
    save_figure,
    staged_outputs,
    write_metrics,
    write_parquet,
)
from stages.contract import Device, Out, Section, Stage
from stages.gates import Check, EnforcedSection, Gate, check

METRICS = "reports/eval/metrics.json"
PER_SAMPLE = "reports/eval/per_sample.parquet"  # per sample: nearest training items, distances, anchor match
NEAREST = "reports/eval/nearest.png"
MEMORIZATION = "reports/eval/memorization.png"
SETS = ("kde", "refined")


class EvaluateParams(Section):
    n_samples: int = Field(500, ge=4)  # samples per stage evaluated: the first n (same seeds in both stages)
    batch_size: int = Field(50, ge=1)  # speed only
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    kid_subsets: int = Field(100, ge=1)  # KID: random subsets averaged
    kid_subset_size: int = Field(1000, ge=2)  # KID: subset size (capped by the smaller set)
    pr_k: int = Field(3, ge=1)  # precision/recall: k-th nearest neighbour radius
    copy_ratio: float = Field(1 / 3, gt=0.0, lt=1.0)  # a sample is a copy when d1/d2 < copy_ratio
    is_splits: int = Field(10, ge=1)  # Inception Score splits (full network only)
    seed: int = Field(0, ge=0)  # KID subsets and precision/recall reference subset
    nn_rows: int = Field(8, ge=1)  # rows of reports/eval/nearest.png
    ct_cells: int = Field(10, ge=1)  # C_T: k-means cells fitted on the training data
    ct_tau: float = Field(0.02, ge=0.0, lt=1.0)  # C_T: cells holding at most this fraction of the samples are left out
    fid_bootstrap: int = Field(100, ge=0)  # resamples of the samples for the FID's spread at this n (<set>_fid_se; 0: off)


def _as_float(x: np.ndarray, kind: str) -> np.ndarray:
    """Images as float in [-1, 1] after uint8 quantization (what a user would save); points as is."""
    if kind != "images":
        return x.astype(np.float32)
    return ds.to_float(x if x.dtype == np.uint8 else ds.to_uint8(x))


def _check_counts(cfg: EvaluateParams, kind: str, n: int, n_ref: int, n_real: int, has_logits: bool) -> None:
    """Every statistic that will be computed has the items it needs (one line naming the param if not)."""
    need: list[tuple[str, int, int, str]] = [("memorization (d1/d2)", 2, n, "samples evaluated per stage")]
    if kind == "images":
        for have, name in ((n, "samples evaluated per stage"), (n_ref, "reference training items")):
            need.append(("precision/recall (evaluate.pr_k + 1)", cfg.pr_k + 1, have, name))
            need.append(("FID/KID", 2, have, name))
        if has_logits:
            need.append(("the Inception Score (evaluate.is_splits)", cfg.is_splits, n, "samples evaluated per stage"))
    else:
        need.append(("MMD", 2, n, "samples evaluated per stage"))
    need.append(("the held-out floor", 2, n_real, "held-out real items"))
    for what, count, have, name in need:
        if have < count:
            raise DKGMError(f"evaluate: {what} needs at least {count} {name}, got {have} "
                            "(raise sample_kde.n_samples / evaluate.n_samples / reference.train_images, "
                            "or the dataset's test_fraction)")


class Scorer:
    """Everything that scoring a sample set needs, loaded once: the prepared data, the reference
    features and weights, the held-out floor at the samples' n (a seeded subset of the test split:
    FID's bias and the k-NN radii of precision/recall depend on the set size) and a second held-out
    set (validation split) for the data-copying floor. `score` gives every statistic of any named
    sets, with flat keys `<set>_<metric>` and the floor's `real_<metric>`: the same evaluation for
    DKGM's stages, the diffusion baseline and the comparison's sweeps."""

    def __init__(self, cfg: EvaluateParams, root: Path, n: int):
        self.cfg, self.n, self.root = cfg, n, Path(root)
        self.prepared = prepared = load_prepared(root)
        self.ref, self.ref_meta = load_reference(root, prepared)
        self.kind = prepared.kind
        self.weights = self.ref_meta.get("weights")
        _check_counts(cfg, self.kind, n, len(self.ref["train_rows"]), len(self.ref["test_rows"]),
                      bool(self.weights and self.weights["has_logits"]))
        self.train = prepared.split("train")
        self.train_rows = prepared.split_rows("train")
        self.real_pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(self.ref["test_rows"]))[:n])
        self.real = prepared.items(self.ref["test_rows"][self.real_pick])
        val_rows = prepared.split_rows("val")
        self.second_pick = np.sort(np.random.default_rng(cfg.seed + 1).permutation(len(val_rows))[:n])
        self.second = prepared.items(val_rows[self.second_pick]) if len(val_rows) > 1 else None
        self.scale = np.sqrt(np.prod(self.train.shape[1:]))  # distances as RMS per coordinate
        resolve_device(cfg.device, "evaluate.device")  # one line naming the key, before any pass needs it
        self.real_d1, self.real_d2, _ = mt.nearest_two(self.real, self.train, device=cfg.device)
        self.net = None

    def as_float(self, x: np.ndarray) -> np.ndarray:
        return _as_float(x[: self.n], self.kind)

    def score(self, sets: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, tuple]]:
        """(metrics, {set: (d1, d2, nearest training index)} in data space) of float sample sets."""
        cfg, m = self.cfg, {}
        m["real_copy_fraction"] = mt.copy_fraction(self.real_d1, self.real_d2, cfg.copy_ratio)
        m["real_nn_distance"] = float(np.median(self.real_d1) / self.scale)
        near = {}
        for name, x in sets.items():  # memorization in data space, against every training item (one GEMM pass)
            d1, d2, nn = near[name] = mt.nearest_two(x, self.train, device=cfg.device)
            m[f"{name}_copy_fraction"] = mt.copy_fraction(d1, d2, cfg.copy_ratio)
            m[f"{name}_nn_distance"] = float(np.median(d1) / self.scale)
        copying(m, "pixel", self.train, self.real, self.second, sets, cfg)
        if self.kind == "images":
            if self.net is None:
                self.net = feature_network(self.weights, cfg.device, root=self.root)
            _image_metrics(cfg, m, sets, self.real, self.real_pick, self.ref, self.net, self.second_pick)
        else:
            _point_metrics(cfg, m, sets, self.real, self.train, self.prepared)
        return m, near


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
    m: dict[str, Any] = {"kind": kind, "n_samples": n, "n_reference": len(scorer.ref["train_rows"]),
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
    primary = "fid" if kind == "images" else "mean_distance_to_manifold"
    kde_p, ref_p = m[f"kde_{primary}"], m[f"refined_{primary}"]
    m["primary_metric"] = primary
    m["debias_gain"] = (1.0 - ref_p / kde_p) if kde_p and kde_p > 0 else None
    if kind == "images":
        m["fid_gain"] = m["kde_fid"] - m["refined_fid"]
        # FID read against the held-out floor at the same n: a number that travels across datasets
        m["refined_fid_ratio"] = m["refined_fid"] / m["real_fid"] if m.get("real_fid") else None
        m["kid_gain"] = m["kde_kid"] - m["refined_kid"]
    m["seconds"] = time.perf_counter() - t0

    with staged_outputs(root, "evaluate") as outs:
        write_parquet(outs.path(PER_SAMPLE), per_sample)
        if kind == "images":
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


def copying(m: dict, space: str, train: np.ndarray, heldout: np.ndarray, second: np.ndarray | None,
            sets: dict[str, np.ndarray], cfg: EvaluateParams) -> None:
    """Z_U, C_T and authenticity of every set in one space (`pixel`: data space against every
    training item; `inception`: features against the reference subset). `real_*` is a second
    held-out set scored the same way: its Z_U and C_T should read about 0."""
    _, own, _ = mt.nearest_two(train, train, device=cfg.device)  # each training item's nearest other training item
    held_nn, _, held_idx = mt.nearest_two(heldout, train, device=cfg.device)
    centres = novelty.kmeans(train, min(cfg.ct_cells, len(train)), seed=cfg.seed)
    m[f"real_authenticity_{space}"] = novelty.authenticity(held_nn, held_idx, own)
    scored = {**sets, **({"real": second} if second is not None and len(second) > 1 else {})}
    for name, x in scored.items():
        d1, _, idx = mt.nearest_two(x, train, device=cfg.device)
        m[f"{name}_zu_{space}"] = novelty.z_u(d1, held_nn)
        if name != "real":
            m[f"{name}_authenticity_{space}"] = novelty.authenticity(d1, idx, own)
        try:
            cells = novelty.c_t(train, heldout, x, centres, tau=cfg.ct_tau, device=cfg.device)
        except DKGMError as exc:  # too few points for the partition: say why instead of a number
            m[f"{name}_ct_{space}"], m[f"ct_{space}_note"] = None, str(exc)
            continue
        m[f"{name}_ct_{space}"] = cells.c_t
        m[f"{name}_ct_{space}_cells"] = cells.kept
    m[f"ct_{space}_cells"] = len(centres)


def feature_network(weights: dict | None, device: str, key: str = "evaluate.device",
                    root: Path | None = None) -> inception.InceptionFeatures:
    """The reference's feature network, checked to be the same file (SHA-256) the reference used;
    with `root`, images seen before are answered from the project's feature cache."""
    if not weights:
        raise DKGMError(f"{REFERENCE} holds no Inception features: re-run reference")
    w = inception.Weights(**weights)
    if not Path(w.path).is_file():  # e.g. a rebuilt venv: the same file found again is as good
        try:
            found = inception.resolve_weights("auto")
        except DKGMError:
            found = None
        if found is None or found.sha256 != w.sha256:
            raise DKGMError(f"the reference features were computed with {w.path} (SHA-256 {w.sha256[:12]}...), which is "
                            "gone and not found elsewhere: restore it or re-run reference")
        w = inception.Weights(found.path, w.name, w.sha256, w.verified, w.source, w.has_logits)
    digest = inception.sha256_file(w.path)
    if digest != w.sha256:
        raise DKGMError(f"Inception weights {w.path} changed since the reference was computed "
                        f"(SHA-256 {digest}, reference {w.sha256}): re-run reference")
    net = inception.InceptionFeatures(w, resolve_device(device, key))  # the reference's resize (its meta says which)
    if root is not None:
        net.use_cache(root)
    return net


def _image_metrics(cfg: EvaluateParams, m: dict, sets: dict[str, np.ndarray], real: np.ndarray,
                   real_pick: np.ndarray, ref: dict, net: inception.InceptionFeatures, second_pick: np.ndarray) -> None:
    w = net.weights
    m.update(feature_network=w.name, weights_sha256=w.sha256, weights_source=w.source)
    total = sum(len(x) for x in sets.values())
    bar = Progress("evaluate features", total)
    t0, hits0 = time.perf_counter(), net.cache.hits if net.cache else 0
    feats, probs, done = {}, {}, 0
    for name, x in sets.items():
        out = net(ds.to_uint8(x), cfg.batch_size, progress=lambda k, base=done: bar(base + k))
        feats[name], probs[name] = out.features, out.probs
        done += len(x)
    bar.close()
    hits = (net.cache.hits if net.cache else 0) - hits0
    m["feature_cache_hits"] = hits  # images seen before (the comparison's rows that refine/sample_baseline drew)
    if total > hits:
        m["feature_images_per_second"] = (total - hits) / max(time.perf_counter() - t0, 1e-9)
    tr = ref["train_features"]
    feats["real"] = ref["test_features"][real_pick]
    probs["real"] = ref["test_probs"][real_pick] if "test_probs" in ref else None
    mu, sigma = ref["mu"], ref["sigma"]
    # one reference subset for every set's precision/recall, so that KDE, refined and real are paired
    sub = tr[np.random.default_rng(cfg.seed).choice(len(tr), min(len(tr), len(real_pick)), replace=False)]
    energy_real = mt.laplacian_energy(real)
    m["real_laplacian_energy"] = energy_real
    for name, f in feats.items():
        m[f"{name}_fid"] = mt.fid_to_reference(f, mu, sigma)
        if cfg.fid_bootstrap:  # which n samples were drawn: the spread a same-model re-draw would show
            m[f"{name}_fid_se"] = float(np.std(mt.fid_bootstrap(f, mu, sigma, cfg.fid_bootstrap, seed=cfg.seed), ddof=1))
        m[f"{name}_kid"] = mt.kid(f, tr, cfg.kid_subsets, cfg.kid_subset_size, seed=cfg.seed)
        m[f"{name}_precision"], m[f"{name}_recall"] = mt.precision_recall(sub, f, cfg.pr_k, device=cfg.device)
        d1, d2, _ = mt.nearest_two(f, tr, device=cfg.device)
        m[f"{name}_copy_fraction_inception"] = mt.copy_fraction(d1, d2, cfg.copy_ratio)
        if probs[name] is not None:
            m[f"{name}_inception_score"], m[f"{name}_inception_score_std"] = mt.inception_score(probs[name], cfg.is_splits)
        else:
            m[f"{name}_inception_score"] = None
        if name != "real":
            m[f"{name}_sharpness"] = mt.laplacian_energy(sets[name]) / max(energy_real, 1e-12)
    if probs["real"] is None:
        m["inception_score_note"] = (f"null: {w.name} has no classifier layer; put clean-fid's {inception.FULL_NAME} "
                                     "in place (or name it in reference.weights) for IS")
    second = ref["val_features"][second_pick] if "val_features" in ref else None
    copying(m, "inception", tr, feats["real"], second, {k: feats[k] for k in sets}, cfg)


def _point_metrics(cfg: EvaluateParams, m: dict, sets: dict[str, np.ndarray], real: np.ndarray, train: np.ndarray,
                   prepared: Prepared) -> None:
    roll = prepared.manifold()
    rng = np.random.default_rng(cfg.seed)
    # the floor: as many training points as samples, against the same held-out points
    floor = train[rng.choice(len(train), min(len(train), max(len(x) for x in sets.values())), replace=False)]
    bw = mt.median_distance(np.concatenate([real, floor]))  # one kernel width for every set
    for name, x in {**sets, "real": floor}.items():
        m[f"{name}_mean_distance_to_manifold"] = float(roll.distance(x).mean())
        m[f"{name}_mmd"] = mt.mmd_rbf(x, real, bandwidth=bw)
        m[f"{name}_sliced_wasserstein"] = mt.sliced_wasserstein(x, real, seed=cfg.seed)
    m["mmd_bandwidth"] = bw


# ----------------------------------------------------------------------------- figures


def _nearest_images(path: Path, sets: dict, per_sample: dict, prepared: Prepared, n: int, rows: int) -> None:
    """Per row: KDE sample | its nearest training image | refined sample | its nearest | its anchor."""
    import matplotlib.pyplot as plt

    rows = min(rows, n)
    nn = {name: np.asarray(per_sample["nn_row"][i * n : (i + 1) * n]) for i, name in enumerate(SETS)}
    d1 = {name: np.asarray(per_sample["d1"][i * n : (i + 1) * n]) for i, name in enumerate(SETS)}
    anchors = np.asarray(per_sample["anchor_row"][:n])
    cols = ["KDE sample", "nearest training", "refined sample", "nearest training", "KDE anchor"]
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.5 * len(cols), 1.55 * rows + 0.4), dpi=110, squeeze=False)
    for r in range(rows):
        tiles = [sets["kde"][r], ds.to_float(prepared.data[nn["kde"][r]]), sets["refined"][r],
                 ds.to_float(prepared.data[nn["refined"][r]]), ds.to_float(prepared.data[anchors[r]])]
        notes = [f"d1 {d1['kde'][r]:.3f}", "", f"d1 {d1['refined'][r]:.3f}",
                 "= anchor" if nn["refined"][r] == anchors[r] else "", ""]
        for c, (tile, note) in enumerate(zip(tiles, notes)):
            ax = axes[r, c]
            ax.imshow(np.clip((tile[0] + 1) / 2, 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if note:
                ax.set_xlabel(note, fontsize=7)
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
    save_figure(fig, path)


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
    max_fid_ratio: float | None = Field(2.5, gt=0.0)  # FID of the refined samples over the held-out floor's at the same n (images only; null: off)
    max_fid: float | None = Field(None, gt=0.0)  # the same FID as an absolute number (null: off; it means different things on different datasets)
    min_debias_gain: float = 0.0  # 1 - refined / KDE of the primary distance (FID; points: distance to the manifold)
    min_zu_pixel: float = -3.0  # Z_U of the refined samples in pixel (data) space: < 0 closer to training data than fresh data
    min_zu_inception: float = -3.0  # the same in Inception space (images only)
    copy_floor_factor: float = Field(2.0, ge=0.0)  # copy fraction <= max(factor x held-out floor, allowance)
    copy_allowance: float = Field(0.01, ge=0.0, le=1.0)
    max_authenticity_drop: float = Field(0.1, ge=0.0, le=1.0)  # pixel authenticity >= held-out's - this


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
    if metrics.get("kind") == "images":  # FID and Inception features have no meaning for point data
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
                "per row: KDE sample, its nearest training image, refined sample, its nearest, its KDE anchor",
                "refined points joined to their nearest training points"),
            Out(MEMORIZATION, "figure", "Memorization histograms",
                "d1/d2 to the two nearest training items, and distance to the own anchor, against held-out real data"),
        ),
        run=run,
    ),
    GATE.stage,
)
