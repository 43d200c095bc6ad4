"""Go/no-go gates: cheap stages that read one stage's metrics and the thresholds in params.yaml
(`gates.<name>`), write a record and a decision token, and stop `dvc repro` on a NO-GO.

The checks of a gate live in the module of the stage it gates (fit_kde.py holds gate kde), declared
with `Gate(...)`; this module is the mechanism they share. A NO-GO is one line per failed check:
the metric, its value, the threshold and the params key that sets it. With
`gates.<name>.enforce: false` the record says "NO-GO (overridden)" and the pipeline continues.
The record is always written; the token (`<name>.decision`: "GO" or "NO-GO (overridden)", the decision alone) only when the pipeline
may go on, so a stage behind an enforced NO-GO cannot start even when run by hand.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from dkgm.errors import DKGMError
from stages.common import read_json, staged_outputs, write_json
from stages.contract import Out, Section, Stage

GATES_DIR = "reports/gates"
GO, NO_GO, OVERRIDDEN = "GO", "NO-GO", "NO-GO (overridden)"
_OPS: dict[str, Callable[[Any, Any], bool]] = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


def gate_record(name: str) -> str:
    """The full gate record: every check, value, threshold and params key."""
    return f"{GATES_DIR}/{name}.json"


def gate_token(name: str) -> str:
    """What downstream stages depend on: the decision alone, so that moving a threshold
    without changing the decision does not re-run what follows."""
    return f"{GATES_DIR}/{name}.decision"


@dataclass(frozen=True)
class Check:
    metric: str
    value: Any
    op: str
    threshold: Any
    params_key: str
    passed: bool
    params_value: Any = None  # the params key's value when the threshold is derived from it (else the threshold)
    failure: str = ""  # what a failure means, in words (the report's verdict)

    def line(self) -> str:
        return f"{self.metric} = {_fmt(self.value)}, needs {self.op} {_fmt(self.threshold)} ({self.params_key})"


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)


def check(metrics: dict[str, Any], metric: str, op: str, threshold: Any, params_key: str,
          params_value: Any = None, failure: str = "") -> Check:
    """One check; a missing metric is an error, a null value (non-finite) fails. `params_value`: the
    params key's value when the threshold is computed from it (a floor minus a margin); `failure`:
    what it means when the check fails, in words a reviewer reads in the report's verdict."""
    if metric not in metrics:
        raise DKGMError(f"gate input has no metric {metric!r}: re-run the stage that writes it")
    value = metrics[metric]
    passed = value is not None and bool(_OPS[op](value, threshold))
    return Check(metric, value, op, threshold, params_key, passed, threshold if params_value is None else params_value,
                 failure)


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


class EnforcedSection(Section):
    enforce: bool = Field(True, description='false: record "NO-GO (overridden)" and continue')


@dataclass(frozen=True)
class Gate:
    """A gate on one stage's metrics file: `checks(metrics, cfg)` lists its checks."""

    name: str
    metrics: str  # the metrics file it reads
    params: type[EnforcedSection]
    checks: Callable[[dict[str, Any], Any], list[Check]]
    doc: str

    def evaluate(self, cfg: EnforcedSection, root: Path) -> GateResult:
        path = Path(root) / self.metrics
        if not path.is_file():
            raise DKGMError(f"gate {self.name}: metrics file not found: {path} (run the stage before the gate)")
        checks = self.checks(read_json(path, f"gate {self.name} input"), cfg)
        decision = GO if all(c.passed for c in checks) else (NO_GO if cfg.enforce else OVERRIDDEN)
        return GateResult(self.name, decision, checks)

    def run(self, cfg: EnforcedSection, root: Path) -> GateResult:
        """Evaluate, then write the record (always) and the token (unless the gate stops the pipeline)."""
        root = Path(root)
        result = self.evaluate(cfg, root)
        record = {"gate": self.name, "decision": result.decision, "go": not result.stops,
                  "checks": [asdict(c) for c in result.checks], "input": self.metrics}
        with staged_outputs(root, f"gate_{self.name}") as out:
            write_json(out.path(gate_record(self.name)), record)
            if not result.stops:
                out.path(gate_token(self.name)).write_text(result.decision + "\n")
        token = root / gate_token(self.name)
        if result.stops and token.exists():
            token.unlink()
        return result

    @property
    def stage(self) -> Stage:
        return Stage(name=f"gate_{self.name}", doc=self.doc, section=f"gates.{self.name}", params=self.params,
                     deps=(self.metrics,), outs=(Out(gate_record(self.name), "record"), Out(gate_token(self.name), "token")),
                     run=self.run, cmd=f"python -m pipeline gate {self.name}", gate=self.name,
                     code_module=self.checks.__module__)
