"""`python -m pipeline compare` and `python -m pipeline ablation`: revisions and DVC experiments as markdown tables.

    python -m pipeline compare                  # HEAD against the workspace; one REV: REV against the workspace
    python -m pipeline compare HEAD~1 HEAD      # two revisions: adds a delta column (right minus left)
    python -m pipeline compare main bw3 bw4     # any commits, branches, tags, `dvc exp run` names (--all: every metric)
    python -m pipeline ablation                 # HEAD's experiments -> reports/ablations.md, reports/ablations/*.png
    python -m pipeline ablation --all-commits   # experiments of every commit
    python -m pipeline ablation --out abl/x.md  # plots then go to abl/x/; `--out -` (both commands): print only

Where the values come from: `Repo.experiments.show`, the call behind `dvc.api.exp_show` and `dvc exp show --json`
(whose flat rows are not used: they drop the file of a key no other file has, and turn booleans, nulls and lists
into text). DVC resolves each revision, so commits, branches, tags and experiment names all work; each carries its
params files and the metrics files under `metrics:` in dvc.yaml. One `Run` (flat params and metrics) per revision.

Names: params `section.key` for params.yaml (`kde.bandwidth_scale`), `FILE:section.key` for another file; metrics
`STAGE.key` for `reports/STAGE/metrics.json` (`kde.h`, `sample_kde.h`), `PATH:key` otherwise; nested keys joined
with dots, lists are values. Cells: 5 significant digits, `true`/`false`, `null`, `—` where there is no value.
Timings are not metrics (each stage writes its own timings.json), so identical runs compare as equal.

compare: the params that differ between the revisions, and the metrics that differ (`--all`: every metric found in
any of them), side by side; a delta column (right minus left) for exactly two. Written to reports/compare.md.

ablation:
  - completed experiments (DVC's state `success`, or run in the workspace) only in the tables; failed, queued and
    running ones are listed at the end, with the params they change;
  - a param is *swept* when its value varies across the completed experiments and differs from the baseline
    commit's in at least one. Gate params (`gates.*`) never define a sweep and are not shown;
  - one table per swept param P: the experiments that differ from their baseline, among the swept params, only in
    P and in params swept jointly with P in some experiment (a grid). One equal to the baseline in every swept
    param (and the baseline commit's own run, when it has metrics) is the reference point in every table. Rows
    sorted by P, then the joint params; columns: the params that vary within the table, then KEY_METRICS. Runs with
    the same values of every varied param (and baseline) are one row `a (= b, c)`, `a` the first in DVC's order
    (newest first) with the most key metrics;
  - plots beside the markdown file (its name without `.md`): FID (KDE, refined, real data) and recall/memorization
    against the bandwidth scale; refined FID against the NFE, one line per schedule; several runs at one x are
    drawn at their mean. A plot whose x never varies is skipped with a line naming the sweep to queue, and its old
    file is removed;
  - no experiments at all: one line saying how to queue a sweep, exit 0, nothing written.

Files are written atomically (dkgm.atomic). Errors (one line, exit status 2 through the CLI): an unknown revision
or experiment (named), not being inside a DVC repository, DVC failing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from dkgm.atomic import write_atomic
from dkgm.errors import DKGMError

COMPARE_OUT, ABLATION_OUT, DOCS = "reports/compare.md", "reports/ablations.md", "docs/ablations.md"
WORKSPACE, MISSING, MAX_CELL = "workspace", "—", 40  # longer text values are shortened in the tables
PARAMS_FILE, METRICS_PREFIX, METRICS_SUFFIX = "params.yaml", "reports/", "/metrics.json"
IGNORED_PREFIXES = ("gates.",)
ABSENT: Any = type("Absent", (), {"__repr__": lambda self: "ABSENT"})()  # no such key (not the same as null)

# (metric, meaning): the ablation table columns, in order
KEY_METRICS: list[tuple[str, str]] = [
    ("eval.refined_fid", "FID of the refined (stage 2) samples"),
    ("eval.kde_fid", "FID of the KDE (stage 1) samples"),
    ("eval.debias_gain", "1 - refined / KDE of the primary distance"),
    ("eval.refined_copy_fraction", "refined samples that copy a training item (d1/d2 < copy_ratio)"),
    ("eval.refined_zu_pixel", "data copying: pixel Z_U of the refined samples (<< 0 copies, about 0 like fresh data)"),
    ("eval.refined_anchor_fraction", "refined samples whose nearest training item is their own KDE anchor"),
    ("eval.refined_recall", "recall (diversity) of the refined samples"),
    ("refine.nfe", "network evaluations per refined sample"),
    ("kde.h", "KDE bandwidth used (per-pixel std)"),
]
BANDWIDTH, STEPS, SCHEDULE, SOLVER = "sample_kde.bandwidth_scale", "refine.steps", "refine.schedule", "refine.solver"
LEGACY_BANDWIDTH = "kde.bandwidth_scale"  # where the scale lived before the operating point moved to sample_kde
NFE, NFE_FALLBACK = "refine.nfe", "eval.nfe"
SWEEP_HINT = {  # the sweep to queue for each plot's x (the full commands, with the gate overrides: docs/ablations.md)
    BANDWIDTH: "the bandwidth sweep: `dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`",
    STEPS: "the steps sweep: `dvc exp run --queue -S 'refine.steps=1,2,5,10,20,40'` "
    "(per schedule: add `-S 'refine.schedule=geometric,karras,robbins_monro'`)",
}
QUEUE_HINT = (f"queue a sweep, e.g. `dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`, "
              f"then `dvc queue start` ({DOCS} has every sweep, with the gate overrides)")


class ExperimentsError(DKGMError):
    """The table cannot be made: a bad revision, no DVC repository, DVC failing."""


# ----------------------------------------------------------------------------- values: flatten, union, canon, fmt


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def union(dicts: list[dict[str, Any]]) -> list[str]:
    """The keys of all `dicts`, in first-seen order."""
    return list(dict.fromkeys(k for d in dicts for k in d))


def canon(v: Any) -> tuple:
    """A value's identity and place in sort order: absent, null, booleans, numbers (1 == 1.0, True is not 1, NaN
    equals NaN and comes last), strings, anything else by its JSON."""
    if v is ABSENT or v is None:
        return (0, v is None, 0)
    if isinstance(v, bool):
        return (1, v, 0)
    if isinstance(v, (int, float)):
        return (2, math.inf, 1) if v != v else (2, v, 0)
    return (3, v, 0) if isinstance(v, str) else (4, json.dumps(v, sort_keys=True, default=str), 0)


def varies(values: list[Any]) -> bool:
    return len({canon(v) for v in values}) > 1


def fmt(v: Any, digits: int | None = 5, null: str = "null", width: int | None = MAX_CELL) -> str:
    """A value as every table shows it (compare, ablation and the report): `—` absent, `null` for None (the
    report says n/a), `true`/`false`, ints whole, floats to `digits` significant digits (None: exact), lists item
    by item, JSON for the rest; text longer than `width` characters is shortened (a long note widens every row)."""
    if v is ABSENT:
        return MISSING
    if v is None or isinstance(v, bool):
        return null if v is None else "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v) if isinstance(v, int) or digits is None else "0" if v == 0 else f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        text = "[" + ", ".join(fmt(x, digits, null, None) for x in v) + "]"
    else:
        text = v if isinstance(v, str) else json.dumps(v)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def fmt_delta(a: Any, b: Any) -> str:
    """b - a for two numbers (signed, 5 significant digits); `—` otherwise."""
    if _number(a) is None or _number(b) is None:
        return MISSING
    d = b - a
    return "0" if d == 0 else f"{d:+d}" if isinstance(d, int) else f"{d:+.5g}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A padded GitHub markdown table (pandas, tabulate): first column left-aligned, the values right-aligned."""
    import pandas as pd

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    frame = pd.DataFrame([[cell(c) for c in r] for r in rows], columns=[cell(h) for h in header], dtype=object)
    return frame.to_markdown(index=False, disable_numparse=True, colalign=["left"] + ["right"] * (len(header) - 1))


# ----------------------------------------------------------------------------- DVC's entries -> runs


def metric_name(path: str, key: str) -> str:
    """`reports/kde/metrics.json`, `h` -> `kde.h`; any other file -> `PATH:key`."""
    path = path.replace(os.sep, "/")
    stage = path[len(METRICS_PREFIX): -len(METRICS_SUFFIX)] if path.endswith(METRICS_SUFFIX) else ""
    return f"{stage}.{key}" if path.startswith(METRICS_PREFIX) and stage else f"{path}:{key}"


def param_name(path: str, key: str) -> str:
    """params.yaml keys stay `section.key`; another params file's get `FILE:` in front."""
    return key if path.replace(os.sep, "/") == PARAMS_FILE else f"{path}:{key}"


@dataclass
class Run:
    """One revision or experiment: flat params and metrics; `reference` is its baseline commit's params."""

    label: str
    rev: str = ""  # full commit sha, or "workspace"
    baseline: str = ""  # the baseline commit: its branch/tag name, else its short sha
    state: str = "success"  # also "failed", "queued", "running"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state == "success"

    def changed(self, keys: list[str] | None = None) -> list[str]:
        """The params (of `keys`, default all but gates.*) whose value differs from the baseline commit's."""
        keys = keys if keys is not None else [k for k in union([self.params, self.reference]) if _shown(k)]
        return [k for k in keys if canon(self.params.get(k, ABSENT)) != canon(self.reference.get(k, ABSENT))]


def run_from_entry(entry: dict[str, Any], label: str, **kw: Any) -> Run:
    """A Run from one entry of `dvc exp show --json` (ExpState.dumpd()); files that failed to load are left out."""
    data = entry.get("data") or {}

    def values(kind: str, name: Callable[[str, str], str]) -> dict[str, Any]:
        files = {p: e["data"] for p, e in (data.get(kind) or {}).items() if isinstance(e, dict)
                 and isinstance(e.get("data"), dict)}
        return {name(p, k): v for p, tree in files.items() for k, v in flatten(tree).items()}

    return Run(label, str(entry.get("rev") or ""), params=values("params", param_name),
               metrics=values("metrics", metric_name), **kw)


def runs_from_states(entries: list[dict[str, Any]]) -> list[Run]:
    """Every experiment under every baseline commit (the workspace is not one), plus the baseline commit's own run
    when it has experiments and metrics. State: DVC's executor's (none: run in the workspace, counted `success`);
    an experiment whose entry carries an error is `failed`."""
    out: list[Run] = []
    for entry in entries:
        if entry.get("rev") == WORKSPACE:
            continue
        baseline = entry.get("name") or str(entry.get("rev") or "")[:7]
        base = run_from_entry(entry, f"{baseline} (baseline)", baseline=baseline)
        if entry.get("experiments") and base.metrics:
            out.append(replace(base, reference=base.params))
        for group in entry.get("experiments") or []:
            executor = group.get("executor") or {}
            for e in group.get("revs") or []:
                state = str(executor.get("state") or "success")
                name = e.get("name") or group.get("name") or str(e.get("rev") or "")[:7]
                out.append(run_from_entry(e, name, baseline=baseline, reference=base.params,
                                          state="failed" if e.get("error") and state == "success" else state))
    return out


def exp_show(command: str, revs: list[str | None], *, workspace: bool = False, all_commits: bool = False,
             queued: bool = False) -> list[list[dict[str, Any]]]:
    """DVC's entries (as `dvc exp show --json` prints them) for each rev (None: HEAD), in one open repository."""
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import RevError

    rev = None
    try:
        with Repo() as repo:
            answers = []
            for rev in revs:
                states = repo.experiments.show(revs=rev, num=1, all_commits=all_commits, hide_workspace=not workspace,
                                               hide_queued=not queued, hide_failed=not queued)
                answers.append([s.dumpd() for s in states])
            return answers
    except NotDvcRepoError as exc:
        raise ExperimentsError(f"{command}: not inside a DVC repository (run it in the project, where `dvc init` "
                               "was run)") from exc
    except RevError as exc:
        raise ExperimentsError(f"{command}: unknown revision or experiment '{rev}' (not a git commit, branch or tag, "
                               "nor a `dvc exp run` name)") from exc
    except DvcException as exc:
        where = f" for '{rev}'" if rev else ""
        raise ExperimentsError(f"{command}: dvc exp show failed{where}: {exc}".replace("\n", " ")) from exc


def _write_text(out: str | Path, text: str) -> Path:
    return write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# ----------------------------------------------------------------------------- compare


def diff_rows(runs: list[Run], kind: str, everything: bool = False) -> list[list[str]]:
    """[name, value per run (+ delta, right minus left, for the metrics of exactly two)] for each param or metric
    (`kind`) whose value is not the same in all runs (every one with `everything`)."""
    rows = []
    for key in union([getattr(r, kind) for r in runs]):
        values = [getattr(r, kind).get(key, ABSENT) for r in runs]
        if everything or varies(values):
            delta = [fmt_delta(*values)] if kind == "metrics" and len(runs) == 2 else []
            rows.append([key, *map(fmt, values), *delta])
    return rows


def render_compare(runs: list[Run], everything: bool = False) -> str:
    """The report: a title, the revisions, the params that differ, the metrics that differ (all with `everything`)."""
    labels = [r.label for r in runs]
    described = ", ".join(f"`{r.label}`" + ("" if r.rev in (WORKSPACE, r.label) else f" ({r.rev[:7]})") for r in runs)
    prows, mrows = diff_rows(runs, "params"), diff_rows(runs, "metrics", everything)
    total = len(union([r.metrics for r in runs]))
    out = [f"# Compare: {' vs '.join(labels)}", "", f"Revisions: {described}.", "", "## Params that differ", "",
           md_table(["param", *labels], prows) if prows else "No params differ.", "",
           "## Metrics" if everything else "## Metrics that differ", ""]
    equal = "metrics are equal in every revision (`--all` lists them)."
    if mrows:
        delta = [f"Δ ({labels[1]} − {labels[0]})"] if len(runs) == 2 else []
        out.append(md_table(["metric", *labels, *delta], mrows))
        out += [] if everything else ["", f"{total - len(mrows)} of {total} {equal}"]
    else:
        out.append(f"All {total} {equal}" if total else "No metrics in any of them (dvc.yaml `metrics:` files).")
    return "\n".join(out) + "\n"


def collect(revs: list[str]) -> list[Run]:
    """Runs in table order: none -> HEAD, workspace; one -> REV, workspace; more -> those revisions."""
    def pick(entries: list[dict[str, Any]], label: str) -> Run:
        found = [e for e in entries if (e.get("rev") == WORKSPACE) == (label == WORKSPACE)]
        if not found:
            raise ExperimentsError(f"compare: dvc exp show returned nothing for '{label}'")
        return run_from_entry(found[0], label)

    if len(revs) > 1:
        return [pick(entries, rev) for rev, entries in zip(revs, exp_show("compare", list(revs)))]
    [entries] = exp_show("compare", [revs[0] if revs else None], workspace=True)
    return [pick(entries, revs[0] if revs else "HEAD"), pick(entries, WORKSPACE)]


def run_compare(revs: list[str], out: str = COMPARE_OUT, everything: bool = False) -> int:
    """The CLI command: print the report and write it to `out` (`-`: print only)."""
    text = render_compare(collect(revs), everything)
    print(text, end="")
    if out != "-":
        print(f"wrote {_write_text(out, text)}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- ablation: sweeps and tables


def _shown(key: str) -> bool:
    return not key.startswith(IGNORED_PREFIXES)


def _metric(r: Run, key: str) -> Any:
    """A metric of an ablation row; a null one counts as absent."""
    v = r.metrics.get(key)
    return ABSENT if v is None else v


@dataclass
class Table:
    param: str  # the swept param ("" for the overview of unswept experiments)
    crossed: list[str]  # params swept jointly with it in some experiment (a grid)
    columns: list[str]  # params shown: param, crossed, then any other that varies within the table
    rows: list[Run]  # merged: the label names the others, `a (= b, c)`


@dataclass
class Ablation:
    """Everything the report shows, computed from the runs alone (no DVC, no files)."""

    runs: list[Run]
    baselines: list[str]
    varied: list[str]  # params (gates aside) that vary across the completed experiments
    swept: list[str]
    overrides: dict[int, list[str]]  # id(run) -> the swept params it changes from its baseline
    tables: list[Table] = field(default_factory=list)
    overview: Table | None = None  # completed experiments when nothing is swept

    def rows_changing_only(self, allowed: set[str]) -> list[Run]:
        """Merged rows of the completed experiments whose swept-param changes all lie in `allowed`."""
        return merge([r for r in self.runs if r.done and set(self.overrides[id(r)]) <= allowed], self.varied,
                     len(self.baselines) > 1)


def merge(runs: list[Run], keys: list[str], by_baseline: bool) -> list[Run]:
    """Runs with the same values of `keys` (and baseline, when several) as one row, in first-seen order."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.baseline if by_baseline else "", *(canon(r.params.get(k, ABSENT)) for k in keys)),
                          []).append(r)
    rows = []
    for members in groups.values():
        best = max(members, key=lambda r: sum(_metric(r, k) is not ABSENT for k, _ in KEY_METRICS))
        rest = ", ".join(m.label for m in members if m is not best)
        rows.append(replace(best, label=best.label + (f" (= {rest})" if rest else "")))
    return rows


def analyse(runs: list[Run]) -> Ablation:
    """Swept params, each run's changes from its baseline, and the tables (see the module docstring)."""
    done = [r for r in runs if r.done]
    by_baseline = len(baselines := list(dict.fromkeys(r.baseline for r in runs))) > 1
    keys = [k for k in union([r.params for r in done]) if _shown(k)]
    varied = [k for k in keys if varies([r.params.get(k, ABSENT) for r in done])]
    changed = {id(r): r.changed(varied) for r in done}
    swept = [k for k in varied if any(k in c for c in changed.values())]
    ab = Ablation(runs, baselines, varied, swept, {id(r): [k for k in changed.get(id(r), []) if k in swept]
                                                   for r in runs})
    for p in swept:
        crossed = sorted({q for c in ab.overrides.values() if p in c for q in c if q != p}, key=swept.index)
        order = [p, *crossed]
        rows = sorted(ab.rows_changing_only(set(order)),
                      key=lambda r: ([canon(r.params.get(k, ABSENT)) for k in order], r.baseline, r.label))
        others = [k for k in varied if k not in order and varies([r.params.get(k, ABSENT) for r in rows])]
        ab.tables.append(Table(p, crossed, [*order, *others], rows))
    if done and not swept:
        ab.overview = Table("", [], varied, sorted(merge(done, varied, by_baseline), key=lambda r: (r.baseline,
                                                                                                    r.label)))
    return ab


def table_rows(table: Table, with_baseline: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells) of one table: experiment [, baseline], the shown params, the key metrics."""
    header = ["experiment", *(["baseline"] if with_baseline else []), *table.columns, *(k for k, _ in KEY_METRICS)]
    return header, [[r.label, *([r.baseline] if with_baseline else []),
                     *(fmt(r.params.get(k, ABSENT)) for k in table.columns),
                     *(fmt(_metric(r, k)) for k, _ in KEY_METRICS)] for r in table.rows]


# ----------------------------------------------------------------------------- ablation: plots


@dataclass
class Plot:
    """One figure: lines (label -> y indexed by x, sorted), or why it is skipped (then `skipped` says what to queue)."""

    filename: str
    title: str
    xlabel: str
    ylabel: str
    lines: dict[str, Any] = field(default_factory=dict)  # label -> pandas Series
    dashed: tuple[str, ...] = ()
    log_x: bool = False
    skipped: str | None = None

    def add(self, label: str, rows: list[Run], x: Callable[[Run], Any], metric: str, dashed: bool = False) -> None:
        """A line of `metric` against x over `rows` (several runs at one x: their mean); none if no point."""
        import pandas as pd

        pts = [(a, b) for r in rows if (a := _number(x(r))) is not None and (b := _number(_metric(r, metric)))
               is not None]
        if pts:
            self.lines[label] = pd.Series([b for _, b in pts], index=[a for a, _ in pts]).groupby(level=0).mean()
            self.dashed += (label,) if dashed else ()

    def skip_if_constant(self, rows: list[Run], x: Callable[[Run], Any], x_name: str, hint: str) -> bool:
        """Mark the plot skipped (and return True) when x takes fewer than two values across `rows`."""
        if len({v for r in rows if (v := _number(x(r))) is not None}) < 2:
            self.skipped = (f"`{x_name}` does not vary across the completed experiments; to get it, queue {hint} "
                            f"({DOCS} has the full command)")
        return self.skipped is not None

    def skip_if_empty(self, x_name: str, metrics: list[str]) -> None:
        if not self.lines:
            names = ", ".join(f"`{m}`" for m in metrics)
            self.skipped = f"no completed experiment of the `{x_name}` sweep has {names} (they stopped before the " \
                "stage that writes them)"


def _scale(r: Run) -> Any:
    """The scale a run sampled at: its pinned value, the one calibrate chose when `auto`, or the value of the key
    experiments made before the move had."""
    value = r.params.get(BANDWIDTH, ABSENT)
    if value == "auto":
        return r.metrics.get(BANDWIDTH)
    return r.params.get(LEGACY_BANDWIDTH) if value is ABSENT else value


def _nfe(r: Run) -> float | None:
    """refine.nfe (evaluate's copy when refine's is missing); not positive -> None (the x axis is logarithmic)."""
    v = next((v for k in (NFE, NFE_FALLBACK) if (v := _number(r.metrics.get(k))) is not None), None)
    return v if v is not None and v > 0 else None


def plot_data(ab: Ablation) -> list[Plot]:
    """The three figures. The bandwidth plots use the runs that change, among the swept params, only the bandwidth
    scale (either key); the NFE plot those that change only refine.steps, refine.schedule or refine.solver."""
    bw_rows = ab.rows_changing_only({BANDWIDTH, LEGACY_BANDWIDTH})
    plots = [Plot("fid_vs_bandwidth.png", "FID against the KDE bandwidth scale", BANDWIDTH, "FID"),
             Plot("memorization_vs_bandwidth.png", "Diversity and memorization against the bandwidth scale",
                  BANDWIDTH, "fraction of refined samples")]
    lines = [[("eval.kde_fid", "KDE (stage 1)", False), ("eval.refined_fid", "refined (stage 2)", False),
              ("eval.real_fid", "real held-out data (floor)", True)],
             [("eval.refined_recall", "recall (diversity)", False),
              ("eval.refined_copy_fraction", "copy fraction (d1/d2 < copy_ratio)", False),
              ("eval.refined_anchor_fraction", "anchor fraction (nearest = own KDE anchor)", False),
              ("eval.refined_authenticity_pixel", "authenticity (pixel)", False)]]
    for plot, series in zip(plots, lines):
        if not plot.skip_if_constant(bw_rows, _scale, BANDWIDTH, SWEEP_HINT[BANDWIDTH]):
            for metric, label, dashed in series:
                plot.add(label, bw_rows, _scale, metric, dashed)
            plot.skip_if_empty(BANDWIDTH, [m for m, _, _ in series])

    rows = ab.rows_changing_only({STEPS, SCHEDULE, SOLVER})
    nfe = Plot("fid_vs_nfe.png", "Refined FID against the number of network evaluations", f"NFE (`{NFE}`)", "FID",
               log_x=True)
    plots.append(nfe)
    if nfe.skip_if_constant(rows, _nfe, NFE, SWEEP_HINT[STEPS]):
        return plots
    schedules, solvers = ({fmt(r.params.get(k, ABSENT)): None for r in rows} for k in (SCHEDULE, SOLVER))
    for sched in sorted(schedules):  # one line per schedule (and per solver when that varies too)
        for solver in sorted(solvers):
            sub = [r for r in rows if [fmt(r.params.get(k, ABSENT)) for k in (SCHEDULE, SOLVER)] == [sched, solver]]
            nfe.add(f"refined, {sched}" + (f" ({solver})" if len(solvers) > 1 else ""), sub, _nfe, "eval.refined_fid")
    nfe.skip_if_empty(NFE, ["eval.refined_fid"])
    kde = [v for r in rows if (v := _number(r.metrics.get("eval.kde_fid"))) is not None]
    if nfe.lines and kde:  # the KDE samples do not depend on refine.*: one level, drawn across
        import pandas as pd

        xs = [x for s in nfe.lines.values() for x in s.index]
        level = sum(kde) / len(kde)
        nfe.lines["KDE (stage 1, before debiasing)"] = pd.Series([level, level], index=[min(xs), max(xs)])
        nfe.dashed += ("KDE (stage 1, before debiasing)",)
    return plots


def write_plot(plot: Plot, path: Path) -> None:
    """One PNG (pandas on matplotlib's Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        for label, s in plot.lines.items():
            s.plot(ax=ax, style="--" if label in plot.dashed else "-o", label=label, logx=plot.log_x)
        if xs := sorted({x for label, s in plot.lines.items() if label not in plot.dashed for x in s.index}):
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(plot.title, fontsize=10)
        ax.set(xlabel=plot.xlabel.replace("`", ""), ylabel=plot.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- ablation: report and files


def _state_summary(runs: list[Run]) -> str:
    counts, order = Counter(r.state for r in runs), ["success", "running", "queued", "failed"]
    states = sorted(counts, key=lambda s: (order.index(s) if s in order else len(order), s))
    return ", ".join(f"{counts[s]} {'completed' if s == 'success' else s}" for s in states)


def render_ablation(ab: Ablation, plots: list[Plot], plot_dir: str | None) -> str:
    """The report. `plot_dir`: the plots' folder relative to the markdown file (None: plots not written)."""
    done, pending, several = [r for r in ab.runs if r.done], [r for r in ab.runs if not r.done], len(ab.baselines) > 1
    out = ["# Ablations", "", f"Baseline{'s' if several else ''}: {', '.join(f'`{b}`' for b in ab.baselines)}. "
           f"Experiments: {_state_summary(ab.runs)} (`dvc exp show`; written by `python -m pipeline ablation`).", ""]
    if ab.swept:
        def values(t: Table) -> str:
            vals = {canon(v): v for r in t.rows if (v := r.params.get(t.param, ABSENT)) is not ABSENT}
            return ", ".join(fmt(vals[c]) for c in sorted(vals))

        out += ["Swept: " + "; ".join(f"`{t.param}` ({values(t)})" for t in ab.tables) + ".", "",
                "Each table holds the completed experiments that differ from their baseline commit, among the swept "
                "params, only in that param (or in params swept jointly with it); one equal to the baseline in every "
                "swept param is the reference point and appears in every table. `—`: no such metric (the experiment "
                "did not run that stage).", ""]
    elif done:
        out += ["No param is swept (the completed experiments do not differ in any param, gates aside). "
                f"To sweep one: {QUEUE_HINT}.", ""]
    else:
        out += [f"No completed experiment yet: run the queue (`dvc queue start`, `dvc queue status`), or {QUEUE_HINT}.",
                ""]
    for t in ab.tables:
        out += [f"## `{t.param}`" + (f" (with {', '.join(f'`{c}`' for c in t.crossed)})" if t.crossed else ""), "",
                md_table(*table_rows(t, several)), ""]
    if ab.overview is not None:
        out += ["## Completed experiments", "", md_table(*table_rows(ab.overview, several)), ""]
    if done:
        out += ["## Plots", ""]
        if plot_dir is not None:  # the figures first, then one line per figure skipped
            out += [line for p in plots if not p.skipped for line in (f"![{p.title}]({plot_dir}/{p.filename})", "")]
        out += [f"- {p.title}: skipped: {p.skipped}." if p.skipped else f"- {p.title}: not written (`--out -`)."
                for p in plots if p.skipped or plot_dir is None] + [""]
    if ab.tables or ab.overview is not None:
        out += ["## Metrics", "", *(f"- `{k}`: {meaning}" for k, meaning in KEY_METRICS), ""]
    if pending:
        rows = [[r.label, r.state, *([r.baseline] if several else []),
                 ", ".join(f"{k}={fmt(r.params.get(k, ABSENT))}" for k in r.changed()) or "(none)"]
                for r in sorted(pending, key=lambda r: (r.state, r.baseline, r.label))]
        out += ["## Not completed", "",
                "Failed runs: `dvc queue logs NAME` shows why. Queued ones run with `dvc queue start`.", "",
                md_table(["experiment", "state", *(["baseline"] if several else []), "params changed"], rows), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def write_outputs(text: str, plots: list[Plot], out: Path) -> list[Path]:
    """The markdown at `out`, the plots in `out` without its suffix; a skipped plot's old file is removed."""
    written = []
    for p in plots:
        target = out.with_suffix("") / p.filename
        if p.skipped:
            target.unlink(missing_ok=True)
        else:
            write_plot(p, target)
            written.append(target)
    _write_text(out, text)
    return written


def run_ablation(out: str = ABLATION_OUT, all_commits: bool = False) -> int:
    """The CLI command: print the report, write it to `out` and the plots next to it (`-`: print only)."""
    [entries] = exp_show("ablation", [None], all_commits=all_commits, queued=True)
    runs = runs_from_states(entries)
    if not runs:
        base = next((e for e in entries if e.get("rev") != WORKSPACE), None)
        label = (base.get("name") or str(base.get("rev") or "")[:7]) if base else None
        where = "in the repository" if all_commits else f"on baseline `{label}`" if label else "on HEAD"
        print(f"ablation: no experiments {where}; {QUEUE_HINT}. Nothing written.")
        return 0
    ab = analyse(runs)
    plots = plot_data(ab)
    if out == "-":
        print(render_ablation(ab, plots, None), end="")
        return 0
    text = render_ablation(ab, plots, Path(out).with_suffix("").name)
    written = write_outputs(text, plots, Path(out))
    print(text, end="")
    print(f"wrote {out}" + (f" and {len(written)} plot(s) in {Path(out).with_suffix('')}/" if written else ""),
          file=sys.stderr)
    return 0
