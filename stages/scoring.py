"""The evaluation's settings and its loaded state, shared by every stage that scores samples
(evaluate, evaluate_baseline, comparison) and by the benchmarks: the `evaluate` section's model
and `Scorer`, which loads the prepared data and the reference once and calls dkgm.scoring. Not a
stage: keeping it apart lets those stages share the evaluation without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from dkgm.devices import resolve_device
from stages.artifacts import load_prepared, load_reference
from stages.common import Progress
from stages.contract import Device, Section


class EvaluateParams(Section):
    n_samples: int = Field(
        500, ge=4,
        description="first n samples of each stage (same seeds: sample s of both stages is paired)",
    )
    batch_size: int = Field(50, ge=1, description="speed only")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged")
    kid_subset_size: int = Field(1000, ge=2, description="KID: subset size (capped by the smaller set)")
    pr_k: int = Field(3, ge=1, description="precision/recall: k-th nearest-neighbour radius")
    copy_ratio: float = Field(
        1 / 3, gt=0.0, lt=1.0,
        description="a sample is a copy when d1/d2 < copy_ratio (nearest / second-nearest training item)",
    )
    is_splits: int = Field(10, ge=1, description="Inception Score splits (full network only)")
    seed: int = Field(0, ge=0, description="KID subsets, precision/recall reference subset")
    nn_rows: int = Field(8, ge=1, description="rows of reports/eval/nearest.png")
    ct_cells: int = Field(10, ge=1, description="C_T: k-means cells fitted on the training data")
    ct_tau: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="C_T: cells holding at most this fraction of the samples are left out",
    )
    fid_bootstrap: int = Field(
        100, ge=0,
        description="resamples of the samples for the FID's spread at this n (<set>_fid_se; 0: off)",
    )


# every key of the evaluate section: the stages that score like evaluate read them all (their DVC params)
SETTINGS = tuple(f"evaluate.{k}" for k in EvaluateParams.model_fields)


def settings(shared: dict[str, Any]) -> EvaluateParams:
    """The evaluate section from {"evaluate.<key>": value} (a stage's `shared` params)."""
    return EvaluateParams(**{key.split(".", 1)[1]: value for key, value in shared.items() if key in SETTINGS})


class Scorer:
    """Everything that scoring a sample set needs, loaded once: the prepared data, the reference
    features and weights, the held-out floor at the samples' n (a seeded subset of the test split:
    FID's bias and the k-NN radii of precision/recall depend on the set size) and a second held-out
    set (validation split) for the data-copying floor. `score` gives every statistic of any named
    sets, with flat keys `<set>_<metric>` and the floor's `real_<metric>`: the same evaluation for
    DKGM's stages, the diffusion baseline and the comparison's sweeps."""

    def __init__(self, cfg: EvaluateParams, root: Path, n: int):
        import dkgm.metrics as mt
        import dkgm.scoring as sc

        self.cfg, self.n, self.root = cfg, n, Path(root)
        self.prepared = prepared = load_prepared(root)
        self.ref, self.ref_meta = load_reference(root, prepared)
        self.kind = prepared.kind
        self.weights = self.ref_meta.get("weights")
        sc.check_counts(cfg, self.kind, n, len(self.ref["train_rows"]), len(self.ref["test_rows"]),
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
        return self.kind.as_saved(x[: self.n])

    def score(self, sets: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, tuple]]:
        """(metrics, {set: (d1, d2, nearest training index)} in data space) of float sample sets."""
        import dkgm.metrics as mt
        import dkgm.scoring as sc

        cfg, m = self.cfg, {}
        m["real_copy_fraction"] = mt.copy_fraction(self.real_d1, self.real_d2, cfg.copy_ratio)
        m["real_nn_distance"] = float(np.median(self.real_d1) / self.scale)
        near = {}
        for name, x in sets.items():  # memorization in data space, against every training item (one GEMM pass)
            d1, d2, nn = near[name] = mt.nearest_two(x, self.train, device=cfg.device)
            m[f"{name}_copy_fraction"] = mt.copy_fraction(d1, d2, cfg.copy_ratio)
            m[f"{name}_nn_distance"] = float(np.median(d1) / self.scale)
        sc.copying(m, "pixel", self.train, self.real, self.second, sets, cfg)
        if self.kind.pixels:
            if self.net is None:
                self.net = sc.feature_network(self.weights, cfg.device, root=self.root)
            bar = Progress("evaluate features", sum(len(x) for x in sets.values()))
            sc.image_metrics(cfg, m, sets, self.real, self.real_pick, self.ref, self.net, self.second_pick, progress=bar)
            bar.close()
        else:
            sc.point_metrics(cfg, m, sets, self.real, self.train, self.prepared.manifold())
        return m, near
