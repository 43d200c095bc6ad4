"""Debiaser networks, preconditioning, trainer, checkpoints and the train_debiaser stage."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dkgm.data import SwissRoll
from dkgm.debias import Denoiser, denoising_loss, denoising_mse, load_denoiser, make_snapshot
from dkgm.errors import DKGMError
from dkgm.networks import NetworkConfig, build_network, count_parameters
from dkgm.training import NonFiniteLoss, TrainConfig, ema_beta, list_states, load_state, newest_usable_state, train
from pipeline.runner import run_gate
from stages import artifacts, fitting, gates, train_debiaser
from stages.fitting import DebiaserParams
from tests.conftest import REPO, run_stages, write_params

TINY_IMG = dict(channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))


@pytest.mark.parametrize("arch, shape", [("unet", (1, 16, 16)), ("dae", (3, 16, 16)), ("mlp", (2,))])
def test_shapes_and_dtypes(arch, shape):
    cfg = NetworkConfig(arch=arch, shape=shape, **(TINY_IMG if arch != "mlp" else dict(channels=16, num_blocks=2)))
    den = Denoiser(build_network(cfg), 0.5)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    out = den(x, torch.tensor([0.1, 0.5, 2.0]))
    assert out.shape == x.shape and out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert den(x, 0.3).dtype == torch.float32  # preconditioning stays in float32
    # zero-initialised output layer: D starts as c_skip * x, the best linear guess
    c_skip = 0.25 / (0.09 + 0.25)
    torch.testing.assert_close(den(x, 0.3), c_skip * x)


def test_dae_has_no_skip_connections_and_fewer_parameters():
    unet = build_network(NetworkConfig(arch="unet", shape=(1, 16, 16), **TINY_IMG))
    dae = build_network(NetworkConfig(arch="dae", shape=(1, 16, 16), **TINY_IMG))
    assert not dae.skips and count_parameters(dae) < count_parameters(unet)


def test_noise_embedding_reaches_every_block_through_a_nonlinearity():
    """The embedding MLP ends in a Linear; each block's projection must see SiLU of it (DDPM, EDM),
    else the two Linears collapse into one affine map of the sinusoidal features."""
    from dkgm.networks import ResBlock

    net = build_network(NetworkConfig(arch="unet", shape=(1, 16, 16), **TINY_IMG))
    seen = []
    blocks = [m for m in net.modules() if isinstance(m, ResBlock)]
    hooks = [b.emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0])) for b in blocks]
    c_noise = torch.tensor([-1.0, 0.3])
    net(torch.zeros(2, 1, 16, 16), c_noise)
    for h in hooks:
        h.remove()
    emb = net.embed(c_noise)
    assert len(seen) == len(blocks) > 0
    for got in seen:
        torch.testing.assert_close(got, torch.nn.functional.silu(emb))
    assert (emb < 0).any()  # SiLU changes these: the assertion above is not vacuous


def test_ddpm_cifar10_configuration_is_expressible():
    from stages.fitting import configs

    p = DebiaserParams(channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.1)
    net_cfg, _ = configs(p, h=0.3, shape=(3, 32, 32), device=torch.device("cpu"), sigma_max=12 * 0.3)
    n = count_parameters(build_network(net_cfg))
    assert 35.5e6 < n < 36.0e6  # DDPM reports 35.7M


def test_every_config_field_comes_from_the_section_or_is_named_derived():
    """The debiaser section is the one declaration of its keys: each field of the network and
    trainer configs is a section key of the same name (and takes its value, non-default values
    here so that a field left at the dataclass default is caught) or one of the named derived
    fields. A new trainer field must be declared in one of the two places, or this fails."""
    import dataclasses

    from dkgm.networks import NetworkConfig as NC
    from dkgm.training import TrainConfig as TC
    from stages.fitting import NETWORK_DERIVED, TRAINER_DERIVED, configs

    p = DebiaserParams(channels=24, channel_mult=(1, 3), num_blocks=2, attn_resolutions=(4,), dropout=0.05,
                       embedding="fourier", batch_size=48, total_kimg=7.5, lr=3e-3, weight_decay=0.01, warmup_kimg=1.5,
                       lr_schedule="cosine", adam_beta2=0.95, grad_clip=2.5, ema_halflife_kimg=3.0, ema_rampup_ratio=0.2,
                       sigma_min=0.004, sigma_dist="loguniform", p_mean=-0.5, p_std=0.9, seed=7, log_every=11,
                       state_every_kimg=2.5, keep_states=3, precision="fp32", compile=True)
    net, tr = configs(p, h=0.3, shape=(1, 16, 16), device=torch.device("cpu"), sigma_max=2.0)
    for config, derived in ((net, NETWORK_DERIVED), (tr, TRAINER_DERIVED)):
        for f in dataclasses.fields(config):
            if f.name in derived:
                continue
            assert f.name in DebiaserParams.model_fields, f"{type(config).__name__}.{f.name} is neither a key nor derived"
            want = getattr(p, f.name)
            assert getattr(config, f.name) == (tuple(want) if isinstance(want, list) else want), f.name
    assert tr.betas == (0.9, 0.95) and tr.sigma_max == 2.0 and net.shape == (1, 16, 16)
    # the baseline's overrides replace the section's noise distribution, and only that
    _, base = configs(p, h=0.3, shape=(1, 16, 16), device=torch.device("cpu"), sigma_max=80.0,
                      sigma_dist="lognormal", p_mean=-1.2, p_std=1.2)
    assert (base.sigma_dist, base.p_mean, base.p_std, base.sigma_max) == ("lognormal", -1.2, 1.2, 80.0)
    assert {k: v for k, v in base.to_dict().items() if k not in ("sigma_dist", "p_mean", "p_std", "sigma_max")} == {
        k: v for k, v in tr.to_dict().items() if k not in ("sigma_dist", "p_mean", "p_std", "sigma_max")}
    assert {f.name for f in dataclasses.fields(NC)} >= set(NETWORK_DERIVED)
    assert {f.name for f in dataclasses.fields(TC)} >= set(TRAINER_DERIVED)


def test_wrong_architecture_for_the_data_is_one_clear_error():
    with pytest.raises(DKGMError, match="mlp is for points"):
        build_network(NetworkConfig(arch="mlp", shape=(1, 16, 16)))
    with pytest.raises(DKGMError, match="use mlp for points"):
        build_network(NetworkConfig(arch="unet", shape=(2,)))


def test_edm_preconditioning_known_coefficients():
    """Karras et al. 2022, table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2),
    c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4; here at sigma_data = 0.5."""
    den = Denoiser(build_network(NetworkConfig(arch="mlp", channels=8, shape=(2,))), sigma_data=0.5)
    sigma = torch.tensor([0.5, 1.2, 0.05], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = den.coefficients(sigma)
    # at sigma = sigma_data: 1/2, sd/sqrt(2), 1/(sd sqrt(2)), ln(0.5)/4
    torch.testing.assert_close(c_skip[0], torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(c_out[0], torch.tensor(0.5 / math.sqrt(2), dtype=torch.float64))
    torch.testing.assert_close(c_in[0], torch.tensor(1 / (0.5 * math.sqrt(2)), dtype=torch.float64))
    torch.testing.assert_close(c_noise[0], torch.tensor(math.log(0.5) / 4, dtype=torch.float64))
    # at sigma = 1.2: s^2 + sd^2 = 1.69, sqrt = 1.3
    torch.testing.assert_close(c_skip[1], torch.tensor(0.25 / 1.69, dtype=torch.float64))
    torch.testing.assert_close(c_out[1], torch.tensor(1.2 * 0.5 / 1.3, dtype=torch.float64))
    torch.testing.assert_close(c_in[1], torch.tensor(1 / 1.3, dtype=torch.float64))
    # the network's training target (x - c_skip (x + n)) / c_out has unit variance at every sigma
    target_var = ((1 - c_skip) ** 2 * 0.25 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("dist", ["lognormal", "lognormal_truncated", "loguniform"])
def test_training_noise_levels_follow_their_law(dist):
    """Known answers: the clipped log-normal keeps N(p_mean, p_std) inside the range and piles the
    tails onto its ends; the truncated one is the same law conditioned on the range; the
    log-uniform is uniform in ln sigma."""
    from scipy import stats

    from dkgm.debias import sample_sigmas

    lo, hi, pm, ps = 0.002, 1.5, -1.2, 1.2
    s = sample_sigmas(200_000, lo, hi, torch.Generator().manual_seed(0), dist, pm, ps).double()
    assert s.dtype == torch.float64 and s.min() >= lo - 1e-9 and s.max() <= hi + 1e-6
    ln = s.log().numpy()
    a, b = (math.log(lo) - pm) / ps, (math.log(hi) - pm) / ps
    if dist == "lognormal":
        at_top = float((s >= hi * (1 - 1e-6)).double().mean())
        assert at_top == pytest.approx(stats.norm.sf(b), abs=3e-3)  # the upper tail clipped onto sigma_max
        inside = ln[(ln > math.log(lo) + 1e-6) & (ln < math.log(hi) - 1e-6)]
        assert inside.mean() == pytest.approx(stats.truncnorm.mean(a, b, pm, ps), abs=0.01)
    elif dist == "lognormal_truncated":
        assert float((s >= hi * (1 - 1e-6)).double().mean()) < 1e-3  # nothing piles up at the end
        assert ln.mean() == pytest.approx(stats.truncnorm.mean(a, b, pm, ps), abs=0.01)
        assert ln.std() == pytest.approx(stats.truncnorm.std(a, b, pm, ps), abs=0.01)
    else:
        u = (ln - math.log(lo)) / (math.log(hi) - math.log(lo))
        assert u.mean() == pytest.approx(0.5, abs=0.005) and u.var() == pytest.approx(1 / 12, abs=0.002)
    with pytest.raises(DKGMError, match="unknown sigma distribution"):
        sample_sigmas(4, lo, hi, torch.Generator(), "uniform")


def test_cosine_learning_rate_known_values_and_its_key():
    from dkgm.training import learning_rate

    cfg = TrainConfig(lr=1e-3, warmup_kimg=2.0, total_kimg=10.0, lr_schedule="cosine")
    assert learning_rate(cfg, 1000) == pytest.approx(0.5e-3)  # half-way through the warm-up
    assert learning_rate(cfg, 2000) == pytest.approx(1e-3)  # the top, where the cosine starts
    assert learning_rate(cfg, 6000) == pytest.approx(0.5e-3)  # half-way down
    assert learning_rate(cfg, 10000) == pytest.approx(0.0, abs=1e-12)
    const = TrainConfig(lr=1e-3, warmup_kimg=2.0, total_kimg=10.0)
    assert learning_rate(const, 9000) == 1e-3
    # a decaying rate depends on the length: a longer run is another trajectory, a constant one extends
    assert "total_kimg" in cfg.trajectory_key() and "total_kimg" not in const.trajectory_key()


def test_ema_halves_the_weight_of_old_images_every_half_life():
    """ema_beta per step of `batch` images: after ema_halflife_kimg x 1000 images the weight of the
    EMA's starting value is 1/2 (no ramp-up), and with the ramp-up the half-life is at most
    ratio x images seen."""
    cfg = TrainConfig(ema_halflife_kimg=2.0, ema_rampup_ratio=None)
    beta = ema_beta(cfg, nimg=100_000, batch=50)
    assert beta ** (2000 / 50) == pytest.approx(0.5, rel=1e-12)
    ramp = TrainConfig(ema_halflife_kimg=2.0, ema_rampup_ratio=0.1)
    assert ema_beta(ramp, nimg=5000, batch=50) ** (500 / 50) == pytest.approx(0.5, rel=1e-12)  # 0.1 x 5000 = 500
    assert ema_beta(ramp, nimg=100_000, batch=50) == pytest.approx(beta, rel=1e-15)  # 0.1 x 1e5 > 2000
    # and the trainer applies it: a network whose weights jump from 0 to 1 at step 1 and stay
    net = torch.nn.Linear(1, 1, bias=False)
    ema = torch.nn.Linear(1, 1, bias=False)
    ema.weight.data.zero_()
    net.weight.data.fill_(1.0)
    for _ in range(2000 // 50):
        ema.weight.data.lerp_(net.weight.data, 1 - beta)
    assert ema.weight.item() == pytest.approx(0.5, rel=1e-9)


def test_snapshot_round_trip_is_bit_exact(tmp_path):
    cfg = NetworkConfig(arch="unet", shape=(1, 16, 16), **TINY_IMG)
    torch.manual_seed(1)
    den = Denoiser(build_network(cfg), 0.6)
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0, 0.05)  # non-trivial weights (the output layer starts at zero)
    torch.save(make_snapshot(den, cfg.to_dict(), h=0.3), tmp_path / "snap.pt")
    back, meta = load_denoiser(tmp_path / "snap.pt")
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(back(x, 0.2), den.eval()(x, 0.2)) and meta["h"] == 0.3
    for (k, a), (_, b) in zip(den.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(DKGMError, match="snapshot not found"):
        load_denoiser(tmp_path / "missing.pt")


def test_bf16_loss_matches_fp32():
    cfg = NetworkConfig(arch="unet", shape=(1, 16, 16), **TINY_IMG)
    torch.manual_seed(2)
    den = Denoiser(build_network(cfg), 0.5)
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0, 0.05)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(32, 1, 16, 16, generator=g) * 2 - 1, torch.randn(32, 1, 16, 16, generator=g)
    sigma = torch.full((32,), 0.3)
    ref = denoising_loss(den, x0, sigma, noise).mean()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = denoising_loss(den, x0, sigma, noise).mean()
    assert abs(low.item() - ref.item()) / ref.item() < 0.02


def _mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return Denoiser(build_network(NetworkConfig(arch="mlp", channels=32, num_blocks=2, dropout=dropout, shape=(2,))), 1.3)


def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path):
    pts, _ = SwissRoll().sample(1000, seed=0)
    data = torch.from_numpy(pts)
    cfg = TrainConfig(batch_size=32, total_kimg=1.6, lr=2e-3, warmup_kimg=0.3, sigma_min=0.01, sigma_max=0.1,
                      state_every_kimg=0.32, keep_states=2, log_every=7, ema_halflife_kimg=0.3)
    # a state every 10 steps, a log row every 7: a state falls inside a log row, whose statistics must resume
    whole = train(_mlp(dropout=0.1), data, cfg, state_dir=tmp_path / "a")
    part = train(_mlp(dropout=0.1), data, cfg, state_dir=tmp_path / "b", stop_after_kimg=0.8)
    assert part.nimg < 1600
    resumed = train(_mlp(seed=99, dropout=0.1), data, cfg, state_dir=tmp_path / "b")  # init is overwritten
    assert resumed.resumed_from == part.nimg
    for (k, a), b in zip(whole.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), f"EMA weight {k} differs after resume"
    assert [r["loss"] for r in whole.log] == [r["loss"] for r in resumed.log]
    assert len(list_states(tmp_path / "b")) == 2  # pruned to keep_states
    # training time adds up over the invocations; resuming a finished run keeps it
    assert resumed.train_seconds > resumed.seconds > 0 and resumed.images_per_second == pytest.approx(1600 / resumed.train_seconds)
    done = train(_mlp(), data, cfg, state_dir=tmp_path / "b")
    assert done.resumed_from == 1600 and done.train_seconds == pytest.approx(resumed.train_seconds, rel=1e-3)
    # a state from before states recorded their time: estimated from the log's throughput
    newest = list_states(tmp_path / "b")[-1]
    st = torch.load(newest, weights_only=True)
    del st["train_seconds"]
    torch.save(st, newest)
    legacy = train(_mlp(), data, cfg, state_dir=tmp_path / "b")
    assert legacy.train_seconds == pytest.approx(sum(
        (r["nimg"] - p) / r["images_per_second"] for r, p in zip(st["log"], [0] + [r["nimg"] for r in st["log"]])))
    assert legacy.images_per_second > 0
    other = TrainConfig(**{**cfg.__dict__, "lr": 1e-3})
    with pytest.raises(DKGMError, match="another configuration"):
        train(_mlp(), data, other, state_dir=tmp_path / "b")
    longer = train(_mlp(), data, TrainConfig(**{**cfg.__dict__, "total_kimg": 1.92}), state_dir=tmp_path / "b")
    assert longer.resumed_from == 1600 and longer.nimg == 1920  # a longer run extends the finished one


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_newest_state_falls_back_to_the_one_before(tmp_path, caplog, damage):
    pts, _ = SwissRoll().sample(500, seed=0)
    data = torch.from_numpy(pts)
    cfg = TrainConfig(batch_size=32, total_kimg=0.96, state_every_kimg=0.32, keep_states=3, sigma_min=0.01,
                      sigma_max=0.1, log_every=5, warmup_kimg=0.1)
    whole = train(_mlp(), data, cfg, state_dir=tmp_path / "whole")
    train(_mlp(), data, cfg, state_dir=tmp_path / "run", stop_after_kimg=0.64)
    newest = list_states(tmp_path / "run")[-1]
    assert newest.name == "state-000000640.pt"
    raw = newest.read_bytes()
    newest.write_bytes({"truncated": raw[: len(raw) // 2], "garbage": b"\x00not a torch file" * 64, "empty": b""}[damage])
    with caplog.at_level("WARNING", logger="dkgm"):
        resumed = train(_mlp(seed=5), data, cfg, state_dir=tmp_path / "run")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "state-000000640.pt" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    assert resumed.resumed_from == 320 and resumed.nimg == 960
    assert _same_weights(resumed.ema, whole.ema)  # resuming from the earlier state loses nothing but time
    assert (tmp_path / "run" / "state-000000640.pt.corrupt").is_file()  # kept for a look, never loaded again
    assert [p.name for p in list_states(tmp_path / "run")][-1] == "state-000000960.pt"


def test_only_rank_0_sets_a_corrupt_state_aside(tmp_path):
    """Under torchrun every rank looks for the newest state: the others skip a corrupt one without
    renaming it (no race over the rename) and reach the same earlier state as rank 0."""
    state_dir = tmp_path / "states"
    state_dir.mkdir()
    for nimg in (320, 640):
        torch.save({"nimg": nimg}, state_dir / f"state-{nimg:09d}.pt")
    (state_dir / "state-000000960.pt").write_bytes(b"\x00cut short")
    path, st = newest_usable_state(state_dir, 960, set_aside=False)
    assert path.name == "state-000000640.pt" and st["nimg"] == 640
    assert (state_dir / "state-000000960.pt").is_file() and not list(state_dir.glob("*.corrupt"))
    path, _ = newest_usable_state(state_dir, 960)  # rank 0
    assert path.name == "state-000000640.pt" and (state_dir / "state-000000960.pt.corrupt").is_file()


class _Payload:
    """Unpickling this runs os.system: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_in_a_state_or_snapshot_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    state_dir = tmp_path / "states"
    state_dir.mkdir()
    evil = {"net": {}, "payload": _Payload(marker)}
    torch.save(evil, state_dir / "state-000000320.pt")
    with pytest.raises(DKGMError, match=r"state-000000320.pt: refused: it holds objects other than tensors") as err:
        load_state(state_dir / "state-000000320.pt")
    assert "\n" not in str(err.value)
    torch.save(evil, tmp_path / "debiaser.pt")
    with pytest.raises(DKGMError, match=r"debiaser.pt: refused: it holds objects other than tensors"):
        load_denoiser(tmp_path / "debiaser.pt")
    # training never resumes from it: it is set aside and training starts afresh
    pts, _ = SwissRoll().sample(200, seed=0)
    cfg = TrainConfig(batch_size=32, total_kimg=0.32, state_every_kimg=0.32, sigma_min=0.01, sigma_max=0.1)
    result = train(_mlp(), torch.from_numpy(pts), cfg, state_dir=state_dir)
    assert result.resumed_from is None and (state_dir / "state-000000320.pt.corrupt").is_file()
    assert not marker.exists()  # nothing in the file ever ran


def test_lowering_total_kimg_never_returns_a_longer_trained_model(tmp_path):
    pts, _ = SwissRoll().sample(500, seed=0)
    data = torch.from_numpy(pts)
    cfg = TrainConfig(batch_size=32, total_kimg=1.28, state_every_kimg=0.32, keep_states=1, sigma_min=0.01,
                      sigma_max=0.1, log_every=5, warmup_kimg=0.1)
    train(_mlp(), data, cfg, state_dir=tmp_path / "run")
    assert [p.name for p in list_states(tmp_path / "run")] == ["state-000001280.pt"]
    short_cfg = TrainConfig(**{**cfg.__dict__, "total_kimg": 0.64})
    fresh = train(_mlp(), data, short_cfg, state_dir=tmp_path / "fresh")
    short = train(_mlp(), data, short_cfg, state_dir=tmp_path / "run")
    assert short.nimg == 640 and short.resumed_from is None and _same_weights(short.ema, fresh.ema)
    # keep_states prunes among the shorter states only: the longer run's state stays, and the
    # shorter run's own final state is there to resume from
    assert [p.name for p in list_states(tmp_path / "run")] == ["state-000000640.pt", "state-000001280.pt"]
    again = train(_mlp(), data, short_cfg, state_dir=tmp_path / "run")
    assert again.resumed_from == 640 and _same_weights(again.ema, fresh.ema)
    back = train(_mlp(), data, cfg, state_dir=tmp_path / "run")
    assert back.resumed_from == 1280  # raising total_kimg again finds the longer run


def test_non_finite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    pts, _ = SwissRoll().sample(500, seed=0)
    cfg = TrainConfig(batch_size=32, total_kimg=0.64, state_every_kimg=0.32, sigma_min=0.01, sigma_max=0.1, log_every=5)
    train(_mlp(), torch.from_numpy(pts), TrainConfig(**{**cfg.__dict__, "total_kimg": 0.32}), state_dir=tmp_path)
    (good,) = list_states(tmp_path)
    before = good.read_bytes()
    bad = torch.from_numpy(pts).clone()
    bad[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"at step 11 \(320 images seen; found at step 15\).*last good state"):
        train(_mlp(), bad, cfg, state_dir=tmp_path)
    assert list_states(tmp_path) == [good] and good.read_bytes() == before


def test_swissroll_denoiser_beats_identity_and_mean():
    roll = SwissRoll()
    pts, _ = roll.sample(3000, seed=0)
    val, _ = roll.sample(500, seed=1)
    h = 0.05
    cfg = TrainConfig(batch_size=256, total_kimg=120, lr=2e-3, warmup_kimg=5, grad_clip=0.0, sigma_dist="loguniform",
                      sigma_min=0.005,
                      sigma_max=1.5 * h, log_every=50, ema_halflife_kimg=20)
    den = Denoiser(build_network(NetworkConfig(arch="mlp", channels=128, num_blocks=3, shape=(2,))), float(pts.std()))
    result = train(den, torch.from_numpy(pts), cfg)
    v = torch.from_numpy(val)
    mse = denoising_mse(result.ema, v, h, torch.Generator().manual_seed(0))
    identity = h * h
    mean_pred = float(((v - torch.from_numpy(pts).mean(0)) ** 2).mean())
    print(f"held-out MSE at sigma=h: {mse:.5f}, identity {identity:.5f} (ratio {mse / identity:.3f}), mean {mean_pred:.3f}")
    # a curve in 2-D: only the normal half of the noise can be removed; with the data's own
    # 0.02 spread the best ratio at h = 0.05 is (1 + 0.02^2/(0.02^2 + 0.05^2)) / 2 = 0.57
    assert mse < 0.75 * identity and mse < 0.01 * mean_pred


def test_train_stage_outputs_resume_and_gate(project):
    run_stages(project, "prepare", "fit_kde", "gate_kde", "train_debiaser")
    m = json.loads((project / train_debiaser.METRICS).read_text())
    timings_rel = next(o.path for o in train_debiaser.STAGES[0].outs if o.kind == "timings")
    t = json.loads((project / timings_rel).read_text())
    assert m["kimg"] == pytest.approx(0.64) and t["resumed_from_kimg"] == 0
    assert not any(k.endswith("seconds") or k.endswith("per_second") or k in ("device", "precision") for k in m)
    assert m["identity_mse_at_h"] == pytest.approx(m["h"] ** 2, rel=0.1)
    den, meta = load_denoiser(project / artifacts.DEBIASER_SNAPSHOT)
    assert meta["h"] == m["h"] and meta["network"]["channels"] == 8 and "dkgm" in meta["code_version"]
    import pandas as pd

    log = pd.read_parquet(project / train_debiaser.LOG)
    assert {"step", "nimg", "loss", "lr", "images_per_second"} <= set(log.columns) and log["nimg"].is_monotonic_increasing
    for png in (train_debiaser.LOSS_PLOT, train_debiaser.DENOISE_PLOT):
        assert (project / png).read_bytes()[:4] == b"\x89PNG"
    first = torch.load(project / artifacts.DEBIASER_SNAPSHOT, weights_only=True)

    run_stages(project, "train_debiaser")  # same config: resumes from the final state, trains nothing
    t2 = json.loads((project / timings_rel).read_text())
    assert t2["resumed_from_kimg"] == pytest.approx(0.64)
    # a resumed run reports the training it resumed, not its own near-zero time
    assert t2["train_seconds"] == pytest.approx(t["train_seconds"], rel=1e-6) and t2["invocation_seconds"] < t["train_seconds"]
    assert t2["images_per_second"] == pytest.approx(t["images_per_second"], rel=1e-6)
    assert json.loads((project / train_debiaser.METRICS).read_text()) == m  # results unchanged
    again = torch.load(project / artifacts.DEBIASER_SNAPSHOT, weights_only=True)
    assert again["ema"].keys() == first["ema"].keys()
    assert all(torch.equal(again["ema"][k], first["ema"][k]) for k in first["ema"])  # the same EMA weights
    assert again["code_version"] == first["code_version"]

    # 0.64 kimg already denoises a little (ratio < 1); a strict threshold stops the pipeline
    assert run_gate("debiaser", project / "params.yaml", project).decision == "GO"
    write_params(project, {"gates": {"debiaser": {"max_error_ratio": 1e-6}}})
    result = run_gate("debiaser", project / "params.yaml", project)
    assert result.stops and [c.params_key for c in result.failures()] == ["gates.debiaser.max_error_ratio"]
    assert not (project / gates.gate_token("debiaser")).exists()


def test_a_state_of_other_training_code_is_never_resumed(project, tmp_path, monkeypatch, caplog):
    """Change one line of the network's code: the finished state of the old code stays where it is,
    ignored with one line, and the stage trains afresh (the key holds a hash of networks.py,
    debias.py and training.py; other library files leave finished states usable)."""
    import logging
    import shutil

    import dkgm

    run_stages(project, "prepare", "fit_kde", "gate_kde", "train_debiaser")
    old = sorted((project / fitting.STATES).iterdir())
    assert len(old) == 1 and json.loads((old[0] / fitting.KEY_FILE).read_text())["code"] == fitting.training_code()
    edited = tmp_path / "dkgm"
    shutil.copytree(REPO / "dkgm", edited)
    src = (edited / "networks.py").read_text()
    (edited / "networks.py").write_text(src.replace("ARCHS = (", "ARCHS: tuple[str, ...] = (", 1))
    monkeypatch.setattr(dkgm, "__file__", str(edited / "__init__.py"))
    with caplog.at_level(logging.INFO, logger="dkgm"):
        run_stages(project, "train_debiaser")
    timings = json.loads((project / "reports/train/timings.json").read_text())
    assert timings["resumed_from_kimg"] == 0  # trained, not resumed
    folders = sorted((project / fitting.STATES).iterdir())
    assert len(folders) == 2 and old[0] in folders
    assert [r for r in caplog.messages if "ignored the training states in " + old[0].name in r]
    # a library file outside the training code (the metrics) leaves the key alone
    (edited / "metrics.py").write_text((edited / "metrics.py").read_text() + "\n# an edit\n")
    assert fitting.training_code() == json.loads((folders[-1] if folders[-1] != old[0] else folders[0])
                                                        .joinpath(fitting.KEY_FILE).read_text())["code"]


def test_train_stage_rejects_mismatched_architecture(project):
    write_params(project, {"debiaser": {"arch": "mlp"}})
    run_stages(project, "prepare", "fit_kde", "gate_kde")
    with pytest.raises(DKGMError, match="does not fit mnist5k"):
        run_stages(project, "train_debiaser")
    assert not (project / "models").exists()


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    script = str(REPO / "tests" / "scripts" / "ddp_train.py")
    subprocess.run([sys.executable, script, str(tmp_path / "one.pt")], env=env, check=True, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    script, str(tmp_path / "two.pt")], env=env, check=True, timeout=300, capture_output=True)
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    for part in ("net", "ema"):
        for k in one[part]:
            # same global batch; only the gradient summation order differs
            torch.testing.assert_close(two[part][k], one[part][k], rtol=1e-4, atol=1e-5, msg=f"{part}.{k}")
