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
from dkgm.errors import DKGMError
from stages import artifacts, calibrate, gates
from stages.gates import NO_GO
from tests.conftest import run_stages, write_params

UP_TO_CALIBRATE = ("prepare", "fit_kde", "gate_kde", "reference", "train_debiaser", "gate_debiaser", "calibrate")


def test_probe_inputs_are_what_sample_kde_draws_for_the_same_seeds():
    train = np.random.default_rng(0).standard_normal((50, 1, 4, 4)).astype(np.float32)
    seeds = np.arange(7) + 123
    anchors, unit = calibrate.probe_inputs(train, seeds)
    for scale in (1.0, 2.5):
        x, _ = kde.sample_kde(torch.from_numpy(train), scale * 0.3, seeds.tolist())
        np.testing.assert_allclose(anchors + scale * 0.3 * unit, x.numpy(), atol=1e-6)


def test_the_rule_names_each_failed_condition():
    cfg = calibrate.CalibrateParams()

    class Ref:
        floor_copy, floor_authenticity = 0.0, 0.6

    good = {"zu_pixel_at_eval": -0.5, "copy_fraction": 0.0, "authenticity": 0.55}
    assert calibrate.passes(good, Ref, cfg) == (True, [])
    ok, why = calibrate.passes({"zu_pixel_at_eval": -1.5, "copy_fraction": 0.02, "authenticity": 0.4}, Ref, cfg)
    assert not ok and len(why) == 3 and why[0].startswith("Z_U -1.50 < -1")  # min_zu -3 + margin 2
    assert calibrate.passes({**good, "zu_pixel_at_eval": float("nan")}, Ref, cfg)[0] is False


def test_calibrate_stage_grid_choice_and_outputs(project):
    # 100 x h lies beyond sigma_max; a loose rule so that some candidates pass and get their FID
    write_params(project, {"calibrate": {"scales": [1.0, 2.0, 100.0], "min_zu": -1e6, "copy_allowance": 1.0,
                                         "max_authenticity_drop": 1.0}})
    run_stages(project, *UP_TO_CALIBRATE)
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


def test_the_default_rule_is_what_the_table_says(project):
    run_stages(project, *UP_TO_CALIBRATE)
    table = pd.read_parquet(project / calibrate.CANDIDATES)
    m = json.loads((project / calibrate.METRICS).read_text())
    for r in table.itertuples():
        assert r.passed == ((r.zu_pixel_at_eval >= -3 + 2) and r.copy_fraction <= max(2 * m["floor_copy_fraction"], 0.01)
                            and r.authenticity >= m["floor_authenticity"] - 0.1)


def test_no_passing_candidate_stops_at_the_gate_with_the_key_to_widen(project):
    write_params(project, {"calibrate": {"min_zu": 1e6}, "gates": {"calibrate": {"enforce": True}}})
    run_stages(project, *UP_TO_CALIBRATE, "gate_calibrate")
    m = json.loads((project / calibrate.METRICS).read_text())
    point = json.loads((project / artifacts.OPERATING_POINT).read_text())
    assert m["passed"] is False and "widen calibrate.scales" in point["reason"]
    record = json.loads((project / gates.gate_record("calibrate")).read_text())
    assert record["decision"] == NO_GO and record["checks"][0]["params_key"] == "calibrate.scales"
    with pytest.raises(DKGMError, match="gate calibrate said NO-GO"):
        run_stages(project, "sample_kde")
