"""The diffusion baseline (DESIGN 2.4): what a user would pick instead of DKGM, trained and scored in
the same run.

The same network, the same trainer and the same training budget (images seen) as the debiaser:
`train_baseline` reads those keys of the `debiaser` section one by one (`reads`), so a change to
them re-runs both branches, while DKGM-only keys (debiaser.sigma_max_margin and its noise distribution, kde.*, calibrate.*,
sample_kde.*, refine.*) leave this branch alone, and `baseline.*` leaves DKGM alone. (The
scoring is its own module, stages/evaluate_baseline.py, so that an edit to the evaluation code
re-scores the baseline without re-training it.) It differs
from DKGM in two things only: the training range and distribution (EDM: ln sigma ~ N(-1.2, 1.2^2)
up to sigma_max = 80) and the start of sampling (pure noise at sigma_max instead of a KDE sample at
sigma_0 = h), with the same update rule (dkgm.sampler) and the same per-sample seeding (sample s
uses seed + s; `sample_baseline.seed` defaults to sample_kde's).

`baseline.enabled: false` switches the branch off: each stage then writes its outputs as records
that say it was skipped, and the report shows the baseline as not run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from dkgm import data as ds
from dkgm.devices import process_rank, resolve_device, resolve_precision
from dkgm.errors import DKGMError
from dkgm.figures import image_grid, new_figure, save_figure, write_png
from stages import fitting
from stages.artifacts import BASELINE_LOG, BASELINE_SAMPLES, BASELINE_SNAPSHOT, PREPARED, load_prepared
from stages.common import Progress, log, staged_outputs, write_json, write_metrics, write_parquet
from stages.contract import Device, Out, Section, Stage
from stages.sampling import denoise_fn, sample_from_noise

TRAIN_LOG = BASELINE_LOG
TRAIN_LOSS = "reports/train_baseline/loss.png"
TRAIN_METRICS = "reports/train_baseline/metrics.json"
STATES = "checkpoints/baseline"
SAMPLE_GRID = "reports/sample_baseline/grid.png"
SAMPLE_METRICS = "reports/sample_baseline/metrics.json"
HELD_OUT_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 80.0)  # held-out denoising error at these sigma
SKIPPED = "baseline.enabled is false"


class BaselineParams(Section):
    enabled: bool = Field(True, description="false: the baseline's stages record that they were skipped")
    sigma_max: float = Field(80.0, gt=0.0, description="EDM's largest training and sampling noise level")
    p_mean: float = Field(-1.2, description="EDM's training distribution: ln sigma ~ N(p_mean, p_std^2)")
    p_std: float = Field(1.2, gt=0.0, description="its spread (EDM: 1.2)")


class SampleBaselineParams(Section):
    steps: int = Field(18, ge=1, description="K on the Karras ladder from sigma_max (EDM: 18 Heun steps = 35 NFE)")
    solver: Literal["euler", "heun"] = Field("heun", description="euler | heun: DKGM's update rule")
    eta: float = Field(0.0, ge=0.0, le=1.0, description="0: the probability-flow ODE")
    rho: float = Field(7.0, gt=0.0, description="Karras ladder exponent")
    sigma_min: float = Field(0.002, gt=0.0, description="last non-zero noise level")
    n_samples: int = Field(500, ge=1, description="evaluate_baseline scores the first evaluate.n_samples")
    seed: int = Field(
        1_000_000, ge=0,
        description="sample s uses seed + s: must equal sample_kde.seed (checked: sample s of both is paired)",
    )
    batch_size: int = Field(250, ge=1, description="speed only")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto | fp32 | bf16")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    grid_samples: int = Field(64, ge=1, description="samples in reports/sample_baseline/grid.png")


def is_skipped(meta: dict[str, Any]) -> bool:
    return bool(meta.get("skipped"))


# ----------------------------------------------------------------------------- train_baseline


def debiaser_params(shared: dict[str, Any]) -> fitting.DebiaserParams:
    """The shared network and trainer keys as a debiaser section (DKGM-only keys at their defaults, unused)."""
    return fitting.DebiaserParams(**{key.split(".", 1)[1]: value for key, value in shared.items()})


def train_run(cfg: BaselineParams, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dkgm.debias import denoising_mse, make_snapshot
    from dkgm.networks import count_parameters

    root = Path(root)
    if not cfg.enabled:
        if process_rank()[0] != 0:  # under torchrun: rank 0 writes the skipped record
            return {}
        metrics = {"skipped": True, "reason": SKIPPED}
        with staged_outputs(root, "train_baseline") as out:
            torch.save({"skipped": True, "reason": SKIPPED}, out.path(BASELINE_SNAPSHOT))
            write_parquet(out.path(TRAIN_LOG), {"step": []})
            _skipped_figure(out.path(TRAIN_LOSS))
            write_metrics(out, TRAIN_METRICS, metrics)
        log.info("train_baseline: skipped (%s)", SKIPPED)
        return metrics
    dcfg = debiaser_params(shared)
    prepared = load_prepared(root)
    fitted = fitting.fit(dcfg, prepared, root, h=1.0, data_extra={"branch": "diffusion baseline"},
                         label="train_baseline", states=STATES, sigma_max=cfg.sigma_max, sigma_dist="lognormal",
                         p_mean=cfg.p_mean, p_std=cfg.p_std)
    if fitted is None:
        return {}
    result, train_cfg = fitted.result, fitted.train_cfg
    ema = result.ema.eval()
    val = torch.from_numpy(prepared.split("val")[: dcfg.eval_images])
    metrics: dict[str, Any] = {
        "sigma_min": train_cfg.sigma_min, "sigma_max": train_cfg.sigma_max, "sigma_dist": "lognormal",
        "p_mean": cfg.p_mean, "p_std": cfg.p_std, "sigma_data": fitted.sigma_data,
        "final_loss": result.log[-1]["loss"] if result.log else float("nan"), "kimg": result.nimg / 1000,
        "images_per_second": result.images_per_second, "train_seconds": result.train_seconds,
        "invocation_seconds": result.seconds,
        "resumed_from_kimg": (result.resumed_from or 0) / 1000, "parameters": count_parameters(fitted.denoiser),
        "precision": train_cfg.precision, "device": str(fitted.device), "arch": dcfg.arch,
    }
    for sigma in HELD_OUT_SIGMAS:
        err = denoising_mse(ema, val, sigma, torch.Generator().manual_seed(12345))
        metrics[f"val_ratio_sigma_{_tag(sigma)}"] = err / (sigma * sigma)
    snapshot = make_snapshot(ema, fitted.net_cfg.to_dict(), sigma_min=train_cfg.sigma_min, sigma_max=train_cfg.sigma_max,
                             train=train_cfg.to_dict(), kimg=result.nimg / 1000, dataset=prepared.meta["dataset"],
                             code_version=fitting.code_version(), branch="diffusion baseline")
    with staged_outputs(root, "train_baseline") as out:
        torch.save(snapshot, out.path(BASELINE_SNAPSHOT))
        rows = result.log
        write_parquet(out.path(TRAIN_LOG), {k: [r.get(k, float("nan")) for r in rows] for k in (rows[0] if rows else
                                                                                             {"step": 0})})
        fitting.loss_plot(out.path(TRAIN_LOSS), rows, "diffusion baseline training loss (EDM range and distribution)")
        write_metrics(out, TRAIN_METRICS, metrics)
    log.info("train_baseline: %.1f kimg at %.0f img/s, held-out error ratio at sigma = 1: %.3f", metrics["kimg"],
             metrics["images_per_second"], metrics["val_ratio_sigma_1"])
    return metrics


def _tag(sigma: float) -> str:
    return f"{sigma:g}".replace(".", "p")


def _skipped_figure(path: Path) -> None:
    fig, ax = new_figure(4, 1.6)
    ax.text(0.5, 0.5, f"skipped: {SKIPPED}", ha="center", va="center")
    ax.set_axis_off()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- sample_baseline


def sample_run(cfg: SampleBaselineParams, root: Path) -> dict[str, Any]:
    import torch

    from dkgm.debias import load_denoiser

    root = Path(root)
    snap_meta = torch.load(root / BASELINE_SNAPSHOT, map_location="cpu", weights_only=True)
    if snap_meta.get("skipped"):
        metrics = {"skipped": True, "reason": SKIPPED}
        with staged_outputs(root, "sample_baseline") as out:
            base = out.path(BASELINE_SAMPLES)
            base.mkdir()
            np.save(base / "samples.npy", np.zeros((0,), np.uint8))
            write_parquet(base / "manifest.parquet", {"sample_id": np.zeros(0, np.int64)})
            write_json(base / "meta.json", {"skipped": True, "reason": SKIPPED})
            _skipped_figure(out.path(SAMPLE_GRID))
            write_metrics(out, SAMPLE_METRICS, metrics)
        return metrics
    device = resolve_device(cfg.device, "sample_baseline.device")
    denoiser, snap = load_denoiser(root / BASELINE_SNAPSHOT, device)
    shape = tuple(snap["network"]["shape"])
    fn = denoise_fn(denoiser, device, resolve_precision(cfg.precision, device, "sample_baseline.precision"))
    seeds = cfg.seed + np.arange(cfg.n_samples, dtype=np.int64)
    t0 = time.perf_counter()
    bar = Progress("sample_baseline", cfg.n_samples)
    x, nfe = sample_from_noise(fn, seeds, shape, float(snap["sigma_max"]), cfg.steps, cfg.solver, cfg.eta, device,
                               cfg.batch_size, cfg.rho, cfg.sigma_min, bar)
    bar.close()
    seconds = time.perf_counter() - t0
    if not np.isfinite(x).all():
        raise DKGMError(f"sample_baseline: {int((~np.isfinite(x)).any(axis=tuple(range(1, x.ndim))).sum())} samples "
                        "are not finite: the baseline diverged (check train_baseline's loss)")
    images = len(shape) == 3
    metrics = {"n_samples": cfg.n_samples, "steps": cfg.steps, "solver": cfg.solver, "eta": cfg.eta, "nfe": nfe,
               "sigma0": float(snap["sigma_max"]), "samples_per_second": cfg.n_samples / max(seconds, 1e-9),
               "seconds": seconds, "device": str(device)}
    with staged_outputs(root, "sample_baseline") as out:
        base = out.path(BASELINE_SAMPLES)
        base.mkdir()
        np.save(base / "samples.npy", ds.to_uint8(x) if images else x)
        write_parquet(base / "manifest.parquet", {"sample_id": np.arange(cfg.n_samples), "seed": seeds,
                                                  "nfe": np.full(cfg.n_samples, nfe, dtype=np.int64)})
        write_json(base / "meta.json", {"shape": list(shape), "n": cfg.n_samples, "nfe": nfe, "start": "noise",
                                        "sigma0": float(snap["sigma_max"]), "steps": cfg.steps, "solver": cfg.solver,
                                        "storage": "uint8 [0, 255]" if images else "float32"})
        if images:
            write_png(out.path(SAMPLE_GRID), image_grid(ds.to_uint8(x[: cfg.grid_samples]), ncol=8))
        else:
            fig, ax = new_figure(5, 5)
            ax.scatter(x[:, 0], x[:, 1], s=2)
            ax.set_aspect("equal")
            save_figure(fig, out.path(SAMPLE_GRID))
        write_metrics(out, SAMPLE_METRICS, metrics)
    log.info("sample_baseline: %d samples from noise at sigma %.3g, K=%d %s, NFE %d, %.1f samples/s", cfg.n_samples,
             metrics["sigma0"], cfg.steps, cfg.solver, nfe, metrics["samples_per_second"])
    return metrics


SHARED_TRAINING = tuple(f"debiaser.{k}" for k in fitting.SHARED_KEYS)

STAGES = (
    Stage(
        name="train_baseline",
        distributed=True,
        doc="train the diffusion baseline: the debiaser's network, trainer and budget over EDM's noise range",
        section="baseline",
        params=BaselineParams,
        deps=(PREPARED,),
        outs=(Out(BASELINE_SNAPSHOT), Out(TRAIN_LOG, "table"),
              Out(TRAIN_LOSS, "figure", "Baseline training loss", "EDM loss of the diffusion baseline against "
                  "thousands of images seen (the same network, trainer and budget as the debiaser)"),
              Out(TRAIN_METRICS, "metrics")),
        run=train_run,
        reads=SHARED_TRAINING,
        summary=(("kimg", "kimg trained"), ("final_loss", "final training loss"), ("sigma_max", "σ_max"),
                 ("val_ratio_sigma_1", "error ratio at σ = 1"), ("images_per_second", "images/s"),
                 ("train_seconds", "train seconds")),
    ),
    Stage(
        name="sample_baseline",
        doc="sample the diffusion baseline from pure noise at sigma_max with DKGM's update rule and seeding",
        section="sample_baseline",
        params=SampleBaselineParams,
        deps=(BASELINE_SNAPSHOT,),
        outs=(Out(BASELINE_SAMPLES),
              Out(SAMPLE_GRID, "figure", "Diffusion baseline samples", "samples of the baseline from pure noise",
                  "the baseline's points", grid=True),
              Out(SAMPLE_METRICS, "metrics")),
        run=sample_run,
        summary=(("nfe", "NFE"), ("steps", "steps K"), ("solver", "solver"), ("samples_per_second", "samples/s")),
    ),
)
