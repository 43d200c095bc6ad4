"""Stage comparison: DKGM against the diffusion baseline over the number of network evaluations,
with the two controls that separate their two differences (DESIGN 2.4).

Rows, all at `comparison.n_samples` samples with the same per-sample seeds, scored together by the
evaluation's code (so FID's bias at this n is the same for every row, and the held-out floor is
drawn at the same n):

- DKGM at its operating point (calibrate's s and eta): the KDE samples at sigma_0 = h refined with
  refine's sampler (its ladder and churn: the comparison reads the refine section), K in
  `dkgm_steps`, with each solver of `dkgm_solvers`;
- the baseline from pure noise at its sigma_max on the Karras ladder, K in `baseline_steps`;
- control "baseline net, KDE start": the baseline's network started from the same KDE samples at
  sigma_0 = h with refine's exact sampler (same start, same sampler and NFE as refine, the other
  network): when it beats DKGM's own network, DKGM's training recipe is what limits it;
- control "DKGM net, noise start": the debiaser started from pure noise at its own sigma_max on
  the Karras ladder (it never learned higher noise: expected to fail; the table shows by how much).

Beside the rows: the held-out denoising error of both networks against sigma, on the same images and
noise draws, over the range the operating point uses (reports/comparison/denoise_error.*): where one
network denoises better, the samples it starts from there come out better.

Training cost comes from each training log (images seen; seconds estimated from the logged images/s,
so a resumed run still reports its whole training). A switched-off baseline leaves its rows
marked skipped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from dkgm import data as ds
from dkgm.devices import resolve_device, resolve_precision
from dkgm.figures import labeled_grid, new_figure, save_figure, write_png
from stages.artifacts import (
    BASELINE_LOG,
    BASELINE_SNAPSHOT,
    DEBIASER_LOG,
    DEBIASER_SNAPSHOT,
    KDE_SAMPLES,
    OPERATING_POINT,
    PREPARED,
    REFERENCE,
    load_point,
    load_samples,
)
from stages.common import Progress, log, read_parquet, staged_outputs, write_metrics
from stages.contract import Device, Out, Section, Stage
from stages.sampling import SAMPLER_KEYS, debias_batch, denoise_fn, sample_from_noise, sampler_config
from stages.scoring import SETTINGS, Scorer, settings

if TYPE_CHECKING:
    import torch

TABLE = "reports/comparison/table.csv"
DENOISE_TABLE = "reports/comparison/denoise_error.csv"
DENOISE_FIGURE = "reports/comparison/denoise_error.png"
FIGURE = "reports/comparison/fid_vs_nfe.png"
SAMPLES = "reports/comparison/samples.png"
METRICS = "reports/comparison/metrics.json"
COLUMNS = ("row", "method", "network", "start", "solver", "steps", "nfe", "fid", "fid_se", "kid", "precision", "recall",
           "zu_pixel", "copy_fraction", "authenticity_pixel", "mean_distance_to_manifold", "train_kimg", "train_seconds",
           "sample_seconds", "samples_per_second")


class ComparisonParams(Section):
    n_samples: int = Field(
        100, ge=4,
        description="samples per row (FID at this n: read it against the floor row drawn at the same n)",
    )
    dkgm_steps: tuple[int, ...] = Field(
        (2, 5, 10, 20),
        description="DKGM's K at its operating point (refine's ladder from h)",
    )
    dkgm_solvers: tuple[Literal["euler", "heun"], ...] = Field(("euler", "heun"), description="DKGM's solvers (each with every K)")
    baseline_steps: tuple[int, ...] = Field((6, 10, 18, 40), description="the baseline's K (heun: NFE 11, 19, 35, 79)")
    baseline_solver: Literal["euler", "heun"] = Field("heun", description="the baseline's solver (EDM: heun)")
    control_noise_steps: int = Field(
        18, ge=1,
        description="control: the debiaser from pure noise at its own sigma_max (Karras ladder)",
    )
    denoise_images: int = Field(
        200, ge=2,
        description="held-out images for the denoising error curves of both networks",
    )
    batch_size: int = Field(100, ge=1, description="speed only")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto | fp32 | bf16")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")


def train_cost(log_path: Path, kimg: float) -> tuple[float, float]:
    """(images seen in thousands, seconds) of a training run from its log: the seconds from the logged
    images/s, so that a run resumed from a finished state still reports its whole training."""
    df = read_parquet(log_path, "training log")
    rate = df["images_per_second"].to_numpy() if "images_per_second" in df else np.array([])
    rate = rate[np.isfinite(rate) & (rate > 0)]
    return kimg, (kimg * 1000 / float(np.median(rate))) if len(rate) else float("nan")


def run(cfg: ComparisonParams, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dkgm.debias import load_denoiser

    root = Path(root)
    ecfg = settings(shared)
    sampler = sampler_config(shared)
    device = resolve_device(cfg.device, "comparison.device")
    precision = resolve_precision(cfg.precision, device, "comparison.precision")
    x_kde, man, kde_meta = load_samples(root, KDE_SAMPLES, "KDE samples")
    n = min(cfg.n_samples, len(x_kde))
    x_kde, seeds = x_kde[:n], man["seed"].to_numpy()[:n]
    h = float(kde_meta["h"])
    point = load_point(root)
    eta = float(point["eta"])
    dkgm, dsnap = load_denoiser(root / DEBIASER_SNAPSHOT, device)
    shape = tuple(dsnap["network"]["shape"])
    base_meta = torch.load(root / BASELINE_SNAPSHOT, map_location="cpu", weights_only=True)
    have_baseline = not base_meta.get("skipped")
    base, bsnap = load_denoiser(root / BASELINE_SNAPSHOT, device) if have_baseline else (None, {})
    nets = {"dkgm": denoise_fn(dkgm, device, precision)}
    if have_baseline:
        nets["baseline"] = denoise_fn(base, device, precision)
    cost = {"dkgm": train_cost(root / DEBIASER_LOG, float(dsnap.get("kimg", float("nan"))))}
    if have_baseline:
        cost["baseline"] = train_cost(root / BASELINE_LOG, float(bsnap.get("kimg", float("nan"))))

    plan: list[dict[str, Any]] = []
    for solver in cfg.dkgm_solvers:
        for k in cfg.dkgm_steps:
            plan.append({"row": f"dkgm_{solver}_k{k}", "method": "DKGM", "network": "dkgm", "start": f"KDE at h = {h:.3g}",
                         "solver": solver, "steps": k})
    if not any(p["solver"] == sampler.solver and p["steps"] == sampler.steps for p in plan):  # refine's own row
        plan.append({"row": f"dkgm_{sampler.solver}_k{sampler.steps}", "method": "DKGM", "network": "dkgm",
                     "start": f"KDE at h = {h:.3g}", "solver": sampler.solver, "steps": sampler.steps})
    for k in cfg.baseline_steps:
        plan.append({"row": f"baseline_{cfg.baseline_solver}_k{k}", "method": "diffusion baseline", "network": "baseline",
                     "start": f"noise at {bsnap.get('sigma_max', 80):g}" if have_baseline else "noise",
                     "solver": cfg.baseline_solver, "steps": k})
    plan.append({"row": "control_baseline_net_kde_start", "method": "control: baseline net, KDE start",
                 "network": "baseline", "start": f"KDE at h = {h:.3g}", "solver": sampler.solver, "steps": sampler.steps})
    plan.append({"row": "control_dkgm_net_noise_start", "method": "control: DKGM net, noise start", "network": "dkgm",
                 "start": f"noise at {dsnap['sigma_max']:.3g}", "solver": cfg.baseline_solver,
                 "steps": cfg.control_noise_steps})

    sets: dict[str, np.ndarray] = {}
    total = sum(1 for p in plan if p["network"] in nets)
    bar = Progress("comparison (rows sampled)", total)
    for row in plan:
        if row["network"] not in nets:
            row["skipped"] = True
            continue
        fn, t0 = nets[row["network"]], time.perf_counter()
        if row["start"].startswith("KDE"):
            ladder = sampler.ladder(h, eta, steps=row["steps"])
            out = np.empty_like(x_kde)
            for b in range(0, n, cfg.batch_size):
                out[b : b + cfg.batch_size], _ = debias_batch(fn, x_kde[b : b + cfg.batch_size],
                                                              seeds[b : b + cfg.batch_size], ladder, row["solver"], device)
            row["nfe"] = ladder.nfe(row["solver"])
        else:
            sigma0 = float((bsnap if row["network"] == "baseline" else dsnap)["sigma_max"])
            row_eta = eta if row["network"] == "dkgm" else 0.0
            out, row["nfe"] = sample_from_noise(fn, seeds, shape, sigma0, row["steps"], row["solver"], row_eta, device,
                                                cfg.batch_size)
        row["sample_seconds"] = time.perf_counter() - t0
        row["samples_per_second"] = n / max(row["sample_seconds"], 1e-9)
        row["train_kimg"], row["train_seconds"] = cost[row["network"]]
        sets[row["row"]] = np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=-1.0)
        bar(len(sets))
    bar.close()

    t0 = time.perf_counter()
    scorer = Scorer(ecfg, root, n)
    m, _ = scorer.score({name: scorer.as_float(x) for name, x in sets.items()})  # as saved: images quantized
    for row in plan:
        name = row["row"]
        for key in ("fid", "fid_se", "kid", "precision", "recall", "zu_pixel", "copy_fraction", "authenticity_pixel",
                    "mean_distance_to_manifold"):
            row[key] = m.get(f"{name}_{key}") if not row.get("skipped") else None
    floor = {"row": "real_heldout", "method": "real held-out images (floor)", "network": "—", "start": "—",
             "solver": "—", "steps": None, "nfe": None,
             **{k: m.get(f"real_{k}") for k in ("fid", "fid_se", "kid", "precision", "recall", "zu_pixel", "copy_fraction",
                                                 "authenticity_pixel", "mean_distance_to_manifold")}}
    rows = [*plan, floor]
    metrics = headline(rows, cfg, n, have_baseline, f"dkgm_{sampler.solver}_k{sampler.steps}")
    metrics["score_seconds"] = time.perf_counter() - t0
    metrics["feature_cache_hits"] = m.get("feature_cache_hits", 0)  # rows refine/sample_baseline drew and evaluate scored
    raw = {"dkgm": dkgm, **({"baseline": base} if have_baseline else {})}
    curve = denoise_curves(raw, root, h, float(dsnap["sigma_max"]), device, cfg.denoise_images)
    metrics.update({f"{name}_denoise_ratio_at_start": _at_start(curve, name, h) for name in raw})
    with staged_outputs(root, "comparison") as outs:
        _write_table(outs.path(TABLE), rows)
        curve.to_csv(outs.path(DENOISE_TABLE), index=False, float_format="%.6g")
        _denoise_figure(outs.path(DENOISE_FIGURE), curve, h, float(dsnap["sigma_max"]))
        _figure(outs.path(FIGURE), rows, n)
        _samples_figure(outs.path(SAMPLES), sets, plan, cfg, scorer.kind.pixels)
        write_metrics(outs, METRICS, metrics)
    log.info("comparison: n=%d; DKGM best FID %.4g at NFE %s; baseline best FID %s at NFE %s; floor %.4g", n,
             metrics.get("dkgm_best_fid", float("nan")), metrics.get("dkgm_best_fid_nfe"),
             metrics.get("baseline_best_fid"), metrics.get("baseline_best_fid_nfe"), metrics.get("floor_fid") or float("nan"))
    return metrics


def headline(rows: list[dict[str, Any]], cfg: ComparisonParams, n: int, have_baseline: bool,
             refine_row: str) -> dict[str, Any]:
    """The few numbers worth a `dvc metrics diff`: each method's best FID and its NFE, DKGM with refine's
    sampler against the control that starts the baseline's network from the same KDE samples with the
    same sampler, the controls, the floor."""
    out: dict[str, Any] = {"n_samples": n, "baseline_run": have_baseline}
    for method, prefix in (("DKGM", "dkgm"), ("diffusion baseline", "baseline")):
        done = [r for r in rows if r["method"] == method and r.get("fid") is not None]
        if done:
            best = min(done, key=lambda r: r["fid"])
            out.update({f"{prefix}_best_fid": best["fid"], f"{prefix}_best_fid_nfe": best["nfe"],
                        f"{prefix}_best_zu_pixel": best["zu_pixel"]})
    for r in rows:
        if r["row"].startswith("control_") or r["row"] == "real_heldout":
            out[f"{'floor' if r['row'] == 'real_heldout' else r['row']}_fid"] = r.get("fid")
            if r.get("fid_se") is not None:
                out[f"{'floor' if r['row'] == 'real_heldout' else r['row']}_fid_se"] = r["fid_se"]
    mine = next((r for r in rows if r["row"] == refine_row), None)
    if mine is not None and mine.get("fid") is not None:
        out.update(dkgm_refine_fid=mine["fid"], dkgm_refine_nfe=mine["nfe"])
        if mine.get("fid_se") is not None:
            out["dkgm_refine_fid_se"] = mine["fid_se"]
        control = out.get("control_baseline_net_kde_start_fid")
        if control is not None:
            # > 0: the baseline's network, started where DKGM starts with DKGM's sampler, does better than DKGM's own
            out["control_beats_dkgm_by"] = mine["fid"] - control
    return out


def denoise_curves(nets: dict[str, Any], root: Path, h: float, sigma_max: float, device: torch.device,
                   images: int) -> Any:
    """Held-out denoising error of each network over sigma (log-spaced from 0.02 to DKGM's sigma_max,
    plus the operating point's start h), on the same validation images and noise draws."""
    import pandas as pd
    import torch

    from dkgm.debias import denoising_curve
    from stages.artifacts import load_prepared

    val = torch.from_numpy(load_prepared(root).split("val")[:images])
    sigmas = sorted({*np.geomspace(0.02, sigma_max, 12).tolist(), h})
    frames = []
    for name, net in nets.items():
        rows = denoising_curve(net, val, sigmas, device=device)
        frames.append(pd.DataFrame(rows).assign(network=name))
    return pd.concat(frames, ignore_index=True)


def _at_start(curve: Any, name: str, h: float) -> float:
    sub = curve[curve["network"] == name]
    return float(sub.loc[(sub["sigma"] - h).abs().idxmin(), "ratio"])


def _denoise_figure(path: Path, curve: Any, h: float, sigma_max: float) -> None:
    fig, ax = new_figure(7, 4.2)
    labels = {"dkgm": "DKGM's network", "baseline": "baseline's network"}
    for name, color in (("dkgm", "C0"), ("baseline", "C3")):
        sub = curve[curve["network"] == name].sort_values("sigma")
        if len(sub):
            ax.plot(sub["sigma"], sub["mse"], "o-", ms=3, color=color, label=labels[name])
    first = curve.sort_values("sigma").drop_duplicates("sigma")
    ax.plot(first["sigma"], np.minimum(first["identity_mse"], first["mean_mse"]), "k:", lw=1,
            label="better trivial denoiser (identity or mean image)")
    ax.axvline(h, color="grey", ls="--", lw=1, label=f"operating point's start σ0 = {h:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise level σ")
    ax.set_ylabel("held-out MSE per coordinate (lower is better)")
    ax.set_title(f"denoising error over the range DKGM samples (up to its σ_max = {sigma_max:.3g})", fontsize=10)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    pd.DataFrame([{c: r.get(c) for c in COLUMNS} for r in rows]).to_csv(path, index=False, float_format="%.6g")


def _figure(path: Path, rows: list[dict[str, Any]], n: int) -> None:
    """FID (images; points: the mean distance to the true manifold) against NFE."""
    key = "fid" if any(r.get("fid") is not None for r in rows) else "mean_distance_to_manifold"
    rows = [{**r, "fid": r.get(key)} for r in rows]
    fig, ax = new_figure(7, 4.4)
    lines = [("DKGM", "euler", "C0", "o-"), ("DKGM", "heun", "C0", "s--"), ("diffusion baseline", "heun", "C3", "o-"),
             ("diffusion baseline", "euler", "C3", "s--")]
    for method, solver, color, style in lines:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["method"] == method and r["solver"] == solver
                     and r.get("fid") is not None)
        if pts:
            ax.plot(*zip(*pts), style, color=color, ms=4, label=f"{method} ({solver})")
    for r, marker in zip([r for r in rows if r["row"].startswith("control_")], ("^", "v")):
        if r.get("fid") is not None:
            ax.plot(r["nfe"], r["fid"], marker, color="C2", ms=8, label=r["method"])
    floor = next((r["fid"] for r in rows if r["row"] == "real_heldout"), None)
    if floor is not None:
        ax.axhline(floor, color="k", ls=":", lw=1, label=f"held-out real images at n = {n} (floor)")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks: list[int] = []
    for v in sorted({r["nfe"] for r in rows if r.get("fid") is not None and r.get("nfe")}):
        if not ticks or v > ticks[-1] * 1.25:  # no labels on top of each other (9, 10, 11)
            ticks.append(v)
    if ticks:
        ax.set_xticks(ticks)
    fids = [r["fid"] for r in rows if r.get("fid")]
    if fids and key == "fid":
        ax.set_yticks([t for t in (10, 20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 600, 1000)
                       if min(fids) / 1.2 <= t <= max(fids) * 1.2])
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers on the log axes, no 3x10^0
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID at n = {n} (lower is better)" if key == "fid" else "mean distance to the true manifold")
    ax.set_title("DKGM against the diffusion baseline over NFE", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _samples_figure(path: Path, sets: dict[str, np.ndarray], plan: list[dict[str, Any]], cfg: ComparisonParams,
                    images: bool) -> None:
    """One row per method at its middle setting and per control (first 8 samples): what the numbers look like."""
    pick = []
    for method in ("DKGM", "diffusion baseline"):
        cands = [r["row"] for r in plan if r["method"] == method and r["row"] in sets]
        if cands:
            pick.append(cands[len(cands) // 2] if method == "diffusion baseline" else cands[min(2, len(cands) - 1)])
    pick += [r["row"] for r in plan if r["row"].startswith("control_") and r["row"] in sets]
    if not images or not pick:
        fig, ax = new_figure(4, 1.6)
        ax.text(0.5, 0.5, "sample rows: image data only", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    rows = [ds.to_uint8(sets[p][:8]) for p in pick]
    names = {r["row"]: r for r in plan}
    labels = [f"{names[p]['method']}, {names[p]['nfe']} NFE" if not p.startswith("control_") else names[p]["method"]
              for p in pick]
    write_png(path, labeled_grid(rows, labels))


STAGES = (
    Stage(
        name="comparison",
        doc="DKGM against the diffusion baseline over NFE (FID, KID, precision/recall, Z_U, copies, cost), with "
            "the two controls",
        section="comparison",
        params=ComparisonParams,
        deps=(PREPARED, REFERENCE, KDE_SAMPLES, OPERATING_POINT, DEBIASER_SNAPSHOT, DEBIASER_LOG, BASELINE_SNAPSHOT,
              BASELINE_LOG),
        outs=(
            Out(TABLE, "table"),
            Out(FIGURE, "figure", "DKGM against the diffusion baseline",
                "FID against network evaluations per sample for both methods, the two controls and the held-out "
                "floor, every row at the same n and seeds"),
            Out(SAMPLES, "figure", "Comparison samples", "rows: DKGM (K = 10), the baseline (middle K), the "
                "baseline net from the KDE start, the DKGM net from noise", "not drawn for point data"),
            Out(DENOISE_TABLE, "table"),
            Out(DENOISE_FIGURE, "figure", "Denoising error of both networks over σ",
                "held-out MSE of DKGM's and the baseline's networks against the noise level, on the same images and "
                "noise, with the operating point's start marked: where the samples' quality is decided"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        reads=(*SETTINGS, *SAMPLER_KEYS),
        summary=(("dkgm_best_fid", "DKGM best FID"), ("dkgm_best_fid_nfe", "at NFE"),
                 ("baseline_best_fid", "baseline best FID"), ("baseline_best_fid_nfe", "at NFE"),
                 ("dkgm_refine_fid", "DKGM with refine's sampler"),
                 ("control_baseline_net_kde_start_fid", "control: baseline net, KDE start (same sampler)"),
                 ("control_dkgm_net_noise_start_fid", "control: DKGM net, noise start"), ("floor_fid", "floor FID"),
                 ("n_samples", "samples per row")),
    ),
)
