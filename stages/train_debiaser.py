"""Stage train_debiaser: train the noise-level-conditioned debiaser D(x; sigma) (DESIGN 2.2).

Training states go to checkpoints/debiaser/<config hash>/ (outside DVC, persisted): a re-run
with the same configuration resumes from the newest state, a changed configuration starts
afresh in its own folder. The DVC output is the inference snapshot (EMA weights + config).
Under torchrun (WORLD_SIZE > 1) each rank trains on its slice of the global batch; rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import Field

from dkgm.errors import DKGMError
from dkgm.figures import labeled_grid, new_figure, save_figure, write_png
from dkgm.kinds import DataKind
from stages.artifacts import BANDWIDTH, DEBIASER_LOG, DEBIASER_SNAPSHOT, PREPARED, load_bandwidth, load_prepared
from stages.common import log, staged_outputs, write_metrics, write_parquet
from stages.contract import Out, Stage
from stages.fitting import DebiaserParams, code_version, fit, loss_plot, sigma_max_for
from stages.gates import Check, EnforcedSection, Gate, check, gate_token

if TYPE_CHECKING:
    import torch

    from dkgm.debias import Denoiser

LOG = DEBIASER_LOG
LOSS_PLOT = "reports/train/loss.png"
DENOISE_PLOT = "reports/train/denoise.png"
METRICS = "reports/train/metrics.json"

SCALES_KEY = "calibrate.scales"  # the candidate starts: the network's range follows them


def _tag(scale: float) -> str:
    """2.5 -> "s2p5": a metrics key without dots (dvc would read a dot as nesting)."""
    return "s" + f"{scale:g}".replace(".", "p")


def run(cfg: DebiaserParams, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dkgm.debias import denoising_curve, denoising_mse, make_snapshot
    from dkgm.networks import count_parameters

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



def figure_scales(scales: tuple[float, ...]) -> list[float]:
    """The candidate starts the denoise figure shows: 1 (the density bandwidth), the middle and the
    largest scale of calibrate's grid."""
    ordered = sorted(set(scales))
    return sorted({1.0, ordered[len(ordered) // 2], ordered[-1]})


def _denoise_figure(path: Path, ema: Denoiser, val: torch.Tensor, h: float, scales: tuple[float, ...],
                    kind: DataKind) -> None:
    import torch

    with torch.no_grad():  # a decorator would need torch when this module is imported
        device = next(ema.parameters()).device
        gen = torch.Generator().manual_seed(7)
        shown = figure_scales(scales)
        if kind.pixels:
            x = val[torch.linspace(0, len(val) - 1, min(8, len(val))).long()]  # spread over the (ordered) split
            rows, labels = [kind.store(x.numpy())], ["clean (held out)"]
            for s in shown:
                noisy = x + s * h * torch.randn(x.shape, generator=gen)
                rows += [kind.store(noisy.numpy()), kind.store(ema(noisy.to(device), s * h).cpu().numpy())]
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
    max_error_ratio: float = Field(0.5, gt=0.0, description="held-out MSE at sigma = h over the identity map's (h^2)")
    max_val_mse: float = Field(0.05, gt=0.0, description="held-out MSE at sigma = h, per coordinate")
    max_start_ratio: float = Field(
        0.9, gt=0.0,
        description="at every candidate start s x h of calibrate: MSE over the better trivial denoiser's "
                    "(identity or mean image)",
    )


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
