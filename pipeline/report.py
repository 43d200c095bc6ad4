"""The report: the review document, everything the stages wrote on one page (a pipeline-level stage).

It is the one piece that knows every stage, so it lives with the orchestration: the registry hands
it the stages (metrics files, gate records, figures with titles and captions, key numbers and data
artifacts, all declared in the stage modules). `build` turns them into a document model (a list of
blocks); the Jinja2 templates in pipeline/templates/ render that one model as reports/report.md
(GitHub markdown, images linked relative to reports/) and reports/report.html (self-contained:
images as data URIs, inline CSS, no script, no external address), so both always say the same.

Every input is optional except params.yaml: a stage that did not run is "not run" in every table, a
missing figure "not produced (stage X did not run)". Besides the stages' outputs and
data/prepared/meta.json (DVC deps) it reads, as documented exceptions, dvc.lock (written after the
stage by DVC) and `git rev-parse HEAD` / `git status`. The output is deterministic except for the
date (SOURCE_DATE_EPOCH pins it) and the git fields.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import io
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, Field

from dkgm.errors import DKGMError
from dkgm.kinds import IMAGES, KINDS, DataKind
from pipeline import experiments
from pipeline.recipe import recipe_differences, training_recipe
from stages.artifacts import PREPARED
from stages.common import read_json, read_parquet, staged_outputs
from stages.contract import Out, Section, Stage
from stages.gates import GO, NO_GO, OVERRIDDEN, gate_record

REPORT_MD, REPORT_HTML = "reports/report.md", "reports/report.html"
TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE_FILES = tuple(f"pipeline/templates/report.{ext}" for ext in ("md.j2", "html.j2", "css"))
NOT_RUN, ABSENT = "not run", "—"  # ABSENT: a value the metrics file does not have (or that does not apply)
PACKAGES = ("torch", "numpy", "dvc", "prefect", "clean-fid")
SETS = (("kde", "KDE (stage 1)"), ("refined", "refined (stage 2)"), ("real", "real held-out (floor)"))
EVALUATE, EVALUATE_BASELINE, COMPARISON = "evaluate", "evaluate_baseline", "comparison"
VERDICT_FIGURE = "nearest"  # evaluate's figure shown beside the verdict: the one whose file name starts so
CONTROL_MARGIN = 0.05  # without sampling spreads, the cost row names a winner only beyond this relative gap
SEED_SPREAD = "benchmarks/results/seed_spread.json"  # seed_spread.py table; not a DVC dep: `dvc repro -f -s report`


class ReportParams(Section):
    title: str = Field("DKGM proof-of-concept review",
                       description="heading of reports/report.md and reports/report.html")
    nn_pairs: int = Field(8, ge=0, description="nearest-neighbour pairs listed in the report (0: none)")
    first_look: bool = Field(
        False,
        description="a smoke-scale run (preset first_look): the verdict says its numbers are not a review",
    )


def fmt(value: Any, digits: int = 4) -> str:
    """A metric as every table shows it: `digits` significant digits, null as n/a (experiments.fmt)."""
    return experiments.fmt(value, digits, null="n/a", width=None)


def param_str(value: Any) -> str:
    """A params.yaml value as YAML would spell it (exact: no rounding)."""
    return experiments.fmt(value, None, width=None)


def _code(name: str) -> str:
    return f"`{name}`"


# ----------------------------------------------------------------------------- document model (the templates' input)


@dataclass(frozen=True)
class Cell:
    """A table cell; `kind` styles it in HTML (go, nogo, override, notrun, pass, fail) and bolds it in markdown."""

    text: str
    kind: str = ""


CellLike = Union[Cell, str]  # noqa: UP007 - a runtime alias
NOT_RUN_CELL = Cell(NOT_RUN, "notrun")


@dataclass
class Heading:
    level: int
    text: str
    anchor: str = ""


@dataclass
class Para:
    text: str  # `backticks` become code in both renderings
    kind: str = ""  # "note": smaller and muted in HTML


@dataclass
class Table:
    header: list[str]
    rows: list[list[CellLike]]


@dataclass
class Cards:  # small titled tables: one after another in markdown, side by side in HTML
    items: list[tuple[str, Table]]


@dataclass
class Figure:
    number: int
    title: str
    caption: str
    rel: str  # path relative to the project root
    stage: str  # the stage that writes it
    png: bytes | None = None  # None: not produced
    size: tuple[int, int] = (0, 0)
    pixels: bool = False  # an image grid: scaled by an integer factor without smoothing


@dataclass
class Figures:
    items: list[Figure]


@dataclass
class Badges:
    items: list[tuple[str, Cell]]  # (label, decision)


@dataclass
class Side:  # a table with a figure beside it in HTML (one after the other in markdown)
    table: Table
    figure: Figure | None


@dataclass
class Bullets:
    items: list[str]
    kind: str = ""  # "warning": boxed in HTML


@dataclass
class Collapsed:  # a collapsed part (<details> in HTML and GitHub markdown)
    summary: str
    body: Cards


Block = Union[Heading, Para, Table, Cards, Figures, Badges, Side, Bullets, Collapsed]  # noqa: UP007


@dataclass
class Document:
    title: str
    subtitle: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        self.blocks.extend(blocks)


def decision_cell(decision: str | None) -> Cell:
    return Cell(decision or NOT_RUN, {GO: "go", NO_GO: "nogo", OVERRIDDEN: "override"}.get(decision or "", "notrun"))


# ----------------------------------------------------------------------------- inputs


class Inputs:
    """Everything the report reads, each file once; a missing file is None."""

    def __init__(self, root: Path, stages: list[Stage], params: BaseModel):
        self.root, self.params = root, params
        self.stages = {s.name: s for s in stages}
        self.metrics: dict[str, dict[str, Any] | None] = {}
        for s in stages:
            if not s.gate and s.metrics is not None:
                m = self._json(s.metrics, f"{s.name} metrics")
                for o in s.outs_of("timings"):  # shown beside the results (the time section, key numbers)
                    t = self._json(o.path, f"{s.name} timings") if m is not None else None
                    m = {**m, **t} if m is not None and t else m
                self.metrics[s.name] = m
        self.gate_names = [s.gate for s in stages if s.gate]
        self.gates = {g: self._gate(g) for g in self.gate_names}
        self.prepared_meta = self._json(f"{PREPARED}/meta.json", "prepared dataset metadata")
        self.comparison = self._comparison_table()  # read once: the verdict and its own section use it
        self.eval = self.metrics.get(EVALUATE)
        self.kind = next((KINDS[s["kind"]] for s in (self.eval, self.prepared_meta) if s and s.get("kind") in KINDS),
                         IMAGES)

    def table(self, stage: str) -> str | None:
        """The (first) table a stage writes, e.g. evaluate's per-sample parquet."""
        found = self.stages[stage].outs_of("table") if stage in self.stages else []
        return found[0].path if found else None

    def _comparison_table(self):
        """The comparison stage's table (a DataFrame with every COMPARISON_COLUMNS column), None when it did not run."""
        rel = self.table(COMPARISON)
        if rel is None or not (self.root / rel).is_file():
            return None
        import pandas as pd

        try:
            df = pd.read_csv(self.root / rel)
        except (OSError, ValueError) as exc:
            raise DKGMError(f"{rel} is not a readable table ({exc}): re-run comparison") from None
        missing = [c for c in ("row", *(c for c, _ in COMPARISON_COLUMNS)) if c not in df.columns]
        if missing:
            raise DKGMError(f"{rel} lacks columns {', '.join(missing)}: re-run comparison")
        return df

    def _json(self, rel: str, what: str) -> dict[str, Any] | None:
        path = self.root / rel
        if not path.exists():
            return None
        data = read_json(path, what)
        if not isinstance(data, dict):
            raise DKGMError(f"{what} is not a JSON object: {path} (re-run the stage that writes it)")
        return data

    def _gate(self, name: str) -> dict[str, Any] | None:
        rec = self._json(gate_record(name), f"gate {name} record")
        keys = {"metric", "value", "op", "threshold", "params_key"}
        if rec is not None and (not isinstance(rec.get("decision"), str) or not isinstance(rec.get("checks"), list)
                                or not all(isinstance(c, dict) and keys <= set(c) for c in rec["checks"])):
            raise DKGMError(f"{gate_record(name)} is not a gate record (needs decision and checks with metric, "
                            f"value, op, threshold, params_key): re-run `python -m pipeline gate {name}`")
        return rec


def read_figures(root: Path, stages: list[Stage], kind: DataKind) -> list[Figure]:
    """Every figure a stage declares, in stage order, numbered; a file that is there must be a PNG."""
    from PIL import Image

    figures = []
    for number, (stage, o) in enumerate(((s.name, o) for s in stages for o in s.outs_of("figure")), start=1):
        caption = o.caption if kind.pixels else (o.caption_points or o.caption)
        fig = Figure(number, o.title or o.path, caption, o.path, stage)
        if (root / o.path).is_file():
            fig.png = (root / o.path).read_bytes()
            try:
                with Image.open(io.BytesIO(fig.png)) as im:
                    fig.size, mode, png = im.size, im.mode, im.format == "PNG"
            except OSError:
                png = False
            if not png:
                raise DKGMError(f"{o.path} is not a PNG image: re-run {stage} (or `dvc repro`)")
            fig.pixels = o.grid and "A" not in mode  # image grids are written without alpha, plots with it
        figures.append(fig)
    return figures


# ----------------------------------------------------------------------------- where and when


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state(root: Path) -> dict[str, str]:
    """Revision and cleanliness of the git work tree holding root, as text for the report."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            if git("rev-parse", "--is-inside-work-tree").returncode != 0:
                return {"revision": "none: the project root is not in a git repository", "tree": "not a git repository"}
            return {"revision": "none: the repository has no commit yet", "tree": "no commit"}
        status = git("status", "--porcelain", "--untracked-files=no")
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        why = "git is not installed" if isinstance(exc, FileNotFoundError) else "git timed out"
        return {"revision": f"unknown ({why})", "tree": "unknown"}
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status.stdout.splitlines() if line.strip()]
    tree = "unknown (git status failed)" if status.returncode else describe_changes(changed) if changed else "clean"
    return {"revision": head.stdout.strip(), "tree": tree}


def describe_changes(changed: list[str], shown: int = 6) -> str:
    """The work tree's changed tracked files in words: the sources by name (they make this report
    differ from the revision above), the run's own outputs by count (a report rendered inside
    `dvc repro` always sees dvc.lock and reports/ rewritten)."""
    sources = [p for p in changed if p != "dvc.lock" and not p.startswith("reports/")]
    outputs, parts = len(changed) - len(sources), []
    if sources:
        more = f" and {len(sources) - shown} more" if len(sources) > shown else ""
        parts.append(f"dirty: {len(sources)} source file{'s' if len(sources) != 1 else ''} changed ("
                     + ", ".join(f"`{p}`" for p in sources[:shown]) + f"{more})")
    if outputs:
        parts.append(f"{outputs} output{'s' if outputs != 1 else ''} of this run, not yet committed "
                     "(dvc.lock, reports/)")
    return "; ".join(parts)


def _is_sha(rev: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", rev) is not None


def report_date() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch and epoch.isdigit() else datetime.now(timezone.utc)
    return when.strftime("%Y-%m-%d %H:%M UTC")


# ----------------------------------------------------------------------------- the verdict


def decide(inp: Inputs) -> tuple[Cell, list[str]]:
    """The review's decision and why, in words: an enforced NO-GO wins, then an overridden one (a
    warning, never a pass), then gates that did not run; GO only when every gate ran and passed."""
    recs = inp.gates
    stopped, overridden = ([g for g, r in recs.items() if r and r["decision"] == d] for d in (NO_GO, OVERRIDDEN))
    missing = [g for g, r in recs.items() if r is None]

    def reasons(gates: list[str]) -> list[str]:
        return [f"gate {g}: {c.get('failure') or c['metric'] + ' is out of bounds'} (`{c['metric']}` = "
                f"{fmt(c['value'])}, needs {c['op']} {fmt(c['threshold'])}; `{c['params_key']}`)"
                for g in gates for c in recs[g]["checks"] if not c.get("passed")]  # type: ignore[index]

    if stopped:
        return Cell(NO_GO, "nogo"), [f"Gate {stopped[0]} stopped the pipeline: the stages after it did not run (fix "
                                     f"what it names, or set `gates.{stopped[0]}.enforce: false` to look past it).",
                                     *reasons(stopped)]
    if overridden:
        s = len(overridden) > 1
        return Cell(OVERRIDDEN, "override"), [f"Warning: gate{'s' * s} {', '.join(overridden)} failed and "
                                              f"{'were' if s else 'was'} overridden (`enforce: false`): the pipeline "
                                              "went on, but this is not a pass.", *reasons(overridden)]
    if missing:
        return Cell("INCOMPLETE", "notrun"), [f"Gate{'s' * (len(missing) > 1)} {', '.join(missing)} did not run: "
                                              "no decision until every gate has (`dvc repro`)."]
    n = sum(len(r["checks"]) for r in recs.values() if r)
    return Cell(GO, "go"), [f"Every gate ran and passed ({len(recs)} gates, {n} checks)."]


def control_margin(mine: float, se_mine: float | None, se_control: float | None) -> tuple[float, str]:
    """The FID gap the cost row needs before it names a winner, and how to say it: twice the two rows'
    combined bootstrap spread (which n samples were drawn) when the comparison measured it, else
    CONTROL_MARGIN of DKGM's FID. Neither includes the spread over training seeds."""
    if se_mine is not None and se_control is not None:
        two_se = 2.0 * math.hypot(se_mine, se_control)
        return two_se, f"twice the rows' sampling spread ({fmt(two_se)}; training-seed spread not included)"
    return CONTROL_MARGIN * mine, f"{CONTROL_MARGIN:.0%} of each other"


def _equal_cost(inp: Inputs) -> tuple[CellLike, str]:
    """DKGM at its operating point's NFE against the baseline row nearest in NFE (comparison table),
    then the control (the baseline's network from DKGM's start) and the spread over training seeds."""
    df = inp.comparison
    if df is None:
        return NOT_RUN_CELL, "stage comparison did not run"
    nfe = (inp.metrics.get("refine") or {}).get("nfe")
    dkgm, base = (df[df["row"].astype(str).str.startswith(p)].dropna(subset=["nfe", "fid"])
                  for p in ("dkgm_", "baseline_"))
    if dkgm.empty or base.empty:
        return Cell("skipped" if not dkgm.empty else NOT_RUN, "notrun"), "no baseline rows (baseline.enabled?)"
    at = dkgm[dkgm["nfe"] == nfe] if nfe is not None else dkgm.iloc[:0]
    d = (at if not at.empty else dkgm).iloc[0]
    b = base.iloc[(base["nfe"] - d["nfe"]).abs().argsort().iloc[0]]
    best = base.loc[base["fid"].idxmin()]
    cm = inp.metrics.get(COMPARISON) or {}
    n = fmt(cm.get("n_samples", ABSENT))
    text = (f"FID {fmt(float(d['fid']))} at {int(d['nfe'])} NFE against the baseline's {fmt(float(b['fid']))} at "
            f"{int(b['nfe'])} NFE")
    note = (f"n = {n} per row, same seeds; the baseline's best: FID {fmt(float(best['fid']))} at {int(best['nfe'])} "
            f"NFE; held-out floor at this n {fmt(cm.get('floor_fid', ABSENT))}")
    control, mine = cm.get("control_baseline_net_kde_start_fid"), cm.get("dkgm_refine_fid")
    if control is not None and mine is not None:
        nfe = fmt(cm.get("dkgm_refine_nfe"))
        margin, within = control_margin(mine, cm.get("dkgm_refine_fid_se"),
                                        cm.get("control_baseline_net_kde_start_fid_se"))
        if mine - control > margin:
            note += (f". **The baseline's network started from DKGM's own KDE samples with refine's sampler beats "
                     f"DKGM's network**: FID {fmt(control)} against {fmt(mine)} at {nfe} NFE, n = {n}, a gap beyond "
                     f"{within}: DKGM's training recipe, not its start, limits its quality")
        elif control - mine > margin:
            note += (f". Control: the baseline's network from the same KDE start with the same sampler scores FID "
                     f"{fmt(control)} against DKGM's {fmt(mine)} at {nfe} NFE (n = {n}), a gap beyond {within}: DKGM's "
                     "own network is the better one there")
        else:
            note += (f". Control: from the same KDE start with the same sampler, the baseline's network scores FID "
                     f"{fmt(control)} against DKGM's {fmt(mine)} at {nfe} NFE (n = {n}): within {within}, no winner "
                     "at this n")
    return text, note + seed_spread_note(inp.root, inp.params)


def seed_spread_note(root: Path, params: BaseModel) -> str:
    """The cost row's reading of the spread over training seeds: per row the range of FID over the
    seeds and whether the sign of DKGM - baseline (and DKGM - control) holds on every seed; said to
    be another recipe's when the table was measured under other training settings."""
    path = root / SEED_SPREAD
    if not path.is_file():
        return (". Training-seed spread: not measured for this project (`python benchmarks/seed_spread.py`): a gap "
                "from one seed is not a decision")
    spread = read_json(path, "seed-spread table")
    differs = recipe_differences(spread.get("recipe") or {}, training_recipe(params))
    if differs:
        return (f". Training-seed spread: {SEED_SPREAD} was measured under another recipe (differs in "
                f"{', '.join(differs[:4])}{', ...' if len(differs) > 4 else ''}): it does not describe this run")
    rows, order = spread.get("rows") or {}, ("dkgm", "control", "baseline")  # the JSON's keys are sorted: DKGM first
    parts = [f"{k} {fmt(rows[k]['min'], 3)} to {fmt(rows[k]['max'], 3)}"
             for k in sorted(rows, key=lambda k: order.index(k) if k in order else len(order))]
    gaps = [f"DKGM - {other} from {fmt(g['min'], 3)} to {fmt(g['max'], 3)} ("
            + ("the same sign on every seed" if g["same_sign"] else "the sign changes: no winner") + ")"
            for other in ("baseline", "control") if (g := spread.get(f"dkgm_minus_{other}"))]
    return (f". Training-seed spread over {len(spread.get('seeds') or [])} seeds at n = {fmt(spread.get('n'))} "
            f"(benchmarks/results/seed_spread.md): FID {'; '.join(parts)}; {'; '.join(gaps)}")


def _verdict_section(doc: Document, inp: Inputs, figures: list[Figure], params: BaseModel) -> Figure | None:
    """The first section: the decision, why, the three numbers that decide it and the
    nearest-neighbour figure beside them (returned: the figures section then leaves it out)."""
    decision, why = decide(inp)
    if params.report.first_look:  # type: ignore[attr-defined]  # smoke scale: say what ran, and that it is no review
        counts, scored = (inp.prepared_meta or {}).get("counts") or {}, (inp.eval or {}).get("n_samples")
        why = [f"First look at smoke scale (preset first_look: {sum(counts.values()) or '?'} items, "
               f"{fmt(params.debiaser.total_kimg)} kimg per network, "  # type: ignore[attr-defined]
               f"n = {fmt(scored)} samples scored, "
               "no gate enforced): it shows what the pipeline does and that every stage runs; its numbers are a smoke "
               "test, not a review. Run `make repro` for the review.", *why]
    doc.add(Heading(2, "Verdict", "verdict"), Badges([("decision", decision)]),
            Bullets(why, "warning" if decision.kind in ("nogo", "override") else ""))
    m, refine = inp.eval or {}, inp.metrics.get("refine") or {}
    point = (f" (bandwidth scale s = {fmt(refine.get('bandwidth_scale'))}, η = {fmt(refine.get('eta'))}, "
             f"{fmt(refine.get('nfe'))} NFE)") if refine else ""
    if inp.kind.pixels:
        ratio = f" ({fmt(m['refined_fid_ratio'], 3)} × the floor)" if m.get("refined_fid_ratio") is not None else ""
        rows: list[list[CellLike]] = [[
            "quality: FID of the refined samples" + point,
            f"{fmt(m['refined_fid'])}{ratio}" if "refined_fid" in m else NOT_RUN_CELL,
            f"held-out floor {fmt(m.get('real_fid'))} at the same n = {fmt(m.get('n_samples'))}; KDE (stage 1) "
            f"{fmt(m.get('kde_fid'))}; precision / recall {fmt(m.get('refined_precision'))} / "
            f"{fmt(m.get('refined_recall'))} (held-out {fmt(m.get('real_precision'))} / {fmt(m.get('real_recall'))})"
            if m else ABSENT]]
    else:
        key = "refined_mean_distance_to_manifold"
        rows = [["quality: distance to the manifold" + point, fmt(m[key]) if key in m else NOT_RUN_CELL,
                 f"KDE (stage 1) {fmt(m.get('kde_mean_distance_to_manifold'))}" if m else ABSENT]]
    novelty = "novelty: data-copying test against held-out data"
    if "refined_zu_pixel" in m:
        zu = f"Z_U {fmt(m['refined_zu_pixel'], 3)} (pixel)"
        held = f"a second held-out set: {fmt(m.get('real_zu_pixel'), 3)} (pixel)"
        if "refined_zu_inception" in m:
            zu += f", {fmt(m['refined_zu_inception'], 3)} (Inception)"
            held += f", {fmt(m.get('real_zu_inception'), 3)} (Inception)"
        rows.append([novelty, f"{zu}; copies {fmt(m.get('refined_copy_fraction'))}",
                     f"{held}; copies {fmt(m.get('real_copy_fraction'))}. Z_U ≪ 0 copies the training data, ≈ 0 "
                     "reads as fresh data, ≫ 0 lies farther from it than fresh data does (underfit)"])
    else:
        rows.append([novelty, NOT_RUN_CELL, ABSENT])
    rows.append(["the diffusion baseline at equal cost", *_equal_cost(inp)])
    nearest = next((f for f in figures if f.stage == EVALUATE and Path(f.rel).name.startswith(VERDICT_FIGURE)), None)
    doc.add(Side(Table(["question", "DKGM", "against"], rows), nearest))
    return nearest


# ----------------------------------------------------------------------------- the other sections


def _gate_sections(doc: Document, inp: Inputs, params: BaseModel) -> None:
    doc.add(Heading(2, "Gates", "gates"),
            Badges([(f"gate {g}", decision_cell((inp.gates[g] or {}).get("decision"))) for g in inp.gate_names]),
            Para("Each gate reads one stage's metrics and the thresholds in `params.yaml` (`gates.<name>`); an "
                 "enforced NO-GO stops `dvc repro`, `enforce: false` records NO-GO (overridden) and continues."))
    overview, checks = [], []
    for name in inp.gate_names:
        rec = inp.gates[name]
        if rec is None:
            overview.append([_code(name), decision_cell(None), NOT_RUN, f"{_code(gate_record(name))} not found"])
            checks.append([_code(name), NOT_RUN_CELL, ABSENT, ABSENT, ABSENT, ABSENT, NOT_RUN_CELL])
            continue
        passed = sum(bool(c.get("passed")) for c in rec["checks"])
        overview.append([_code(name), decision_cell(rec["decision"]), f"{passed} of {len(rec['checks'])} passed",
                         _code(str(rec.get("input", ABSENT)))])
        for c in rec["checks"]:
            threshold, recorded = fmt(c["threshold"], 6), c.get("params_value", c["threshold"])  # the value it ran with
            current = _current_param(params, c["params_key"])
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (current, recorded)) \
                    and float(current) != float(recorded):
                threshold += f" (params.yaml now {fmt(current, 6)}: re-run the gate)"
            checks.append([_code(name), _code(c["metric"]), fmt(c["value"], 6), c["op"], threshold,
                           _code(c["params_key"]), Cell("pass", "pass") if c.get("passed") else Cell("FAIL", "fail")])
    doc.add(Table(["gate", "decision", "checks", "input"], overview), Heading(3, "Checks"),
            Table(["gate", "metric", "value", "operator", "threshold", "params key", "result"], checks))


def _current_param(params: BaseModel, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = getattr(node, part, None)
    return node


IMAGE_ROWS = [  # (label, key suffix, what it is)
    ("FID", "fid", "Fréchet Inception distance to the reference training features (lower is better)"),
    ("KID", "kid", "kernel Inception distance, unbiased (lower is better)"),
    ("IS", "inception_score", "Inception Score (needs the full network's classifier)"),
    ("precision", "precision", "fraction of samples inside the real k-NN manifold (Inception space)"),
    ("recall", "recall", "fraction of real items inside the samples' k-NN manifold"),
    ("Z_U (pixel)", "zu_pixel", "data copying: Mann–Whitney z of nearest-training distances against held-out "
     "images (≪ 0 copies, ≈ 0 like fresh data; real: a second held-out set)"),
    ("Z_U (Inception)", "zu_inception", "the same in Inception space, against the reference training features"),
    ("C_T (pixel)", "ct_pixel", "Z_U per k-means cell of the training data, weighted by the held-out mass"),
    ("C_T (Inception)", "ct_inception", "the same in Inception space"),
    ("authenticity (pixel)", "authenticity_pixel", "fraction farther from their nearest training image than "
     "it is from its own nearest neighbour"),
    ("authenticity (Inception)", "authenticity_inception", "the same in Inception space"),
    ("copy fraction (pixel)", "copy_fraction", "d1/d2 < copy_ratio against every training image"),
    ("copy fraction (Inception)", "copy_fraction_inception", "d1/d2 < copy_ratio in Inception space"),
    ("nearest is own anchor", "anchor_fraction", "descriptive: ≈ 1 even for raw KDE samples in high dimension"),
    ("anchor distance", "anchor_distance", "median RMS distance per pixel to the own anchor"),
    ("nearest-training distance", "nn_distance", "median RMS distance per pixel to the nearest training item"),
    ("sharpness", "sharpness", "Laplacian energy relative to real held-out images (1 = as sharp)"),
]
POINT_ROWS = [
    ("distance to manifold", "mean_distance_to_manifold", "mean distance to the true spiral (lower is better)"),
    ("MMD", "mmd", "maximum mean discrepancy to held-out points, Gaussian kernel"),
    ("sliced Wasserstein", "sliced_wasserstein", "sliced Wasserstein distance to held-out points"),
    ("Z_U", "zu_pixel", "data copying: Mann–Whitney z of nearest-training distances against held-out points"),
    ("C_T", "ct_pixel", "Z_U per k-means cell of the training data, weighted by the held-out mass"),
    ("authenticity", "authenticity_pixel", "fraction farther from their nearest training point than it is from "
     "its own nearest neighbour"),
    ("copy fraction", "copy_fraction", "d1/d2 < copy_ratio against every training point"),
    ("nearest is own anchor", "anchor_fraction", "descriptive: fraction whose nearest training item is its anchor"),
    ("anchor distance", "anchor_distance", "median RMS distance per coordinate to the own anchor"),
    ("nearest-training distance", "nn_distance", "median RMS distance per coordinate to the nearest training item"),
]
DERIVED = [("primary metric", "primary_metric", "what the debiasing gain is measured on"),
           ("debias gain", "debias_gain", "1 − refined / KDE of the primary metric (> 0: stage 2 helped)"),
           ("FID gain", "fid_gain", "KDE FID − refined FID"), ("KID gain", "kid_gain", "KDE KID − refined KID"),
           ("anchor distance ratio", "anchor_distance_ratio",
            "refined anchor distance / real nearest-training distance"),
           ("feature network", "feature_network", ""), ("NFE", "nfe", "network evaluations per refined sample")]


def metric_rows(kind: DataKind) -> list[tuple[str, str, str]]:
    return IMAGE_ROWS if kind.pixels else POINT_ROWS


def _metrics_section(doc: Document, inp: Inputs) -> None:
    m, b = inp.eval, inp.metrics.get(EVALUATE_BASELINE)
    header = ["metric", *(label for _, label in SETS), "baseline", "meaning"]
    doc.add(Heading(2, "Sample quality", "metrics"))
    if m is None:
        rel = inp.stages[EVALUATE].metrics if EVALUATE in inp.stages else "reports/eval/metrics.json"
        doc.add(Para(f"Stage `evaluate` did not run (`{rel}` not found): every value is not run."),
                Table(header, [[label, *[NOT_RUN_CELL] * 4, what]
                               for label, _, what in [("samples evaluated", "", ""), *metric_rows(inp.kind)]]))
        return
    skipped = bool(b and b.get("skipped"))
    absent: CellLike = Cell("skipped" if skipped else NOT_RUN, "notrun")
    doc.add(Para(f"Scored by stage `evaluate` on the first {fmt(m.get('n_samples', ABSENT))} samples of each stage "
                 "(sample s of both stages has the same seed), against the reference features; the real column is "
                 "held-out data scored the same way, the floor at this sample size; the baseline column is the "
                 "diffusion baseline scored by the same code (stage `evaluate_baseline`"
                 + (", skipped: `baseline.enabled` is false)." if skipped else ").")))
    n = fmt(m.get("n_samples", ABSENT))
    rows: list[list[CellLike]] = [["samples evaluated", n, n, fmt(m.get("n_real", ABSENT)),
                                   fmt(b["n_samples"]) if b and "n_samples" in b else absent, "items per column"]]
    for label, suffix, what in metric_rows(inp.kind):
        base = absent if not b or skipped else fmt(b.get(f"baseline_{suffix}", ABSENT))
        rows.append([label, *(fmt(m.get(f"{name}_{suffix}", ABSENT)) for name, _ in SETS), base, what])
    doc.add(Table(header, rows))
    if inp.kind.pixels and "real_laplacian_energy" in m:
        doc.add(Para(f"Sharpness is relative to the real held-out images' Laplacian energy "
                     f"({fmt(m['real_laplacian_energy'])}).", "note"))
    if m.get("inception_score_note"):
        doc.add(Para(f"IS: {m['inception_score_note']}.", "note"))
    if "copy_ratio" in m:
        doc.add(Para(f"copy_ratio = {fmt(m['copy_ratio'])}; — marks a value that does not apply to that column.",
                     "note"))
    doc.add(Heading(3, "Derived"),
            Table(["quantity", "value", "meaning"], [[label, fmt(m[k]), what] for label, k, what in DERIVED if k in m]))


COMPARISON_COLUMNS = [("method", "method"), ("start", "start"), ("solver", "solver"), ("steps", "K"), ("nfe", "NFE"),
                      ("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
                      ("zu_pixel", "Z_U (pixel)"), ("copy_fraction", "copies"), ("train_kimg", "train kimg"),
                      ("train_seconds", "train s"), ("samples_per_second", "samples/s")]


def _comparison_section(doc: Document, inp: Inputs) -> None:
    doc.add(Heading(2, "DKGM against the diffusion baseline", "baseline"))
    if inp.comparison is None:
        rel = inp.table(COMPARISON) or "reports/comparison/table.csv"
        doc.add(Para(f"Stage `comparison` did not run (`{rel}` not found)."))
        return
    n = fmt((inp.metrics.get(COMPARISON) or {}).get("n_samples", ABSENT))
    doc.add(Para(f"Every row at the same {n} samples and seeds, scored together by the evaluation's code (FID at this "
                 "n is biased upwards: read it against the floor row, or KID). The two controls separate DKGM's two "
                 "differences from diffusion: its start (a KDE sample at σ_0 = h) and its training range (only up to "
                 "a few h)."))

    def cell(c: str, v: Any) -> CellLike:
        if c in ("method", "start", "solver"):
            return str(v)
        if v is None or (isinstance(v, float) and v != v):
            return ABSENT
        return fmt(int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 1e6 else v)

    doc.add(Table([label for _, label in COMPARISON_COLUMNS],
                  [[cell(c, r.get(c)) for c, _ in COMPARISON_COLUMNS] for r in inp.comparison.to_dict("records")]))


def _stage_numbers_section(doc: Document, inp: Inputs) -> None:
    cards = []
    for s in inp.stages.values():
        if s.summary:
            m = inp.metrics.get(s.name)
            if m is None:
                rows: list[list[CellLike]] = [[NOT_RUN_CELL, NOT_RUN_CELL]]
            else:
                rows = [[label, fmt(m[key])] for key, label in s.summary if key in m] or [[ABSENT, ABSENT]]
            cards.append((s.name, Table(["quantity", "value"], rows)))
    doc.add(Heading(2, "Key numbers per stage", "stages"), Cards(cards))


def _time_section(doc: Document, inp: Inputs) -> None:
    rows: list[list[CellLike]] = []
    for stage, m in inp.metrics.items():
        if m is None:
            rows.append([_code(stage), NOT_RUN_CELL, ABSENT, ABSENT, ABSENT])
            continue
        keys = [k for k in ("stage_seconds", "seconds") if k in m]
        keys += sorted(k for k in m if k.endswith("_seconds") and k not in keys)
        t = [k for k in keys if isinstance(m[k], (int, float)) and not isinstance(m[k], bool)]
        device = str(m.get("device", ABSENT))
        if t:
            others = ", ".join(f"{_code(k)} {fmt(float(m[k]), 3)}" for k in t[1:]) or ABSENT
            rows.append([_code(stage), fmt(float(m[t[0]]), 3), _code(t[0]), others, device])
        else:
            rows.append([_code(stage), ABSENT, ABSENT, ABSENT, device])
    doc.add(Heading(2, "Time per stage", "time"),
            Para("Seconds the stage recorded in its metrics file (`seconds`, `stage_seconds` or `*_seconds`: "
                 "the timed part, not the process start-up); — where the stage records none."),
            Table(["stage", "seconds", "field", "other timings", "device"], rows))


def _nn_section(doc: Document, inp: Inputs, cfg: ReportParams) -> None:
    doc.add(Heading(2, "Nearest training items of the refined samples", "nearest"))
    rel = inp.table(EVALUATE) or "reports/eval/per_sample.parquet"
    header = ["sample_id", "nearest training row", "d1", "d2", "d1/d2", "anchor row", "nearest is anchor"]
    if cfg.nn_pairs == 0:
        doc.add(Para("None listed (`report.nn_pairs` is 0)."))
        return
    if not (inp.root / rel).is_file():
        doc.add(Para(f"Not produced (stage evaluate did not run): `{rel}` not found."),
                Table(header, [[NOT_RUN_CELL, *([ABSENT] * 6)]]))
        return
    df = read_parquet(inp.root / rel, "per-sample evaluation")
    need = {"set", "sample_id", "nn_row", "d1", "d2", "anchor_row", "anchor_match"}
    if not need <= set(df.columns):
        raise DKGMError(f"{rel} lacks columns {', '.join(sorted(need - set(df.columns)))}: re-run evaluate")
    refined = df[df["set"] == "refined"].head(cfg.nn_pairs)
    doc.add(Para(f"The first {len(refined)} refined samples (`report.nn_pairs` = {cfg.nn_pairs}) from `{rel}`: "
                 "d1, d2 are the RMS distances per coordinate to the nearest and second-nearest training items."),
            Table(header, [[str(int(r.sample_id)), str(int(r.nn_row)), fmt(float(r.d1)), fmt(float(r.d2)),
                            fmt(r.d1 / r.d2) if r.d2 > 0 else "n/a", str(int(r.anchor_row)),
                            "yes" if bool(r.anchor_match) else "no"] for r in refined.itertuples(index=False)]))


def _dataset_section(doc: Document, inp: Inputs, params: BaseModel) -> None:
    meta, prep = inp.prepared_meta or {}, inp.metrics.get("prepare") or {}
    counts = meta.get("counts") or {k: prep[f"n_{k}"] for k in ("train", "val", "test") if f"n_{k}" in prep}
    rows = [["dataset", _code(meta.get("dataset", params.prepare.dataset))],  # type: ignore[attr-defined]
            ["kind", inp.kind.name],
            ["item shape", fmt(meta["shape"]) if "shape" in meta else ABSENT],
            ["items (train / val / test)", " / ".join(fmt(counts.get(k, ABSENT)) for k in ("train", "val", "test"))
             if counts else NOT_RUN_CELL],
            ["source", _code(meta["source"]) if "source" in meta else ABSENT],
            ["source SHA-256", _code(meta["source_sha256"]) if "source_sha256" in meta else ABSENT],
            ["storage", meta.get("storage", ABSENT)]]
    doc.add(Heading(2, "Dataset", "dataset"), Table(["item", "value"], rows))


def _params_section(doc: Document, root: Path, params: BaseModel) -> None:
    doc.add(Heading(2, "Appendix: parameters", "params"),
            Para("The keys of `params.yaml` whose value differs from the schema default (the stage module's params "
                 "model); every key, after validation, in the collapsed tables below."))
    try:
        raw = experiments.flatten(yaml.safe_load((root / "params.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError) as exc:  # the runner validated it already; this cannot normally fail
        raise DKGMError(f"{root / 'params.yaml'}: cannot read: {exc}".replace("\n", " ")) from None
    defaults = experiments.flatten(type(params)().model_dump(mode="json"))  # the schema's defaults
    changed: list[list[CellLike]] = []
    groups: dict[str, list[list[CellLike]]] = {}
    for key, value in experiments.flatten(params.model_dump(mode="json")).items():
        section, name = key.rsplit(".", 1)
        note = "schema default (not in the file)" if key not in raw else ""
        if key in raw and value != defaults.get(key):
            note = f"default {param_str(defaults.get(key))}"
            changed.append([_code(key), _code(param_str(value)), _code(param_str(defaults.get(key)))])
        groups.setdefault(section, []).append([_code(name), _code(param_str(value)), note])
    doc.add(Table(["key", "value", "default"], changed) if changed else Para("Every key holds its default."),
            Collapsed(f"All {sum(len(r) for r in groups.values())} keys, by section",
                      Cards([(section, Table(["key", "value", "note"], rows)) for section, rows in groups.items()])))


def _environment_section(doc: Document) -> None:
    """Where the report was made; each stage's device is in its timings (the time section), so torch is not imported."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [["python", f"{platform.python_version()} ({platform.python_implementation()})"],
            *([name, package_version(name)] for name in PACKAGES),
            ["CPU count", f"{os.cpu_count()} ({affinity} usable by this process)"], ["CPU", cpu_model()],
            ["platform", platform.platform()]]
    doc.add(Heading(2, "Environment", "environment"),
            Para("Where the report was made (the stages may have run elsewhere: each stage's device is in the time "
                 "table)."), Table(["item", "version / value"], rows))


def _provenance_section(doc: Document, root: Path, git: dict[str, str], data_artifacts: list[str]) -> None:
    rev = _code(git["revision"]) if _is_sha(git["revision"]) else git["revision"]
    doc.add(Heading(2, "Provenance", "provenance"),
            Table(["item", "value"], [["git revision", rev], ["work tree", git["tree"]]]),
            Heading(3, "Data artifacts (dvc.lock)"))
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        doc.add(Para("`dvc.lock` not found: the stages were not run through `dvc repro`, so no artifact hashes "
                     "are recorded."))
        return
    try:
        lock = yaml.safe_load(lock_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DKGMError(f"{lock_path}: not valid YAML: {exc}".replace("\n", " ")) from None
    stages = lock.get("stages") if isinstance(lock, dict) else None
    if not isinstance(stages, dict):
        raise DKGMError(f"{lock_path}: no `stages` mapping (not a DVC lock file?)")

    def entries(role: str) -> list[tuple[str, dict]]:  # (stage, item) for every data artifact it writes or reads
        return [(stage, item) for stage, entry in stages.items() for item in (entry or {}).get(role) or []
                if isinstance(item, dict) and item.get("path") in data_artifacts]

    written = {item["path"]: (stage, item) for stage, item in entries("outs")}
    rows: list[list[CellLike]] = []
    for art in data_artifacts:
        readers = [(s, it) for s, it in entries("deps") if it["path"] == art]
        if art not in written:
            rows.append([_code(art), Cell("not in dvc.lock", "notrun"), ABSENT, ABSENT,
                         "; ".join(f"{s}: {it.get('md5', ABSENT)!s}" for s, it in readers) or ABSENT])
            continue
        stage, item = written[art]
        md5 = item.get("md5", ABSENT)
        size = fmt(item["size"]) if "size" in item else ABSENT
        size += f" ({item['nfiles']} files)" if "nfiles" in item else ""
        read_by = [f"{s}: " + ("same" if it.get("md5") == md5 else f"differs {str(it.get('md5', ABSENT))[:8]}")
                   for s, it in readers]
        rows.append([_code(art), _code(stage), _code(str(md5)), size, "; ".join(read_by) or ABSENT])
    doc.add(Para("md5 of each data artifact as its producing stage recorded it; `read by` says whether each "
                 "consumer ran on the same version (`differs`: that stage is stale)."),
            Table(["artifact", "written by", "md5", "size (bytes)", "read by"], rows))


def build(cfg: ReportParams, root: Path, params: BaseModel, stages: list[Stage] | None = None, date: str | None = None,
          git: dict[str, str] | None = None) -> Document:
    """The document model of the stages (default: every registered stage) under `params` (the whole
    validated params.yaml, which the runner hands an `all_params` stage); `date` and `git` are the
    only fields that vary between identical runs."""
    root = Path(root)
    if stages is None:
        from pipeline import registry

        stages = list(registry.all_stages().values())
    inp = Inputs(root, stages, params)
    figures = read_figures(root, stages, inp.kind)
    git = git if git is not None else git_state(root)
    dataset = (inp.prepared_meta or {}).get("dataset", params.prepare.dataset)  # type: ignore[attr-defined]
    rev = f"git {git['revision'][:12]} ({git['tree']})" if _is_sha(git["revision"]) else f"git: {git['tree']}"
    doc = Document(cfg.title, f"{date or report_date()} · dataset {dataset} ({inp.kind}) · {rev}")
    beside = _verdict_section(doc, inp, figures, params)
    rest = [f for f in figures if f is not beside]
    for number, fig in enumerate([beside, *rest] if beside else rest, start=1):  # numbered in reading order
        fig.number = number
    not_run = [s for s, m in inp.metrics.items() if m is None]
    if not_run:
        doc.add(Para("Stages not run: " + ", ".join(f"`{s}`" for s in not_run) + ".", "note"))
    _gate_sections(doc, inp, params)
    _metrics_section(doc, inp)
    _comparison_section(doc, inp)
    _stage_numbers_section(doc, inp)
    doc.add(Heading(2, "Figures", "figures"), Figures(rest))
    if beside is not None:
        doc.add(Para(f"Figure {beside.number} ({beside.title.lower()}) is shown with the verdict, at the top.", "note"))
    _nn_section(doc, inp, cfg)
    _time_section(doc, inp)
    _dataset_section(doc, inp, params)
    _environment_section(doc)
    _provenance_section(doc, root, git, [o.path for s in stages for o in s.outs_of("data")])
    _params_section(doc, root, params)
    return doc


# ----------------------------------------------------------------------------- rendering (pipeline/templates)

MAX_FIGURE_WIDTH = 1040  # the content width of <main>
MAX_FIGURE_HEIGHT = 900  # taller plots are shown smaller (the file is embedded unchanged)
PIXEL_TARGET = 560  # image grids are scaled by the integer factor that brings them closest to this width
_NUMBER = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def _md_inline(text: str, in_table: bool = False) -> str:
    text = " ".join(str(text).split())
    return text.replace("|", "\\|") if in_table else text


def _md_cell(cell: CellLike) -> str:
    if isinstance(cell, Cell):
        text = _md_inline(cell.text, True)
        return f"**{text}**" if cell.kind in ("go", "nogo", "override", "fail") else text
    return _md_inline(cell, True)


def _report_relative(rel: str) -> str:
    prefix = Path(REPORT_MD).parent.as_posix() + "/"
    return rel[len(prefix):] if rel.startswith(prefix) else os.path.relpath(rel, Path(REPORT_MD).parent)


def _h(text: str) -> str:
    """Escape text for HTML; `code` spans become <code>, and no address can appear as a live URL."""
    parts = html.escape(" ".join(text.split()), quote=True).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)).replace("://", ":&#47;&#47;")


def _html_cell(cell: CellLike) -> str:
    if isinstance(cell, Cell):
        inner = f'<span class="{cell.kind}">{_h(cell.text)}</span>' if cell.kind else _h(cell.text)
        return f"<td>{inner}</td>"
    return f'<td class="num">{_h(cell)}</td>' if _NUMBER.match(cell) else f"<td>{_h(cell)}</td>"


def figure_display_size(fig: Figure) -> tuple[int, int]:
    w, h = fig.size
    if fig.pixels and w > 0:
        scale = max(1, min(4, round(PIXEL_TARGET / w)))
        while scale > 1 and w * scale > MAX_FIGURE_WIDTH:
            scale -= 1
        return w * scale, h * scale
    shrink = min(1.0, MAX_FIGURE_WIDTH / max(w, 1), MAX_FIGURE_HEIGHT / max(h, 1))
    return round(w * shrink), round(h * shrink)


@cache
def _templates():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters.update(md=_md_inline, cell=_md_cell, relative=_report_relative, h=_h, td=_html_cell, attr=html.escape,
                       missing=lambda f: f"not produced (stage {f.stage} did not run): {f.rel} not found",
                       display_size=figure_display_size, base64=lambda f: base64.b64encode(f.png).decode("ascii"))
    env.tests["block"] = lambda b, name: type(b).__name__ == name  # {% if b is block("Table") %}
    return env


def render_md(doc: Document) -> str:
    return _templates().get_template("report.md.j2").render(doc=doc).rstrip() + "\n"


def render_html(doc: Document) -> str:
    css = (TEMPLATES / "report.css").read_text(encoding="utf-8")
    return _templates().get_template("report.html.j2").render(doc=doc, css=css, max_width=MAX_FIGURE_WIDTH)


# ----------------------------------------------------------------------------- stage


def run(cfg: ReportParams, root: Path, params: BaseModel) -> dict[str, Any]:
    root = Path(root)
    doc = build(cfg, root, params)
    with staged_outputs(root, "report") as out:
        out.path(REPORT_MD).write_text(render_md(doc), encoding="utf-8")
        out.path(REPORT_HTML).write_text(render_html(doc), encoding="utf-8")
    figures = next(b for b in doc.blocks if isinstance(b, Figures)).items
    badges = [item for b in doc.blocks if isinstance(b, Badges) for item in b.items]
    return {"decision": next(cell.text for label, cell in badges if label == "decision"),
            "gates": {label.split(" ", 1)[1]: cell.text for label, cell in badges if label.startswith("gate ")},
            "figures_embedded": sum(f.png is not None for f in figures),
            "figures_missing": sum(f.png is None for f in figures)}


def stage(others: list[Stage]) -> Stage:
    """The report as a stage: every small output of the other stages (metrics, figures, gate records,
    tables) and the prepared data's metadata are its inputs; it depends on the whole of params.yaml."""
    shown = [o.path for s in others for o in s.outs
             if o.kind in ("metrics", "timings", "figure", "record")
             or (o.kind == "table" and s.name in (EVALUATE, COMPARISON))]
    return Stage(name="report", doc="the review document: gates, metrics per stage vs the real floor, figures, "
                 "timings, environment, provenance (reports/report.md and a self-contained report.html)",
                 section="report", params=ReportParams, deps=(PREPARED, *shown),
                 outs=(Out(REPORT_MD, "document"), Out(REPORT_HTML, "document")), run=run,
                 require_deps=False,  # `python -m pipeline run report` after a NO-GO shows what did not run
                 data_files=TEMPLATE_FILES, all_params=True)
