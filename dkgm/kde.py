"""Stage 1: kernel density estimation in pixel space.

Kernels have unit per-coordinate variance, so the bandwidth h is the per-coordinate noise
std of a sample around its anchor: x = x_i + h * u, u ~ K.

Bandwidth selection maximises the held-out log-likelihood of the Gaussian KDE,

    L(h) = mean_v logsumexp_j(-|y_v - x_j|^2 / 2h^2) - log n - (d/2) log(2 pi h^2),

from one chunked pass that keeps each validation point's k smallest squared distances to
the training set. With that table L(h) costs microseconds for any h, and the terms left
out are bounded: each is at most exp(-D_(k) / 2h^2), so the truncated value is a lower
bound and `truncation_bound` is the largest amount it can be below the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dkgm.devices import exact_fp32, resolve_device
from dkgm.errors import DKGMError
from dkgm.rng import sample_generators

KERNELS = ("gaussian", "epanechnikov")
LOG_2PI = math.log(2.0 * math.pi)

ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------- distances


def _as_matrix(x: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim < 2:
        raise DKGMError(f"{name} must have shape (n, ...), got {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise DKGMError(f"{name} is empty")
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True)
class DistanceOperands:
    """Both point sets, centred and augmented so that one plain GEMM gives the distances:
    [-2q, 1] . [r, |r|^2] = |q - r|^2 - |q|^2. Folding the |r|^2 bias into the product saves
    the separate pass an addmm spends broadcasting it into every block."""

    queries: torch.Tensor  # (m, d + 1): [-2 (q - c), 1]
    reference: torch.Tensor  # (n, d + 1): [r - c, |r - c|^2]
    query_sq_norm: torch.Tensor  # (m,) |q - c|^2, to turn a block into true distances
    dim: int

    @staticmethod
    def build(queries: torch.Tensor, reference: torch.Tensor, device: torch.device, dtype: torch.dtype) -> "DistanceOperands":
        if queries.shape[1] != reference.shape[1]:
            raise DKGMError(f"queries have dimension {queries.shape[1]} but reference has {reference.shape[1]}")
        d = reference.shape[1]
        # any shift leaves distances unchanged; the reference mean shrinks norms (less cancellation)
        centre = reference.to(device, dtype).mean(dim=0, keepdim=True)
        r = torch.empty((reference.shape[0], d + 1), dtype=dtype, device=device)
        torch.sub(reference.to(device, dtype), centre, out=r[:, :d])
        r[:, d] = torch.linalg.vector_norm(r[:, :d], dim=1).square_()
        q = torch.empty((queries.shape[0], d + 1), dtype=dtype, device=device)
        torch.sub(queries.to(device, dtype), centre, out=q[:, :d])
        qn = torch.linalg.vector_norm(q[:, :d], dim=1).square_()
        q[:, :d].mul_(-2.0)
        q[:, d] = 1.0
        return DistanceOperands(q, r, qn, d)

    def centred_queries(self) -> torch.Tensor:
        return self.queries[:, : self.dim] * -0.5

    def centred_reference(self) -> torch.Tensor:
        return self.reference[:, : self.dim]


def sq_distance_blocks(
    ops: DistanceOperands,
    *,
    query_chunk: int = 1024,
    ref_chunk: int = 16384,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (query_start, ref_start, block) with block[a, b] = |q_a - r_b|^2 - |q_a|^2.

    The |q|^2 term is constant along a row, so rankings need no more; add
    ops.query_sq_norm back for true distances. Full-size blocks are written into one reused
    buffer (fresh large allocations cost page faults on the CPU), so a consumer must finish
    with a block before asking for the next. The products are full float32 (never TF32).
    """
    queries, reference = ops.queries, ops.reference
    m, n = queries.shape[0], reference.shape[0]
    total = math.ceil(m / query_chunk) * math.ceil(n / ref_chunk)
    buf = torch.empty((min(query_chunk, m), min(ref_chunk, n)), dtype=queries.dtype, device=queries.device)
    done = 0
    for qs in range(0, m, query_chunk):
        q = queries[qs : qs + query_chunk]
        for rs in range(0, n, ref_chunk):
            r = reference[rs : rs + ref_chunk]
            with exact_fp32():  # full float32 even where the stage turned TF32 on for its network
                block = torch.mm(q, r.T, out=buf) if (q.shape[0], r.shape[0]) == tuple(buf.shape) else torch.mm(q, r.T)
            yield qs, rs, block
            done += 1
            if progress is not None:
                progress(done, total)


@dataclass(frozen=True)
class TopK:
    """Each query's k smallest squared distances to the reference set (ascending, exact float64)."""

    sq_dists: np.ndarray  # (m, k) float64
    indices: np.ndarray  # (m, k) int64, rows of the reference set
    n_reference: int
    dim: int

    @property
    def k(self) -> int:
        return int(self.sq_dists.shape[1])


def topk_sq_distances(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    k: int,
    *,
    device: str = "auto",
    query_chunk: int = 1024,
    ref_chunk: int = 16384,
    progress: ProgressFn | None = None,
    recompute: bool = True,
) -> TopK:
    """k nearest reference points of every query, by one chunked float32 matmul pass.

    Both sets are centred on the reference mean first (smaller norms, less cancellation),
    then (recompute=True) the selected distances are recomputed from the differences, free
    of the matmul's cancellation error; recompute=False keeps the matmul's float32 values.
    """
    q_in = _as_matrix(queries, "queries")
    r_in = _as_matrix(reference, "reference")
    if k < 1:
        raise DKGMError(f"k must be >= 1, got {k}")
    n = r_in.shape[0]
    k = min(k, n)
    ref_chunk = max(ref_chunk, k)  # each block must hold at least k candidates
    dev = resolve_device(device)
    ops = DistanceOperands.build(q_in, r_in, dev, torch.float32)
    d = ops.dim

    # per query chunk: each block's k best candidates, then one top-k over all candidates
    m = q_in.shape[0]
    best_vals = torch.empty((m, k), dtype=torch.float32, device=dev)
    best_idx = torch.empty((m, k), dtype=torch.int64, device=dev)
    cand_vals: list[torch.Tensor] = []
    cand_idx: list[torch.Tensor] = []
    for qs, rs, block in sq_distance_blocks(ops, query_chunk=query_chunk, ref_chunk=ref_chunk, progress=progress):
        vals, idx = torch.topk(block, min(k, block.shape[1]), dim=1, largest=False, sorted=False)
        cand_vals.append(vals)
        cand_idx.append(idx + rs)
        if rs + block.shape[1] >= n:  # the query chunk is complete
            rows = slice(qs, qs + block.shape[0])
            if len(cand_vals) == 1:
                best_vals[rows], best_idx[rows] = cand_vals[0], cand_idx[0]
            else:
                all_vals, all_idx = torch.cat(cand_vals, 1), torch.cat(cand_idx, 1)
                vals, pos = torch.topk(all_vals, k, dim=1, largest=False, sorted=False)
                best_vals[rows], best_idx[rows] = vals, torch.gather(all_idx, 1, pos)
            cand_vals, cand_idx = [], []

    idx = best_idx.cpu()
    if recompute:
        exact = _exact_sq_dists(ops.centred_queries().cpu(), ops.centred_reference().cpu(), idx)
    else:
        exact = (best_vals + ops.query_sq_norm[:, None]).clamp_min_(0.0).to(torch.float64).cpu()
    order = torch.argsort(exact, dim=1)
    return TopK(
        sq_dists=torch.gather(exact, 1, order).numpy(),
        indices=torch.gather(idx, 1, order).numpy(),
        n_reference=n,
        dim=d,
    )


def _exact_sq_dists(q: torch.Tensor, r: torch.Tensor, idx: torch.Tensor, budget: int = 1 << 22) -> torch.Tensor:
    """|q_a - r_idx[a, j]|^2 for the selected pairs, as a float32 difference (no cancellation)
    summed in float64: relative error ~1e-8, 5x cheaper than a float64 gather. Row chunks keep
    the gathered (rows, k, d) block under `budget` elements."""
    m, k = idx.shape
    d = q.shape[1]
    q32, r32 = q.to(torch.float32), r.to(torch.float32)
    rows = max(1, budget // max(1, k * d))
    out = torch.empty((m, k), dtype=torch.float64)
    for s in range(0, m, rows):
        diff = q32[s : s + rows, None, :] - r32[idx[s : s + rows]]
        out[s : s + rows] = torch.linalg.vector_norm(diff, dim=2, dtype=torch.float64).square()
    return out


# ----------------------------------------------------------------------------- log-likelihood


@dataclass(frozen=True)
class HeldOutLogLik:
    loglik: float  # mean held-out log-likelihood (nats per point), truncated: a lower bound
    truncation_bound: float  # exact value lies in [loglik, loglik + truncation_bound]

    @property
    def upper(self) -> float:
        return self.loglik + self.truncation_bound


def _check_bandwidth(h: float) -> float:
    if not math.isfinite(h) or h <= 0:
        raise DKGMError(f"bandwidth must be a positive finite number, got {h}")
    return float(h)


def cv_loglik(topk: TopK, h: float) -> HeldOutLogLik:
    """Gaussian-KDE held-out log-likelihood at bandwidth h from the top-k table."""
    h = _check_bandwidth(h)
    n, d = topk.n_reference, topk.dim
    a = -topk.sq_dists / (2.0 * h * h)
    amax = a[:, :1]
    lse = amax[:, 0] + np.log(np.exp(a - amax).sum(axis=1))
    norm = -math.log(n) - 0.5 * d * (LOG_2PI + 2.0 * math.log(h))
    left_out = n - topk.k
    if left_out > 0:
        # sum of the n-k terms left out <= (n-k) * exp(a_k); bound = log(1 + that / kept sum)
        log_ratio = math.log(left_out) + a[:, -1] - lse
        bound = float(np.mean(np.log1p(np.exp(np.minimum(log_ratio, 700.0)))))
    else:
        bound = 0.0
    return HeldOutLogLik(loglik=float(lse.mean() + norm), truncation_bound=bound)


def exact_loglik(
    queries: np.ndarray | torch.Tensor,
    reference: np.ndarray | torch.Tensor,
    bandwidths: Sequence[float],
    *,
    device: str = "auto",
    query_chunk: int = 1024,
    ref_chunk: int = 16384,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Exact held-out Gaussian-KDE log-likelihood at each bandwidth: a streaming logsumexp
    over every reference point (one more distance pass, no truncation)."""
    hs = [_check_bandwidth(h) for h in bandwidths]
    q_in = _as_matrix(queries, "queries")
    r_in = _as_matrix(reference, "reference")
    n, d = r_in.shape
    dev = resolve_device(device)
    # float64 throughout: the terms that dominate are the nearest neighbours, whose distances
    # float32 cancellation would perturb by ~1e-4 (more than the top-k truncation error)
    ops = DistanceOperands.build(q_in, r_in, dev, torch.float64)
    inv = torch.tensor([-0.5 / (h * h) for h in hs], dtype=torch.float64, device=dev)
    lse = torch.full((len(hs), q_in.shape[0]), -math.inf, dtype=torch.float64, device=dev)
    for qs, _, block in sq_distance_blocks(ops, query_chunk=query_chunk, ref_chunk=ref_chunk, progress=progress):
        rows = slice(qs, qs + block.shape[0])
        dist = (block + ops.query_sq_norm[rows, None]).clamp_min_(0.0)
        for j in range(len(hs)):  # one (rows, cols) temporary per bandwidth, not an (H, rows, cols) one
            lse[j, rows] = torch.logaddexp(lse[j, rows], torch.logsumexp(inv[j] * dist, dim=1))
    out = []
    for j, h in enumerate(hs):
        norm = -math.log(n) - 0.5 * d * (LOG_2PI + 2.0 * math.log(h))
        out.append(float(lse[j].mean().item() + norm))
    return out


def diag_gaussian_loglik(train: np.ndarray, heldout: np.ndarray, extra_var: float | Sequence[float] = 0.0):
    """Held-out log-likelihood (nats per point) of N(mean, diag(var) + extra_var) fitted on `train`;
    a list of extra variances gives a list of values (the fit is done once).

    With extra_var = h^2 this is the KDE's own moment-matched diagonal Gaussian: the same
    smoothing, none of the mixture structure. (A plain MLE fit is degenerate on images: pixels
    that are constant in the data get zero variance and an infinite density.)
    """
    mean, base_var = column_moments(train)
    y = np.asarray(heldout).reshape(len(heldout), -1)
    out = []
    for extra in np.atleast_1d(np.asarray(extra_var, dtype=np.float64)):
        var = base_var + extra
        if np.any(var <= 0):
            raise DKGMError("diagonal Gaussian baseline: zero variance in some coordinate; pass extra_var > 0")
        quad = sum(float((((y[s : s + _ROWS].astype(np.float64) - mean) ** 2) / var).sum()) for s in range(0, len(y), _ROWS))
        out.append(float(-0.5 * (quad / len(y) + np.log(var).sum() + len(mean) * LOG_2PI)))
    return out if np.ndim(extra_var) else out[0]


_ROWS = 4096  # rows per float64 chunk: moments never need a float64 copy of the whole set


def column_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean and (population) variance in float64, two passes over row chunks (the
    same two-pass formula as numpy's var, without its float64 copy of the whole array)."""
    x = np.asarray(x).reshape(len(x), -1)
    n = len(x)
    mean = sum(x[s : s + _ROWS].astype(np.float64).sum(axis=0) for s in range(0, n, _ROWS)) / n
    var = sum((((x[s : s + _ROWS].astype(np.float64) - mean) ** 2).sum(axis=0) for s in range(0, n, _ROWS))) / n
    return mean, var


# ----------------------------------------------------------------------------- rules of thumb


def data_scale(train: np.ndarray) -> float:
    """sigma_hat: the root mean per-coordinate variance of the training set."""
    return float(math.sqrt(column_moments(train)[1].mean()))


def scott_bandwidth(n: int, d: int, sigma: float) -> float:
    return float(sigma * n ** (-1.0 / (d + 4)))


def silverman_bandwidth(n: int, d: int, sigma: float) -> float:
    return float(sigma * (4.0 / (d + 2)) ** (1.0 / (d + 4)) * n ** (-1.0 / (d + 4)))


# ----------------------------------------------------------------------------- bandwidth search


@dataclass(frozen=True)
class BandwidthSearch:
    grid: np.ndarray  # log-spaced bandwidths
    loglik: np.ndarray  # truncated L(h) on the grid
    bound: np.ndarray  # truncation bound on the grid
    h_grid_best: float
    h_opt: float  # after refinement
    loglik_opt: float
    bound_opt: float
    on_boundary: bool  # the grid maximum is its first or last point
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # refinement (h, L)


def log_grid(h_min: float, h_max: float, points: int) -> np.ndarray:
    _check_bandwidth(h_min)
    _check_bandwidth(h_max)
    if points < 3:
        raise DKGMError(f"the bandwidth grid needs at least 3 points, got {points}")
    if not h_min < h_max:
        raise DKGMError(f"the bandwidth grid is empty: grid_min ({h_min}) must be below grid_max ({h_max})")
    return np.exp(np.linspace(math.log(h_min), math.log(h_max), points))


def select_bandwidth(topk: TopK, grid: np.ndarray, *, tol: float = 1e-4, max_iter: int = 200) -> BandwidthSearch:
    """Maximise L(h) on the log-spaced grid, then golden-section search on log h between
    the best point's neighbours. `tol` is the final bracket width in log h."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 3:
        raise DKGMError("the bandwidth grid needs at least 3 points")
    evals = [cv_loglik(topk, float(h)) for h in grid]
    ll = np.array([e.loglik for e in evals])
    if not np.all(np.isfinite(ll)):
        raise DKGMError("held-out log-likelihood is not finite on the grid: check for NaN or infinite pixels")
    i = int(np.argmax(ll))
    on_boundary = i in (0, len(grid) - 1)
    lo = math.log(grid[max(i - 1, 0)])
    hi = math.log(grid[min(i + 1, len(grid) - 1)])

    def f(logh: float) -> float:
        return cv_loglik(topk, math.exp(logh)).loglik

    trace: list[tuple[float, float]] = []
    invphi = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, e = b - invphi * (b - a), a + invphi * (b - a)
    fc, fe = f(c), f(e)
    for _ in range(max_iter):
        if b - a <= tol:
            break
        if fc >= fe:
            b, e, fe = e, c, fc
            c = b - invphi * (b - a)
            fc = f(c)
            trace.append((math.exp(c), fc))
        else:
            a, c, fc = c, e, fe
            e = a + invphi * (b - a)
            fe = f(e)
            trace.append((math.exp(e), fe))
    best_logh = (a + b) / 2.0
    h_opt = math.exp(best_logh)
    best = cv_loglik(topk, h_opt)
    if best.loglik < ll[i]:  # refinement can only help; keep the grid point otherwise
        h_opt, best = float(grid[i]), evals[i]
    return BandwidthSearch(
        grid=grid,
        loglik=ll,
        bound=np.array([e.truncation_bound for e in evals]),
        h_grid_best=float(grid[i]),
        h_opt=float(h_opt),
        loglik_opt=best.loglik,
        bound_opt=best.truncation_bound,
        on_boundary=on_boundary,
        evaluations=trace,
    )


# ----------------------------------------------------------------------------- sampling


def kernel_noise(seeds: Sequence[int], dim: int, kernel: str = "gaussian", stream: str = "kde") -> torch.Tensor:
    """Unit-per-coordinate-variance kernel noise u, one row per sample seed (float32, CPU).

    gaussian:      u ~ N(0, I_d).
    epanechnikov:  u = sqrt(d+4) * r * s, s uniform on the sphere, r^2 ~ Beta(d/2, 2).
    For a Gaussian z, z/|z| is uniform on the sphere and independent of |z|^2/2 ~ Gamma(d/2),
    so one normal draw gives both the direction and the Beta numerator; the denominator adds
    a Gamma(2) = Exp + Exp. Support: |u| <= sqrt(d+4).
    """
    if kernel not in KERNELS:
        raise DKGMError(f"unknown kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    if dim < 1:
        raise DKGMError(f"dimension must be >= 1, got {dim}")
    gens = sample_generators(seeds, f"{stream}/kernel")
    rows = []
    for g in gens:
        z = torch.randn(dim, generator=g, dtype=torch.float64)
        if kernel == "gaussian":
            rows.append(z)
            continue
        u2 = torch.rand(2, generator=g, dtype=torch.float64)
        gamma2 = -torch.log1p(-u2).sum()  # Gamma(2, 1): 1 - U avoids log(0)
        sq = (z * z).sum()
        gamma_d = 0.5 * sq
        r = torch.sqrt(gamma_d / (gamma_d + gamma2))
        rows.append(math.sqrt(dim + 4) * r * z / torch.sqrt(sq))
    return torch.stack(rows).to(torch.float32)


def sample_anchors(seeds: Sequence[int], n: int, stream: str = "kde") -> torch.Tensor:
    """Uniform anchor index in [0, n) for each sample seed."""
    if n < 1:
        raise DKGMError("cannot sample anchors from an empty training set")
    gens = sample_generators(seeds, f"{stream}/anchor")
    return torch.tensor([int(torch.randint(n, (1,), generator=g).item()) for g in gens], dtype=torch.int64)


def sample_kde(
    train: torch.Tensor, h: float, seeds: Sequence[int], kernel: str = "gaussian"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one KDE sample per seed: x = train[anchor] + h * u. Returns (samples, anchors).

    Depends only on each seed, not on how seeds are batched.
    """
    h = _check_bandwidth(h)
    train = torch.as_tensor(train)
    anchors = sample_anchors(seeds, train.shape[0])
    shape = tuple(train.shape[1:])
    u = kernel_noise(seeds, int(np.prod(shape)), kernel).reshape(len(seeds), *shape)
    return train[anchors].to(torch.float32) + h * u, anchors
