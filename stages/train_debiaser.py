"""Stage train_debiaser: train the noise-level-conditioned debiaser D(x; sigma) (DESIGN 2.2).

Training states go to checkpoints/debiaser/<config hash>/ (outside DVC, persisted): a re-run
with the same configuration resumes from the newest state, a changed configuration starts
afresh in its own folder. The DVC output is the inference snapshot (EMA weights + config).
Under torchrun (WORLD_SIZE > 1) each rank trains on its slice of the global batch; rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

import dkgm
from dkgm import data as ds
from dkgm.debias import Denoiser, denoising_curve, denoising_mse, make_snapshot
from dkgm.devices import init_distributed, resolve_precision
from dkgm.errors import DKGMError
from dkgm.networks import NetworkConfig, build_network, count_parameters
from dkgm.training import TrainConfig, train
from stages.artifacts import BANDWIDTH, DEBIASER_SNAPSHOT, PREPARED, Prepared, load_bandwidth, load_prepared
from stages.common import (
    Progress,
    labeled_grid,
    log,
    new_figure,
    save_figure,
    staged_outputs,
    write_json,
    write_metrics,
    write_parquet,
    write_png,
)
from stages.contract import Device, Out, Section, Stage
from stages.gates import Check, EnforcedSection, Gate, check, gate_token

STATES = "checkpoints/debiaser"  # resumable training states, outside DVC (one folder per config)
LOG = "reports/train/log.parquet"
LOSS_PLOT = "reports/train/loss.png"
DENOISE_PLOT = "reports/train/denoise.png"
METRICS = "reports/train/metrics.json"


class DebiaserParams(Section):
    arch: Literal["unet", "dae", "mlp"] = "unet"  # unet | dae (no skip connections: the ablation) | mlp (points)
    channels: int = Field(32, ge=1)  # base width (DDPM CIFAR-10: 128)
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per resolution (DDPM CIFAR-10: 1,2,2,2)
    num_blocks: int = Field(1, ge=1)  # residual blocks per resolution (DDPM CIFAR-10: 2)
    attn_resolutions: tuple[int, ...] = (8,)  # feature-map sizes with self-attention (DDPM CIFAR-10: 16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    embedding: Literal["positional", "fourier"] = "positional"  # noise-level embedding
    sigma_min: float = Field(0.002, gt=0.0)  # smallest training noise level
    sigma_max_margin: float = Field(1.5, ge=1.0)  # sigma_max = margin x the largest calibrate scale x h_kde: the network covers every candidate start
    sigma_dist: Literal["lognormal", "lognormal_truncated", "loguniform"] = "lognormal"  # training noise levels on [sigma_min, sigma_max]: EDM's log-normal clipped | truncated | log-uniform (the ablation)
    p_mean: float = -1.2  # log-normal: ln sigma ~ N(p_mean, p_std^2)
    p_std: float = Field(1.2, gt=0.0)
    batch_size: int = Field(64, ge=1)  # global batch
    total_kimg: float = Field(40.0, gt=0.0)  # training length, thousands of images seen
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_kimg: float = Field(2.0, ge=0.0)  # linear learning-rate warm-up
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up: constant | cosine (down to 0 at total_kimg; a longer total_kimg is then a new run)
    adam_beta2: float = Field(0.99, gt=0.0, lt=1.0)  # AdamW's second-moment decay
    grad_clip: float = Field(1.0, ge=0.0)  # max gradient norm (0 = off)
    ema_halflife_kimg: float = Field(5.0, gt=0.0)  # EMA half-life
    ema_rampup_ratio: float | None = Field(0.05, gt=0.0)  # EMA half-life <= ratio x images seen (null = off)
    seed: int = Field(0, ge=0)
    log_every: int = Field(20, ge=1)  # steps per log row
    state_every_kimg: float = Field(10.0, gt=0.0)  # thousands of images between resumable states
    keep_states: int = Field(2, ge=1)  # newest states kept
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA and on CPUs with bf16 units
    compile: bool = False  # torch.compile the network
    device: Device = "auto"  # auto | cpu | cuda | cuda:N
    eval_images: int = Field(500, ge=1)  # held-out images for the denoising error (at sigma = h and at each calibrate scale)


def sigma_max_for(cfg: DebiaserParams, h: float, scales: tuple[float, ...]) -> float:
    """DKGM's largest training noise level: margin x the largest candidate start s x h_kde (DESIGN
    2.2), so the calibration grid and the network's range follow each other."""
    return cfg.sigma_max_margin * max(scales) * h


def configs(cfg: DebiaserParams, h: float, shape: tuple[int, ...], device: torch.device, *,
            sigma_max: float, p_mean: float | None = None, p_std: float | None = None,
            sigma_dist: str | None = None) -> tuple[NetworkConfig, TrainConfig]:
    """The network and the trainer of a debiaser section over [sigma_min, sigma_max]. The noise
    distribution is the section's (sigma_dist, p_mean, p_std) unless given: the diffusion baseline
    trains the same network with the same trainer and optimizer over EDM's range and distribution."""
    net = NetworkConfig(
        arch=cfg.arch,
        channels=cfg.channels,
        channel_mult=tuple(cfg.channel_mult),
        num_blocks=cfg.num_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        embedding=cfg.embedding,
        shape=tuple(shape),
    )
    if cfg.sigma_min >= sigma_max:
        raise DKGMError(f"debiaser.sigma_min ({cfg.sigma_min}) must be below sigma_max = {sigma_max:.4g} "
                        "(debiaser.sigma_max_margin x the largest calibrate.scales x h_kde)")
    train_cfg = TrainConfig(
        batch_size=cfg.batch_size,
        total_kimg=cfg.total_kimg,
        lr=cfg.lr,
        betas=(0.9, cfg.adam_beta2),
        weight_decay=cfg.weight_decay,
        warmup_kimg=cfg.warmup_kimg,
        lr_schedule=cfg.lr_schedule,
        grad_clip=cfg.grad_clip,
        ema_halflife_kimg=cfg.ema_halflife_kimg,
        ema_rampup_ratio=cfg.ema_rampup_ratio,
        sigma_min=cfg.sigma_min,
        sigma_max=sigma_max,
        sigma_dist=sigma_dist or cfg.sigma_dist,
        p_mean=cfg.p_mean if p_mean is None else p_mean,
        p_std=cfg.p_std if p_std is None else p_std,
        seed=cfg.seed,
        log_every=cfg.log_every,
        state_every_kimg=cfg.state_every_kimg,
        keep_states=cfg.keep_states,
        precision=resolve_precision(cfg.precision, device, "debiaser.precision"),
        channels_last=device.type == "cuda" and len(shape) == 3,
        compile=cfg.compile,
    )
    return net, train_cfg


# the keys that define the network, the trainer, the optimizer and the budget: the diffusion baseline reads
# these (stages/baseline.py), so both branches train the same network the same way; the noise range is DKGM's own
DKGM_ONLY_KEYS = ("sigma_max_margin", "sigma_dist", "p_mean", "p_std")  # DKGM's noise range; the baseline has EDM's
SHARED_KEYS = tuple(k for k in DebiaserParams.model_fields if k not in DKGM_ONLY_KEYS)


SCALES_KEY = "calibrate.scales"  # the candidate starts: the network's range follows them


def _tag(scale: float) -> str:
    """2.5 -> "s2p5": a metrics key without dots (dvc would read a dot as nesting)."""
    return "s" + f"{scale:g}".replace(".", "p")


def states_root(root: Path) -> Path:
    """The folder training states live under: the project root, also when a stage runs in a DVC
    experiment's temporary workspace (`dvc exp run --queue` / `--temp`: <project>/.dvc/tmp/exps/...),
    which is a fresh copy without the untracked checkpoints/: states there would be lost with the
    workspace and every queued experiment would train from scratch. DKGM_STATES_ROOT overrides
    (a shared disk for several machines)."""
    if os.environ.get("DKGM_STATES_ROOT"):
        return Path(os.environ["DKGM_STATES_ROOT"]).expanduser()
    parts = Path(root).resolve().parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return Path(root)


TRAINING_CODE = ("networks.py", "debias.py", "training.py")  # the library files that define the network, loss and trainer
KEY_FILE = "key.json"  # in each state folder: what its states were made with (the hash's input, readable)


def training_code() -> str:
    """A hash of the source files that define the network, the loss and the trainer: a state made by
    other code is another model, never resumed as this one (other dkgm files, such as the metrics,
    leave finished states usable)."""
    src = Path(dkgm.__file__).parent
    digest = hashlib.sha256()
    for name in TRAINING_CODE:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    return digest.hexdigest()[:12]


def state_key(net: NetworkConfig, train_cfg: TrainConfig, data_key: dict[str, Any]) -> dict[str, Any]:
    return {"net": net.to_dict(), "train": train_cfg.trajectory_key(), "data": data_key, "code": training_code()}


def state_dir(root: Path, net: NetworkConfig, train_cfg: TrainConfig, data_key: dict[str, Any],
              states: str = STATES) -> Path:
    key = json.dumps(state_key(net, train_cfg, data_key), sort_keys=True)
    return states_root(root) / states / hashlib.sha256(key.encode()).hexdigest()[:16]


def other_code_states(where: Path, key: dict[str, Any]) -> list[Path]:
    """Sibling state folders made with the same configuration and data but other training code: states
    this run ignores (the caller says so in one line)."""
    found = []
    for sibling in sorted(where.parent.glob("*/" + KEY_FILE)) if where.parent.is_dir() else []:
        if sibling.parent == where:
            continue
        try:
            other = json.loads(sibling.read_text())
        except (OSError, ValueError):
            continue
        if other.get("code") != key["code"] and {k: v for k, v in other.items() if k != "code"} == {
                k: v for k, v in key.items() if k != "code"}:
            found.append(sibling.parent)
    return found


def code_version() -> str:
    """The dkgm version and a hash of the library's source files: what the snapshot's network
    code actually was. (A git revision would change the snapshot's bytes, and re-run everything
    downstream, on every commit, also ones that leave the model code alone.)"""
    src = Path(dkgm.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(src.glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return f"dkgm {dkgm.__version__} src {digest.hexdigest()[:12]}"


@dataclass
class Fitted:
    rank: int
    world: int
    device: torch.device
    net_cfg: NetworkConfig
    train_cfg: TrainConfig
    result: Any  # dkgm.training.TrainResult
    data: torch.Tensor
    sigma_data: float
    denoiser: Denoiser


def fit(cfg: DebiaserParams, prepared: Prepared, root: Path, *, h: float, data_extra: dict[str, Any], label: str,
        sigma_max: float, states: str = STATES, **noise_dist: Any) -> Fitted | None:
    """Build and train (or resume) the network of a debiaser section on the training split, over
    [sigma_min, sigma_max]; None on ranks other than 0 under torchrun. `noise_dist` (sigma_dist,
    p_mean, p_std) replaces the section's: the baseline's way of training the same network with the
    same trainer over EDM's distribution."""
    if (cfg.arch == "mlp") != (prepared.kind == "points"):
        want = "mlp" if prepared.kind == "points" else "unet or dae"
        raise DKGMError(f"debiaser.arch {cfg.arch} does not fit {prepared.meta['dataset']} ({prepared.kind}): use {want}")
    train_np = prepared.split("train")
    rank, world, device = init_distributed(cfg.device, "debiaser.device")  # a CUDA device comes back with TF32 and cudnn.benchmark on
    shape = tuple(train_np.shape[1:])
    net_cfg, train_cfg = configs(cfg, h, shape, device, sigma_max=sigma_max, **noise_dist)
    data = torch.from_numpy(train_np)
    sigma_data = float(data.std())
    torch.manual_seed(cfg.seed)  # network initialisation
    denoiser = Denoiser(build_network(net_cfg), sigma_data)
    data_key = {"dataset": prepared.meta["dataset"], "n_train": len(train_np), **data_extra, "sigma_data": sigma_data,
                "source": prepared.meta.get("source_sha256", prepared.meta.get("manifold"))}
    where = state_dir(root, net_cfg, train_cfg, data_key, states)
    key = json.loads(json.dumps(state_key(net_cfg, train_cfg, data_key), sort_keys=True))
    shown = where.relative_to(root) if where.is_relative_to(root) else where
    if rank == 0:
        for other in other_code_states(where, key):
            log.info("%s: ignored the training states in %s: same configuration and data, other training code "
                     "(dkgm/%s changed since)", label, other.name, ", dkgm/".join(TRAINING_CODE))
        where.mkdir(parents=True, exist_ok=True)
        if not (where / KEY_FILE).is_file():
            write_json(where / KEY_FILE, key)
    log.info("%s: %s, %.2fM parameters, %s on %s, states in %s", label, cfg.arch, count_parameters(denoiser) / 1e6,
             train_cfg.precision, device, shown)
    bar = Progress(f"{label} (images)", int(train_cfg.total_kimg * 1000))
    result = train(denoiser, data, train_cfg, state_dir=where, device=device,
                   progress=lambda nimg, total, row: bar(nimg, total, f"loss {row['loss']:.4f}"))
    bar.close()
    if rank != 0:
        return None
    if result.resumed_from is not None:
        log.info("%s: resumed from a state at %d images", label, result.resumed_from)
    return Fitted(rank, world, device, net_cfg, train_cfg, result, data, sigma_data, denoiser)


def run(cfg: DebiaserParams, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    prepared = load_prepared(root)
    bw = load_bandwidth(root, prepared)
    h = float(bw["h"])
    scales = tuple(shared[SCALES_KEY])
    fitted = fit(cfg, prepared, root, h=h, data_extra={"h": h}, label="train_debiaser",
                 sigma_max=sigma_max_for(cfg, h, scales))
    if fitted is None:
        return {}
    world, device, net_cfg, train_cfg = fitted.world, fitted.device, fitted.net_cfg, fitted.train_cfg
    result, data, sigma_data, denoiser = fitted.result, fitted.data, fitted.sigma_data, fitted.denoiser

    # held-out denoising error at sigma = h, against the identity and the data-mean predictor
    val = torch.from_numpy(prepared.split("val")[: cfg.eval_images])
    if len(val) == 0:
        raise DKGMError("train_debiaser needs validation items for its held-out error: prepare.val_fraction is 0")
    gen = torch.Generator().manual_seed(12345)
    ema = result.ema.eval()
    mse = denoising_mse(ema, val, h, gen)
    identity = denoising_mse(lambda x, sigma: x, val, h, torch.Generator().manual_seed(12345), device="cpu")
    mean_pred = float(((val - data.mean(0)) ** 2).mean())
    # the same error where refine will start: sigma = s x h for every candidate scale of calibrate,
    # against the better of the two trivial denoisers (the identity wins at small sigma, the mean image
    # at large sigma), so that a network that denoises poorly at the operating point fails its gate
    curve = denoising_curve(ema, val, [s * h for s in scales])
    by_sigma: dict[str, float] = {}
    for s, row in zip(scales, curve):
        by_sigma[f"val_mse_{_tag(s)}"] = row["mse"]
        by_sigma[f"val_ratio_{_tag(s)}"] = row["ratio"]
    worst = max(zip(scales, curve), key=lambda p: p[1]["ratio"])
    log_rows = result.log
    metrics = {
        "val_mse_at_h": mse,
        "identity_mse_at_h": identity,
        "mean_predictor_mse": mean_pred,
        "error_ratio": mse / identity if identity > 0 else float("nan"),
        "h": h,
        "sigma_max": train_cfg.sigma_max,
        "sigma_data": sigma_data,
        "final_loss": log_rows[-1]["loss"] if log_rows else float("nan"),
        "kimg": result.nimg / 1000,
        "images_per_second": result.images_per_second,
        "train_seconds": result.train_seconds,  # the whole training, over resumed invocations
        "invocation_seconds": result.seconds,  # this process (near 0 when it resumed a finished state)
        "resumed_from_kimg": (result.resumed_from or 0) / 1000,
        "parameters": count_parameters(denoiser),
        "precision": train_cfg.precision,
        "device": str(device),
        "world_size": world,
        "arch": cfg.arch,
        "worst_start_ratio": worst[1]["ratio"],  # the largest error ratio over calibrate's candidate starts
        "worst_start_scale": worst[0],
        **by_sigma,
    }
    snapshot = make_snapshot(
        ema,
        net_cfg.to_dict(),
        sigma_min=train_cfg.sigma_min,
        sigma_max=train_cfg.sigma_max,
        h=h,
        train=train_cfg.to_dict(),
        kimg=result.nimg / 1000,
        dataset=prepared.meta["dataset"],
        code_version=code_version(),
    )
    with staged_outputs(root, "train_debiaser") as out:
        torch.save(snapshot, out.path(DEBIASER_SNAPSHOT))
        columns = {k: [r.get(k, float("nan")) for r in log_rows] for k in (log_rows[0] if log_rows else {"step": 0})}
        write_parquet(out.path(LOG), columns)
        loss_plot(out.path(LOSS_PLOT), log_rows)
        _denoise_figure(out.path(DENOISE_PLOT), ema, val, h, scales, prepared.kind)
        write_metrics(out, METRICS, metrics)
    log.info("train_debiaser: %.1f kimg, held-out MSE at sigma=h %.4g (identity %.4g, ratio %.3f), %.0f img/s",
             metrics["kimg"], mse, identity, metrics["error_ratio"], result.images_per_second)
    return metrics


def loss_plot(path: Path, rows: list[dict], title: str = "debiaser training loss") -> None:
    fig, ax = new_figure(7, 4)
    if rows:
        kimg = np.array([r["nimg"] for r in rows]) / 1000
        ax.plot(kimg, [r["loss"] for r in rows], color="k", lw=1.5, label="loss (all sigma)")
        for key in [k for k in rows[0] if k.startswith("loss_sigma_")]:
            lo, hi = key[len("loss_sigma_"):].split("_")
            ax.plot(kimg, [r[key] for r in rows], lw=0.8, alpha=0.8, label=f"sigma in [{lo}, {hi})")
    ax.set_xlabel("thousands of images seen")
    ax.set_ylabel("EDM loss (|D - x0|^2 / c_out^2)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(title)
    save_figure(fig, path)


def figure_scales(scales: tuple[float, ...]) -> list[float]:
    """The candidate starts the denoise figure shows: 1 (the density bandwidth), the middle and the
    largest scale of calibrate's grid."""
    ordered = sorted(set(scales))
    return sorted({1.0, ordered[len(ordered) // 2], ordered[-1]})


@torch.no_grad()
def _denoise_figure(path: Path, ema: Denoiser, val: torch.Tensor, h: float, scales: tuple[float, ...],
                    kind: str) -> None:
    device = next(ema.parameters()).device
    gen = torch.Generator().manual_seed(7)
    shown = figure_scales(scales)
    if kind == "images":
        x = val[torch.linspace(0, len(val) - 1, min(8, len(val))).long()]  # spread over the (ordered) split
        rows, labels = [ds.to_uint8(x.numpy())], ["clean (held out)"]
        for s in shown:
            noisy = x + s * h * torch.randn(x.shape, generator=gen)
            rows += [ds.to_uint8(noisy.numpy()), ds.to_uint8(ema(noisy.to(device), s * h).cpu().numpy())]
            labels += [f"noisy, sigma = {s:g} h = {s * h:.2f}", "denoised"]
        write_png(path, labeled_grid(rows, labels))
        return
    x = val[:300]
    fig, axes = new_figure(4.2 * len(shown), 4.2, ncols=len(shown))
    for ax, s in zip(np.atleast_1d(axes), shown):
        noisy = x + s * h * torch.randn(x.shape, generator=gen)
        den = ema(noisy.to(device), s * h).cpu()
        ax.scatter(noisy[:, 0], noisy[:, 1], s=3, c="grey", alpha=0.5, label=f"noisy (sigma = {s:g} h)")
        ax.scatter(den[:, 0], den[:, 1], s=3, c="C0", label="denoised (EMA)")
        ax.set_aspect("equal")
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- gate debiaser


class DebiaserGateParams(EnforcedSection):
    max_error_ratio: float = Field(0.5, gt=0.0)  # EMA denoising MSE at sigma = h over the identity's (h^2)
    max_val_mse: float = Field(0.05, gt=0.0)  # EMA denoising MSE at sigma = h, per coordinate
    max_start_ratio: float = Field(0.9, gt=0.0)  # at every candidate start s x h of calibrate: MSE over the better trivial denoiser's (identity or mean image)


def debiaser_checks(metrics: dict[str, Any], cfg: DebiaserGateParams) -> list[Check]:
    key = "gates.debiaser"
    return [
        check(metrics, "val_mse_at_h", "<=", cfg.max_val_mse, f"{key}.max_val_mse",
              failure="the debiaser denoises held-out images at sigma = h too poorly"),  # null (non-finite) fails
        check(metrics, "error_ratio", "<=", cfg.max_error_ratio, f"{key}.max_error_ratio",
              failure="the debiaser removes too little of the noise it was trained on"),
        check(metrics, "worst_start_ratio", "<=", cfg.max_start_ratio, f"{key}.max_start_ratio",
              failure=f"at the candidate start s = {metrics.get('worst_start_scale', '?')} x h the debiaser does "
              "little better than returning the noisy image or the mean image"),
    ]


GATE = Gate("debiaser", METRICS, DebiaserGateParams, debiaser_checks,
            doc="go/no-go on the debiaser: held-out denoising error at sigma = h and at every candidate start of calibrate")

STAGES = (
    Stage(
        name="train_debiaser",
        distributed=True,
        doc="train the noise-level-conditioned debiaser D(x; sigma) (resumable; the EMA snapshot is the output)",
        section="debiaser",
        params=DebiaserParams,
        deps=(PREPARED, BANDWIDTH, gate_token("kde")),
        outs=(
            Out(DEBIASER_SNAPSHOT),
            Out(LOG, "table"),
            Out(LOSS_PLOT, "figure", "Debiaser training loss",
                "EDM loss against thousands of images seen, overall and per σ bucket"),
            Out(DENOISE_PLOT, "figure", "Denoising at the candidate starts",
                "rows: clean held-out images, then noisy and denoised (EMA network) at σ = s h_kde for s = 1, "
                "the middle and the largest scale of calibrate's grid",
                "noisy held-out points at σ = s h_kde and their denoised positions"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        reads=(SCALES_KEY,),
        summary=(("arch", "architecture"), ("parameters", "parameters"), ("kimg", "kimg trained"),
                 ("final_loss", "final training loss"), ("val_mse_at_h", "held-out MSE at σ = h"),
                 ("identity_mse_at_h", "identity map's MSE at σ = h"), ("error_ratio", "error ratio"),
                 ("sigma_max", "σ_max trained"),
                 ("worst_start_ratio", "worst error ratio over the candidate starts"),
                 ("worst_start_scale", "at s ="),
                 ("images_per_second", "images/s"), ("precision", "precision")),
    ),
    GATE.stage,
)
