"""Stage calibrate: choose the operating point (bandwidth scale s, debiasing noise level eta) for
novelty (DESIGN 2.6).

At the CV bandwidth a good debiaser walks each KDE sample back to its anchor: a near-copy of a
training image. A wider generation bandwidth h = s * h_kde and eta > 0 trade fidelity for novelty.
This stage refines one small probe set at every (s, eta) of a grid, with the same anchors, kernel
noise and xi_k for every candidate (they differ only in the point), with refine's own sampler (it
reads the refine section's ladder, solver, K and churn), and measures on each:

- novelty, against the validation split as the held-out reference (the test split stays for the
  evaluation): pixel-space Z_U of the nearest-training-image distances, the copy fraction
  (d1/d2 < evaluate.copy_ratio) and authenticity;
- fidelity, for the passing candidates nearest the threshold (`fid_candidates` per eta): Inception
  FID of their probe against the reference statistics (`fidelity: inception`, the default; `pixel`:
  the Frechet distance to the validation images in the training set's top principal components,
  no feature network: measured to rank candidates poorly, see docs/design.md).

Novelty crosses the rule's line at one scale and fidelity falls past it, so after the grid the
search bisects (`bisect_steps` times) between the last failing and the first passing scale of each
eta (dkgm.operating_point.search_scale): the choice sits at the crossing, not at the next grid value.

The rule is the evaluation gate's own (it reads gates.eval.min_zu_pixel, copy_floor_factor,
copy_allowance, max_authenticity_drop and evaluate.n_samples, copy_ratio): Z_U grows with the
square root of the sample sizes at a fixed effect, so the probe's Z_U is carried to the
evaluation's sizes through its effect U/(nm) - 1/2, and must clear the gate's line by `margin`.
Among the passing candidates it picks the best fidelity. No candidate passing is a NO-GO of gate
calibrate, with the best Z_U reached and the key to widen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, field_validator

from dkgm import data as ds
from dkgm.devices import resolve_device, resolve_precision
from dkgm.errors import DKGMError
from dkgm.figures import labeled_grid, new_figure, save_figure, write_png
from dkgm.kinds import DataKind
from stages.artifacts import (
    BANDWIDTH,
    DEBIASER_SNAPSHOT,
    OPERATING_POINT,
    PREPARED,
    REFERENCE,
    Prepared,
    load_bandwidth,
    load_prepared,
    load_reference,
)
from stages.common import Progress, log, staged_outputs, write_json, write_metrics, write_parquet
from stages.contract import Device, Out, Section, Stage
from stages.gates import Check, EnforcedSection, Gate, check, gate_token
from stages.sampling import SAMPLER_KEYS, debias_batch, denoise_fn, sampler_config

if TYPE_CHECKING:
    import dkgm.operating_point as op

CANDIDATES = "reports/calibrate/candidates.parquet"
TRADEOFF = "reports/calibrate/tradeoff.png"
PROBE = "reports/calibrate/probe.png"
METRICS = "reports/calibrate/metrics.json"
# the evaluation gate's novelty rule and the evaluation's sample size: calibrate keeps what that gate would pass
RULE_KEYS = ("gates.eval.min_zu_pixel", "gates.eval.copy_floor_factor", "gates.eval.copy_allowance",
             "gates.eval.max_authenticity_drop", "evaluate.n_samples", "evaluate.copy_ratio")


class CalibrateParams(Section):
    scales: tuple[float, ...] = Field(
        (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0),
        description="candidate scales s (h = s x h_kde); the debiaser trains up to debiaser.sigma_max_margin "
                    "x the largest",
    )
    etas: tuple[float, ...] = Field(
        (1.0,),
        description="candidate debiasing noise levels (sweep: eta = 0 and 0.5 lose to 1 at every recipe; add "
                    "them to search)",
    )
    bisect_steps: int = Field(
        3, ge=0,
        description="bisections between the last failing and the first passing scale, per eta",
    )
    probe_samples: int = Field(
        256, ge=8,
        description="samples refined per candidate (same anchors, kernel noise and xi for all)",
    )
    seed: int = Field(2_000_000, ge=0, description="probe sample s uses seed + s")
    margin: float = Field(
        2.0, ge=0.0,
        description="headroom over gates.eval.min_zu_pixel for the probe's noise, in Z_U units at "
                    "evaluate.n_samples",
    )
    fidelity: Literal["inception", "pixel"] = Field(
        "inception",
        description="rank the passing candidates by Inception FID of their probe | pixel (PCA Frechet "
                    "distance)",
    )
    fid_samples: int = Field(128, ge=4, description="inception: probe samples per scored candidate (FID at this n)")
    fid_candidates: int = Field(
        2, ge=1,
        description="inception: the passing candidates nearest the threshold scored, per eta",
    )
    pca_dims: int = Field(
        64, ge=1,
        description="pixel: Frechet distance to validation images in the training PCA space",
    )
    batch_size: int = Field(256, ge=1, description="speed only")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto | fp32 | bf16")
    device: Device = Field("auto", description="auto | cpu | cuda | cuda:N")
    figure_samples: int = Field(8, ge=1, description="columns of reports/calibrate/probe.png")

    @field_validator("scales", "etas")
    @classmethod
    def _grid(cls, v: tuple[float, ...], info: Any) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one value")
        if info.field_name == "scales" and min(v) <= 0:
            raise ValueError(f"scales must be positive (got {list(v)})")
        if info.field_name == "etas" and not all(0 <= e <= 1 for e in v):
            raise ValueError(f"etas must lie in [0, 1] (got {list(v)})")
        return tuple(sorted(set(v)))


def novelty_rule(cfg: CalibrateParams, shared: dict[str, Any], n_test: int) -> op.NoveltyRule:
    """The evaluation gate's rule, with calibrate's margin, at the evaluation's sample sizes."""
    import dkgm.operating_point as op

    return op.NoveltyRule(min_zu=shared["gates.eval.min_zu_pixel"], margin=cfg.margin,
                          copy_floor_factor=shared["gates.eval.copy_floor_factor"],
                          copy_allowance=shared["gates.eval.copy_allowance"],
                          max_authenticity_drop=shared["gates.eval.max_authenticity_drop"],
                          copy_ratio=shared["evaluate.copy_ratio"], eval_samples=shared["evaluate.n_samples"],
                          eval_heldout=min(shared["evaluate.n_samples"], n_test))


def pca_basis(train: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, top principal directions as columns) of the flattened training items."""
    import torch

    x = torch.as_tensor(train.reshape(len(train), -1), dtype=torch.float64)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.numpy(), v[: min(dims, v.shape[0])].T.numpy()


def run(cfg: CalibrateParams, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    import dkgm.metrics as mt
    import dkgm.operating_point as op
    from dkgm.debias import load_denoiser

    prepared = load_prepared(root)
    bw = load_bandwidth(root, prepared)
    h_kde = float(bw["h"])
    device = resolve_device(cfg.device, "calibrate.device")
    denoiser, snap = load_denoiser(root / DEBIASER_SNAPSHOT, device)
    fn = denoise_fn(denoiser, device, resolve_precision(cfg.precision, device, "calibrate.precision"))
    sampler = sampler_config(shared)
    train = prepared.split("train")
    val = prepared.kind.as_saved(prepared.split("val"))  # as refine stores its samples
    if len(val) < 2:
        raise DKGMError("calibrate needs validation items for its held-out reference: prepare.val_fraction is 0")
    rule = novelty_rule(cfg, shared, len(prepared.split_rows("test")))
    ref = op.NoveltyReference(train, val, rule.copy_ratio, cfg.device)
    pca_mean, basis = pca_basis(train, cfg.pca_dims)
    val_proj = (val.reshape(len(val), -1).astype(np.float64) - pca_mean) @ basis

    seeds = cfg.seed + np.arange(cfg.probe_samples, dtype=np.int64)
    x_anchor, unit = op.probe_inputs(train, seeds)
    sigma_max = float(snap["sigma_max"])
    usable = [s for s in cfg.scales if s * h_kde <= sigma_max * (1 + 1e-6)]
    if not usable:
        raise DKGMError(f"calibrate: every candidate scale starts above the debiaser's sigma_max = {sigma_max:.3g}: "
                        "re-run train_debiaser (its range follows calibrate.scales) or lower calibrate.scales")
    rows: list[dict[str, Any]] = []
    probes: dict[tuple[float, float], np.ndarray] = {}
    t0 = time.perf_counter()
    bar = Progress("calibrate (candidates)", len(cfg.etas) * (len(usable) + cfg.bisect_steps))

    def evaluate(s: float, eta: float) -> dict[str, Any]:
        h = s * h_kde
        ladder = sampler.ladder(h, eta)
        out = np.empty_like(x_anchor)
        for b in range(0, len(seeds), cfg.batch_size):
            sl = slice(b, b + cfg.batch_size)
            out[sl], _ = debias_batch(fn, x_anchor[sl] + h * unit[sl], seeds[sl], ladder, sampler.solver, device)
        out = prepared.kind.as_saved(out)
        row: dict[str, Any] = {"eta": eta, "h": h, "nfe": ladder.nfe(sampler.solver), **ref.score(out, rule)}
        row["fidelity_fd"] = mt.fid((out.reshape(len(out), -1).astype(np.float64) - pca_mean) @ basis, val_proj)
        ok, why = rule.passes(row, ref)
        row.update(passed=ok, why="; ".join(why) or "passes")
        probes[(s, eta)] = out
        bar(len(probes))
        return row

    for eta in cfg.etas:
        rows += [{**r, "trained": True} for r in op.search_scale(lambda s: evaluate(s, eta), usable, cfg.bisect_steps)]
    bar.close()
    rows += [{"scale": s, "eta": e, "h": s * h_kde, "trained": False, "passed": False, "search": "grid",
              "why": f"h = {s * h_kde:.3g} above the debiaser's sigma_max {sigma_max:.3g}"}
             for s in cfg.scales if s not in usable for e in cfg.etas]
    seconds = time.perf_counter() - t0

    scored = [r for r in rows if r["trained"]]
    passing = [r for r in scored if r["passed"]]
    fidelity, floor_fid = "fidelity_fd", None
    if passing and cfg.fidelity == "inception" and prepared.kind.pixels:
        nearest = [r for eta in cfg.etas
                   for r in sorted((p for p in passing if p["eta"] == eta), key=lambda p: p["scale"])[: cfg.fid_candidates]]
        floor_fid = _inception_fids(root, prepared, nearest, probes, cfg)
        passing, fidelity = nearest, "fid"
    if passing:
        best = min(passing, key=lambda r: r[fidelity])
        n_fid = min(cfg.fid_samples, cfg.probe_samples)
        what = (f"Inception FID {best['fid']:.4g} at n = {n_fid}" if fidelity == "fid"
                else f"pixel-PCA Frechet distance {best['fidelity_fd']:.4g}")
        reason = (f"best fidelity ({what}) among the passing candidates nearest the novelty threshold "
                  f"({len([r for r in scored if r['passed']])} of {len(scored)} candidates pass)")
    else:
        best = max(scored, key=lambda r: r["zu_pixel_at_eval"])
        reason = (f"no candidate passes the novelty rule: the best Z_U at {rule.eval_samples} samples is "
                  f"{best['zu_pixel_at_eval']:.2f} (s = {best['scale']:g}, eta = {best['eta']:g}), it needs "
                  f">= {rule.min_zu + rule.margin:g}: widen calibrate.scales (the debiaser's range follows them)")
        log.warning("calibrate: %s", reason)
    point = {"scale": best["scale"], "eta": best["eta"], "h_kde": h_kde, "h": best["h"], "passed": bool(passing),
             "sampler": {k.split(".", 1)[1]: shared[k] for k in SAMPLER_KEYS}, "nfe": best["nfe"],
             "reason": reason}
    # the copying point beside the chosen one: the CV bandwidth itself (s = 1) at the smallest eta searched
    at_cv = min((r for r in scored if r["scale"] == 1.0), key=lambda r: r["eta"], default=None)
    metrics: dict[str, Any] = {
        "passed": bool(passing), "scale": best["scale"], "eta": best["eta"], "h": best["h"], "h_kde": h_kde,
        "candidates": len(rows), "passing": len([r for r in scored if r["passed"]]),
        "probe_samples": cfg.probe_samples, "nfe": best["nfe"],
        "zu_pixel": best["zu_pixel"], "zu_pixel_at_eval": best["zu_pixel_at_eval"],
        "copy_fraction": best["copy_fraction"], "authenticity": best["authenticity"],
        "fidelity_fd": best["fidelity_fd"], "fid": best.get("fid"), "floor_fid": floor_fid,
        "floor_copy_fraction": ref.floor_copy, "min_zu_rule": rule.min_zu + rule.margin,
        "floor_authenticity": ref.floor_authenticity, "seconds": seconds, "device": str(device),
        **({f"hcv_{k}": at_cv[k] for k in ("zu_pixel", "zu_pixel_at_eval", "copy_fraction", "authenticity",
                                          "fidelity_fd", "eta")} if at_cv else {}),
    }
    shown = {r["scale"]: probes[(r["scale"], r["eta"])][: cfg.figure_samples] for r in scored
             if r["eta"] == best["eta"] and r["search"] == "grid"}
    with staged_outputs(root, "calibrate") as outs:
        write_json(outs.path(OPERATING_POINT), point)
        write_parquet(outs.path(CANDIDATES), {k: [r.get(k) for r in rows] for k in _columns(rows)})
        _tradeoff_figure(outs.path(TRADEOFF), rows, best, rule, floor_fid, min(cfg.fid_samples, cfg.probe_samples))
        _probe_figure(outs.path(PROBE), x_anchor[: cfg.figure_samples], shown, best, prepared.kind)
        write_metrics(outs, METRICS, metrics)
    log.info("calibrate: s = %g, eta = %g (%s); Z_U %.2f at %d samples, copies %.1f%%, authenticity %.2f (floor %.2f)",
             best["scale"], best["eta"], "passes" if passing else "NO candidate passes", best["zu_pixel_at_eval"],
             rule.eval_samples, 100 * best["copy_fraction"], best["authenticity"], ref.floor_authenticity)
    return metrics


def _inception_fids(root: Path, prepared: Prepared, rows: list[dict[str, Any]],
                    probes: dict[tuple[float, float], np.ndarray], cfg: CalibrateParams) -> float:
    """FID (against the reference's training statistics) of each row's probe, in place; returns the
    held-out floor at the same n."""
    import dkgm.metrics as mt
    from dkgm.scoring import feature_network

    ref, meta = load_reference(root, prepared)
    net = feature_network(meta.get("weights"), cfg.device, "calibrate.device", root=root)
    n = min(cfg.fid_samples, cfg.probe_samples)
    bar = Progress("calibrate (FID of the passing candidates nearest the threshold)", len(rows))
    for i, r in enumerate(rows):
        feats = net(ds.to_uint8(probes[(r["scale"], r["eta"])][:n]), 50).features
        r["fid"] = mt.fid_to_reference(feats, ref["mu"], ref["sigma"])
        bar(i + 1)
    bar.close()
    return mt.fid_to_reference(ref["test_features"][:n], ref["mu"], ref["sigma"])


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _tradeoff_figure(path: Path, rows: list[dict[str, Any]], best: dict[str, Any], rule: op.NoveltyRule,
                     floor_fid: float | None, n_fid: int) -> None:
    """Left: novelty (pixel Z_U carried to the evaluation's n) against the scale, one line per eta
    (bisection points smaller), with the gate's line and the rule's; right: fidelity of the scored
    candidates, the choice ringed."""
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    etas = sorted({r["eta"] for r in rows})
    fid_key = "fid" if any(r.get("fid") is not None for r in rows) else "fidelity_fd"
    for j, eta in enumerate(etas):
        pts = sorted((r for r in rows if r["trained"] and r["eta"] == eta), key=lambda r: r["scale"])
        if not pts:
            continue
        a1.plot([r["scale"] for r in pts], [r["zu_pixel_at_eval"] for r in pts], "-", color=f"C{j}", lw=1, label=f"η = {eta:g}")
        for r in pts:
            a1.scatter(r["scale"], r["zu_pixel_at_eval"], color=f"C{j}", marker="o" if r["passed"] else "x",
                       s=24 if r["search"] == "grid" else 12, zorder=3)
        ok = sorted((r for r in pts if r["passed"] and r.get(fid_key) is not None), key=lambda r: r["scale"])
        if ok:
            a2.plot([r["scale"] for r in ok], [r[fid_key] for r in ok], "o-", color=f"C{j}", ms=4, label=f"η = {eta:g}")
    a1.axhline(rule.min_zu, color="r", ls="--", lw=1, label=f"gate: Z_U ≥ {rule.min_zu:g}")
    a1.axhline(rule.min_zu + rule.margin, color="r", ls=":", lw=1, label=f"rule: + margin {rule.margin:g}")
    a1.axhline(0.0, color="grey", lw=0.8, alpha=0.6)
    a1.scatter(best["scale"], best["zu_pixel_at_eval"], s=150, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
               label=f"chosen: s = {best['scale']:g}, η = {best['eta']:g}")
    a1.set_xlabel("bandwidth scale s (h = s × h_kde); small dots: bisection")
    a1.set_ylabel(f"pixel Z_U at {rule.eval_samples} samples")
    a1.set_title("novelty (< 0: closer to the training data than held-out data; x fails the rule)", fontsize=9)
    a1.legend(fontsize=7)
    if best.get(fid_key) is not None and best["passed"]:
        a2.scatter(best["scale"], best[fid_key], s=150, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
                   label="chosen")
    if floor_fid is not None:
        a2.axhline(floor_fid, color="k", ls=":", lw=1, label="held-out images at the same n")
    a2.set_xlabel("bandwidth scale s")
    a2.set_ylabel(f"Inception FID at n = {n_fid}" if fid_key == "fid" else "pixel-PCA Fréchet distance")
    a2.set_title("fidelity of the passing candidates nearest the threshold (lower is better)", fontsize=9)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=7)
    else:
        a2.text(0.5, 0.5, "no candidate passes the rule", ha="center", va="center", transform=a2.transAxes)
    save_figure(fig, path)


def _probe_figure(path: Path, anchors: np.ndarray, shown: dict[float, np.ndarray], best: dict[str, Any],
                  kind: DataKind) -> None:
    """Images: the anchors (first row), then the refined probe at every grid scale for the chosen eta."""
    if not kind.pixels or not shown:
        fig, ax = new_figure(4, 2)
        ax.text(0.5, 0.5, "probe images: image data only", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    rows = [ds.to_uint8(anchors)] + [ds.to_uint8(shown[s]) for s in sorted(shown)]
    write_png(path, labeled_grid(rows, ["anchors"] + [f"s = {s:g}, eta = {best['eta']:g}" for s in sorted(shown)]))


# ----------------------------------------------------------------------------- gate calibrate


class CalibrateGateParams(EnforcedSection):
    pass


def calibrate_checks(metrics: dict[str, Any], cfg: CalibrateGateParams) -> list[Check]:
    return [check(metrics, "passed", "==", True, "calibrate.scales",
                  failure="no bandwidth scale on the grid gives samples that pass the data-copying rule")]


GATE = Gate("calibrate", METRICS, CalibrateGateParams, calibrate_checks,
            doc="go/no-go on the operating point: some candidate of the grid passes the novelty rule")

STAGES = (
    Stage(
        name="calibrate",
        doc="choose the bandwidth scale and eta for novelty: a probe set refined over a grid, the best fidelity "
            "among the points that pass the data-copying rule",
        section="calibrate",
        params=CalibrateParams,
        deps=(PREPARED, BANDWIDTH, REFERENCE, DEBIASER_SNAPSHOT, gate_token("debiaser")),
        outs=(
            Out(OPERATING_POINT),
            Out(CANDIDATES, "table"),
            Out(TRADEOFF, "figure", "Operating point: novelty and fidelity against the bandwidth scale",
                "left: every candidate's pixel Z_U carried to the evaluation's sample size, with the gate's line "
                "and the rule's margin; right: the FID of the candidates that pass; the chosen point ringed"),
            Out(PROBE, "figure", "Probe samples per bandwidth scale",
                "first row: the anchors; then the refined probe at each grid scale s (the chosen η): copies on top, "
                "new digits lower down", "not drawn for point data"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        reads=(*SAMPLER_KEYS, *RULE_KEYS),
        summary=(("scale", "chosen scale s"), ("eta", "chosen η"), ("passed", "a candidate passes"),
                 ("fid", "probe FID of the choice"), ("floor_fid", "held-out FID at the probe's n"),
                 ("passing", "candidates passing"), ("zu_pixel_at_eval", "pixel Z_U (at eval n)"),
                 ("copy_fraction", "copy fraction"), ("authenticity", "authenticity"),
                 ("hcv_zu_pixel_at_eval", "pixel Z_U at s = 1 (the CV bandwidth)"), ("seconds", "seconds")),
    ),
    GATE.stage,
)
