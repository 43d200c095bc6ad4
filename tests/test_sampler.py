"""The iterative debiasing sampler against closed-form oracles, and on a trained swiss-roll MLP."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from dkgm import kde
from dkgm.data import SwissRoll
from dkgm.debias import Denoiser
from dkgm.errors import DKGMError
from dkgm.networks import NetworkConfig, build_network
from dkgm.sampler import SCHEDULES, debias, make_ladder
from dkgm.training import TrainConfig, train
from tests.conftest import pin_point


MU, S, H = 0.3, 0.5, 1.0
RM = dict(a0=0.3, gamma=0.55)


def gaussian_oracle(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The optimal denoiser for N(MU, S^2 I): the posterior mean."""
    return MU + S * S / (S * S + sigma * sigma) * (x - MU)


def run_gaussian(schedule: str, eta: float, solver: str, steps: int, **churn) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x0 = MU + math.sqrt(S * S + H * H) * torch.randn(20000, 8, generator=g, dtype=torch.float64)
    ladder = make_ladder(H, steps, schedule, eta, sigma_min=0.002, **({} if churn else RM), **churn)
    noise_gen = torch.Generator().manual_seed(1)
    x, _ = debias(gaussian_oracle, x0, ladder, solver=solver,
                  noise=lambda k, shape: torch.randn(shape, generator=noise_gen, dtype=torch.float64))
    return x


# Tolerances on the final variance (target S^2) at K = 128: Euler is first order in the step
# ratio (measured errors 1-6%, the Robbins-Monro ladder's large first steps cost most), Heun
# second order (<= 1.5%). The mean's standard error is 0.0013.
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("solver, tol", [("euler", 0.08), ("heun", 0.03)])
def test_gaussian_oracle_lands_on_the_data_law(schedule, eta, solver, tol):
    x = run_gaussian(schedule, eta, solver, steps=128)
    assert abs(x.mean().item() - MU) < 0.01
    assert x.var().item() / (S * S) == pytest.approx(1.0, abs=tol)


@pytest.mark.parametrize("schedule", ["geometric", "karras"])
def test_churn_keeps_the_gaussian_law(schedule):
    """EDM's churn raises the level before a step and steps from there: with the exact denoiser
    the samples still land on the data law. Heun at K = 128 within 3% (measured <= 1.1%); Euler's
    longer steps (each starts gamma = churn / K above sigma_k) cost a first-order error that must
    shrink as K grows at a fixed churn (measured 16%, 4.9%, 1.5% at K = 128, 512, 2048). A wrong
    noise std or a step from the old level would not converge."""
    churn = dict(churn=40.0, churn_min=0.05, churn_max=0.8)
    x = run_gaussian(schedule, 0.5, "heun", 128, **churn)
    assert abs(x.mean().item() - MU) < 0.01
    assert x.var().item() / (S * S) == pytest.approx(1.0, abs=0.03)
    errors = [abs(run_gaussian(schedule, 0.5, "euler", k, **churn).var().item() / (S * S) - 1) for k in (128, 512)]
    assert errors[1] < errors[0] / 2.5


def test_churn_raises_only_the_levels_inside_its_range():
    lad = make_ladder(2.0, 10, "karras", 0.0, churn=5.0, churn_min=0.1, churn_max=1.0)
    for k in range(lad.steps):
        s = lad.sigmas[k]
        want = s * (1 + min(5.0 / 10, math.sqrt(2) - 1)) if 0.1 <= s <= 1.0 else s
        assert lad.start(k) == pytest.approx(want)
        # a perfect denoiser still moves the level from the raised one to sigma_{k+1}
        assert math.hypot(lad.start(k) * (1 - lad.a[k]), lad.b[k]) == pytest.approx(lad.sigmas[k + 1], abs=1e-12)
    assert make_ladder(2.0, 10, "karras", 0.0).sigma_up is None
    assert make_ladder(2.0, 10, "karras", 0.0, churn=5.0).nfe("euler") == 10
    with pytest.raises(DKGMError, match="churn needs a noise source"):
        debias(gaussian_oracle, torch.zeros(2, 3), make_ladder(2.0, 4, "karras", 0.0, churn=5.0))


@pytest.mark.parametrize("schedule", ["geometric", "karras"])
def test_euler_error_shrinks_with_more_steps(schedule):
    errors = [abs(run_gaussian(schedule, 0.0, "euler", k).var().item() / (S * S) - 1) for k in (16, 64)]
    assert errors[1] < errors[0] / 2.5  # first order: 4x the steps, ~4x smaller error


def test_ladder_invariants():
    for schedule in SCHEDULES:
        for eta in (0.0, 0.5, 1.0):
            lad = make_ladder(0.4, 10, schedule, eta, sigma_min=0.01, **RM)
            assert lad.sigmas[0] == 0.4 and lad.sigmas[-1] == 0.0 and len(lad.sigmas) == 11
            assert all(a > b for a, b in zip(lad.sigmas, lad.sigmas[1:]))
            # a perfect denoiser moves the level from sigma_k to sigma_{k+1}
            for k in range(10):
                s, s1 = lad.sigmas[k], lad.sigmas[k + 1]
                assert (1 - lad.a[k]) ** 2 * s * s + lad.b[k] ** 2 == pytest.approx(s1 * s1, abs=1e-12)
            if schedule != "robbins_monro":
                assert lad.sigmas[-2] == pytest.approx(0.01)
    assert make_ladder(1.0, 5, "geometric", 0.0).nfe("heun") == 9  # no second evaluation at sigma = 0
    assert make_ladder(1.0, 5, "geometric", 1.0).b[-1] == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "at least 1"),
    (dict(eta=1.5), r"eta must be in \[0, 1\]"),
    (dict(eta=-0.1), r"eta must be in \[0, 1\]"),
    (dict(schedule="cosine"), "unknown schedule"),
    (dict(sigma_min=2.0), "sigma_min"),
])
def test_bad_ladders_are_rejected(kwargs, message):
    args = dict(sigma0=1.0, steps=10, schedule="geometric", eta=0.0, sigma_min=0.01) | kwargs
    with pytest.raises(DKGMError, match=message):
        make_ladder(**args)


def test_empirical_posterior_mean_collapses_onto_training_points():
    """With the exact denoiser of a small training set, debiasing walks every KDE sample back to a
    training point (mostly its own anchor): the memorization risk the evaluation measures."""
    g = torch.Generator().manual_seed(0)
    train_x = torch.randn(50, 16, generator=g, dtype=torch.float64)

    def posterior_mean(x, sigma):
        w = torch.softmax(-torch.cdist(x, train_x) ** 2 / (2 * sigma * sigma), dim=1)
        return w @ train_x

    h = 0.15
    seeds = list(range(400))
    x0, anchors = kde.sample_kde(train_x.float(), h, seeds)
    out, _ = debias(posterior_mean, x0.double(), make_ladder(h, 30, "geometric", 0.0, sigma_min=0.002))
    nearest = torch.cdist(out, train_x).min(dim=1)
    assert nearest.values.max().item() < 1e-3  # copies of training points
    assert (nearest.indices == anchors).float().mean().item() > 0.95  # mostly their own anchors


def test_swissroll_debiasing_moves_kde_samples_onto_the_spiral():
    roll = SwissRoll()
    pts, _ = roll.sample(3000, seed=0)
    data = torch.from_numpy(pts)
    h = 0.05
    cfg = TrainConfig(batch_size=256, total_kimg=120, lr=2e-3, warmup_kimg=5, grad_clip=0.0, sigma_dist="loguniform",
                      sigma_min=0.002,
                      sigma_max=1.5 * h, log_every=50, ema_halflife_kimg=20)
    torch.manual_seed(0)
    den = Denoiser(build_network(NetworkConfig(arch="mlp", channels=128, num_blocks=3, shape=(2,))), float(data.std()))
    ema = train(den, data, cfg).ema
    x0, _ = kde.sample_kde(data, h, list(range(1000)))
    ladder = make_ladder(h, 20, "geometric", 0.0, sigma_min=0.002)
    keep = list(range(0, 21, 2))
    _, iterates = debias(lambda x, s: ema(x, s), x0, ladder, keep=keep)
    dist = [roll.distance(iterates[k].numpy()).mean() for k in keep]
    factor = dist[0] / dist[-1]
    print(f"mean distance to the spiral: KDE input {dist[0]:.4f} -> {dist[-1]:.4f} after 20 steps (factor {factor:.2f}); "
          f"training data {roll.distance(pts).mean():.4f}")
    assert all(b <= a * 1.02 for a, b in zip(dist, dist[1:]))  # decreases with k (2% noise allowed)
    assert factor > 1.8


def test_results_do_not_depend_on_batch_size():
    from dkgm.rng import randn_per_sample, sample_generators

    torch.manual_seed(0)
    net = build_network(NetworkConfig(arch="unet", channels=8, channel_mult=(1, 2), attn_resolutions=(8,), shape=(1, 16, 16)))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    den = Denoiser(net, 0.5).eval()
    seeds = list(range(100, 112))
    x0 = torch.stack([torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ladder = make_ladder(0.5, 6, "karras", 0.7, sigma_min=0.01)

    def run(batch):
        outs = []
        for i in range(0, len(seeds), batch):
            gens = sample_generators(seeds[i : i + batch], "refine")
            x, _ = debias(lambda x, s: den(x, s), x0[i : i + batch], ladder, solver="heun",
                          noise=lambda k, shape: randn_per_sample(gens, shape[1:]))
            outs.append(x)
        return torch.cat(outs)

    torch.testing.assert_close(run(5), run(12), rtol=0, atol=1e-5)  # batched convolutions may reorder sums


# ----------------------------------------------------------------------------- the refine stage


def test_refine_stage_outputs_and_batch_invariance(tiny_copy):
    project = tiny_copy  # the session's tiny run, trained
    import json

    import numpy as np
    import pandas as pd

    from stages import artifacts, refine
    from tests.conftest import run_stages, write_params

    write_params(project, {"refine": {"steps": 4, "eta": 0.5, "solver": "heun", "batch_size": 16}})
    pin_point(project)
    run_stages(project, "sample_kde", "refine")
    m = json.loads((project / refine.METRICS).read_text())
    assert m["nfe"] == 7 and m["n_samples"] == 40
    assert m["rms_distance_to_anchor"] < m["kde_rms_distance_to_anchor"]  # debiasing moves samples towards the data
    out = np.load(project / artifacts.REFINED / "samples.npy")
    man = pd.read_parquet(project / artifacts.REFINED / "manifest.parquet")
    kde_man = pd.read_parquet(project / artifacts.KDE_SAMPLES / "manifest.parquet")
    assert out.shape == (40, 1, 32, 32) and out.dtype == np.uint8
    assert list(man.columns) == ["sample_id", "seed", "anchor_index", "nfe"] and (man["nfe"] == 7).all()
    assert (man["seed"] == kde_man["seed"]).all() and (man["anchor_index"] == kde_man["anchor_index"]).all()
    for png in (refine.GRID, refine.TRAJECTORY, refine.PROGRESS):
        assert (project / png).read_bytes()[:4] == b"\x89PNG"

    write_params(project, {"refine": {"steps": 4, "eta": 0.5, "solver": "heun", "batch_size": 7}})
    run_stages(project, "refine")
    again = np.load(project / artifacts.REFINED / "samples.npy")
    # per-sample noise streams: only float summation order may differ, by at most one grey level
    assert np.abs(again.astype(int) - out.astype(int)).max() <= 1 and (again == out).mean() > 0.999


def test_refine_rejects_stale_artifacts(tiny_copy):
    project = tiny_copy  # the session's tiny run, trained
    import json

    from stages import artifacts
    from tests.conftest import run_stages

    pin_point(project)
    run_stages(project, "sample_kde")
    shutil.rmtree(project / artifacts.REFINED)  # as before refine's first run: a refusal must publish nothing
    meta_path = project / artifacts.KDE_SAMPLES / "meta.json"
    meta = json.loads(meta_path.read_text())
    import torch

    h = meta["h"]
    top = torch.load(project / artifacts.DEBIASER_SNAPSHOT, map_location="cpu", weights_only=True)["sigma_max"]
    meta["h"] = 2 * top  # samples drawn at a bandwidth beyond the noise range the debiaser was trained on
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DKGMError, match="trained only up to sigma_max .*widen calibrate.scales"):
        run_stages(project, "refine")
    assert not (project / artifacts.REFINED).exists()
    meta["h"] = h
    meta_path.write_text(json.dumps(meta))
    # a snapshot whose network was built for another data shape
    from dkgm.debias import make_snapshot

    other = NetworkConfig(arch="unet", channels=8, channel_mult=(1, 2), attn_resolutions=(8,), shape=(1, 16, 16))
    torch.save(make_snapshot(Denoiser(build_network(other), 0.5), other.to_dict(), h=meta["h"]),
               project / artifacts.DEBIASER_SNAPSHOT)
    with pytest.raises(DKGMError, match=r"trained on data of shape \(1, 16, 16\)"):
        run_stages(project, "refine")


def test_a_diverged_sampler_stops_refine_with_the_step_and_count(tiny_copy):
    project = tiny_copy  # the session's tiny run, trained
    """A network that returns NaN: refine stops with one line naming how many samples diverged and
    at which step, and writes nothing (NaN must never become black pixels that get scored)."""
    import torch

    from stages import artifacts
    from tests.conftest import run_stages

    pin_point(project)
    run_stages(project, "sample_kde")
    shutil.rmtree(project / artifacts.REFINED)  # as before refine's first run: a failure must publish nothing
    snap_path = project / artifacts.DEBIASER_SNAPSHOT
    snap = torch.load(snap_path, map_location="cpu", weights_only=True)
    for name, value in snap["ema"].items():
        if value.is_floating_point() and name.endswith("weight"):
            value.fill_(float("nan"))
    torch.save(snap, snap_path)
    with pytest.raises(DKGMError, match=r"refine: 40 of the 40 samples from 0 on became non-finite "
                                        r"\(first at step k = 1 of \d+.*nothing was written"):
        run_stages(project, "refine")
    assert not (project / artifacts.REFINED).exists()
    staging = project / ".dkgm" / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def _ode_error(solver: str, steps: int) -> float:
    """Largest error of the probability-flow ODE solve (eta = 0) for N(MU, S^2), whose exact
    solution scales x - MU by sqrt((S^2 + sigma^2) / (S^2 + H^2)), stopped at sigma_min (the last
    step to sigma = 0 is the same jump to D for both solvers, so it is left out)."""
    x0 = MU + torch.linspace(-3, 3, 101, dtype=torch.float64)
    full = make_ladder(H, steps, "geometric", 0.0, sigma_min=0.05)
    ladder = type(full)(full.sigmas[:-1], full.a[:-1], full.b[:-1], full.sigma_hat[:-1])
    x, _ = debias(gaussian_oracle, x0, ladder, solver=solver)
    exact = MU + (x0 - MU) * math.sqrt((S * S + 0.05**2) / (S * S + H * H))
    return (x - exact).abs().max().item()


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_ode_solvers_converge_at_their_order(solver, order):
    """Doubling the steps divides the error by 2^order: Heun's trapezoid average of the two slopes
    is what makes it second order (weights 0.6/0.4 would leave it first order)."""
    errors = [_ode_error(solver, k) for k in (8, 16, 32)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)
