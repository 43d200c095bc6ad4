"""Stage evaluate_baseline: the diffusion baseline's samples scored by the evaluation stage's own
code (`stages.evaluate.Scorer`) and settings (it reads the `evaluate` section key by key), so its
numbers sit beside DKGM's on the same footing: the report's baseline column.

A module of its own, apart from stages/baseline.py: an edit to the evaluation code re-scores the
baseline, it does not re-train it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from stages.artifacts import BASELINE_SAMPLES, PREPARED, REFERENCE, load_samples
from stages.common import log, staged_outputs, write_metrics
from stages.contract import Out, Stage
from stages.scoring import SETTINGS, Scorer, settings

EVAL_METRICS = "reports/eval_baseline/metrics.json"
SKIPPED = "baseline.enabled is false"
# the evaluation settings, key by key: read here and by the comparison, so that both score like evaluate


def evaluate_run(cfg: None, root: Path, shared: dict[str, Any]) -> dict[str, Any]:
    root = Path(root)
    ecfg = settings(shared)
    x, _, meta = load_samples(root, BASELINE_SAMPLES, "baseline samples")
    if meta.get("skipped"):
        metrics = {"skipped": True, "reason": SKIPPED}
    else:
        n = min(ecfg.n_samples, len(x))
        t0 = time.perf_counter()
        scorer = Scorer(ecfg, root, n)
        scored, _ = scorer.score({"baseline": scorer.as_float(x)})
        metrics = {"kind": scorer.kind.name, "n_samples": n, "nfe": int(meta.get("nfe", 0)),
                   **{k: v for k, v in scored.items() if not k.startswith("real_")},
                   "seconds": time.perf_counter() - t0}
        if scored.get("real_fid"):  # against the held-out floor at the same n, as evaluate reports DKGM's
            metrics["baseline_fid_ratio"] = scored["baseline_fid"] / scored["real_fid"]
    with staged_outputs(root, "evaluate_baseline") as out:
        write_metrics(out, EVAL_METRICS, metrics)
    if not metrics.get("skipped"):
        log.info("evaluate_baseline: n=%d, FID %s, pixel Z_U %.2f, copies %.1f%%", metrics["n_samples"],
                 f"{metrics['baseline_fid']:.4g}" if "baseline_fid" in metrics else "n/a",
                 metrics["baseline_zu_pixel"], 100 * metrics["baseline_copy_fraction"])
    return metrics


STAGES = (
    Stage(
        name="evaluate_baseline",
        doc="score the baseline's samples with the evaluation stage's code and settings",
        section="",
        params=None,
        deps=(PREPARED, REFERENCE, BASELINE_SAMPLES),
        outs=(Out(EVAL_METRICS, "metrics"),),
        run=evaluate_run,
        reads=SETTINGS,
    ),
)
