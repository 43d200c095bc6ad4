"""Training loop for the debiaser: AdamW, warm-up, clipping, EMA by half-life, resumable states.

Progress is counted in images seen (nimg), as in EDM. Every random draw (batch indices, noise
levels, noise) comes from one generator whose state is saved in each training state, and the
global RNG (dropout) is saved too, so a run resumed from a state ends with exactly the weights
of an uninterrupted run on the CPU. Under torchrun every rank draws the same global batch and
trains on its slice: DDP averages the gradients, so the result matches one process with the
same global batch up to float summation order.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dkgm.atomic import remove_stale_temps, write_atomic
from dkgm.debias import Denoiser, denoising_loss, sample_sigmas
from dkgm.errors import DKGMError, torch_load_reason

log = logging.getLogger(__name__)
STATE_RE = re.compile(r"^state-(\d{9})\.pt$")


class NonFiniteLoss(DKGMError):
    """The loss became NaN or infinite; training stopped and the last good state was kept."""


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 64  # global batch (split across ranks under torchrun)
    total_kimg: float = 40.0  # training length in thousands of images seen
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_kimg: float = 2.0  # linear learning-rate warm-up
    lr_schedule: str = "constant"  # after the warm-up: constant | cosine (down to 0 at total_kimg)
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_halflife_kimg: float = 5.0  # EMA half-life in thousands of images
    ema_rampup_ratio: float | None = 0.1  # half-life at most this fraction of images seen (None = off)
    sigma_min: float = 0.002
    sigma_max: float = 1.0
    sigma_dist: str = "lognormal"  # lognormal (EDM: ln sigma ~ N(p_mean, p_std^2), clipped) | lognormal_truncated | loguniform
    p_mean: float = -1.2
    p_std: float = 1.2
    seed: int = 0
    log_every: int = 20  # steps between log rows
    state_every_kimg: float = 10.0  # thousands of images between training states
    keep_states: int = 2
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False
    sigma_buckets: int = 4  # log-spaced sigma buckets for the per-bucket loss

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def trajectory_key(self) -> dict[str, Any]:
        """The fields that shape the training trajectory. A state can be resumed under any
        config with the same key: a longer total_kimg extends a finished run."""
        d = self.to_dict()
        # a decaying learning rate depends on the length: a longer run is another trajectory
        for k in ("log_every", "state_every_kimg", "keep_states") + (("total_kimg",) if self.lr_schedule == "constant"
                                                                       else ()):
            d.pop(k)
        return d


@dataclass
class TrainResult:
    ema: nn.Module  # the EMA denoiser (what samples come from)
    log: list[dict[str, float]] = field(default_factory=list)
    nimg: int = 0
    step: int = 0
    resumed_from: int | None = None  # nimg of the state resumed from
    seconds: float = 0.0  # wall time of this invocation
    images_per_second: float = 0.0  # of the whole training (every invocation that trained this model)
    train_seconds: float = 0.0  # wall time of the whole training, summed over resumed invocations


# ----------------------------------------------------------------------------- states


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through the project's one atomic writer (temp file, fsync, rename, fsync folder)."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def list_states(state_dir: Path) -> list[Path]:
    if not state_dir.is_dir():
        return []
    return sorted((p for p in state_dir.iterdir() if STATE_RE.match(p.name)), key=lambda p: p.name)


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise DKGMError(f"cannot load training state {path}: {torch_load_reason(exc)}") from None


def _state_nimg(path: Path) -> int:
    return int(STATE_RE.match(path.name).group(1))


def newest_usable_state(state_dir: Path, total_nimg: int, set_aside: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest state at or below `total_nimg` images that loads, and its contents.

    States beyond `total_nimg` (a longer run before `total_kimg` was lowered) are skipped: resuming
    one would return a model trained longer than asked for. A state that does not load (a crash while
    the disk lost a write, a truncated copy) is set aside as `<name>.corrupt` with one warning, and
    the state before it is tried. With `set_aside` false (every rank but 0 under torchrun) it is
    only skipped: one process renames, the others reach the same earlier state (a state renamed
    away meanwhile does not load either)."""
    for path in reversed(list_states(state_dir)):
        if _state_nimg(path) > total_nimg:
            continue
        try:
            return path, load_state(path)
        except DKGMError as exc:
            if not set_aside:
                continue
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
            except FileNotFoundError:  # gone meanwhile
                continue
            log.warning("%s; set aside as %s, resuming from the state before it", exc, aside.name)
    return None


def _seconds_from_log(rows: list[dict[str, float]]) -> float:
    """Training time estimated from a log's per-interval throughput (states written before they
    recorded the time itself)."""
    total, prev = 0.0, 0
    for r in rows:
        if r.get("images_per_second", 0) > 0:
            total += (r["nimg"] - prev) / r["images_per_second"]
        prev = r["nimg"]
    return total


def ema_beta(cfg: TrainConfig, nimg: int, batch: int) -> float:
    halflife = cfg.ema_halflife_kimg * 1000
    if cfg.ema_rampup_ratio is not None:
        halflife = min(halflife, nimg * cfg.ema_rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(cfg: TrainConfig, nimg: int) -> float:
    """Linear warm-up to `lr`, then constant, or (`cosine`) a half cosine from `lr` down to 0 at
    `total_kimg`: a short budget ends on a settled network instead of one still taking full steps."""
    warm = cfg.warmup_kimg * 1000
    lr = cfg.lr * min(1.0, nimg / warm) if warm > 0 else cfg.lr
    if cfg.lr_schedule == "cosine" and nimg > warm:
        total = cfg.total_kimg * 1000
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, (nimg - warm) / max(total - warm, 1.0))))
    return lr


# ----------------------------------------------------------------------------- loop


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(
    denoiser: Denoiser,
    data: torch.Tensor,
    cfg: TrainConfig,
    *,
    state_dir: Path | None = None,
    device: torch.device | str = "cpu",
    stop_after_kimg: float | None = None,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train `denoiser` on `data` (float32, (N, ...), CPU) and return its EMA copy.

    With `state_dir`, resume from the newest state there and save states every
    `state_every_kimg` (and at the end), keeping the newest `keep_states`.
    `stop_after_kimg` ends this invocation early (as if interrupted) after saving a state.
    """
    if cfg.precision not in ("fp32", "bf16"):
        raise DKGMError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise DKGMError(f"lr_schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    if len(data) == 0:
        raise DKGMError("no training data")
    rank, world = _dist()
    if cfg.batch_size % world:
        raise DKGMError(f"batch_size {cfg.batch_size} is not divisible by the {world} processes")
    device = torch.device(device)
    local = cfg.batch_size // world
    total_nimg = int(round(cfg.total_kimg * 1000))

    denoiser = denoiser.to(device)
    image_like = data.ndim == 4
    if cfg.channels_last and image_like:
        denoiser = denoiser.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(denoiser).eval().requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed + 1_000_003)  # dropout
    nimg, step, log_rows = 0, 0, []
    resumed_from = None
    earlier_seconds = 0.0  # training time of the invocations this one resumes

    if state_dir is not None and rank == 0:
        for p in remove_stale_temps(state_dir):
            log.info("removed %s, left by a run killed while it wrote a state", p.name)
    found = newest_usable_state(state_dir, total_nimg, set_aside=rank == 0) if state_dir is not None else None
    if found is not None:
        path, st = found
        saved, now = st.get("config") or {}, cfg.trajectory_key()
        if saved != now:
            diff = ", ".join(f"{k} (state {saved.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
                             if saved.get(k) != now.get(k))
            raise DKGMError(f"training state {path} was made with another configuration ({diff}): "
                            f"delete {state_dir} to start over")
        denoiser.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        if device.type == "cuda" and st.get("cuda_rng") is not None:  # dropout on the GPU draws from it
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        nimg, step, log_rows = int(st["nimg"]), int(st["step"]), list(st["log"])
        resumed_from = nimg
        earlier_seconds = float(st["train_seconds"]) if "train_seconds" in st else _seconds_from_log(log_rows)

    model: nn.Module = denoiser
    if world > 1:
        model = nn.parallel.DistributedDataParallel(denoiser, device_ids=[device.index] if device.type == "cuda" else None)
    forward = _LossView(torch.compile(model) if cfg.compile else model, denoiser)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    edges = torch.exp(torch.linspace(math.log(cfg.sigma_min), math.log(cfg.sigma_max), cfg.sigma_buckets + 1))
    # loss statistics accumulate on the device: the loop never waits for the GPU except at a log row
    # (no per-step .item() / .cpu()); a non-finite loss is caught there, before any state is saved
    stats_dtype = torch.float64 if device.type != "mps" else torch.float32
    edges_dev = edges.to(device, stats_dtype)[1:-1]
    acc_loss = torch.zeros(cfg.sigma_buckets, dtype=stats_dtype, device=device)
    acc_n = torch.zeros(cfg.sigma_buckets, dtype=stats_dtype, device=device)
    acc_total = torch.zeros((), dtype=stats_dtype, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    acc_steps = 0
    if found is not None and "acc" in st:  # the log row in progress when the state was saved
        acc_loss.copy_(st["acc"]["loss"].to(device, stats_dtype))
        acc_n.copy_(st["acc"]["n"].to(device, stats_dtype))
        acc_total.fill_(float(st["acc"]["total"]))
        acc_steps = int(st["acc"]["steps"])
    next_state = (nimg // int(cfg.state_every_kimg * 1000) + 1) * int(cfg.state_every_kimg * 1000)
    stop_at = total_nimg if stop_after_kimg is None else min(total_nimg, int(round(stop_after_kimg * 1000)))
    t0 = time.perf_counter()
    t_log, nimg_log = t0, nimg
    start_nimg = nimg

    def save_state(train_seconds: float | None = None) -> None:
        if state_dir is None or rank != 0:
            return
        save_atomic(
            {
                "net": denoiser.state_dict(),
                "ema": ema.state_dict(),
                "opt": opt.state_dict(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "nimg": nimg,
                "step": step,
                "log": log_rows,
                "config": cfg.trajectory_key(),
                # the loss statistics of the log row in progress: a resumed run logs the same rows
                "acc": {"loss": acc_loss.cpu(), "n": acc_n.cpu(), "total": float(acc_total), "steps": acc_steps},
                "train_seconds": earlier_seconds + time.perf_counter() - t0 if train_seconds is None else train_seconds,
            },
            state_dir / f"state-{nimg:09d}.pt",
        )
        # prune among the states up to this one: a longer run's states (total_kimg lowered since)
        # stay, for a later run that raises total_kimg again
        for old in [p for p in list_states(state_dir) if _state_nimg(p) <= nimg][: -cfg.keep_states]:
            old.unlink()

    denoiser.train()
    while nimg < stop_at:
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        sigma = sample_sigmas(cfg.batch_size, cfg.sigma_min, cfg.sigma_max, gen, cfg.sigma_dist, cfg.p_mean, cfg.p_std)
        noise = torch.randn((cfg.batch_size, *data.shape[1:]), generator=gen)
        mine = slice(rank * local, (rank + 1) * local)
        x0 = data[idx[mine]].to(device, non_blocking=True)
        sig, nz = sigma[mine].to(device), noise[mine].to(device)
        if cfg.channels_last and image_like:
            x0, nz = x0.contiguous(memory_format=torch.channels_last), nz.contiguous(memory_format=torch.channels_last)
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, nimg)
        with autocast:
            per_sample = denoising_loss(forward, x0, sig, nz)
        loss = per_sample.mean()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step + 1, first_bad)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(denoiser.parameters(), cfg.grad_clip)
        opt.step()
        nimg += cfg.batch_size
        step += 1
        beta = ema_beta(cfg, nimg, cfg.batch_size)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), denoiser.parameters()):
                pe.lerp_(p.detach(), 1.0 - beta)
            for be, b in zip(ema.buffers(), denoiser.buffers()):
                be.copy_(b)

        with torch.no_grad():
            ps = per_sample.detach().to(stats_dtype)
            bucket = torch.bucketize(sig.to(stats_dtype), edges_dev)
            acc_loss.index_add_(0, bucket, ps)
            acc_n.index_add_(0, bucket, torch.ones_like(ps))
            acc_total += ps.mean()
            acc_steps += 1
        # the last row comes at the end of training, not where an early stop (stop_after_kimg) falls
        at_log, at_state = step % cfg.log_every == 0 or nimg >= total_nimg, nimg >= next_state
        if (at_log or at_state or nimg >= stop_at) and int(first_bad) >= 0:  # one host sync per row or state
            kept = f"; the last good state is kept in {state_dir}" if state_dir is not None else ""
            bad = int(first_bad)
            raise NonFiniteLoss(f"non-finite loss at step {bad} ({(bad - 1) * cfg.batch_size} images seen; "
                                f"found at step {step}): training stopped{kept}")
        if at_log:
            now = time.perf_counter()
            row = {
                "step": step,
                "nimg": nimg,
                "loss": float(acc_total) / acc_steps,
                "lr": learning_rate(cfg, nimg),
                "images_per_second": (nimg - nimg_log) / max(now - t_log, 1e-9),
            }
            sums, counts = acc_loss.tolist(), acc_n.tolist()  # one transfer per row
            for b in range(cfg.sigma_buckets):
                row[f"loss_sigma_{edges[b]:.3g}_{edges[b + 1]:.3g}"] = sums[b] / counts[b] if counts[b] > 0 else float("nan")
            log_rows.append(row)
            acc_loss.zero_(), acc_n.zero_(), acc_total.zero_()
            acc_steps, t_log, nimg_log = 0, now, nimg
            if progress is not None:
                progress(nimg, total_nimg, row)
        if at_state:
            save_state()
            next_state += int(cfg.state_every_kimg * 1000)
    seconds = time.perf_counter() - t0
    total = earlier_seconds + seconds if nimg > start_nimg else earlier_seconds
    if found is None or nimg != (resumed_from or 0):
        save_state(total)  # the final state holds exactly the training time this run reports
    return TrainResult(
        ema=ema,
        log=log_rows,
        nimg=nimg,
        step=step,
        resumed_from=resumed_from,
        seconds=seconds,
        images_per_second=nimg / total if total > 0 else 0.0,
        train_seconds=total,
    )


class _LossView:
    """What the loss needs: the (possibly DDP-wrapped or compiled) forward, and the
    preconditioning coefficients of the underlying Denoiser."""

    def __init__(self, forward: Callable[..., torch.Tensor], denoiser: Denoiser):
        self.forward, self.coefficients = forward, denoiser.coefficients

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.forward(x, sigma)
