"""Data-copying statistics: is a generated set closer to the training data than fresh data is?

Every statistic compares generated samples with held-out real samples on the same footing
(DESIGN 2.5), through the distance from a point to its nearest training point, L(x):

- Z_U (Meehan, Chaudhuri & Dasgupta, AISTATS 2020): the Mann-Whitney U of L(generated) against
  L(held-out), z-scored under the null of equal laws. Z_U << 0: the samples sit closer to the
  training set than fresh data does (data copying); Z_U >> 0: farther (underfitting).
- C_T (same paper): Z_U computed inside each cell of a partition of the space fitted on training
  data (k-means), averaged with the held-out mass of each cell as weight, over the cells that hold
  more than a fraction tau of the generated samples. It catches copying confined to some regions.
- Authenticity (Alaa et al., ICML 2022): the fraction of samples farther from their nearest
  training point than that point is from its own nearest training neighbour.

Ties are ranked by their average, and the continuity correction is the reference implementation's
(mean n*m/2 - 0.5), so Z_U of identical distances is slightly positive, never spuriously negative.
Pure numpy/torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dkgm.errors import DKGMError


def _vector(x: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64).reshape(-1)
    if len(v) == 0:
        raise DKGMError(f"{name}: no values")
    if not np.all(np.isfinite(v)):
        raise DKGMError(f"{name}: NaN or infinite distances")
    return v


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..N of the values, ties sharing the mean of their ranks (as scipy.stats.rankdata)."""
    v = np.asarray(values)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.r_[0, np.flatnonzero(sorted_v[1:] != sorted_v[:-1]) + 1]
    ends = np.r_[starts[1:], len(v)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks start+1 .. end, averaged
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def mann_whitney_u(generated: np.ndarray, heldout: np.ndarray) -> float:
    """U of the generated values: the number of (generated, held-out) pairs in which the generated
    value is the larger, ties counting one half."""
    g, h = _vector(generated, "generated"), _vector(heldout, "held-out")
    ranks = average_ranks(np.concatenate([g, h]))
    return float(ranks[: len(g)].sum() - len(g) * (len(g) + 1) / 2)


def z_u(generated_nn: np.ndarray, heldout_nn: np.ndarray) -> float:
    """Z_U of nearest-training-neighbour distances: (U - (mn/2 - 1/2)) / sqrt(mn(m+n+1)/12)."""
    g, h = _vector(generated_nn, "generated"), _vector(heldout_nn, "held-out")
    m, n = len(g), len(h)
    u = mann_whitney_u(g, h)
    return float((u - (m * n / 2 - 0.5)) / math.sqrt(m * n * (m + n + 1) / 12))


def z_u_effect(z: float, m: int, n: int) -> float:
    """The effect behind a Z_U: U/(mn) - 1/2, the probability that a sample's distance exceeds a
    held-out one's, minus one half. Z_U grows with sqrt(m n / (m + n)) at a fixed effect; the
    effect does not (used to carry a threshold from one sample size to another)."""
    return z * math.sqrt(m * n * (m + n + 1) / 12) / (m * n)


def z_u_at(effect: float, m: int, n: int) -> float:
    """The Z_U that an effect gives at sample sizes m (generated) and n (held-out)."""
    return effect * (m * n) / math.sqrt(m * n * (m + n + 1) / 12)


def authenticity(sample_nn: np.ndarray, nearest_index: np.ndarray, train_nn_of_train: np.ndarray) -> float:
    """Fraction of samples farther from their nearest training point than that point is from its
    own nearest other training point (Alaa et al. 2022)."""
    d = _vector(sample_nn, "sample distances")
    idx = np.asarray(nearest_index, dtype=np.int64).reshape(-1)
    own = _vector(train_nn_of_train, "training nearest-neighbour distances")
    if len(idx) != len(d):
        raise DKGMError(f"authenticity: {len(d)} distances but {len(idx)} nearest indices")
    return float(np.mean(d > own[idx]))


# ----------------------------------------------------------------------------- cells


def kmeans(points: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """k-means centres (Lloyd's iterations from a k-means++ start, seeded): the cells of C_T."""
    x = torch.as_tensor(np.asarray(points, dtype=np.float32).reshape(len(points), -1))
    if not 1 <= k <= len(x):
        raise DKGMError(f"kmeans: need 1 <= k <= {len(x)} points, got k = {k}")
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(len(x), (1,), generator=gen)]
    d2 = torch.cdist(x, centres).square().min(dim=1).values
    for _ in range(1, k):  # k-means++: the next centre with probability proportional to d^2
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        nxt = x[torch.multinomial(probs, 1, generator=gen)]
        centres = torch.cat([centres, nxt])
        d2 = torch.minimum(d2, torch.cdist(x, nxt).square()[:, 0])
    for _ in range(iters):
        labels = torch.cdist(x, centres).argmin(dim=1)
        new = torch.zeros_like(centres).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        keep = counts > 0
        new[keep] /= counts[keep, None]
        new[~keep] = centres[~keep]  # an empty cell keeps its centre
        if torch.allclose(new, centres):
            break
        centres = new
    return centres.numpy()


def assign_cells(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    x = torch.as_tensor(np.asarray(points, dtype=np.float32).reshape(len(points), -1))
    c = torch.as_tensor(np.asarray(centres, dtype=np.float32))
    return torch.cdist(x, c).argmin(dim=1).numpy()


def _nn_distances(queries: np.ndarray, reference: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Distance to the nearest reference row: one chunked GEMM pass on `device`, the selected
    distance recomputed from the difference (dkgm.kde.topk_sq_distances)."""
    from dkgm.kde import topk_sq_distances

    q = np.asarray(queries, dtype=np.float32).reshape(len(queries), -1)
    r = np.asarray(reference, dtype=np.float32).reshape(len(reference), -1)
    return np.sqrt(topk_sq_distances(q, r, 1, device=device).sq_dists[:, 0])


@dataclass(frozen=True)
class CellTest:
    c_t: float  # the weighted mean of the kept cells' Z_U
    cells: int  # cells in the partition
    kept: int  # cells with more than tau of the generated samples
    z_u: np.ndarray  # per cell (NaN where left out)
    weight: np.ndarray  # held-out fraction per cell


def c_t(train: np.ndarray, heldout: np.ndarray, generated: np.ndarray, centres: np.ndarray,
        tau: float = 0.0, device: str = "cpu") -> CellTest:
    """C_T: in each cell, Z_U of the distances to the nearest training point *of that cell*; the
    mean over the cells holding more than a fraction tau of the generated samples, weighted by the
    held-out fraction of each cell. Every cell must hold training and held-out points."""
    tc, hc, gc = (assign_cells(a, centres) for a in (train, heldout, generated))
    k = len(centres)
    z = np.full(k, np.nan)
    weight = np.bincount(hc, minlength=k) / len(hc)
    share = np.bincount(gc, minlength=k) / len(gc)
    flat = [np.asarray(a).reshape(len(a), -1) for a in (train, heldout, generated)]
    for j in range(k):
        t, h, g = flat[0][tc == j], flat[1][hc == j], flat[2][gc == j]
        if len(t) == 0 or len(h) == 0:
            raise DKGMError(f"C_T: cell {j} of {k} has no {'training' if len(t) == 0 else 'held-out'} points: "
                            "use fewer cells")
        if share[j] > tau and len(g):
            z[j] = z_u(_nn_distances(g, t, device), _nn_distances(h, t, device))
    kept = ~np.isnan(z)
    if not kept.any():
        raise DKGMError(f"C_T: no cell holds more than tau = {tau:g} of the generated samples")
    value = float((weight[kept] * z[kept]).sum() / weight[kept].sum())
    return CellTest(value, k, int(kept.sum()), z, weight)
