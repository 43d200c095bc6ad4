"""Data-copying statistics: known answers against scipy and hand computations, and the three
regimes the tests must tell apart (fresh data, copies, samples off the data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dkgm import novelty as N
from dkgm.errors import DKGMError


def _gauss(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


def _nn(q: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sqrt(((q[:, None] - t[None]) ** 2).sum(-1)).min(1)


def test_ranks_and_u_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 7, 40).astype(float), rng.integers(2, 9, 55).astype(float)  # many ties
    np.testing.assert_array_equal(N.average_ranks(np.r_[a, b]), stats.rankdata(np.r_[a, b]))
    assert N.mann_whitney_u(a, b) == stats.mannwhitneyu(a, b).statistic


def test_zu_matches_the_reference_formula():
    rng = np.random.default_rng(1)
    g, h = rng.random(30), rng.random(45)
    u = stats.mannwhitneyu(g, h, alternative="less").statistic
    want = (u - (30 * 45 / 2 - 0.5)) / math.sqrt(30 * 45 * (30 + 45 + 1) / 12)
    assert N.z_u(g, h) == pytest.approx(want, rel=1e-12)


def test_zu_regimes_fresh_copies_and_far():
    train, held1, held2 = _gauss(2000, 16, 0), _gauss(400, 16, 1), _gauss(400, 16, 2)
    base = _nn(held2, train)
    fresh = [N.z_u(_nn(h, train), base) for h in (held1, _gauss(400, 16, 3), _gauss(400, 16, 4))]
    assert all(abs(z) < 3 for z in fresh), fresh
    copies = train[:400]  # training points returned as samples: L = 0
    assert N.z_u(_nn(copies, train), base) < -20
    near_copies = train[:400] + 0.05 * _gauss(400, 16, 5)  # a training point plus a little noise
    assert N.z_u(_nn(near_copies, train), base) < -20
    far = held1 + 3.0  # off the data
    assert N.z_u(_nn(far, train), base) > 20


def test_effect_carries_a_threshold_across_sample_sizes():
    z = -3.0
    e = N.z_u_effect(z, 300, 500)
    assert N.z_u_at(e, 300, 500) == pytest.approx(z)
    assert N.z_u_at(e, 500, 500) < z  # the same effect is more significant with more samples
    assert N.z_u_at(e, 500, 500) == pytest.approx(z * math.sqrt(500 * 500 / 1001) / math.sqrt(300 * 500 / 801))


def test_authenticity_known_answers():
    train = _gauss(500, 8, 0)
    own = np.sort(np.sqrt(((train[:, None] - train[None]) ** 2).sum(-1)), axis=1)[:, 1]
    d, idx = np.zeros(100), np.arange(100)
    assert N.authenticity(d, idx, own) == 0.0  # copies are never authentic
    assert N.authenticity(own[:100] * 2, idx, own) == 1.0
    assert N.authenticity(np.r_[own[:50] * 0.5, own[50:100] * 1.5], idx, own) == 0.5
    # the threshold is the training point's own nearest-neighbour distance, exactly: a sample 5% inside
    # it is not authentic, one 5% outside is, and one at the same distance is not (strictly farther)
    assert N.authenticity(own[:100] * 0.95, idx, own) == 0.0
    assert N.authenticity(own[:100] * 1.05, idx, own) == 1.0
    assert N.authenticity(own[:100].copy(), idx, own) == 0.0
    # each sample is read against the training point it is nearest to, not another one
    assert N.authenticity(own[:100] * 1.05, idx[::-1], own) == pytest.approx(np.mean(own[:100] * 1.05 > own[:100][::-1]))
    with pytest.raises(DKGMError, match="100 distances but 3"):
        N.authenticity(d, idx[:3], own)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    pts = np.concatenate([c + 0.3 * rng.standard_normal((100, 2)) for c in centres])
    found = N.kmeans(pts, 3, seed=1)
    assert sorted(map(tuple, np.round(found).astype(int).tolist())) == [(0, 0), (0, 10), (10, 0)]
    np.testing.assert_array_equal(found, N.kmeans(pts, 3, seed=1))
    labels = N.assign_cells(pts, found)
    assert all(len(set(labels[i * 100 : (i + 1) * 100])) == 1 for i in range(3))


def test_ct_equals_a_direct_cellwise_computation():
    rng = np.random.default_rng(2)
    # two cells far apart on the x axis; the generated set copies in cell 0 only
    def cloud(x0, n):
        return np.c_[x0 + rng.standard_normal(n), rng.standard_normal(n)]

    train, held = np.r_[cloud(0, 300), cloud(50, 300)], np.r_[cloud(0, 60), cloud(50, 140)]
    gen = np.r_[train[:40] + 0.01, cloud(50, 80), cloud(0, 2)[:1]]
    centres = np.array([[0.0, 0.0], [50.0, 0.0]])
    res = N.c_t(train, held, gen, centres, tau=0.0)
    cells = [lambda a: a[:, 0] < 25, lambda a: a[:, 0] >= 25]
    z = [N.z_u(_nn(gen[c(gen)], train[c(train)]), _nn(held[c(held)], train[c(train)])) for c in cells]
    w = np.array([60, 140]) / 200
    assert res.c_t == pytest.approx((w * z).sum() / w.sum()) and res.kept == 2
    np.testing.assert_allclose(res.z_u, z)
    assert z[0] < -5 < 3 > abs(z[1])  # copying in cell 0 only, invisible in cell 1
    # tau leaves out the cells with too few generated samples: here none is below 1/3 of 121
    only = N.c_t(train, held, gen, centres, tau=0.34)
    assert only.kept == 1 and only.c_t == pytest.approx(z[1])
    with pytest.raises(DKGMError, match="no cell holds more than tau"):
        N.c_t(train, held, gen, centres, tau=0.99)
