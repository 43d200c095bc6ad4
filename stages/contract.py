"""The stage contract: what a stage module declares, once, for the rest of the project to derive from.

A stage module (stages/<name>.py) ends with

    STAGES = (Stage(name=..., doc=..., section=..., params=<its Section model>, deps=(...), outs=(...), run=run),)

and nothing about the stage lives anywhere else: `pipeline/registry.py` discovers the modules,
`pipeline/params.py` assembles the params.yaml schema from their sections, and `python -m pipeline
dvc-yaml` writes dvc.yaml from the same declarations (code deps from each module's imports).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict

# ----------------------------------------------------------------------------- params sections


class Section(BaseModel):
    """One params.yaml section: every key typed; unknown keys are an error; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {v!r})")
    return v


Device = Annotated[str, AfterValidator(_check_device)]  # auto | cpu | cuda | cuda:N
AutoOr = Union[Literal["auto"], float]  # a value chosen by an earlier stage (auto), or pinned by hand


def auto_or_number(v: Any, lo: float, hi: float | None = None, lo_open: bool = False) -> Any:
    """Validate an `auto | number` key: the number in [lo, hi] ((lo, hi] with lo_open)."""
    if v == "auto":
        return v
    ok_type = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok_type and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi):
        return float(v)
    bounds = f"{'above' if lo_open else 'at least'} {lo:g}" + (f" and at most {hi:g}" if hi is not None else "")
    raise ValueError(f"must be auto or a number {bounds} (got {v!r})")


# ----------------------------------------------------------------------------- artifacts

OutKind = Literal["data", "metrics", "timings", "figure", "table", "record", "token", "document"]


@dataclass(frozen=True)
class Out:
    """One output of a stage.

    kind: `data` is DVC-cached (large, not in git); every other kind is small and committed with
    the run (`cache: false`): `metrics` (flat JSON for `dvc metrics diff`: results only),
    `timings` (the same stage's seconds, throughputs and run conditions, beside its metrics file and
    added to every stage that has one; not a DVC metric, so identical runs diff as equal), `figure` (PNG, a DVC
    image plot), `table` (csv/parquet), `record` (a gate's record), `token` (a gate's decision),
    `document` (the report)."""

    path: str
    kind: OutKind = "data"
    title: str = ""  # figures: the title the report gives it
    caption: str = ""  # figures: what it shows (image data)
    caption_points: str = ""  # figures: what it shows for point data (default: caption)
    grid: bool = False  # figures: an image grid (scaled by whole pixels, never smoothed)

    @property
    def cached(self) -> bool:
        return self.kind == "data"


# run conditions, not results (feature_cache_hits: images answered by dkgm.feature_cache, which depends on what ran before)
TIMING_KEYS = frozenset({"device", "precision", "resumed_from_kimg", "world_size", "feature_cache_hits"})


def timings_path(metrics_path: str) -> str:
    """The timings file beside a metrics file: reports/<stage>/metrics.json -> reports/<stage>/timings.json."""
    p = PurePosixPath(metrics_path)
    return str(p.with_name(p.name.replace("metrics", "timings") if "metrics" in p.name else f"{p.stem}.timings.json"))


def is_timing(key: str) -> bool:
    """Keys that vary between identical runs or only say where a run ran: seconds, throughputs,
    peak memory (MiB), resume counters, the device and precision. Everything else a stage reports is a result."""
    return key.endswith(("seconds", "per_second", "_mib")) or key in TIMING_KEYS


# ----------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """A pipeline stage as DVC, the CLI, Prefect and the report see it."""

    name: str  # the dvc.yaml stage name
    doc: str  # one line: what it does (dvc.yaml comment, `python -m pipeline stages`)
    section: str  # the params.yaml section it owns and reads (dotted for gates: gates.kde; "" for none)
    params: type[Section] | None
    deps: tuple[str, ...]  # artifacts it reads (paths relative to the project root)
    outs: tuple[Out, ...]
    run: Callable[..., Any]  # run(cfg, root) -> metrics (a gate's run returns its result)
    summary: tuple[tuple[str, str], ...] = ()  # (metrics key, label): the report's key numbers of the stage
    require_deps: bool = True  # False: runs with inputs missing and says what did not run (the report)
    cmd: str = ""  # default: python -m pipeline run <name>
    data_files: tuple[str, ...] = ()  # non-Python project files the stage's code reads (templates): code deps too
    gate: str | None = None  # for gate stages: the gate's name (python -m pipeline gate <gate>)
    all_params: bool = False  # depends on every key of params.yaml (the report, which shows them all)
    # keys of other sections it reads as well, named one by one (a shared setting, such as the network both
    # training stages use): run(cfg, root, shared) then gets {key: value} for exactly these keys
    reads: tuple[str, ...] = ()
    code_module: str = ""  # the module whose import closure is the stage's code (default: run's module)
    # runs on every torchrun process, sharing the work (rank 0 alone writes the outputs and talks to
    # Prefect); a stage without it runs on rank 0 only, the other ranks exit at once
    distributed: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # stage-specific facts for the report

    def __post_init__(self) -> None:
        # every metrics file has its timings file beside it (write_metrics splits one dict into both)
        have = {o.path for o in self.outs}
        extra = tuple(Out(timings_path(o.path), "timings") for o in self.outs
                      if o.kind == "metrics" and timings_path(o.path) not in have)
        if extra:
            object.__setattr__(self, "outs", (*self.outs, *extra))

    @property
    def command(self) -> str:
        return self.cmd or f"python -m pipeline run {self.name}"

    @property
    def module(self) -> str:
        """The module that holds the stage's code (its import closure is the stage's code dependency)."""
        return self.code_module or self.run.__module__

    def outs_of(self, *kinds: str) -> list[Out]:
        return [o for o in self.outs if o.kind in kinds]

    @property
    def metrics(self) -> str | None:
        found = self.outs_of("metrics")
        return found[0].path if found else None

    @property
    def out_paths(self) -> tuple[str, ...]:
        return tuple(o.path for o in self.outs)
