"""Run a stage or a gate without Prefect: load and validate params, check inputs, call the stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dkgm.errors import DKGMError
from pipeline import gates
from pipeline.params import load_params, section
from pipeline.registry import GATE_STAGES, STAGES


def check_inputs(stage: str, root: Path) -> None:
    if not STAGES[stage].require_deps:
        return
    missing = [d for d in STAGES[stage].deps if not (root / d).exists()]
    if missing:
        raise DKGMError(f"stage {stage}: input not found: {', '.join(missing)} (run the stages before it, or `dvc repro`)")


def run_stage_direct(stage: str, params_path: str | Path, root: str | Path) -> dict[str, Any]:
    if stage not in STAGES or STAGES[stage].gate:
        raise DKGMError(f"unknown stage {stage!r}: expected one of {', '.join(n for n, s in STAGES.items() if not s.gate)}")
    root = Path(root)
    spec = STAGES[stage]
    cfg = section(load_params(params_path), spec.section)
    check_inputs(stage, root)
    t0 = time.perf_counter()
    metrics = spec.load().run(cfg, root)
    metrics = dict(metrics or {})
    metrics.setdefault("stage_seconds", time.perf_counter() - t0)
    return metrics


def run_gate(name: str, params_path: str | Path, root: str | Path) -> gates.GateResult:
    if name not in GATE_STAGES:
        raise DKGMError(f"unknown gate {name!r}: expected one of {', '.join(GATE_STAGES)}")
    root = Path(root)
    result = gates.evaluate(name, load_params(params_path), root)
    gates.write(result, root)
    return result
