"""The operating point (DESIGN 2.6): how novel a refined probe set is, the rule that keeps what the
evaluation gate would pass, and the search for the passing bandwidth scale nearest the threshold.

At the CV bandwidth a good debiaser walks each KDE sample back to its anchor. A sample stops
returning to its anchor once the start noise s * h_kde is of the order of the distance from the
anchor to its nearest other training image, so novelty crosses the rule's line at one scale, and
fidelity falls as s grows past it. The search evaluates a grid of scales and then bisects between
the last failing and the first passing one, so the chosen point sits at the crossing, not at the
next grid value. Pure numpy/torch: the calibrate stage and the sweeps in benchmarks/ share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dkgm import kde, novelty
from dkgm import metrics as mt
from dkgm.errors import DKGMError


@dataclass(frozen=True)
class NoveltyRule:
    """Pass when the probe's pixel Z_U, carried to the evaluation's sample sizes, clears `min_zu` by
    `margin`, the copy fraction stays within max(`copy_floor_factor` x held-out floor,
    `copy_allowance`), and authenticity within `max_authenticity_drop` of the held-out floor's."""

    min_zu: float = -3.0
    margin: float = 2.0
    copy_floor_factor: float = 2.0
    copy_allowance: float = 0.01
    max_authenticity_drop: float = 0.1
    copy_ratio: float = 1 / 3
    eval_samples: int = 500  # generated samples the evaluation scores
    eval_heldout: int = 500  # held-out items it scores them against

    def passes(self, row: dict[str, Any], ref: NoveltyReference) -> tuple[bool, list[str]]:
        """Whether a scored probe passes; the reasons it fails (one per failed condition)."""
        why = []
        if not row["zu_pixel_at_eval"] >= self.min_zu + self.margin:
            why.append(f"Z_U {row['zu_pixel_at_eval']:.2f} < {self.min_zu + self.margin:g}")
        limit = max(self.copy_floor_factor * ref.floor_copy, self.copy_allowance)
        if not row["copy_fraction"] <= limit:
            why.append(f"copy fraction {row['copy_fraction']:.3f} > {limit:.3f}")
        if not row["authenticity"] >= ref.floor_authenticity - self.max_authenticity_drop:
            why.append(f"authenticity {row['authenticity']:.3f} < {ref.floor_authenticity - self.max_authenticity_drop:.3f}")
        return not why, why


class NoveltyReference:
    """What every probe is compared with: the training set and a held-out set scored the same way
    (its nearest-training distances, copy fraction and authenticity are the floor)."""

    def __init__(self, train: np.ndarray, heldout: np.ndarray, copy_ratio: float = 1 / 3, device: str = "cpu"):
        if len(heldout) < 2:
            raise DKGMError("the novelty reference needs at least two held-out items")
        self.train, self.device = train, device
        _, self.train_own_nn, _ = mt.nearest_two(train, train, device=device)  # each item's nearest *other* item
        d1, d2, nn = mt.nearest_two(heldout, train, device=device)
        self.heldout_nn = d1
        self.floor_copy = mt.copy_fraction(d1, d2, copy_ratio)
        self.floor_authenticity = novelty.authenticity(d1, nn, self.train_own_nn)

    def score(self, x: np.ndarray, rule: NoveltyRule) -> dict[str, float]:
        """Pixel novelty of one probe set: Z_U against the held-out set (and carried to the
        evaluation's sizes through its effect), copy fraction, authenticity, median NN distance."""
        d1, d2, nn = mt.nearest_two(x, self.train, device=self.device)
        zu = novelty.z_u(d1, self.heldout_nn)
        effect = novelty.z_u_effect(zu, len(x), len(self.heldout_nn))
        return {"zu_pixel": zu, "zu_pixel_at_eval": novelty.z_u_at(effect, rule.eval_samples, rule.eval_heldout),
                "copy_fraction": mt.copy_fraction(d1, d2, rule.copy_ratio),
                "authenticity": novelty.authenticity(d1, nn, self.train_own_nn),
                "nn_distance": float(np.median(d1) / np.sqrt(x[0].size))}


def probe_inputs(train: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anchors, unit kernel noise u) of a probe: scale s starts from x_anchor + s h_kde u, so every
    candidate refines the same anchors with the same noise (what sample_kde draws for these seeds
    at h = s h_kde)."""
    x_anchor = train[kde.sample_anchors(seeds.tolist(), len(train)).numpy()]
    unit = kde.kernel_noise(seeds.tolist(), int(np.prod(train.shape[1:]))).numpy().reshape(x_anchor.shape)
    return x_anchor, unit


def search_scale(evaluate: Callable[[float], dict[str, Any]], scales: Sequence[float], bisect_steps: int = 3,
                 ) -> list[dict[str, Any]]:
    """Rows of `evaluate(s)` (each with a boolean "passed") for every grid scale, then for the
    bisection between the largest failing scale below the first passing one and that passing one.

    Each row gets "search": "grid" or "bisection". With no passing scale, or a passing smallest
    scale, there is nothing to bisect. The passing scale nearest the threshold is then the smallest
    passing scale of all rows."""
    grid = sorted(set(float(s) for s in scales))
    rows = []
    for s in grid:
        rows.append({**evaluate(s), "scale": s, "search": "grid"})
    first = next((i for i, r in enumerate(rows) if r["passed"]), None)
    if first is None or first == 0:
        return rows
    lo, hi = grid[first - 1], grid[first]
    for _ in range(bisect_steps):
        mid = 0.5 * (lo + hi)
        row = {**evaluate(mid), "scale": mid, "search": "bisection"}
        rows.append(row)
        lo, hi = (lo, mid) if row["passed"] else (mid, hi)
    return rows


def nearest_passing(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The passing row with the smallest scale (the one nearest the novelty threshold)."""
    passing = [r for r in rows if r.get("passed")]
    return min(passing, key=lambda r: r["scale"]) if passing else None
