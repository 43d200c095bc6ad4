"""Known answers and invariants of the stage-1 KDE: distances, held-out likelihood, bandwidth
search, kernels and per-sample seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from dkgm import kde
from dkgm.errors import DKGMError


def direct_loglik(val: np.ndarray, train: np.ndarray, h: float) -> float:
    """Textbook Gaussian KDE log-likelihood, every pair, float64."""
    v, x = val.reshape(len(val), -1).astype(np.float64), train.reshape(len(train), -1).astype(np.float64)
    d2 = ((v[:, None, :] - x[None]) ** 2).sum(-1)
    n, d = x.shape
    return float(np.mean(logsumexp(-d2 / (2 * h * h), axis=1)) - math.log(n) - 0.5 * d * math.log(2 * math.pi * h * h))


@pytest.fixture(scope="module")
def clustered():
    """Points in d=12 around 6 centres: a KDE with a clear interior optimum."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 12)) * 3
    def draw(n):
        return (centres[rng.integers(0, 6, n)] + 0.4 * rng.normal(size=(n, 12))).astype(np.float32)
    return draw(300), draw(60)


def test_topk_matches_brute_force_across_chunk_boundaries(clustered):
    train, val = clustered
    tk = kde.topk_sq_distances(val, train, 7, device="cpu", query_chunk=13, ref_chunk=29)
    d2 = ((val[:, None, :].astype(np.float64) - train[None]) ** 2).sum(-1)
    ref = np.sort(d2, axis=1)[:, :7]
    np.testing.assert_allclose(tk.sq_dists, ref, rtol=1e-6)
    np.testing.assert_array_equal(tk.indices[:, 0], np.argmin(d2, axis=1))
    assert np.all(np.diff(tk.sq_dists, axis=1) >= 0)


def test_cv_loglik_with_full_table_equals_direct_and_sklearn(clustered):
    train, val = clustered
    tk = kde.topk_sq_distances(val, train, len(train), device="cpu")
    from sklearn.neighbors import KernelDensity

    for h in (0.2, 0.5, 1.3):
        got = kde.cv_loglik(tk, h)
        assert got.truncation_bound == 0.0  # nothing left out
        assert got.loglik == pytest.approx(direct_loglik(val, train, h), rel=1e-9, abs=1e-6)
    for h in (0.5, 1.3):  # (at h=0.2 far points underflow in sklearn's tree traversal, off by 0.07)
        skl = KernelDensity(bandwidth=h, kernel="gaussian").fit(train.astype(np.float64))
        assert kde.cv_loglik(tk, h).loglik == pytest.approx(skl.score_samples(val.astype(np.float64)).mean(), rel=1e-7)


def test_exact_pass_equals_direct(clustered):
    train, val = clustered
    hs = [0.15, 0.6, 4.0]
    got = kde.exact_loglik(val, train, hs, device="cpu", query_chunk=17, ref_chunk=50)
    for g, h in zip(got, hs):
        assert g == pytest.approx(direct_loglik(val, train, h), rel=1e-10, abs=1e-8)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_truncation_error_within_reported_bound(clustered, k):
    train, val = clustered
    tk = kde.topk_sq_distances(val, train, k, device="cpu")
    hs = np.exp(np.linspace(math.log(0.05), math.log(20.0), 25))
    exact = kde.exact_loglik(val, train, list(hs), device="cpu")
    for h, ex in zip(hs, exact):
        got = kde.cv_loglik(tk, float(h))
        slack = 1e-6 * abs(ex)  # float32 distance rounding
        assert got.loglik <= ex + slack, f"truncated value must be a lower bound (h={h})"
        assert ex <= got.loglik + got.truncation_bound + slack, f"bound too small at h={h}"


def test_truncation_bound_shrinks_with_k(clustered):
    train, val = clustered
    bounds = [kde.cv_loglik(kde.topk_sq_distances(val, train, k, device="cpu"), 0.4).truncation_bound for k in (1, 5, 40, 150)]
    assert all(a > b for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] < 1e-6  # 150 of 300 points: the rest (other clusters) are negligible at h=0.4


def test_golden_refinement_finds_the_maximum_of_a_fine_grid(clustered):
    train, val = clustered
    tk = kde.topk_sq_distances(val, train, len(train), device="cpu")
    search = kde.select_bandwidth(tk, kde.log_grid(0.01, 100.0, 15), tol=1e-6)
    fine = np.exp(np.linspace(math.log(0.01), math.log(100.0), 20001))
    lls = np.array([kde.cv_loglik(tk, float(h)).loglik for h in fine])
    h_fine = fine[int(np.argmax(lls))]
    assert not search.on_boundary
    assert search.h_opt == pytest.approx(h_fine, rel=2e-3)
    assert search.loglik_opt >= lls.max() - 1e-6


def test_boundary_optimum_is_flagged(clustered):
    train, val = clustered
    tk = kde.topk_sq_distances(val, train, 50, device="cpu")
    assert kde.select_bandwidth(tk, kde.log_grid(5.0, 50.0, 9)).on_boundary  # grid entirely above
    assert kde.select_bandwidth(tk, kde.log_grid(0.001, 0.01, 9)).on_boundary  # grid entirely below


def test_rules_of_thumb_known_values():
    # d = 1: Silverman's rule is (4/3)^(1/5) sigma n^(-1/5) = 1.0592 sigma n^(-1/5)
    assert kde.silverman_bandwidth(100, 1, 2.0) == pytest.approx(1.0592 * 2.0 * 100 ** (-0.2), rel=1e-4)
    assert kde.scott_bandwidth(100, 1, 2.0) == pytest.approx(2.0 * 100 ** (-0.2))
    # high d: both tend to sigma (this is why they oversmooth images)
    assert kde.scott_bandwidth(4000, 1024, 0.45) == pytest.approx(0.45, rel=0.01)


def test_diag_gaussian_loglik_matches_scipy():
    rng = np.random.default_rng(1)
    train, val = rng.normal(size=(200, 5)) * [1, 2, 3, 0.5, 1], rng.normal(size=(30, 5))
    got = kde.diag_gaussian_loglik(train, val, extra_var=0.1)
    ref = stats.multivariate_normal(train.mean(0), np.diag(train.var(0) + 0.1)).logpdf(val).mean()
    assert got == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("kernel", kde.KERNELS)
@pytest.mark.parametrize("dim", [1, 3, 64])
def test_kernel_noise_has_unit_variance_per_coordinate(kernel, dim):
    u = kde.kernel_noise(range(20000 // dim * 4), dim, kernel).double()
    n = u.shape[0]
    var = (u * u).mean(0)  # zero-mean by symmetry
    # per coordinate: variance 1 within 5 standard errors (the 4th moment is at most 3 for both kernels)
    tol = 5 * math.sqrt(2.0 / n) * 1.3
    assert torch.all((var - 1).abs() < tol), f"per-coordinate variance off: {var.min():.3f}..{var.max():.3f}"
    assert abs(u.mean().item()) < 5 / math.sqrt(n * dim) * 1.5
    if kernel == "epanechnikov":
        radius = torch.linalg.vector_norm(u, dim=1)
        assert radius.max().item() <= math.sqrt(dim + 4) + 1e-5  # compact support


def test_epanechnikov_radius_follows_beta():
    d = 9
    u = kde.kernel_noise(range(3000), d, "epanechnikov").double()
    r2 = (u * u).sum(1).numpy() / (d + 4)
    assert stats.kstest(r2, stats.beta(d / 2, 2).cdf).pvalue > 1e-3


def test_samples_are_batch_size_invariant_and_seed_dependent():
    train = torch.randn(50, 1, 4, 4)
    seeds = list(range(1000, 1037))
    whole, a_whole = kde.sample_kde(train, 0.3, seeds, "epanechnikov")
    parts = [kde.sample_kde(train, 0.3, seeds[s : s + 5], "epanechnikov") for s in range(0, len(seeds), 5)]
    assert torch.equal(whole, torch.cat([p[0] for p in parts]))
    assert torch.equal(a_whole, torch.cat([p[1] for p in parts]))
    again, _ = kde.sample_kde(train, 0.3, seeds[::-1], "epanechnikov")
    assert torch.equal(again.flip(0), whole)  # order does not matter either
    other, _ = kde.sample_kde(train, 0.3, [s + 1 for s in seeds], "epanechnikov")
    assert not torch.equal(other, whole)


def test_sample_is_anchor_plus_scaled_noise():
    train = torch.randn(30, 6)
    seeds = list(range(200))
    x, anchors = kde.sample_kde(train, 0.25, seeds)
    u = kde.kernel_noise(seeds, 6)
    torch.testing.assert_close(x, train[anchors] + 0.25 * u)
    assert anchors.min() >= 0 and anchors.max() < 30
    assert len(torch.unique(anchors)) > 25  # uniform over the training set


@pytest.mark.parametrize("h", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_bandwidth_is_rejected(h):
    tk = kde.TopK(np.ones((2, 2)), np.zeros((2, 2), np.int64), 4, 3)
    with pytest.raises(DKGMError, match="bandwidth must be a positive"):
        kde.cv_loglik(tk, h)
    with pytest.raises(DKGMError, match="bandwidth must be a positive"):
        kde.sample_kde(torch.zeros(3, 2), h, [0])


def test_empty_grid_and_unknown_kernel_are_rejected():
    with pytest.raises(DKGMError, match="grid is empty"):
        kde.log_grid(1.0, 1.0, 10)
    with pytest.raises(DKGMError, match="at least 3"):
        kde.log_grid(0.1, 1.0, 2)
    with pytest.raises(DKGMError, match="unknown kernel"):
        kde.kernel_noise([0], 4, "box")
