"""Stage refine: debias the stage-1 KDE samples with the trained debiaser (DESIGN 2.3).

Every sample keeps its seed: the noise xi_k of sample s comes from a generator derived from
seed s alone (stream "refine"), so sample s is the same whatever the batch size or device.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from dkgm import data as ds
from dkgm.devices import init_distributed, resolve_precision
from dkgm.errors import DKGMError
from dkgm.figures import labeled_grid, new_figure, save_figure, write_png
from dkgm.kinds import DataKind
from stages.artifacts import (
    DEBIASER_SNAPSHOT,
    KDE_SAMPLES,
    OPERATING_POINT,
    PREPARED,
    REFINED,
    check_noise_range,
    load_point,
    load_prepared,
    load_samples,
    resolve_value,
)
from stages.common import Progress, log, open_npy, staged_outputs, write_json, write_metrics, write_parquet
from stages.contract import AutoOr, Device, Out, Section, Stage, auto_or_number
from stages.gates import gate_token
from stages.sampling import debias_batch, denoise_fn, sampler_config

GRID = "reports/refine/grid.png"
TRAJECTORY = "reports/refine/trajectory.png"
PROGRESS = "reports/refine/progress.png"
METRICS = "reports/refine/metrics.json"


class RefineParams(Section):
    schedule: Literal["geometric", "karras", "robbins_monro"] = Field(
        "karras",
        description="noise ladder from sigma_0 = h: karras | geometric | robbins_monro (sweep: karras wins at"
                    " K = 10)",
    )
    steps: int = Field(10, ge=1, description="K ladder steps (NFE = K with euler, 2K - 1 with heun)")
    eta: AutoOr = Field(
        "auto",
        description="debiasing noise level in [0, 1] (0: probability-flow ODE, 1: ancestral); auto: "
                    "calibrate's",
    )

    _eta = field_validator("eta", mode="before")(classmethod(lambda cls, v: auto_or_number(v, 0.0, 1.0)))
    solver: Literal["euler", "heun"] = Field("euler", description="euler | heun")
    sigma_min: float = Field(0.002, gt=0.0, description="last non-zero noise level (geometric, karras)")
    rho: float = Field(7.0, gt=0.0, description="karras ladder exponent")
    a0: float = Field(0.3, gt=0.0, lt=1.0, description="robbins_monro step sizes a_k = a0 / (k+1)^gamma")
    gamma: float = Field(0.55, gt=0.5, le=1.0, description="robbins_monro exponent, in (1/2, 1]")
    churn: float = Field(
        0.0, ge=0.0,
        description="EDM's S_churn: raise sigma_k by gamma = min(churn / K, sqrt(2) - 1) before the step (0: "
                    "off)",
    )
    churn_min: float = Field(0.05, ge=0.0, description="churn only on steps with sigma_k in [churn_min, churn_max]")
    churn_max: float = Field(1.0, gt=0.0, description="the largest sigma_k that gets churn")
    batch_size: int = Field(250, ge=1, description="speed only: samples do not depend on it")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto (bf16 autocast on CUDA and bf16-capable CPUs: 2.4x here) | fp32 | bf16",
    )
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    grid_samples: int = Field(64, ge=1, description="samples in reports/refine/grid.png")
    trajectory_samples: int = Field(
        8, ge=1,
        description="rows of reports/refine/trajectory.png (x_k at k = 0, K/4, K/2, 3K/4, K, then the anchor)",
    )


def figure_steps(k: int) -> list[int]:
    """k = 0, K/4, K/2, 3K/4, K (rounded, distinct)."""
    return sorted({round(k * f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)})


def run(cfg: RefineParams, root: Path) -> dict[str, Any]:
    """Read the KDE samples and the debiaser, debias every batch into the staged samples file (under
    torchrun: every world-th batch per rank, rank 0 publishing), then the metrics and figures."""
    from dkgm.debias import load_denoiser

    prepared = load_prepared(root)
    x_kde, manifest, kde_meta = load_samples(root, KDE_SAMPLES, "KDE samples", mmap=True)
    rank, world, device = init_distributed(cfg.device, "refine.device")  # torchrun: batches shared by rank
    denoiser, snap = load_denoiser(root / DEBIASER_SNAPSHOT, device)
    shape = tuple(snap["network"]["shape"])
    if tuple(x_kde.shape[1:]) != shape:
        raise DKGMError(
            f"the debiaser snapshot was trained on data of shape {shape} but the KDE samples have shape "
            f"{tuple(x_kde.shape[1:])}: re-run train_debiaser (or `dvc repro`)"
        )
    h = float(kde_meta["h"])
    check_noise_range(snap, h, "sample_kde.bandwidth_scale")
    eta, eta_source = resolve_value(cfg.eta, load_point(root), "eta", "refine.eta")
    ladder = sampler_config(cfg).ladder(h, eta)
    nfe = ladder.nfe(cfg.solver)
    precision = resolve_precision(cfg.precision, device, "refine.precision")
    fn = denoise_fn(denoiser, device, precision)
    kind, n = prepared.kind, len(x_kde)

    with staged_outputs(root, "refine") if rank == 0 else contextlib.nullcontext() as outs:
        base = outs.path(REFINED) if rank == 0 else None
        out = _open_output(base, kind, x_kde.shape, world, rank)
        t0 = time.perf_counter()
        per_k, traj = _debias_into(out, fn, x_kde, manifest, prepared, ladder, cfg, device, rank, world)
        seconds = time.perf_counter() - t0
        if world > 1:
            per_k, traj = _gather(per_k, traj)
            if rank != 0:
                del out
                return {}
        curve = per_k.mean(axis=1)
        metrics: dict[str, Any] = {
            "n_samples": n, "steps": cfg.steps, "nfe": nfe, "schedule": cfg.schedule, "solver": cfg.solver,
            "churn": cfg.churn, "eta": eta, "eta_source": eta_source,
            "bandwidth_scale": float(kde_meta.get("bandwidth_scale", 1.0)), "h": h,
            "samples_per_second": n / max(seconds, 1e-9), "seconds": seconds, "device": str(device),
            "precision": precision, "world_size": world,
            **kind.progress_metrics(curve, prepared.manifold(), lambda: prepared.split("train")),
        }
        write_parquet(base / "manifest.parquet", {
            "sample_id": manifest["sample_id"].to_numpy(), "seed": manifest["seed"].to_numpy(),
            "anchor_index": manifest["anchor_index"].to_numpy(), "nfe": np.full(n, nfe, dtype=np.int64)})
        write_json(base / "meta.json", {"kind": kind.name, "shape": list(shape), "n": n, "h": h, "nfe": nfe,
                                        "storage": kind.storage_label, "ladder": ladder.sigmas,
                                        "schedule": cfg.schedule, "solver": cfg.solver, "churn": cfg.churn, "eta": eta,
                                        "bandwidth_scale": kde_meta.get("bandwidth_scale")})
        _figures(outs, out, traj, curve, prepared, manifest, ladder.sigmas, metrics, cfg, eta)
        del out  # close the map before the staged folder is published
        write_metrics(outs, METRICS, metrics)
    log.info("refine: %d samples, K=%d %s/%s eta=%.2f (%s), NFE %d, %.1f samples/s", n, cfg.steps, cfg.schedule,
             cfg.solver, eta, eta_source, nfe, metrics["samples_per_second"])
    return metrics


def _open_output(base: Path | None, kind: DataKind, shape: tuple[int, ...], world: int, rank: int) -> np.ndarray:
    """The staged samples file, memory-mapped: rank 0 creates it; under torchrun the other ranks map
    rank 0's file (one machine, or a shared disk) and write their rows into it."""
    import torch

    if rank == 0:
        base.mkdir()
        out = open_npy(base / "samples.npy", np.dtype(kind.storage), shape)
    if world > 1:
        shared = [str(base / "samples.npy") if rank == 0 else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        if rank != 0:
            out = np.load(shared[0], mmap_mode="r+")
    return out


def _debias_into(out: np.ndarray, fn, x_kde: np.ndarray, manifest, prepared, ladder, cfg: RefineParams, device,
                 rank: int, world: int) -> tuple[np.ndarray, dict[int, dict[int, np.ndarray]]]:
    """Debias this rank's batches into `out`, batch by batch (memory holds one batch of samples,
    iterates and anchors, whatever n is). Returns the distance to the data of every sample at every
    step k (zero in other ranks' rows) and the iterates the figures show, {k: {batch start: x_k}}:
    the first trajectory_samples for images, every point for points."""
    kind, manifold, n = prepared.kind, prepared.manifold(), len(x_kde)
    all_k, shown = list(range(cfg.steps + 1)), figure_steps(cfg.steps)
    keep = cfg.trajectory_samples if kind.pixels else n
    per_k = np.zeros((len(all_k), n))
    traj: dict[int, dict[int, np.ndarray]] = {k: {} for k in shown}
    seeds, anchor_rows = manifest["seed"].to_numpy(), manifest["anchor_index"].to_numpy()
    # a sample's noise comes from its own seed, so which rank refines it does not change it (bit-identical
    # to one process on the CPU)
    mine = list(range(0, n, cfg.batch_size))[rank::world]
    bar = Progress("refine", n) if rank == 0 else None
    for i, s in enumerate(mine):
        rows = slice(s, s + cfg.batch_size)
        x_out, kept = debias_batch(fn, np.array(x_kde[rows]), seeds[rows], ladder, cfg.solver, device, keep=all_k)
        bad = ~np.isfinite(x_out.reshape(len(x_out), -1)).all(axis=1)
        if bad.any():  # a diverged sampler: never store (or score) NaN as black pixels
            first = next(k for k in all_k if not np.isfinite(kept[k][bad]).all())
            raise DKGMError(f"refine: {int(bad.sum())} of the {len(x_out)} samples from {s} on became non-finite "
                            f"(first at step k = {first} of {cfg.steps}, sigma = {ladder.sigmas[max(first - 1, 0)]:.4g}); "
                            "nothing was written: check the debiaser (reports/train) and refine.steps / eta")
        out[rows] = kind.store(x_out)
        anchors = prepared.items(anchor_rows[rows])
        for j, k in enumerate(all_k):
            per_k[j, rows] = kind.distance_to_data(kept[k], anchors, manifold)
            if k in traj and s < keep:
                traj[k][s] = kept[k][: keep - s]
        if bar is not None:
            bar(min((i + 1) * cfg.batch_size * world, n))
    out.flush()
    if bar is not None:
        bar.close()
    return per_k, traj


def _gather(per_k: np.ndarray, traj: dict[int, dict[int, np.ndarray]]) -> tuple[np.ndarray, dict]:
    """torchrun: every rank's distances (each sample's row is filled by exactly one rank) and iterates,
    once every rank's rows are in the file."""
    import torch

    per_k_t = torch.from_numpy(per_k)
    torch.distributed.all_reduce(per_k_t)
    pieces: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(pieces, traj)
    traj = {k: {s: v for part in pieces for s, v in part[k].items()} for k in traj}
    torch.distributed.barrier()
    return per_k_t.numpy(), traj


def _figures(outs, out: np.ndarray, traj: dict[int, dict[int, np.ndarray]], curve: np.ndarray, prepared, manifest,
             sigmas: list[float], metrics: dict[str, Any], cfg: RefineParams, eta: float) -> None:
    kind, manifold = prepared.kind, prepared.manifold()
    stacked = {k: np.concatenate([traj[k][s] for s in sorted(traj[k])]) for k in traj}
    train = None if kind.pixels else prepared.split("train")
    kind.sample_figure(outs.path(GRID), out, train, "refined", limit=cfg.grid_samples)
    if kind.pixels:
        rows = manifest["anchor_index"].to_numpy()[: cfg.trajectory_samples]
        _trajectory_images(outs.path(TRAJECTORY), stacked, prepared.items(rows),
                           manifest["sample_id"].to_numpy()[: cfg.trajectory_samples])
    else:
        _swissroll_figure(outs.path(TRAJECTORY), stacked, train, manifold, cfg, eta)
    _progress_plot(outs.path(PROGRESS), sigmas, curve, kind.distance_label,
                   metrics.get("train_mean_distance_to_manifold"))


def _trajectory_images(path: Path, stacked: dict[int, np.ndarray], anchors: np.ndarray, ids: np.ndarray) -> None:
    """One row per sample: x_k at k = 0, K/4, K/2, 3K/4, K, then its anchor."""
    cols = [ds.to_uint8(stacked[k]) for k in sorted(stacked)] + [ds.to_uint8(anchors)]
    rows = list(np.stack(cols, axis=1))
    write_png(path, labeled_grid(rows, [f"sample {int(i)}" for i in ids],
                                 [f"k = {k}" for k in sorted(stacked)] + ["anchor"]))


def _swissroll_figure(path: Path, stacked: dict[int, np.ndarray], train: np.ndarray, roll, cfg: RefineParams,
                      eta: float) -> None:
    """The paper's panels: the KDE input, the iterates at several k, the ground truth."""
    import matplotlib.pyplot as plt

    ks = sorted(stacked)
    fig, axes = plt.subplots(1, len(ks) + 1, figsize=(3 * (len(ks) + 1), 3.2), dpi=110, sharex=True, sharey=True)
    curve = roll.curve(np.linspace(roll.t_min, roll.t_max, 800))
    for ax, k in zip(axes, ks):
        pts = stacked[k]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, c="C0" if k else "C1")
        ax.plot(curve[:, 0], curve[:, 1], "r-", lw=0.4, alpha=0.6)
        ax.set_title("KDE input (k = 0)" if k == 0 else f"k = {k}", fontsize=9)
    axes[-1].scatter(train[:, 0], train[:, 1], s=1, c="k")
    axes[-1].set_title("ground truth (train)", fontsize=9)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"iterative debiasing, {cfg.schedule}/{cfg.solver}, eta = {eta:g}", fontsize=10)
    save_figure(fig, path)


def _progress_plot(path: Path, sigmas: list[float], curve: np.ndarray, ylabel: str, floor: float | None) -> None:
    fig, ax = new_figure(6, 3.8)
    ax.plot(range(len(curve)), curve, "o-", ms=3, label="mean over samples")
    if floor is not None:
        ax.axhline(floor, color="grey", ls="--", label="training data")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("step k")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax.twinx()
    ax2.plot(range(len(sigmas)), sigmas, color="C3", lw=0.8, alpha=0.6)
    ax2.set_ylabel("sigma_k", color="C3")
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path)


STAGES = (
    Stage(
        name="refine",
        distributed=True,
        doc="debias the stage-1 KDE samples with the trained debiaser (the iterative update on a noise ladder from h)",
        section="refine",
        params=RefineParams,
        deps=(PREPARED, KDE_SAMPLES, DEBIASER_SNAPSHOT, OPERATING_POINT, gate_token("debiaser")),
        outs=(
            Out(REFINED),
            Out(GRID, "figure", "Refined samples (stage 2)", "the debiased samples",
                "the debiased points over the training data", grid=True),
            Out(TRAJECTORY, "figure", "Trajectory over k",
                "one row per sample: x_k at k = 0, K/4, K/2, 3K/4, K, then its anchor",
                "the swiss-roll panels: KDE input, the iterates at several k, the ground truth"),
            Out(PROGRESS, "figure", "Refine progress",
                "mean RMS distance to the anchor at every step k, with the noise ladder σ_k",
                "mean distance to the true spiral at every step k, with the noise ladder σ_k"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        summary=(("steps", "steps K"), ("nfe", "NFE"), ("schedule", "schedule"), ("solver", "solver"), ("eta", "η"),
                 ("eta_source", "η from"),
                 ("kde_rms_distance_to_anchor", "RMS distance to anchor at k = 0"),
                 ("rms_distance_to_anchor", "RMS distance to anchor at k = K"),
                 ("kde_mean_distance_to_manifold", "distance to manifold at k = 0"),
                 ("mean_distance_to_manifold", "distance to manifold at k = K"),
                 ("train_mean_distance_to_manifold", "training data's distance to manifold"),
                 ("samples_per_second", "samples/s"), ("precision", "precision")),
    ),
)
