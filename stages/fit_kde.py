"""Stage fit_kde: choose the KDE bandwidth by held-out log-likelihood (DESIGN 2.1).

One distance pass keeps each validation point's top-k squared distances to the training set;
the CV curve, its refinement and its truncation bounds come from that table. A second,
exact pass scores the bandwidths that matter (CV optimum, the one used, Scott, Silverman).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np
from pydantic import Field, field_validator

from dkgm.devices import resolve_device
from dkgm.errors import DKGMError
from dkgm.figures import new_figure, save_figure
from stages.artifacts import BANDWIDTH, PREPARED, load_prepared
from stages.common import Progress, log, staged_outputs, write_json, write_metrics
from stages.contract import Device, Out, Section, Stage
from stages.gates import Check, EnforcedSection, Gate, check

if TYPE_CHECKING:
    import dkgm.kde as kde

TOPK = "data/kde/val_topk.npz"  # each validation point's k nearest training rows
CV_CURVE = "reports/kde/cv_curve.csv"
CV_PLOT = "reports/kde/cv_curve.png"
METRICS = "reports/kde/metrics.json"

Bandwidth = Union[Literal["cv", "scott", "silverman"], float]


class KDEParams(Section):
    bandwidth: Bandwidth = Field(
        "cv",
        description="cv (held-out likelihood) | scott | silverman | a number (per-pixel std)",
    )
    topk: int = Field(128, ge=1, description="nearest training points kept per validation point")
    grid_min: float | Literal["auto"] = Field(
        "auto",
        description="search grid, smallest bandwidth (auto: 0.05 x median NN distance per coordinate)",
    )
    grid_max: float | Literal["auto"] = Field(
        "auto",
        description="search grid, largest bandwidth (auto: max(2 x data std, 4 x NN distance))",
    )
    grid_points: int = Field(41, ge=3, description="log-spaced grid size before the golden-section refinement")
    refine_tol: float = Field(1e-4, gt=0.0, description="refinement stops when the bracket is this narrow in log h")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N for the distance pass")

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _bandwidth_choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v in ("cv", "scott", "silverman"):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
        raise ValueError(f"must be cv, scott, silverman or a positive number (got {v!r})")

    @field_validator("grid_min", "grid_max", mode="before")
    @classmethod
    def _positive_grid(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
        raise ValueError(f"must be auto or a positive number (got {v!r})")

    @field_validator("grid_max")
    @classmethod
    def _grid_not_empty(cls, v: float | str, info: Any) -> float | str:
        lo = info.data.get("grid_min")
        if isinstance(v, float) and isinstance(lo, float) and v <= lo:
            raise ValueError(f"the grid is empty: grid_max must exceed grid_min={lo} (got {v})")
        return v


def auto_grid(cfg: KDEParams, topk: kde.TopK, sigma: float) -> tuple[float, float]:
    """Default grid ends from the data: the median RMS per-coordinate distance of a validation
    point to its nearest training point (h_nn) sets the scale; the CV optimum lies near it."""
    h_nn = float(np.median(np.sqrt(topk.sq_dists[:, 0] / topk.dim)))
    if h_nn <= 0:
        raise DKGMError("validation points coincide with training points (zero nearest-neighbour distance)")
    lo = cfg.grid_min if cfg.grid_min != "auto" else 0.05 * h_nn
    hi = cfg.grid_max if cfg.grid_max != "auto" else max(2.0 * sigma, 4.0 * h_nn)
    if not lo < hi:
        raise DKGMError(f"kde.grid_min ({lo:g}) must be below kde.grid_max ({hi:g}): the bandwidth grid is empty")
    return float(lo), float(hi)


def choose(cfg: KDEParams, h_cv: float, h_scott: float, h_silverman: float) -> float:
    if cfg.bandwidth == "cv":
        return h_cv
    if cfg.bandwidth == "scott":
        return h_scott
    if cfg.bandwidth == "silverman":
        return h_silverman
    return float(cfg.bandwidth)


def run(cfg: KDEParams, root: Path) -> dict[str, Any]:
    import dkgm.kde as kde

    prepared = load_prepared(root)
    train, val = prepared.split("train"), prepared.split("val")
    if len(val) == 0:
        raise DKGMError("fit_kde needs validation points: prepare.val_fraction is 0")
    n, d = len(train), int(np.prod(train.shape[1:]))
    device = str(resolve_device(cfg.device, "kde.device"))

    t0 = time.perf_counter()
    bar = Progress("fit_kde: distances", 1)
    topk = kde.topk_sq_distances(val, train, cfg.topk, device=device, progress=bar)
    bar.close()
    t_pass = time.perf_counter() - t0

    sigma = kde.data_scale(train)
    h_scott, h_silverman = kde.scott_bandwidth(n, d, sigma), kde.silverman_bandwidth(n, d, sigma)
    lo, hi = auto_grid(cfg, topk, sigma)
    search = kde.select_bandwidth(topk, kde.log_grid(lo, hi, cfg.grid_points), tol=cfg.refine_tol)
    if search.on_boundary:
        log.warning("fit_kde: the CV optimum %.4g is on the grid boundary [%.4g, %.4g]: widen the grid", search.h_opt, lo, hi)

    # the density bandwidth; generation multiplies it by the operating point's scale (stage calibrate)
    h = choose(cfg, search.h_opt, h_scott, h_silverman)
    named = {"cv": search.h_opt, "used": h, "scott": h_scott, "silverman": h_silverman}
    exact = dict(zip(named, kde.exact_loglik(val, train, list(named.values()), device=device)))
    baseline = kde.diag_gaussian_loglik(train, val, extra_var=h * h)
    truncated_cv = kde.cv_loglik(topk, search.h_opt)
    nn_rms = np.sqrt(topk.sq_dists[:, 0] / d)

    metrics = {
        "h": h,
        "h_cv": search.h_opt,
        "h_scott": h_scott,
        "h_silverman": h_silverman,
        "sigma_hat": sigma,
        "cv_on_boundary": bool(search.on_boundary),
        "grid_min": lo,
        "grid_max": hi,
        "loglik_per_dim": exact["used"] / d,
        "cv_loglik_per_dim": exact["cv"] / d,
        "scott_loglik_per_dim": exact["scott"] / d,
        "silverman_loglik_per_dim": exact["silverman"] / d,
        "baseline_loglik_per_dim": baseline / d,
        "loglik_gain_per_dim": (exact["used"] - baseline) / d,
        "truncation_bound_opt": search.bound_opt,
        "truncation_error_opt": exact["cv"] - truncated_cv.loglik,
        "nn_rms_median": float(np.median(nn_rms)),
        "topk": topk.k,
        "n_train": n,
        "n_val": len(val),
        "dim": d,
        "distance_pass_seconds": t_pass,
        "device": device,
    }
    train_index, val_index = prepared.split_rows("train"), prepared.split_rows("val")
    bandwidth = {
        "h": h,
        "method": cfg.bandwidth if isinstance(cfg.bandwidth, str) else "fixed",
        "h_cv": search.h_opt,
        "h_scott": h_scott,
        "h_silverman": h_silverman,
        "sigma_hat": sigma,
        "n_train": n,
        "dim": d,
        "dataset": prepared.meta["dataset"],
    }

    with staged_outputs(root, "fit_kde") as out:
        write_json(out.path(BANDWIDTH), bandwidth)
        np.savez(
            out.path(TOPK),
            sq_dists=topk.sq_dists,
            neighbour=train_index[topk.indices],  # rows of data/prepared, not of the train split
            query=val_index,
        )
        baselines = [b / d for b in kde.diag_gaussian_loglik(train, val, extra_var=list(search.grid**2))]
        _write_curve(out.path(CV_CURVE), search, d, baselines)
        _plot_curve(out.path(CV_PLOT), search, d, baselines, named, exact)
        write_metrics(out, METRICS, metrics)
    log.info(
        "fit_kde: h=%.4g (%s); CV optimum %.4g; Scott %.4g; held-out log-lik %.4f nats/dim vs %.4f baseline",
        h, bandwidth["method"], search.h_opt, h_scott, exact["used"] / d, baseline / d,
    )
    return metrics


def _write_curve(path: Path, search: kde.BandwidthSearch, d: int, baselines: list[float]) -> None:
    lines = ["h,loglik_per_dim,upper_per_dim,truncation_bound,baseline_per_dim"]
    for h, ll, b, base in zip(search.grid, search.loglik, search.bound, baselines):
        lines.append(f"{h:.6g},{ll / d:.6f},{(ll + b) / d:.6f},{b:.6g},{base:.6f}")
    path.write_text("\n".join(lines) + "\n")


def _plot_curve(path, search, d, baselines, named, exact) -> None:
    """Two panels on the same log-h axis: the whole curve (every grid point), and the region around
    the optimum where the candidates differ (the whole curve spans hundreds of nats there)."""
    fig, (whole, ax) = new_figure(11, 4.2, ncols=2)
    ll, up = search.loglik / d, (search.loglik + search.bound) / d
    finite_up = np.where(np.isfinite(up), up, np.nan)
    styles = {"cv": ("C3", "CV optimum"), "used": ("k", "selected"), "scott": ("C2", "Scott"), "silverman": ("C4", "Silverman")}
    for a in (whole, ax):
        a.plot(search.grid, ll, "o-", ms=3, label="KDE held-out log-lik (top-k lower bound)")
        a.fill_between(search.grid, ll, finite_up, alpha=0.2, label="truncation bound")
        a.plot(search.grid, baselines, "--", color="grey", label="diagonal Gaussian, same smoothing")
        for key, (color, label) in styles.items():
            a.axvline(named[key], color=color, ls=":", lw=1.2, label=f"{label} h={named[key]:.3g}: {exact[key] / d:.3f}")
        a.set_xscale("log")
        a.set_xlabel("bandwidth h (per-coordinate std)")
    whole.set_ylabel("nats per dimension")
    whole.set_title(f"the whole search grid (d={d})", fontsize=10)
    top = np.nanmax(finite_up)
    near = np.nanmax(ll) - 3.0 * (np.nanmax(ll) - np.nanmedian(ll)) - 0.5
    shown = np.isfinite(ll) & (ll >= near)
    ax.set_xlim(search.grid[shown].min() / 1.1, search.grid[shown].max() * 1.1)
    ax.set_ylim(max(np.nanmin(ll[np.isfinite(ll)]), near), top + 0.1)
    ax.set_title("near the optimum: where the candidates differ", fontsize=10)
    ax.legend(fontsize=7, loc="lower center")
    fig.suptitle("bandwidth selection: held-out log-likelihood per dimension", fontsize=11)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- gate kde


class KDEGateParams(EnforcedSection):
    require_interior_optimum: bool = Field(True, description="the CV optimum must lie inside the search grid")
    min_loglik_gain_per_dim: float = Field(
        0.0,
        description="KDE log-lik minus the smoothed diagonal Gaussian's, nats/dim",
    )
    max_truncation_bound: float = Field(
        1e-3, ge=0.0,
        description="top-k truncation bound at the CV optimum, nats per point",
    )


def kde_checks(metrics: dict[str, Any], cfg: KDEGateParams) -> list[Check]:
    key = "gates.kde"
    checks = [
        check(metrics, "loglik_gain_per_dim", ">=", cfg.min_loglik_gain_per_dim, f"{key}.min_loglik_gain_per_dim",
              failure="the KDE explains held-out data no better than the reference bandwidth"),
        check(metrics, "truncation_bound_opt", "<=", cfg.max_truncation_bound, f"{key}.max_truncation_bound",
              failure="the top-k truncation of the kernel sum may bias the bandwidth"),
    ]
    if cfg.require_interior_optimum:
        checks.insert(0, check(metrics, "cv_on_boundary", "==", False, f"{key}.require_interior_optimum",
                                 failure="the chosen bandwidth sits on the edge of its search grid"))
    return checks


GATE = Gate("kde", METRICS, KDEGateParams, kde_checks,
            doc="go/no-go on the KDE: interior CV optimum, beats the smoothed diagonal Gaussian, small truncation bound")

STAGES = (
    Stage(
        name="fit_kde",
        doc="choose the KDE bandwidth by held-out log-likelihood (one top-k distance pass, then the CV curve)",
        section="kde",
        params=KDEParams,
        deps=(PREPARED,),
        outs=(
            Out(BANDWIDTH),
            Out(TOPK),
            Out(CV_CURVE, "table"),
            Out(CV_PLOT, "figure", "Bandwidth CV curve",
                "held-out log-likelihood per dimension against the bandwidth h; the selected h marked"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        summary=(("h", "density bandwidth h (selected)"), ("h_cv", "h, CV optimum"), ("h_scott", "h, Scott's rule"),
                 ("h_silverman", "h, Silverman's rule"),
                 ("cv_loglik_per_dim", "CV held-out log-lik at h_cv (nats/dim)"),
                 ("loglik_per_dim", "held-out log-lik at h (nats/dim)"),
                 ("baseline_loglik_per_dim", "diagonal-Gaussian baseline (nats/dim)"),
                 ("loglik_gain_per_dim", "gain over the baseline (nats/dim)"),
                 ("cv_on_boundary", "optimum on the grid boundary"), ("truncation_bound_opt", "top-k truncation bound")),
    ),
    GATE.stage,
)
