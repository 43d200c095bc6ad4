"""Go/no-go gates: cheap DVC stages that read a stage's metrics and the thresholds in
params.yaml (`gates.<name>`), write a record, and stop `dvc repro` on a NO-GO.

A NO-GO prints one line per failed check: the metric, its value, the threshold and the params
key that sets it. With `gates.<name>.enforce: false` the record says "NO-GO (overridden)" and
the pipeline continues.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dkgm.errors import DKGMError
from pipeline import paths
from pipeline.params import DebiaserGateParams, EvalGateParams, KDEGateParams, Params, section

GO, NO_GO, OVERRIDDEN = "GO", "NO-GO", "NO-GO (overridden)"
_OPS: dict[str, Callable[[Any, Any], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Check:
    metric: str
    value: Any
    op: str
    threshold: Any
    params_key: str
    passed: bool

    def line(self) -> str:
        return f"{self.metric} = {_fmt(self.value)}, needs {self.op} {_fmt(self.threshold)} ({self.params_key})"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def check(metrics: dict[str, Any], metric: str, op: str, threshold: Any, params_key: str) -> Check:
    if metric not in metrics:
        raise DKGMError(f"gate input has no metric {metric!r}: re-run the stage that writes it")
    value = metrics[metric]
    passed = value is not None and bool(_OPS[op](value, threshold))
    return Check(metric, value, op, threshold, params_key, passed)


def kde_checks(metrics: dict[str, Any], cfg: KDEGateParams) -> list[Check]:
    key = "gates.kde"
    checks = [
        check(metrics, "loglik_gain_per_dim", ">=", cfg.min_loglik_gain_per_dim, f"{key}.min_loglik_gain_per_dim"),
        check(metrics, "truncation_bound_opt", "<=", cfg.max_truncation_bound, f"{key}.max_truncation_bound"),
    ]
    if cfg.require_interior_optimum:
        checks.insert(0, check(metrics, "cv_on_boundary", "==", False, f"{key}.require_interior_optimum"))
    return checks


def debiaser_checks(metrics: dict[str, Any], cfg: DebiaserGateParams) -> list[Check]:
    key = "gates.debiaser"
    return [
        check(metrics, "val_mse_at_h", "<=", cfg.max_val_mse, f"{key}.max_val_mse"),  # null (non-finite) fails
        check(metrics, "error_ratio", "<=", cfg.max_error_ratio, f"{key}.max_error_ratio"),
    ]


def eval_checks(metrics: dict[str, Any], cfg: EvalGateParams) -> list[Check]:
    key = "gates.eval"
    checks = [
        check(metrics, "debias_gain", ">=", cfg.min_debias_gain, f"{key}.min_debias_gain"),
        check(metrics, "refined_copy_fraction", "<=", cfg.max_copy_fraction, f"{key}.max_copy_fraction"),
        check(metrics, "refined_anchor_fraction", "<=", cfg.max_anchor_fraction, f"{key}.max_anchor_fraction"),
    ]
    if metrics.get("kind") == "images":  # FID has no meaning for point data
        checks.insert(0, check(metrics, "refined_fid", "<=", cfg.max_fid, f"{key}.max_fid"))
    return checks


@dataclass(frozen=True)
class GateSpec:
    metrics: str  # the metrics file the gate reads
    checks: Callable[[dict[str, Any], Any], list[Check]]


GATES: dict[str, GateSpec] = {
    "kde": GateSpec(metrics=paths.KDE_METRICS, checks=kde_checks),
    "debiaser": GateSpec(metrics=paths.TRAIN_METRICS, checks=debiaser_checks),
    "eval": GateSpec(metrics=paths.EVAL_METRICS, checks=eval_checks),
}


@dataclass(frozen=True)
class GateResult:
    name: str
    decision: str
    checks: list[Check]

    @property
    def stops(self) -> bool:
        return self.decision == NO_GO

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def evaluate(name: str, params: Params, root: Path) -> GateResult:
    if name not in GATES:
        raise DKGMError(f"unknown gate {name!r}: expected one of {', '.join(GATES)}")
    spec = GATES[name]
    cfg = section(params, f"gates.{name}")
    mpath = root / spec.metrics
    if not mpath.is_file():
        raise DKGMError(f"gate {name}: metrics file not found: {mpath} (run the stage before the gate)")
    metrics = json.loads(mpath.read_text())
    checks = spec.checks(metrics, cfg)
    ok = all(c.passed for c in checks)
    decision = GO if ok else (NO_GO if cfg.enforce else OVERRIDDEN)
    return GateResult(name, decision, checks)


def write(result: GateResult, root: Path) -> None:
    """Write the record (always) and the decision token (unless the gate stops the pipeline),
    each atomically."""
    from stages.common import staged_outputs, write_json

    record = {
        "gate": result.name,
        "decision": result.decision,
        "go": result.decision != NO_GO,
        "checks": [asdict(c) for c in result.checks],
        "input": GATES[result.name].metrics,
    }
    token = root / paths.gate_token(result.name)
    with staged_outputs(root, f"gate_{result.name}") as out:
        write_json(out.path(paths.gate_record(result.name)), record)
        if not result.stops:
            out.path(paths.gate_token(result.name)).write_text(result.decision + "\n")
    if result.stops and token.exists():
        token.unlink()
