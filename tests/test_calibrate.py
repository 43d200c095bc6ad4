"""The operating point: the probe's candidates differ only in (s, eta), the rule keeps what the
evaluation gate would pass, the choice is the best fidelity among them, and no passing candidate
stops the run at gate calibrate with the key to widen."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dkgm import kde
from dkgm import operating_point as op
from dkgm.errors import DKGMError
from stages import artifacts, calibrate, gates
from stages.gates import NO_GO
from tests.conftest import run_stages, write_params



def test_probe_inputs_are_what_sample_kde_draws_for_the_same_seeds():
    train = np.random.default_rng(0).standard_normal((50, 1, 4, 4)).astype(np.float32)
    seeds = np.arange(7) + 123
    anchors, unit = op.probe_inputs(train, seeds)
    for scale in (1.0, 2.5):
        x, _ = kde.sample_kde(torch.from_numpy(train), scale * 0.3, seeds.tolist())
        np.testing.assert_allclose(anchors + scale * 0.3 * unit, x.numpy(), atol=1e-6)


def test_the_rule_names_each_failed_condition():
    rule = op.NoveltyRule()  # the evaluation gate's defaults: Z_U >= -3, + margin 2

    class Ref:
        floor_copy, floor_authenticity = 0.0, 0.6

    good = {"zu_pixel_at_eval": -0.5, "copy_fraction": 0.0, "authenticity": 0.55}
    assert rule.passes(good, Ref) == (True, [])
    ok, why = rule.passes({"zu_pixel_at_eval": -1.5, "copy_fraction": 0.02, "authenticity": 0.4}, Ref)
    assert not ok and len(why) == 3 and why[0].startswith("Z_U -1.50 < -1")  # min_zu -3 + margin 2
    assert rule.passes({**good, "zu_pixel_at_eval": float("nan")}, Ref)[0] is False


@pytest.mark.parametrize("threshold", [0.7, 3.2, 5.99, 6.0, 7.5, 100.0])
def test_the_search_finds_the_passing_scale_nearest_the_threshold(threshold):
    """Known answer: novelty that passes from `threshold` on. After the grid the bisection narrows the
    bracket between the last failing and the first passing grid scale to 1/2^k of the grid step, and the
    nearest passing scale lies within that of the threshold, never below it."""
    seen = []

    def evaluate(s):
        seen.append(s)
        return {"passed": s >= threshold}

    rows = op.search_scale(evaluate, [8.0, 1.0, 2.0, 4.0, 6.0, 2.0], bisect_steps=4)
    assert [r["scale"] for r in rows[:5]] == [1.0, 2.0, 4.0, 6.0, 8.0]  # the grid in order, duplicates once
    best = op.nearest_passing(rows)
    if threshold > 8.0:
        assert best is None and len(rows) == 5  # nothing passes: nothing to bisect
    elif threshold <= 1.0:
        assert best["scale"] == 1.0 and len(rows) == 5  # the smallest scale passes: nothing to bisect
    else:
        grid = [1.0, 2.0, 4.0, 6.0, 8.0]
        first = next(g for g in grid if g >= threshold)
        step = first - grid[grid.index(first) - 1]
        assert len(rows) == 9 and [r["search"] for r in rows[5:]] == ["bisection"] * 4
        assert threshold <= best["scale"] <= threshold + step / 2**4 + 1e-12
    assert seen == [r["scale"] for r in rows]  # one evaluation per row, no hidden ones


def test_calibrate_stage_grid_choice_and_outputs(tiny_copy):
    # the network's range follows the grid it was trained for ([1, 2]: up to 1.5 x 2 x h); a scale
    # added later (100 x h) lies beyond it until train_debiaser re-runs: recorded, never refined
    project = tiny_copy
    snap = torch.load(project / artifacts.DEBIASER_SNAPSHOT, weights_only=True)
    assert snap["sigma_max"] == pytest.approx(1.5 * 2.0 * snap["h"])
    write_params(project, {"calibrate": {"scales": [1.0, 2.0, 100.0]}})
    run_stages(project, "calibrate")
    table = pd.read_parquet(project / calibrate.CANDIDATES)
    m = json.loads((project / calibrate.METRICS).read_text())
    point = json.loads((project / artifacts.OPERATING_POINT).read_text())
    assert len(table) == 6 and set(zip(table["scale"], table["eta"])) == {(s, e) for s in (1.0, 2.0, 100.0)
                                                                        for e in (0.0, 1.0)}
    assert not table[table["scale"] == 100.0]["trained"].any()
    scored = table[table["trained"]]
    # the decision is the rule applied to each row, and the choice the best fidelity among the passing rows
    assert scored["passed"].all()
    passing = scored[scored["passed"]]
    if len(passing):  # only the passing candidates are scored for fidelity (Inception FID of their probe)
        assert passing["fid"].notna().all() and scored[~scored["passed"]]["fid"].isna().all()
        assert m["floor_fid"] > 0
    want = (passing.loc[passing["fid"].idxmin()] if len(passing) else scored.loc[scored["zu_pixel_at_eval"].idxmax()])
    assert (point["scale"], point["eta"]) == (want["scale"], want["eta"]) == (m["scale"], m["eta"])
    assert point["passed"] == m["passed"] == bool(len(passing)) and point["h"] == pytest.approx(m["h_kde"] * m["scale"])
    # carried to the evaluation's sample size through the effect (20 samples against 20 held-out here)
    assert (scored["zu_pixel_at_eval"] / scored["zu_pixel"]).round(6).nunique() == 1
    for png in (calibrate.TRADEOFF, calibrate.PROBE):
        assert (project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_rule_is_the_evaluation_gates_and_the_table_applies_it(tiny_copy):
    # calibrate reads the evaluation gate's thresholds (no copy of them to keep equal by hand)
    project = tiny_copy
    write_params(project, {"gates": {"eval": {"min_zu_pixel": -3.0, "copy_allowance": 0.01, "copy_floor_factor": 2.0,
                                              "max_authenticity_drop": 0.1}}})
    run_stages(project, "calibrate")
    table = pd.read_parquet(project / calibrate.CANDIDATES)
    m = json.loads((project / calibrate.METRICS).read_text())
    assert m["min_zu_rule"] == -3 + 2
    for r in table[table["trained"]].itertuples():
        assert r.passed == ((r.zu_pixel_at_eval >= -3 + 2) and r.copy_fraction <= max(2 * m["floor_copy_fraction"], 0.01)
                            and r.authenticity >= m["floor_authenticity"] - 0.1)


def test_no_passing_candidate_stops_at_the_gate_with_the_key_to_widen(tiny_copy):
    project = tiny_copy
    write_params(project, {"gates": {"eval": {"min_zu_pixel": 1e6}, "calibrate": {"enforce": True}}})
    run_stages(project, "calibrate", "gate_calibrate")
    m = json.loads((project / calibrate.METRICS).read_text())
    point = json.loads((project / artifacts.OPERATING_POINT).read_text())
    assert m["passed"] is False and "widen calibrate.scales" in point["reason"]
    record = json.loads((project / gates.gate_record("calibrate")).read_text())
    assert record["decision"] == NO_GO and record["checks"][0]["params_key"] == "calibrate.scales"
    with pytest.raises(DKGMError, match="gate calibrate said NO-GO"):
        run_stages(project, "sample_kde")
