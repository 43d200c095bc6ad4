"""Sample-quality statistics on feature arrays: FID, KID, IS, precision/recall, memorization,
sharpness. Pure numpy/torch: the feature network and its weights are the evaluation stage's
business (see DESIGN 2.5); these functions take the features (or images) it produces.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dkgm.errors import DKGMError


def _features(x: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(x, dtype=np.float64)
    if f.ndim != 2:
        raise DKGMError(f"{name}: expected a (N, D) feature array, got shape {f.shape}")
    if len(f) < min_rows:
        raise DKGMError(f"{name}: needs at least {min_rows} rows, got {len(f)}")
    if not np.all(np.isfinite(f)):
        raise DKGMError(f"{name}: features contain NaN or infinite values")
    return f


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a feature set, float64."""
    f = _features(features, "features")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def sqrt_psd(m: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     sqrt_sigma2: np.ndarray | None = None) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S2^1/2 S1 S2^1/2)^1/2): the Frechet distance of two
    Gaussians (FID on Inception features). Symmetric eigendecompositions instead of a general
    sqrtm: no complex round-off to discard. Pass `sqrt_sigma2` (from sqrt_psd) to reuse the
    reference's square root across many comparisons (one 2048 x 2048 eigh saved per call)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise DKGMError(f"frechet_distance: mismatched shapes {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    r2 = sqrt_psd(s2) if sqrt_sigma2 is None else sqrt_sigma2
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r2 @ s1 @ r2), 0.0, None)).sum()
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross))


def fid_to_reference(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray,
                     sqrt_sigma: np.ndarray | None = None) -> float:
    """FID of a feature set against reference statistics (mu, sigma). With fewer samples than
    feature dimensions (n - 1 < d: 500 samples, 2048 features) the sample covariance is
    S1 = A^T A with A = centred features / sqrt(n - 1) (n x d), and the non-zero eigenvalues of
    sigma^1/2 S1 sigma^1/2 are those of the n x n matrix A sigma A^T: no d x d square root needed.
    Otherwise this is frechet_distance on the sample's statistics."""
    f = _features(features, "features")
    n, d = f.shape
    mu1 = f.mean(axis=0)
    if n - 1 >= d:
        return frechet_distance(mu1, np.cov(f, rowvar=False), mu, sigma, sqrt_sigma)
    mu2, s2 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu2.shape != (d,) or s2.shape != (d, d):
        raise DKGMError(f"fid_to_reference: features have {d} dimensions, reference {mu2.shape}, {s2.shape}")
    a = (f - mu1) / np.sqrt(n - 1)
    small = a @ s2 @ a.T  # rows of a are samples: S1 = a^T a, and eig(sigma^1/2 a^T a sigma^1/2) = eig(a sigma a^T)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0.0, None)).sum()
    trace1 = float((a * a).sum())  # Tr(S1)
    return float(max(0.0, ((mu1 - mu2) ** 2).sum() + trace1 + np.trace(s2) - 2.0 * cross))


def fid_bootstrap(features: np.ndarray, mu: np.ndarray, sigma: np.ndarray, n_boot: int = 200,
                  seed: int = 0) -> np.ndarray:
    """FIDs of `n_boot` bootstrap resamples of the samples (rows drawn with replacement, the
    reference fixed): the spread of the FID that comes from which n samples were drawn.

    All resamples share two n x n Gram matrices, K = f f^T and G = f sigma f^T (computed once);
    a resample with row indices i and centring C = I - 11^T/n has Tr(S1) = Tr(C K[i,i] C)/(n-1)
    and the cross term's eigenvalues from C G[i,i] C/(n-1), as in fid_to_reference. So a resample
    costs one n x n eigendecomposition, whatever the feature dimension. Resamples hold duplicate
    rows, so their FIDs sit above the point estimate: read the spread (std), not the centre."""
    f = _features(features, "features")
    n, d = f.shape
    mu2, s2 = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu2.shape != (d,) or s2.shape != (d, d):
        raise DKGMError(f"fid_bootstrap: features have {d} dimensions, reference {mu2.shape}, {s2.shape}")
    if n_boot < 1:
        raise DKGMError(f"fid_bootstrap: n_boot must be >= 1, got {n_boot}")
    shift = f.mean(axis=0)  # Gram matrices of shifted rows: centring removes the shift again, and it keeps them small
    g = f - shift
    gram, cross_gram = g @ g.T, g @ s2 @ g.T
    rng = np.random.default_rng(seed)
    tr2 = float(np.trace(s2))
    out = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, n, n)
        k, c = gram[np.ix_(i, i)], cross_gram[np.ix_(i, i)]
        k = k - k.mean(0) - k.mean(1)[:, None] + k.mean()  # C K C
        c = c - c.mean(0) - c.mean(1)[:, None] + c.mean()
        cross = np.sqrt(np.clip(np.linalg.eigvalsh((c + c.T) / (2 * (n - 1))), 0.0, None)).sum()
        mean_b = shift + g[i].mean(axis=0)
        out[b] = max(0.0, ((mean_b - mu2) ** 2).sum() + np.trace(k) / (n - 1) + tr2 - 2.0 * cross)
    return out


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kid(features1: np.ndarray, features2: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> float:
    """Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial kernel
    (x.y/d + 1)^3, averaged over random subsets (as clean-fid and Binkowski et al. 2018)."""
    x, y = _features(features1, "features1"), _features(features2, "features2")
    m = min(len(x), len(y), max_subset_size)
    if m < 2:
        raise DKGMError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    vals = [_mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
            for _ in range(num_subsets)]
    return float(np.mean(vals))


def inception_score(probs: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), from class probabilities."""
    p = _features(probs, "class probabilities", min_rows=splits)
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise DKGMError("inception_score: rows must be probability vectors (non-negative, summing to 1)")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = np.where(part > 0, part * (np.log(np.clip(part, 1e-300, None)) - np.log(np.clip(py, 1e-300, None))), 0.0)
        scores.append(math.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radius(f: np.ndarray, k: int, device: str = "cpu") -> np.ndarray:
    from dkgm.kde import topk_sq_distances

    tk = topk_sq_distances(f, f, k + 1, device=device)  # the first neighbour is the point itself
    return np.sqrt(tk.sq_dists[:, k])


def inside_any_ball(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray, *, device: str = "cpu",
                    query_chunk: int = 1024, ref_chunk: int = 16384) -> np.ndarray:
    """Whether each query lies in some ball |q - c_j| <= r_j: one chunked float32 GEMM pass on
    `device` (the distance blocks of dkgm.kde). A pair whose GEMM distance is within the float32
    cancellation bound of its radius is decided again from the exact difference in float64, so
    the answer equals an exact pairwise test (a copy, at distance 0, is inside any ball)."""
    from dkgm.devices import resolve_device
    from dkgm.kde import DistanceOperands, sq_distance_blocks

    q_np = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    c_np = np.asarray(centres, dtype=np.float64).reshape(len(centres), -1)
    dev = resolve_device(device)
    ops = DistanceOperands.build(torch.from_numpy(q_np), torch.from_numpy(c_np), dev, torch.float32)
    r2 = torch.as_tensor(np.asarray(radii, dtype=np.float64) ** 2, dtype=torch.float32, device=dev)
    ref_norm = ops.reference[:, ops.dim]  # |c - centre|^2
    # float32 products of centred vectors: error below ~d * 2^-23 * (|q|^2 + |c|^2); 8x headroom
    eps = 8.0 * ops.dim * torch.finfo(torch.float32).eps
    inside = torch.zeros(len(q_np), dtype=torch.bool, device=dev)
    unsure: list[tuple[torch.Tensor, torch.Tensor]] = []
    for qs, rs, block in sq_distance_blocks(ops, query_chunk=query_chunk, ref_chunk=ref_chunk):
        qn = ops.query_sq_norm[qs : qs + block.shape[0], None]
        gap = block + qn - r2[None, rs : rs + block.shape[1]]  # ~ |q - c|^2 - r^2
        tol = eps * (qn + ref_norm[None, rs : rs + block.shape[1]]) + 1e-30
        rows = slice(qs, qs + block.shape[0])
        inside[rows] |= (gap <= -tol).any(dim=1)
        a, b = torch.nonzero(gap.abs() < tol, as_tuple=True)
        if len(a):
            unsure.append((a + qs, b + rs))
    out = inside.cpu().numpy()
    for a, b in unsure:  # the borderline pairs, exactly
        a_np, b_np = a.cpu().numpy(), b.cpu().numpy()
        keep = ~out[a_np]
        a_np, b_np = a_np[keep], b_np[keep]
        if len(a_np):
            dist = np.sqrt(((q_np[a_np] - c_np[b_np]) ** 2).sum(axis=1))  # compared as distances, like the radii
            hit = dist <= np.asarray(radii, dtype=np.float64)[b_np]
            out[a_np[hit]] = True
    return out


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
    generated points inside some real point's k-NN ball, recall the converse. Every pass is a
    chunked GEMM on `device`: memory O(chunk x n), not O(n^2)."""
    r, f = _features(real, "real features", k + 1), _features(fake, "generated features", k + 1)
    precision = inside_any_ball(f, r, _kth_neighbour_radius(r, k, device), device=device).mean()
    recall = inside_any_ball(r, f, _kth_neighbour_radius(f, k, device), device=device).mean()
    return float(precision), float(recall)


def nearest_two(queries: np.ndarray, reference: np.ndarray, device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distances to the nearest and second-nearest reference rows, and the nearest row's index:
    one chunked GEMM pass on `device`, the two selected distances recomputed exactly."""
    from dkgm.kde import topk_sq_distances

    tk = topk_sq_distances(np.asarray(queries).reshape(len(queries), -1), np.asarray(reference).reshape(len(reference), -1),
                           2, device=device)
    d = np.sqrt(tk.sq_dists)
    return d[:, 0], d[:, 1], tk.indices[:, 0]


def copy_fraction(d1: np.ndarray, d2: np.ndarray, threshold: float = 1 / 3) -> float:
    """Fraction of samples much closer to one training item than to any other (d1/d2 < threshold)."""
    return float(np.mean(d1 / np.maximum(d2, 1e-12) < threshold))


def laplacian_energy(images: np.ndarray) -> float:
    """Mean squared response of the 4-neighbour Laplacian: high-frequency energy per pixel.
    Oversmoothed images score below real ones; noisy images above."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim != 4:
        raise DKGMError(f"laplacian_energy expects (N, C, H, W) images, got shape {tuple(x.shape)}")
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).expand(x.shape[1], 1, 3, 3)
    lap = torch.nn.functional.conv2d(x, kernel.contiguous(), groups=x.shape[1])
    return float((lap**2).mean())


# ----------------------------------------------------------------------------- point data


def median_distance(points: np.ndarray, max_points: int = 2000, seed: int = 0) -> float:
    """Median pairwise Euclidean distance (the kernel median heuristic), over a seeded subset of
    at most max_points rows (the median of all pairs does not depend on their order)."""
    p = _features(points, "points")
    if len(p) > max_points:
        p = p[np.random.default_rng(seed).choice(len(p), max_points, replace=False)]
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    return float(np.sqrt(np.median(d2[np.triu_indices(len(p), 1)])))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 with the Gaussian kernel exp(-|a-b|^2 / (2 bw^2)); bw defaults to the
    median pairwise distance of the pooled sample (the median heuristic)."""
    a, b = _features(x, "x"), _features(y, "y")
    if bandwidth is None:
        bandwidth = median_distance(np.concatenate([a, b]))
    if not bandwidth > 0:
        raise DKGMError("mmd_rbf: the kernel bandwidth must be positive (are all points identical?)")

    m, n = len(a), len(b)
    sxx, syy, sxy = (_rbf_sum(p, q, bandwidth) for p, q in ((a, a), (b, b), (a, b)))
    # the diagonals of kxx and kyy are exp(0) = 1: m and n of the sums
    return float((sxx - m) / (m * (m - 1)) + (syy - n) / (n * (n - 1)) - 2 * sxy / (m * n))


def _rbf_sum(p: np.ndarray, q: np.ndarray, bandwidth: float, budget: int = 1 << 22) -> float:
    """sum_ij exp(-|p_i - q_j|^2 / (2 bw^2)) in row chunks of at most `budget` differences
    (float64 differences: exact zeros on the diagonal; memory O(budget), not O(n m d))."""
    rows = max(1, budget // max(1, len(q) * p.shape[1]))
    total = 0.0
    for s in range(0, len(p), rows):
        d2 = ((p[s : s + rows, None, :] - q[None]) ** 2).sum(-1)
        total += float(np.exp(-d2 / (2 * bandwidth**2)).sum())
    return total


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_projections: int = 256, seed: int = 0,
                       quantiles: int = 512) -> float:
    """Sliced 1-Wasserstein distance: the mean over random unit directions of the 1-D W1 between
    the projections, from matched quantiles (so the two sets may differ in size)."""
    a, b = _features(x, "x"), _features(y, "y")
    if a.shape[1] != b.shape[1]:
        raise DKGMError(f"sliced_wasserstein: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((a.shape[1], n_projections))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    q = (np.arange(quantiles) + 0.5) / quantiles
    pa, pb = np.quantile(a @ dirs, q, axis=0), np.quantile(b @ dirs, q, axis=0)
    return float(np.abs(pa - pb).mean())
