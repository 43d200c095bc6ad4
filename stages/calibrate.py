"""Stage calibrate: choose the operating point (bandwidth scale s, debiasing noise level eta) for
novelty (DESIGN 2.6).

At the CV bandwidth a good debiaser walks each KDE sample back to its anchor: a near-copy of a
training image. A wider generation bandwidth h = s * h_kde and eta > 0 trade fidelity for novelty.
This stage refines one small probe set at every (s, eta) of a grid, with the same anchors, kernel
noise and xi_k for every candidate (they differ only in the point), and measures on each:

- novelty, against the validation split as the held-out reference (the test split stays for the
  evaluation): pixel-space Z_U of the nearest-training-image distances, the copy fraction
  (d1/d2 < 1/3) and authenticity;
- fidelity, for the candidates that pass only: Inception FID of their probe against the reference
  statistics (`fidelity: inception`, the default; `pixel`: the Frechet distance to the validation
  images in the training set's top principal components, no feature network: measured to rank
  candidates poorly, see docs/design.md).

The rule (params `min_zu`, `margin`, `copy_*`, `max_authenticity_drop`) keeps the candidates that
would pass the evaluation gate: Z_U grows with the square root of the sample sizes at a fixed
effect, so the probe's Z_U is carried to the evaluation's sizes (`eval_samples` generated against
as many held-out images) through its effect U/(nm) - 1/2, and must clear `min_zu` by `margin`.
Among those it picks the best fidelity. No candidate passing is a NO-GO of gate calibrate, with
the best Z_U reached and the key to widen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from dkgm import data as ds
from dkgm import kde, novelty
from dkgm import metrics as mt
from dkgm.debias import load_denoiser
from dkgm.devices import resolve_device, resolve_precision
from dkgm.errors import DKGMError
from dkgm.sampler import make_ladder
from stages.artifacts import (
    BANDWIDTH,
    DEBIASER_SNAPSHOT,
    OPERATING_POINT,
    PREPARED,
    REFERENCE,
    Prepared,
    load_bandwidth,
    load_prepared,
)
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
from stages.sampling import debias_batch, denoise_fn

CANDIDATES = "reports/calibrate/candidates.parquet"
TRADEOFF = "reports/calibrate/tradeoff.png"
PROBE = "reports/calibrate/probe.png"
METRICS = "reports/calibrate/metrics.json"


class CalibrateParams(Section):
    scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # candidate scales s (h = s x h_kde)
    etas: tuple[float, ...] = (0.0, 1.0)  # candidate debiasing noise levels
    steps: int = Field(10, ge=1)  # K of the probe's geometric Euler ladder (keep refine.steps equal)
    probe_samples: int = Field(256, ge=8)  # samples refined per candidate
    seed: int = Field(2_000_000, ge=0)  # probe sample s uses seed + s (anchor, kernel noise, xi)
    eval_samples: int = Field(500, ge=2)  # the sample size the evaluation gate scores at (evaluate.n_samples)
    min_zu: float = -3.0  # pixel Z_U at eval_samples must reach this (gates.eval.min_zu_pixel)...
    margin: float = Field(2.0, ge=0.0)  # ...plus this headroom, in Z_U units at eval_samples
    copy_floor_factor: float = Field(2.0, ge=0.0)  # copy fraction <= max(factor x held-out floor, allowance)
    copy_allowance: float = Field(0.01, ge=0.0, le=1.0)
    max_authenticity_drop: float = Field(0.1, ge=0.0, le=1.0)  # authenticity >= held-out's - this
    fidelity: Literal["inception", "pixel"] = "inception"  # rank the passing candidates by Inception FID | pixel-PCA FD
    fid_samples: int = Field(128, ge=4)  # inception: probe samples per passing candidate scored (FID at this n)
    pca_dims: int = Field(64, ge=1)  # pixel: Frechet distance in this many principal components
    copy_ratio: float = Field(1 / 3, gt=0.0, lt=1.0)  # a copy: d1/d2 < copy_ratio (evaluate.copy_ratio)
    batch_size: int = Field(256, ge=1)  # speed only
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Device = "auto"
    figure_samples: int = Field(8, ge=1)  # columns of reports/calibrate/probe.png

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


def pca_basis(train: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, top principal directions as columns) of the flattened training items."""
    x = torch.as_tensor(train.reshape(len(train), -1), dtype=torch.float64)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    return mean.numpy(), v[: min(dims, v.shape[0])].T.numpy()


class Reference:
    """What every candidate is compared with: the training set, the validation floor, the PCA."""

    def __init__(self, prepared: Prepared, cfg: CalibrateParams):
        self.train = prepared.split("train")
        self.val = _quantized(prepared.split("val"), prepared.kind)
        if len(self.val) < 2:
            raise DKGMError("calibrate needs validation items for its held-out reference: prepare.val_fraction is 0")
        self.kind = prepared.kind
        _, own, _ = mt.nearest_two(self.train, self.train, device=cfg.device)  # the nearest *other* training item
        self.train_own_nn = own
        d1, d2, nn = mt.nearest_two(self.val, self.train, device=cfg.device)
        self.val_nn = d1
        self.floor_copy = mt.copy_fraction(d1, d2, cfg.copy_ratio)
        self.floor_authenticity = novelty.authenticity(d1, nn, own)
        self.mean, self.basis = pca_basis(self.train, cfg.pca_dims)
        self.val_proj = self.project(self.val)
        self.n_test = len(prepared.split_rows("test"))

    def project(self, x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1).astype(np.float64) - self.mean) @ self.basis


def probe_inputs(train: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(anchors, unit kernel noise u) of the probe: candidate s starts from x_anchor + s h_kde u, so
    every candidate refines the same anchors with the same noise (exactly what sample_kde would draw
    for these seeds at h = s h_kde)."""
    x_anchor = train[kde.sample_anchors(seeds.tolist(), len(train)).numpy()]
    unit = kde.kernel_noise(seeds.tolist(), int(np.prod(train.shape[1:]))).numpy().reshape(x_anchor.shape)
    return x_anchor, unit


def _quantized(x: np.ndarray, kind: str) -> np.ndarray:
    """Images as a user would save them (uint8, as refine stores them), back in [-1, 1]."""
    return ds.to_float(ds.to_uint8(x)) if kind == "images" else x.astype(np.float32)


def score(x: np.ndarray, ref: Reference, cfg: CalibrateParams) -> dict[str, float]:
    """Novelty and fidelity of one candidate's refined probe set."""
    x = _quantized(x, ref.kind)
    d1, d2, nn = mt.nearest_two(x, ref.train, device=cfg.device)
    zu = novelty.z_u(d1, ref.val_nn)
    m_eval = min(cfg.eval_samples, ref.n_test)
    zu_eval = novelty.z_u_at(novelty.z_u_effect(zu, len(x), len(ref.val_nn)), cfg.eval_samples, m_eval)
    return {"zu_pixel": zu, "zu_pixel_at_eval": zu_eval, "copy_fraction": mt.copy_fraction(d1, d2, cfg.copy_ratio),
            "authenticity": novelty.authenticity(d1, nn, ref.train_own_nn),
            "nn_distance": float(np.median(d1) / np.sqrt(x[0].size)),
            "fidelity_fd": mt.fid(ref.project(x), ref.val_proj)}


def passes(row: dict[str, Any], ref: Reference, cfg: CalibrateParams) -> tuple[bool, list[str]]:
    """The novelty rule; the reasons a candidate fails it."""
    why = []
    if not row["zu_pixel_at_eval"] >= cfg.min_zu + cfg.margin:
        why.append(f"Z_U {row['zu_pixel_at_eval']:.2f} < {cfg.min_zu + cfg.margin:g}")
    limit = max(cfg.copy_floor_factor * ref.floor_copy, cfg.copy_allowance)
    if not row["copy_fraction"] <= limit:
        why.append(f"copy fraction {row['copy_fraction']:.3f} > {limit:.3f}")
    if not row["authenticity"] >= ref.floor_authenticity - cfg.max_authenticity_drop:
        why.append(f"authenticity {row['authenticity']:.3f} < {ref.floor_authenticity - cfg.max_authenticity_drop:.3f}")
    return not why, why


def run(cfg: CalibrateParams, root: Path) -> dict[str, Any]:
    prepared = load_prepared(root)
    bw = load_bandwidth(root, prepared)
    h_kde = float(bw["h"])
    device = resolve_device(cfg.device, "calibrate.device")
    denoiser, snap = load_denoiser(root / DEBIASER_SNAPSHOT, device)
    fn = denoise_fn(denoiser, device, resolve_precision(cfg.precision, device, "calibrate.precision"))
    ref = Reference(prepared, cfg)

    seeds = cfg.seed + np.arange(cfg.probe_samples, dtype=np.int64)
    x_anchor, unit = probe_inputs(ref.train, seeds)

    grid = [(s, e) for s in cfg.scales for e in cfg.etas]
    sigma_max = float(snap["sigma_max"])
    rows: list[dict[str, Any]] = []
    shown: dict[float, np.ndarray] = {}
    kept: dict[tuple[float, float], np.ndarray] = {}  # the passing candidates' probe, for their FID
    t0 = time.perf_counter()
    bar = Progress("calibrate (candidates)", len(grid))
    for i, (s, eta) in enumerate(grid):
        h = s * h_kde
        row: dict[str, Any] = {"scale": s, "eta": eta, "h": h}
        if h > sigma_max * (1 + 1e-6):
            row.update(trained=False, passed=False, why=f"h = {h:.3g} above the debiaser's sigma_max {sigma_max:.3g}")
            rows.append(row)
            bar(i + 1)
            continue
        ladder = make_ladder(h, cfg.steps, "geometric", eta)
        out = np.empty_like(x_anchor)
        for b in range(0, len(seeds), cfg.batch_size):
            sl = slice(b, b + cfg.batch_size)
            out[sl], _ = debias_batch(fn, x_anchor[sl] + h * unit[sl], seeds[sl], ladder, "euler", device)
        row.update(trained=True, **score(out, ref, cfg))
        ok, why = passes(row, ref, cfg)
        row.update(passed=ok, why="; ".join(why) or "passes")
        rows.append(row)
        if ok:
            kept[(s, eta)] = out[: cfg.fid_samples]
        if eta == max(cfg.etas) and prepared.kind == "images":
            shown[s] = out[: cfg.figure_samples]
        bar(i + 1)
    bar.close()
    seconds = time.perf_counter() - t0

    scored = [r for r in rows if r["trained"]]
    if not scored:
        raise DKGMError(f"calibrate: every candidate scale starts above the debiaser's sigma_max = {sigma_max:.3g}: "
                        "lower calibrate.scales or raise debiaser.sigma_max_factor")
    passing = [r for r in scored if r["passed"]]
    fidelity, floor_fid = "fidelity_fd", None
    if passing and cfg.fidelity == "inception" and prepared.kind == "images":
        floor_fid = _inception_fids(root, prepared, passing, kept, cfg)
        fidelity = "fid"
    if passing:
        best = min(passing, key=lambda r: r[fidelity])
        what = (f"Inception FID {best['fid']:.4g} at n = {min(cfg.fid_samples, cfg.probe_samples)}" if fidelity == "fid"
                else f"pixel-PCA Frechet distance {best['fidelity_fd']:.4g}")
        reason = f"best fidelity ({what}) among the {len(passing)} of {len(scored)} candidates that pass the novelty rule"
    else:
        best = max(scored, key=lambda r: r["zu_pixel_at_eval"])
        reason = (f"no candidate passes the novelty rule: the best Z_U at {cfg.eval_samples} samples is "
                  f"{best['zu_pixel_at_eval']:.2f} (s = {best['scale']:g}, eta = {best['eta']:g}), it needs "
                  f">= {cfg.min_zu + cfg.margin:g}: widen calibrate.scales (raise debiaser.sigma_max_factor with it)")
        log.warning("calibrate: %s", reason)
    point = {"scale": best["scale"], "eta": best["eta"], "steps": cfg.steps, "h_kde": h_kde, "h": best["h"],
             "passed": bool(passing), "reason": reason}
    at_cv = next((r for r in scored if r["scale"] == 1.0 and r["eta"] == 0.0), None)
    metrics: dict[str, Any] = {
        "passed": bool(passing), "scale": best["scale"], "eta": best["eta"], "h": best["h"], "h_kde": h_kde,
        "candidates": len(grid), "passing": len(passing), "probe_samples": cfg.probe_samples,
        "zu_pixel": best["zu_pixel"], "zu_pixel_at_eval": best["zu_pixel_at_eval"],
        "copy_fraction": best["copy_fraction"], "authenticity": best["authenticity"],
        "fidelity_fd": best["fidelity_fd"], "fid": best.get("fid"), "floor_fid": floor_fid,
        "floor_copy_fraction": ref.floor_copy,
        "floor_authenticity": ref.floor_authenticity, "seconds": seconds, "device": str(device),
        **({f"hcv_{k}": at_cv[k] for k in ("zu_pixel", "zu_pixel_at_eval", "copy_fraction", "authenticity",
                                          "fidelity_fd")} if at_cv else {}),
    }
    with staged_outputs(root, "calibrate") as outs:
        write_json(outs.path(OPERATING_POINT), point)
        write_parquet(outs.path(CANDIDATES), {k: [r.get(k) for r in rows] for k in _columns(rows)})
        _tradeoff_figure(outs.path(TRADEOFF), rows, best, cfg, floor_fid)
        _probe_figure(outs.path(PROBE), x_anchor[: cfg.figure_samples], shown, best, max(cfg.etas), prepared.kind)
        write_metrics(outs, METRICS, metrics)
    log.info("calibrate: s = %g, eta = %g (%s); Z_U %.2f at %d samples, copies %.1f%%, authenticity %.2f (floor %.2f)",
             best["scale"], best["eta"], "passes" if passing else "NO candidate passes", best["zu_pixel_at_eval"],
             cfg.eval_samples, 100 * best["copy_fraction"], best["authenticity"], ref.floor_authenticity)
    return metrics


def _inception_fids(root: Path, prepared: Prepared, passing: list[dict[str, Any]],
                    kept: dict[tuple[float, float], np.ndarray], cfg: CalibrateParams) -> float:
    """FID (against the reference's training statistics) of each passing candidate's probe, in
    place; returns the held-out floor at the same n."""
    from stages.artifacts import load_reference
    from stages.evaluate import feature_network

    ref, meta = load_reference(root, prepared)
    net = feature_network(meta.get("weights"), cfg.device, "calibrate.device")
    n = min(cfg.fid_samples, cfg.probe_samples)
    bar = Progress("calibrate (FID of the passing candidates)", len(passing))
    for i, r in enumerate(passing):
        feats = net(ds.to_uint8(kept[(r["scale"], r["eta"])][:n]), 50).features
        r["fid"] = mt.fid_to_reference(feats, ref["mu"], ref["sigma"])
        bar(i + 1)
    bar.close()
    return mt.fid_to_reference(ref["test_features"][:n], ref["mu"], ref["sigma"])


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _tradeoff_figure(path: Path, rows: list[dict[str, Any]], best: dict[str, Any], cfg: CalibrateParams,
                     floor_fid: float | None) -> None:
    """Left: novelty (pixel Z_U carried to the evaluation's n) against the scale, one line per eta,
    with the gate's line and the rule's; right: fidelity of the candidates that pass, the choice ringed."""
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
            a1.scatter(r["scale"], r["zu_pixel_at_eval"], color=f"C{j}", marker="o" if r["passed"] else "x", s=24, zorder=3)
        ok = [r for r in pts if r["passed"] and r.get(fid_key) is not None]
        if ok:
            a2.plot([r["scale"] for r in ok], [r[fid_key] for r in ok], "o-", color=f"C{j}", ms=4, label=f"η = {eta:g}")
    a1.axhline(cfg.min_zu, color="r", ls="--", lw=1, label=f"gate: Z_U ≥ {cfg.min_zu:g}")
    a1.axhline(cfg.min_zu + cfg.margin, color="r", ls=":", lw=1, label=f"rule: + margin {cfg.margin:g}")
    a1.axhline(0.0, color="grey", lw=0.8, alpha=0.6)
    a1.scatter(best["scale"], best["zu_pixel_at_eval"], s=150, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
               label=f"chosen: s = {best['scale']:g}, η = {best['eta']:g}")
    a1.set_xlabel("bandwidth scale s (h = s × h_kde)")
    a1.set_ylabel(f"pixel Z_U at {cfg.eval_samples} samples")
    a1.set_title("novelty (< 0: closer to the training data than held-out data; x fails the rule)", fontsize=9)
    a1.legend(fontsize=7)
    if best.get(fid_key) is not None and best["passed"]:
        a2.scatter(best["scale"], best[fid_key], s=150, facecolors="none", edgecolors="k", lw=1.5, zorder=4,
                   label="chosen")
    if floor_fid is not None:
        a2.axhline(floor_fid, color="k", ls=":", lw=1, label="held-out images at the same n")
    a2.set_xlabel("bandwidth scale s")
    a2.set_ylabel(f"Inception FID at n = {min(cfg.fid_samples, cfg.probe_samples)}" if fid_key == "fid"
                  else "pixel-PCA Fréchet distance")
    a2.set_title("fidelity of the candidates that pass (lower is better)", fontsize=9)
    if a2.get_legend_handles_labels()[0]:
        a2.legend(fontsize=7)
    else:
        a2.text(0.5, 0.5, "no candidate passes the rule", ha="center", va="center", transform=a2.transAxes)
    save_figure(fig, path)


def _probe_figure(path: Path, anchors: np.ndarray, shown: dict[float, np.ndarray], best: dict[str, Any], eta: float,
                  kind: str) -> None:
    """Images: the anchors (first row), then the refined probe at every scale for the largest eta."""
    if kind != "images" or not shown:
        fig, ax = new_figure(4, 2)
        ax.text(0.5, 0.5, "probe images: image data only", ha="center", va="center")
        ax.set_axis_off()
        save_figure(fig, path)
        return
    rows = [ds.to_uint8(anchors)] + [ds.to_uint8(shown[s]) for s in sorted(shown)]
    write_png(path, labeled_grid(rows, ["anchors"] + [f"s = {s:g}, eta = {eta:g}" for s in sorted(shown)]))


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
                "first row: the anchors; then the refined probe at each scale s (largest η): copies on top, "
                "new digits lower down", "not drawn for point data"),
            Out(METRICS, "metrics"),
        ),
        run=run,
        summary=(("scale", "chosen scale s"), ("eta", "chosen η"), ("passed", "a candidate passes"),
                 ("fid", "probe FID of the choice"), ("floor_fid", "held-out FID at the probe's n"),
                 ("passing", "candidates passing"), ("zu_pixel_at_eval", "pixel Z_U (at eval n)"),
                 ("copy_fraction", "copy fraction"), ("authenticity", "authenticity"),
                 ("hcv_zu_pixel_at_eval", "pixel Z_U at s = 1, η = 0"), ("seconds", "seconds")),
    ),
    GATE.stage,
)
