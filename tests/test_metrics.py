"""Known answers for the sample-quality statistics (dkgm.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dkgm import metrics as M
from dkgm.errors import DKGMError


def test_fid_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert M.fid(f, f) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_form():
    # diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # invariant under a common rotation (the matrices then no longer commute with the axes)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    rotated = M.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_fid_between_gaussian_samples_approaches_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 4)) * [1, 2, 1, 1]
    y = rng.normal(size=(20000, 4)) * [1, 1, 3, 1] + [0.5, 0, 0, 0]
    expected = 0.25 + (2 - 1) ** 2 + (1 - 3) ** 2
    assert M.fid(x, y) == pytest.approx(expected, rel=0.03)


def test_inception_score_known_answers():
    uniform = np.full((100, 10), 0.1)
    assert M.inception_score(uniform, splits=10)[0] == pytest.approx(1.0)
    confident = np.eye(7)[np.arange(700) % 7]  # certain predictions spread evenly over 7 classes
    mean, std = M.inception_score(confident, splits=10)
    assert mean == pytest.approx(7.0) and std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(DKGMError, match="probability vectors"):
        M.inception_score(np.ones((20, 3)), splits=2)


def test_kid_is_unbiased():
    rng = np.random.default_rng(3)
    # the same law on both sides: the estimator averages to zero (a biased one would be > 0)
    vals = [M.kid(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)), num_subsets=1) for _ in range(300)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / math.sqrt(len(vals))
    # matches the textbook unbiased MMD^2 on a small case (every pair written out)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(6, 3)) + 1

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(6)) / 30
    assert M._mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    assert M.kid(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 2, num_subsets=5) > 0.5


def test_precision_recall():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(400, 5))
    assert M.precision_recall(real, real) == (1.0, 1.0)
    # mode collapse: 400 samples packed around 20 real points: precise, little coverage
    collapsed = np.repeat(real[:20], 20, axis=0) + 1e-3 * rng.normal(size=(400, 5))
    p, r = M.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.3
    far = real + 100.0
    assert M.precision_recall(real, far) == (0.0, 0.0)


def test_memorization_statistics():
    rng = np.random.default_rng(5)
    train = rng.normal(size=(300, 20))
    copies = train[:50] + 1e-3 * rng.normal(size=(50, 20))
    d1, d2, idx = M.nearest_two(copies, train)
    assert M.copy_fraction(d1, d2) == 1.0 and (idx == np.arange(50)).all()
    fresh = rng.normal(size=(50, 20))
    assert M.copy_fraction(*M.nearest_two(fresh, train)[:2]) == 0.0


def test_laplacian_energy_orders_sharpness():
    rng = np.random.default_rng(6)
    img = rng.uniform(-1, 1, size=(8, 1, 16, 16)).astype(np.float32)
    blurred = (img + np.roll(img, 1, 2) + np.roll(img, -1, 2) + np.roll(img, 1, 3) + np.roll(img, -1, 3)) / 5
    assert M.laplacian_energy(blurred) < 0.5 * M.laplacian_energy(img)
    assert M.laplacian_energy(np.zeros((2, 3, 8, 8))) == 0.0


def test_bad_features_are_one_clear_error():
    with pytest.raises(DKGMError, match="at least 2 rows"):
        M.fid(np.ones((1, 4)), np.ones((5, 4)))
    with pytest.raises(DKGMError, match="NaN"):
        M.feature_stats(np.array([[np.nan, 1.0], [1.0, 2.0]]))


def test_ball_test_by_gemm_equals_the_exact_pairwise_test():
    """inside_any_ball decides from a float32 GEMM and re-checks borderline pairs exactly: the answer
    must equal the exact float64 test, for copies (distance 0), for queries placed exactly on a
    ball's boundary, and whatever the chunking."""
    rng = np.random.default_rng(3)
    for d in (2, 64, 1024):
        centres = rng.standard_normal((300, d)) + 5.0  # off-centre: large norms, the GEMM's hard case
        queries = rng.standard_normal((250, d)) * 1.1 + 5.0
        queries[:20] = centres[:20]  # copies
        queries[20:40] = centres[20:40] + 1e-3 * rng.standard_normal((20, d))  # near-copies, on the boundary below
        exact_d = np.sqrt(((queries[:, None, :] - centres[None]) ** 2).sum(-1))
        radii = exact_d.min(axis=0) * (1 - 1e-6)  # every ball just misses its nearest query (a copy's: radius 0)
        radii[20:40] = exact_d[np.arange(20, 40), np.arange(20, 40)]  # twenty queries exactly on a boundary
        want = (exact_d <= radii[None]).any(axis=1)
        for qc, rc in ((1024, 16384), (7, 50)):
            got = M.inside_any_ball(queries, centres, radii, query_chunk=qc, ref_chunk=rc)
            np.testing.assert_array_equal(got, want)
        assert want[:40].all() and not want.all()  # copies and boundary points inside; the test is not vacuous


def test_mmd_rbf_in_chunks_equals_the_full_kernel_matrix():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((120, 2)), rng.standard_normal((90, 2)) + 0.4
    bw = 0.8

    def k(a, b):
        return np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * bw**2))

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    full = ((kxx.sum() - np.trace(kxx)) / (120 * 119) + (kyy.sum() - np.trace(kyy)) / (90 * 89) - 2 * kxy.mean())
    assert M.mmd_rbf(x, y, bandwidth=bw) == pytest.approx(full, rel=1e-12)
    assert M._rbf_sum(x, y, bw, budget=7) == pytest.approx(kxy.sum(), rel=1e-12)  # tiny chunks, same sum


def test_fid_with_fewer_samples_than_dimensions_matches_clean_fid():
    """The n x n path (the one the stages use: 500 samples, 2048 features) against clean-fid's own
    frechet_distance on the full d x d statistics."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    rng = np.random.default_rng(11)
    d = 64
    ref = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) / 8
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    for n in (10, 40, 63):  # n - 1 < d: the small path
        f = rng.normal(size=(n, d)) * 1.3 + 0.2
        want = cleanfid_frechet(f.mean(axis=0), np.cov(f, rowvar=False), mu, sigma)
        assert M.fid_to_reference(f, mu, sigma) == pytest.approx(want, rel=1e-6), n


def test_copy_fraction_known_answer_at_the_threshold():
    """A copy is d1/d2 < 1/3 (DESIGN 2.6; Meehan et al.): the ratios straddle the threshold."""
    ratios = np.array([0.10, 0.30, 0.33, 0.34, 0.36, 0.39, 0.45, 0.80])
    d2 = np.full(len(ratios), 2.0)
    assert M.copy_fraction(ratios * d2, d2) == 3 / 8
    assert M.copy_fraction(ratios * d2, d2, threshold=0.4) == 6 / 8


def test_the_copy_threshold_is_one_third_and_lives_in_one_place():
    """evaluate.copy_ratio is the one copy threshold: calibrate reads it (and the gate's rule) instead
    of keeping its own copy that could drift."""
    import yaml

    from stages.calibrate import CalibrateParams
    from stages.scoring import EvaluateParams
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["evaluate"]["copy_ratio"] == pytest.approx(1 / 3) and EvaluateParams().copy_ratio == pytest.approx(1 / 3)
    assert "copy_ratio" not in raw["calibrate"] and "copy_ratio" not in CalibrateParams.model_fields


def test_fid_bootstrap_resamples_are_the_fids_of_the_resampled_rows():
    """Each bootstrap FID (two shared Gram matrices, one n x n eigendecomposition) equals the FID
    computed from scratch on the rows that resample drew, with n below and above the dimension."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(400, 24))
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    for n in (12, 60):
        f = rng.normal(size=(n, 24)) * 1.4 + 0.3
        boot = M.fid_bootstrap(f, mu, sigma, n_boot=6, seed=9)
        draws = np.random.default_rng(9)
        for b in boot:
            i = draws.integers(0, n, n)
            assert b == pytest.approx(M.frechet_distance(f[i].mean(0), np.cov(f[i], rowvar=False), mu, sigma), rel=1e-7)
    assert np.array_equal(M.fid_bootstrap(f, mu, sigma, 4, seed=1), M.fid_bootstrap(f, mu, sigma, 4, seed=1))
    with pytest.raises(DKGMError, match="n_boot"):
        M.fid_bootstrap(f, mu, sigma, 0)


def test_fid_bootstrap_spread_shrinks_like_one_over_root_n():
    """The spread measures which samples were drawn: four times the samples, about half the spread."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5000, 8))
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    se = [np.std(M.fid_bootstrap(rng.normal(size=(n, 8)) + 0.5, mu, sigma, 300, seed=2)) for n in (200, 800)]
    assert 0.35 < se[1] / se[0] < 0.7
