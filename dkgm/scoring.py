"""Scoring sample sets: the statistics the evaluation, the diffusion baseline's evaluation, the
comparison and the sweeps share (DESIGN 2.5).

Every function takes the scoring settings as `cfg`, any object with the attributes of the
`evaluate` section (stages/scoring.py's EvaluateParams: batch_size, device, kid_subsets,
kid_subset_size, pr_k, copy_ratio, is_splits, seed, ct_cells, ct_tau, fid_bootstrap), and writes
flat keys `<set>_<metric>` into a dict `m`. Loading the artifacts they score against is the
stages' work (stages/scoring.py); this module needs torch and numpy only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dkgm import data as ds
from dkgm import inception, novelty
from dkgm import metrics as mt
from dkgm.devices import resolve_device
from dkgm.errors import DKGMError
from dkgm.kinds import DataKind


def check_counts(cfg: Any, kind: DataKind, n: int, n_ref: int, n_real: int, has_logits: bool) -> None:
    """Every statistic that will be computed has the items it needs (one line naming the param if not)."""
    need: list[tuple[str, int, int, str]] = [("memorization (d1/d2)", 2, n, "samples evaluated per stage")]
    if kind.pixels:
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


def copying(m: dict, space: str, train: np.ndarray, heldout: np.ndarray, second: np.ndarray | None,
            sets: dict[str, np.ndarray], cfg: Any) -> None:
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
        raise DKGMError("the reference (data/reference) holds no Inception features: re-run reference")
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


def image_metrics(cfg: Any, m: dict, sets: dict[str, np.ndarray], real: np.ndarray, real_pick: np.ndarray, ref: dict,
                  net: inception.InceptionFeatures, second_pick: np.ndarray,
                  progress: Callable[[int], None] | None = None) -> None:
    """FID (and its bootstrap spread), KID, precision/recall, copies and IS in Inception space of every
    set and of the held-out floor (`real_*`), then Z_U, C_T and authenticity there; in place."""
    w = net.weights
    m.update(feature_network=w.name, weights_sha256=w.sha256, weights_source=w.source)
    total = sum(len(x) for x in sets.values())
    t0, hits0 = time.perf_counter(), net.cache.hits if net.cache else 0
    feats, probs, done = {}, {}, 0
    for name, x in sets.items():
        out = net(ds.to_uint8(x), cfg.batch_size, progress=None if progress is None else lambda k, base=done: progress(base + k))
        feats[name], probs[name] = out.features, out.probs
        done += len(x)
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


def point_metrics(cfg: Any, m: dict, sets: dict[str, np.ndarray], real: np.ndarray, train: np.ndarray,
                  roll: Any) -> None:
    """Distance to the true manifold `roll` (its `distance`), MMD and sliced Wasserstein against the
    held-out points, of every set and of as many training points (`real_*`); in place."""
    rng = np.random.default_rng(cfg.seed)
    # the floor: as many training points as samples, against the same held-out points
    floor = train[rng.choice(len(train), min(len(train), max(len(x) for x in sets.values())), replace=False)]
    bw = mt.median_distance(np.concatenate([real, floor]))  # one kernel width for every set
    for name, x in {**sets, "real": floor}.items():
        m[f"{name}_mean_distance_to_manifold"] = float(roll.distance(x).mean())
        m[f"{name}_mmd"] = mt.mmd_rbf(x, real, bandwidth=bw)
        m[f"{name}_sliced_wasserstein"] = mt.sliced_wasserstein(x, real, seed=cfg.seed)
    m["mmd_bandwidth"] = bw
