"""The stages, assembled from the stage modules: nothing about a stage is written here.

Every module in the `stages` package that defines `STAGES` (a tuple of `stages.contract.Stage`)
contributes its stages; the pipeline-level report (pipeline/report.py) is added last, with every
small output of the others as its inputs. The order is a topological order of the artifact graph
(a stage after every stage whose output it reads), which keeps each chain together: it is the
order of dvc.yaml. DVC still decides what runs; this order only makes the file readable.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache

import stages as stages_pkg
from dkgm.errors import DKGMError
from stages.contract import Stage


def discover(package=stages_pkg) -> list[Stage]:
    """The stages declared by the modules of `package`, in module-name order."""
    found: list[Stage] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for stage in getattr(module, "STAGES", ()):
            if not isinstance(stage, Stage):
                raise TypeError(f"{module.__name__}.STAGES holds {stage!r}, not a stages.contract.Stage")
            found.append(stage)
    return found


def order(found: list[Stage]) -> list[Stage]:
    """A topological order of the stages by their artifacts. Among the stages that can come next,
    the one that reads the most recently placed stage's output goes first (a chain stays together:
    a gate right after its stage), then the one that needs fewer stages, then the alphabetical one."""
    producer: dict[str, str] = {}
    for s in found:
        for path in s.out_paths:
            if path in producer:
                raise DKGMError(f"{path} is an output of both {producer[path]} and {s.name}")
            producer[path] = s.name
    needs = {s.name: {producer[d] for d in s.deps if d in producer} - {s.name} for s in found}
    by_name = {s.name: s for s in found}
    if len(by_name) != len(found):
        raise DKGMError("two stage modules declare a stage of the same name")
    placed: dict[str, int] = {}
    while len(placed) < len(found):
        ready = [n for n in by_name if n not in placed and needs[n] <= placed.keys()]
        if not ready:
            cycle = sorted(n for n in by_name if n not in placed)
            raise DKGMError(f"the stages {', '.join(cycle)} read each other's outputs in a cycle")
        ready.sort(key=lambda n: (-max((placed[d] for d in needs[n]), default=-1), len(needs[n]), n))
        placed[ready[0]] = len(placed)
    return [by_name[n] for n in sorted(placed, key=placed.get)]


# the pipeline-level stage built from the others' declarations, loaded by name as the stage modules are (the
# report reads the registry; the registry names the report without importing it: no import cycle)
REPORT_MODULE = "pipeline.report"


@cache
def all_stages() -> dict[str, Stage]:
    """Every stage by name, in dvc.yaml order, the report last."""
    found = order(discover())
    return {s.name: s for s in [*found, importlib.import_module(REPORT_MODULE).stage(found)]}


def get(name: str) -> Stage:
    """A stage by name; an unknown name is one line with the closest names."""
    table = all_stages()
    if name not in table:
        from difflib import get_close_matches

        close = get_close_matches(name, table, n=3)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise DKGMError(f"unknown stage {name!r}{hint}: the stages are {', '.join(table)}")
    return table[name]


def gates() -> dict[str, Stage]:
    """Gate stages by gate name (kde, debiaser, eval)."""
    return {s.gate: s for s in all_stages().values() if s.gate}
