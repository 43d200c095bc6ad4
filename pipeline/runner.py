"""Run a stage without Prefect: load and validate params, check inputs, call the stage's `run`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dkgm.devices import process_rank
from dkgm.errors import DKGMError, environment_error
from pipeline import registry
from pipeline.params import load_params, section
from stages.common import recover_staging
from stages.contract import Stage
from stages.gates import NO_GO, GateResult, gate_record, gate_token


def _blocked_by_gate(path: str) -> str | None:
    """The gate whose missing token `path` is, when that gate said NO-GO (its record exists)."""
    for name in registry.gates():
        if path == gate_token(name):
            return name
    return None


def check_inputs(stage: Stage, root: Path) -> None:
    """Every input exists; a token withheld by an enforced NO-GO is named as such."""
    if not stage.require_deps:
        return
    missing = [d for d in stage.deps if not (root / d).exists()]
    for d in missing:
        gate = _blocked_by_gate(d)
        if gate and (root / gate_record(gate)).is_file():
            raise DKGMError(f"stage {stage.name}: gate {gate} said {NO_GO} (see {gate_record(gate)}); fix what it "
                            f"names, or set gates.{gate}.enforce: false to continue anyway")
    if missing:
        raise DKGMError(f"stage {stage.name}: input not found: {', '.join(missing)} "
                        "(run the stages before it, or `dvc repro`)")


def run_stage_direct(name: str, params_path: str | Path, root: str | Path) -> Any:
    """Run one stage (a gate too) in this process; its metrics (a gate: its GateResult)."""
    root = Path(root)
    stage = registry.get(name)
    params = load_params(params_path)
    cfg = section(params, stage.section) if stage.section else None
    if process_rank()[0] == 0:  # a killed run's half-published outputs: completed (or undone) before anything reads them
        recover_staging(root)
    check_inputs(stage, root)
    t0 = time.perf_counter()
    try:
        if stage.all_params:  # run(cfg, root, params): the whole validated params.yaml (the report shows every key)
            result = stage.run(cfg, root, params)
        elif stage.reads:
            result = stage.run(cfg, root, {key: section(params, key) for key in stage.reads})
        else:
            result = stage.run(cfg, root)
    except OSError as exc:  # a full disk or an unwritable folder: one line, the staged outputs are gone
        err = environment_error(exc, f"stage {stage.name}")
        if err is None:
            raise
        raise err from None
    if stage.gate:
        return result
    if process_rank()[0] != 0:  # under torchrun only rank 0 writes the outputs
        return dict(result or {})
    missing = [o.path for o in stage.outs if not (root / o.path).exists()]
    if missing:
        hint = " (write metrics with stages.common.write_metrics: it writes timings.json too)" if any(
            o.kind == "timings" and o.path in missing for o in stage.outs) else ""
        raise DKGMError(f"stage {stage.name} declared {', '.join(missing)} but did not write it{hint}")
    metrics = dict(result or {})
    metrics.setdefault("stage_seconds", time.perf_counter() - t0)
    return metrics


def run_gate(name: str, params_path: str | Path, root: str | Path) -> GateResult:
    if name not in registry.gates():
        raise DKGMError(f"unknown gate {name!r}: expected one of {', '.join(registry.gates())}")
    return run_stage_direct(registry.gates()[name].name, params_path, root)
