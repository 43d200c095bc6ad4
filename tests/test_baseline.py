"""The diffusion baseline shares DKGM's network, trainer and budget and differs only in the noise
range and the start; its stages are skipped on request; the comparison's rows and headline agree."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from dkgm.networks import NetworkConfig, build_network, count_parameters
from pipeline import dvcyaml, registry
from stages import artifacts, baseline, comparison, evaluate_baseline
from tests.conftest import run_stages, write_params

BRANCH = ("train_baseline", "sample_baseline", "evaluate_baseline")


@pytest.fixture
def both(tiny_run):
    """The session's tiny run: both branches, the reference and the comparison."""
    return tiny_run


def _snapshot(root, rel):
    return torch.load(root / rel, map_location="cpu", weights_only=True)


def test_branches_share_network_trainer_and_budget_and_differ_only_in_noise_range(both):
    dkgm, base = _snapshot(both, artifacts.DEBIASER_SNAPSHOT), _snapshot(both, artifacts.BASELINE_SNAPSHOT)
    assert dkgm["network"] == base["network"]
    shapes = {k: tuple(v.shape) for k, v in dkgm["ema"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in base["ema"].items()}  # the same network, parameter for parameter
    n = count_parameters(build_network(NetworkConfig.from_dict(dkgm["network"])))
    assert json.loads((both / baseline.TRAIN_METRICS).read_text())["parameters"] == n
    assert dkgm["kimg"] == base["kimg"] == 0.64  # the same images seen
    differ = {k for k in dkgm["train"] if dkgm["train"][k] != base["train"][k]}
    # the noise range only (and the distribution, when DKGM's is set apart from EDM's): optimizer, EMA,
    # clipping, warm-up and budget are one recipe
    assert "sigma_max" in differ and differ <= {"sigma_max", "sigma_dist", "p_mean", "p_std"}
    assert base["train"]["betas"] == dkgm["train"]["betas"] and base["train"]["grad_clip"] == dkgm["train"]["grad_clip"]
    assert base["train"]["sigma_max"] == 80.0 and dkgm["train"]["sigma_max"] < 5
    # and the start: a KDE sample at h against pure noise at sigma_max, with the same seeds
    refined = json.loads((both / artifacts.REFINED / "meta.json").read_text())
    sampled = json.loads((both / artifacts.BASELINE_SAMPLES / "meta.json").read_text())
    assert refined["ladder"][0] == pytest.approx(refined["h"]) and sampled["sigma0"] == 80.0
    man_b = pd.read_parquet(both / artifacts.BASELINE_SAMPLES / "manifest.parquet")
    man_k = pd.read_parquet(both / artifacts.KDE_SAMPLES / "manifest.parquet")
    assert (man_b["seed"].to_numpy()[:20] == man_k["seed"].to_numpy()[:20]).all()


def test_baseline_scored_like_dkgm(both):
    m = json.loads((both / evaluate_baseline.EVAL_METRICS).read_text())
    ev = json.loads((both / "reports/eval/metrics.json").read_text())
    assert m["n_samples"] == ev["n_samples"] == 20
    shared = [k[len("refined_"):] for k in ev if k.startswith("refined_")]
    assert {f"baseline_{k}" for k in shared if not k.startswith("anchor")} <= set(m)


def test_comparison_rows_and_headline(both):
    df = pd.read_csv(both / comparison.TABLE)
    rows = list(df["row"])
    # refine's own sampler (euler, K = 10 here) is always a DKGM row: the control runs exactly it
    assert rows == ["dkgm_euler_k1", "dkgm_euler_k2", "dkgm_euler_k10", "baseline_heun_k2",
                    "control_baseline_net_kde_start", "control_dkgm_net_noise_start", "real_heldout"]
    assert list(df["nfe"][:6]) == [1, 2, 10, 3, 10, 3]  # heun: 2K - 1
    m = json.loads((both / comparison.METRICS).read_text())
    dk = df[df["method"] == "DKGM"]
    # the table keeps 6 significant digits
    assert m["dkgm_best_fid"] == pytest.approx(dk["fid"].min(), rel=1e-5)
    assert m["floor_fid"] == pytest.approx(df["fid"].iloc[-1], rel=1e-5)
    assert (df["train_kimg"][:6] == 0.64).all() and (df["train_seconds"][:6] > 0).all()
    # DKGM with refine's sampler against the baseline's network from the same start with the same sampler
    assert m["dkgm_refine_fid"] == pytest.approx(df.loc[df["row"] == "dkgm_euler_k10", "fid"].item(), rel=1e-5)
    assert m["control_beats_dkgm_by"] == pytest.approx(m["dkgm_refine_fid"] - m["control_baseline_net_kde_start_fid"])
    # every row carries the FID's bootstrap spread at n; the headline keeps the two rows the cost row reads
    assert (df["fid_se"] > 0).all() and (df["fid_se"] < df["fid"]).all()
    assert m["dkgm_refine_fid_se"] == pytest.approx(df.loc[df["row"] == "dkgm_euler_k10", "fid_se"].item(), rel=1e-5)
    assert m["control_baseline_net_kde_start_fid_se"] > 0
    # both networks' denoising error on the same images: the trivial baselines are shared, the networks differ
    curve = pd.read_csv(both / comparison.DENOISE_TABLE)
    a, b = (curve[curve["network"] == n].reset_index(drop=True) for n in ("dkgm", "baseline"))
    assert len(a) == len(b) > 5 and (a["sigma"] == b["sigma"]).all()
    assert a["identity_mse"].to_numpy() == pytest.approx(a["sigma"].to_numpy() ** 2, rel=1e-5)
    assert (a["mean_mse"] == b["mean_mse"]).all() and not (a["mse"] == b["mse"]).all()
    # refine's own row is the same bytes that refine drew and evaluate scored: answered by the feature
    # cache, not featurised again (the other rows are new images)
    timings = json.loads((both / "reports/comparison/timings.json").read_text())
    assert timings["feature_cache_hits"] == m["n_samples"] == 8


def test_baseline_params_do_not_touch_dkgm_and_dkgm_only_params_do_not_touch_the_baseline():
    stages = registry.all_stages()
    keys = {name: set(dvcyaml.params_keys(s)) for name, s in stages.items() if not s.all_params}
    dkgm_only = {"debiaser.sigma_max_margin", "debiaser.sigma_dist", "debiaser.p_mean", "kde.bandwidth", "calibrate.scales", "sample_kde.bandwidth_scale",
                 "refine.eta"}
    for name in BRANCH:
        assert not keys[name] & dkgm_only, name
    for name in ("fit_kde", "train_debiaser", "calibrate", "sample_kde", "refine", "evaluate"):
        assert not any(k.startswith(("baseline.", "sample_baseline.")) for k in keys[name]), name
    assert {"debiaser.channels", "debiaser.total_kimg", "debiaser.lr"} <= keys["train_baseline"]  # the shared budget


def test_a_switched_off_baseline_records_skips(project):
    write_params(project, {"baseline": {"enabled": False}})
    run_stages(project, "prepare", "train_baseline", "sample_baseline")
    assert json.loads((project / baseline.TRAIN_METRICS).read_text())["skipped"] is True
    meta = json.loads((project / artifacts.BASELINE_SAMPLES / "meta.json").read_text())
    assert meta["skipped"] is True and "baseline.enabled" in meta["reason"]
