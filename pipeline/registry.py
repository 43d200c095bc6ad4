"""The stages: what each runs, which params section it reads, what it reads and writes.

DVC owns the order (dvc.yaml); this table only says how to run one stage. A test checks that
dvc.yaml lists exactly these params keys, inputs and outputs for each stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pipeline import paths


@dataclass(frozen=True)
class StageSpec:
    name: str  # the dvc.yaml stage name
    section: str  # the params.yaml section it reads (and nothing else)
    deps: tuple[str, ...]  # artifacts it reads
    outs: tuple[str, ...]  # artifacts it writes
    module: str | None = None  # stages.<module> with run(cfg, root) -> metrics; None for gates
    gate: str | None = None  # gate name, for gate stages
    require_deps: bool = True  # False: the stage runs with inputs missing and says what did not run (report)

    @property
    def cmd(self) -> str:
        return f"python -m pipeline gate {self.gate}" if self.gate else f"python -m pipeline run {self.name}"

    def load(self) -> ModuleType:
        assert self.module is not None
        return importlib.import_module(self.module)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec(
            "prepare",
            "prepare",
            deps=(),
            outs=(paths.PREPARED, paths.PREPARE_PREVIEW, paths.PREPARE_METRICS),
            module="stages.prepare",
        ),
        StageSpec(
            "fit_kde",
            "kde",
            deps=(paths.PREPARED,),
            outs=(paths.KDE_BANDWIDTH, paths.KDE_TOPK, paths.KDE_CV_CURVE, paths.KDE_CV_PLOT, paths.KDE_METRICS),
            module="stages.fit_kde",
        ),
        StageSpec(
            "gate_kde",
            "gates.kde",
            deps=(paths.KDE_METRICS,),
            outs=(paths.gate_record("kde"), paths.gate_token("kde")),
            gate="kde",
        ),
        StageSpec(
            "sample_kde",
            "sample_kde",
            deps=(paths.PREPARED, paths.KDE_BANDWIDTH, paths.gate_token("kde")),
            outs=(paths.KDE_SAMPLES, paths.SAMPLE_KDE_GRID, paths.SAMPLE_KDE_METRICS),
            module="stages.sample_kde",
        ),
        StageSpec(
            "train_debiaser",
            "debiaser",
            deps=(paths.PREPARED, paths.KDE_BANDWIDTH, paths.gate_token("kde")),
            outs=(paths.DEBIASER_SNAPSHOT, paths.TRAIN_LOG, paths.TRAIN_LOSS_PLOT, paths.TRAIN_DENOISE_PLOT, paths.TRAIN_METRICS),
            module="stages.train_debiaser",
        ),
        StageSpec(
            "gate_debiaser",
            "gates.debiaser",
            deps=(paths.TRAIN_METRICS,),
            outs=(paths.gate_record("debiaser"), paths.gate_token("debiaser")),
            gate="debiaser",
        ),
        StageSpec(
            "refine",
            "refine",
            deps=(paths.PREPARED, paths.KDE_SAMPLES, paths.DEBIASER_SNAPSHOT, paths.gate_token("debiaser")),
            outs=(paths.REFINED, paths.REFINE_GRID, paths.REFINE_TRAJECTORY, paths.REFINE_PROGRESS, paths.REFINE_METRICS),
            module="stages.refine",
        ),
        StageSpec(
            "reference",
            "reference",
            deps=(paths.PREPARED,),
            outs=(paths.REFERENCE, paths.REFERENCE_METRICS),
            module="stages.reference",
        ),
        StageSpec(
            "evaluate",
            "evaluate",
            deps=(paths.PREPARED, paths.REFERENCE, paths.KDE_SAMPLES, paths.REFINED),
            outs=(paths.EVAL_METRICS, paths.EVAL_SAMPLES, paths.EVAL_NEAREST, paths.EVAL_MEMORIZATION),
            module="stages.evaluate",
        ),
        StageSpec(
            "gate_eval",
            "gates.eval",
            deps=(paths.EVAL_METRICS,),
            outs=(paths.gate_record("eval"), paths.gate_token("eval")),
            gate="eval",
        ),
        StageSpec(
            "report",
            "report",
            # everything the report shows, so that DVC re-renders it when any of it changes
            deps=(paths.PREPARED, paths.PREPARE_PREVIEW, paths.PREPARE_METRICS, paths.KDE_CV_PLOT, paths.KDE_METRICS,
                  paths.gate_record("kde"), paths.SAMPLE_KDE_GRID, paths.SAMPLE_KDE_METRICS, paths.TRAIN_LOSS_PLOT,
                  paths.TRAIN_DENOISE_PLOT, paths.TRAIN_METRICS, paths.gate_record("debiaser"), paths.REFINE_GRID,
                  paths.REFINE_TRAJECTORY, paths.REFINE_PROGRESS, paths.REFINE_METRICS, paths.REFERENCE_METRICS,
                  paths.EVAL_METRICS, paths.EVAL_SAMPLES, paths.EVAL_NEAREST, paths.EVAL_MEMORIZATION,
                  paths.gate_record("eval")),
            outs=(paths.REPORT_MD, paths.REPORT_HTML),
            module="stages.report",
            require_deps=False,  # `python -m pipeline run report` after a NO-GO shows what did not run
        ),
    ]
}

RUNNABLE = [name for name, s in STAGES.items() if s.gate is None]
GATE_STAGES = {s.gate: s for s in STAGES.values() if s.gate}
