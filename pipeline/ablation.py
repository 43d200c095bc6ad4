"""`python -m pipeline ablation`: every DVC experiment of the baseline, one table per swept param, and plots.

    python -m pipeline ablation                  # HEAD's experiments -> reports/ablations.md, reports/ablations/*.png
    python -m pipeline ablation --all-commits    # experiments of every commit (`dvc exp show --all-commits`)
    python -m pipeline ablation --out abl/bw.md  # plots then go to abl/bw/*.png
    python -m pipeline ablation --out -          # print the markdown only; no file, no plots

The sweeps themselves are queued with `dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'` and run with
`dvc queue start` (the commands, what each re-runs and how long it takes: docs/ablations.md).

Where the values come from: one `dvc exp show --json --hide-workspace` (with `--all-commits` for every commit).
Each experiment carries its full params.yaml and the metrics files listed under `metrics:` in dvc.yaml; names are
those of `python -m pipeline compare` (`sample_kde.bandwidth_scale` a param, `eval.refined_fid` the `refined_fid` of
reports/eval/metrics.json, `refine.nfe`, `kde.h`).

What the report holds:
  - completed experiments (DVC's state `success`, or run in the workspace) only in the tables; failed, queued and
    running ones are listed at the end, with the params they change;
  - a param is *swept* when its value varies across the completed experiments and differs from the baseline
    commit's in at least one of them. Gate params (`gates.*`) decide whether a run goes on, not what it computes:
    they never define a sweep and are not shown;
  - one table per swept param P: the experiments that differ from their baseline, among the swept params, only in
    P and in params swept jointly with P in some experiment (a grid, e.g. `refine.steps` x `refine.schedule`).
    An experiment equal to the baseline in every swept param is the reference point and appears in every table.
    Rows are sorted by P (then by the jointly swept params); columns are the params that vary within the table and
    the key metrics (KEY_METRICS); `—` where an experiment has no value (it did not run that stage). Experiments
    with the same values of every varied param (and the same baseline) are one row, named `a (= b, c)`: the
    first, in DVC's order (newest first), with the most key metrics;
  - plots in the folder named like the markdown file without `.md` (reports/ablations/): FID (KDE, refined and
    real held-out data) against the bandwidth scale; recall and memorization (copy fraction, anchor fraction)
    against the bandwidth scale; refined FID against the NFE, one line per schedule when the schedule varies.
    A plot whose x never varies is skipped, with a line saying which sweep to queue. Files are written atomically
    (dkgm.atomic: temp file, fsync, rename); a skipped plot's old file is removed.

No experiments at all (none completed, failed or queued): one line on stdout saying how to queue a sweep, exit 0,
nothing written (an existing report is left as it is). Errors (not in a DVC repository, DVC failing): one line,
exit status 2 through the CLI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dkgm.atomic import write_atomic
from dkgm.errors import DKGMError
from pipeline.compare import (
    MISSING,
    WORKSPACE,
    CompareError,
    dvc_error,
    dvc_executable,
    fmt,
    md_table,
    same,
    snapshot_from_entry,
)

DEFAULT_OUT = "reports/ablations.md"
DOCS = "docs/ablations.md"
IGNORED_PREFIXES = ("gates.",)

# (metric, meaning): the table columns, in order
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

# the sweep to queue for each plot's x (the full commands, with the gate overrides: docs/ablations.md)
SWEEP_HINT = {
    BANDWIDTH: "the bandwidth sweep: `dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`",
    STEPS: "the steps sweep: `dvc exp run --queue -S 'refine.steps=1,2,5,10,20,40'` "
    "(per schedule: add `-S 'refine.schedule=geometric,karras,robbins_monro'`)",
}
QUEUE_HINT = (f"queue a sweep, e.g. `dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`, "
              f"then `dvc queue start` ({DOCS} has every sweep, with the gate overrides)")


class AblationError(DKGMError):
    """The ablation report cannot be made: no DVC repository, DVC failing."""


# ----------------------------------------------------------------------------- experiments from DVC's JSON


@dataclass
class Experiment:
    """One experiment of `dvc exp show --json`: flat params and metrics, and its baseline commit's params."""

    name: str
    rev: str
    baseline: str  # the baseline commit: its branch/tag name, else its short sha
    state: str  # "success" (also: run in the workspace), "failed", "queued", "running"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)  # the baseline commit's params
    log: str | None = None  # the queue's log file of a failed run

    @property
    def done(self) -> bool:
        return self.state == "success"


def experiments_from_exp_show(entries: list[dict[str, Any]]) -> list[Experiment]:
    """Every experiment under every baseline commit of one `dvc exp show --json` answer (the workspace is not one).

    DVC's executor state: absent for an experiment run in the workspace (counted as `success`), else `success`,
    `failed`, `queued` or `running`; an experiment whose entry carries an error counts as `failed`.
    """
    out: list[Experiment] = []
    for entry in entries:
        if entry.get("rev") == WORKSPACE:
            continue
        base = snapshot_from_entry(entry, "")
        baseline = entry.get("name") or str(entry.get("rev") or "")[:7]
        if entry.get("experiments") and base.metrics:
            # the baseline commit's own run: the reference point of every table
            out.append(Experiment(name=f"{baseline} (baseline)", rev=base.rev, baseline=baseline, state="success",
                                  params=base.params, metrics=base.metrics, reference=base.params))
        for group in entry.get("experiments") or []:
            executor = group.get("executor") or {}
            for rev_entry in group.get("revs") or []:
                snap = snapshot_from_entry(rev_entry, "")
                name = rev_entry.get("name") or group.get("name") or snap.rev[:7]
                state = str(executor.get("state") or "success")
                if rev_entry.get("error") and state == "success":
                    state = "failed"
                out.append(Experiment(name=name, rev=snap.rev, baseline=baseline, state=state, params=snap.params,
                                      metrics=snap.metrics, reference=base.params,
                                      log=(executor.get("local") or {}).get("log")))
    return out


# ----------------------------------------------------------------------------- sweeps and tables


def _shown(key: str) -> bool:
    return not key.startswith(IGNORED_PREFIXES)


def _union(dicts: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def _varies(values: list[Any]) -> bool:
    return any(not same(values[0], v) for v in values[1:])


_ABSENT = object()


def changed_params(exp: Experiment, keys: list[str] | None = None) -> list[str]:
    """The params (of `keys`, default all but gates.*) whose value differs from the experiment's baseline commit."""
    keys = keys if keys is not None else [k for k in _union([exp.params, exp.reference]) if _shown(k)]
    return [k for k in keys if not same(exp.params.get(k, _ABSENT), exp.reference.get(k, _ABSENT))]


def sort_key(v: Any) -> tuple:
    """Orders mixed values: null, booleans, numbers (by value), strings, anything else (by its JSON)."""
    if v is None or v is _ABSENT:
        return (0, 0)
    if isinstance(v, bool):
        return (1, v)
    if isinstance(v, (int, float)):
        return (2, float(v))  # 1 and 1.0 are the same value (`-S x=1` writes an int)
    if isinstance(v, str):
        return (3, v)
    return (4, json.dumps(v, sort_keys=True, default=str))


@dataclass
class Row:
    """One table row: experiments with the same values of every shown param; `experiments[0]` is the one shown."""

    experiments: list[Experiment]

    @property
    def exp(self) -> Experiment:
        return self.experiments[0]

    @property
    def label(self) -> str:
        rest = [e.name for e in self.experiments[1:]]
        return self.exp.name + (f" (= {', '.join(rest)})" if rest else "")

    def param(self, key: str) -> Any:
        return self.exp.params.get(key, _ABSENT)

    def metric(self, key: str) -> Any:
        return self.exp.metrics.get(key)


@dataclass
class Table:
    param: str  # the swept param
    crossed: list[str]  # params swept jointly with it in some experiment (a grid)
    columns: list[str]  # params shown: param, crossed, then any other that varies within the table
    rows: list[Row]


@dataclass
class Ablation:
    """Everything the report shows, computed from the experiments alone (no DVC, no files)."""

    experiments: list[Experiment]
    baselines: list[str]
    varied: list[str]  # params (gates aside) that vary across the completed experiments
    swept: list[str]
    overrides: dict[int, list[str]]  # id(experiment) -> the swept params it changes from its baseline
    tables: list[Table]
    overview: Table | None  # completed experiments that no sweep groups (nothing swept), else None

    @property
    def done(self) -> list[Experiment]:
        return [e for e in self.experiments if e.done]

    @property
    def pending(self) -> list[Experiment]:
        return [e for e in self.experiments if not e.done]

    def rows_changing_only(self, allowed: set[str]) -> list[Row]:
        """Rows of the completed experiments whose swept-param changes all lie in `allowed` (merged like tables)."""
        exps = [e for e in self.done if set(self.overrides[id(e)]) <= allowed]
        return _merge(exps, self.varied, len(self.baselines) > 1)


def _merge(exps: list[Experiment], keys: list[str], by_baseline: bool) -> list[Row]:
    """Experiments with the same values of `keys` (and baseline, when several) as one row, in first-seen order."""
    groups: dict[str, list[Experiment]] = {}
    for e in exps:
        ident = json.dumps([e.baseline if by_baseline else "", *(sort_key(e.params.get(k, _ABSENT)) for k in keys)],
                           default=str)
        groups.setdefault(ident, []).append(e)
    rows = []
    for members in groups.values():
        best = max(members, key=lambda e: sum(e.metrics.get(k) is not None for k, _ in KEY_METRICS))
        rows.append(Row([best, *(e for e in members if e is not best)]))
    return rows


def analyse(experiments: list[Experiment]) -> Ablation:
    """Swept params, each experiment's changes from its baseline, and the tables (see the module docstring)."""
    done = [e for e in experiments if e.done]
    baselines = list(dict.fromkeys(e.baseline for e in experiments))
    keys = [k for k in _union([e.params for e in done]) if _shown(k)]
    varied = [k for k in keys if len(done) > 1 and _varies([e.params.get(k, _ABSENT) for e in done])]
    changed = {id(e): changed_params(e, varied) for e in done}
    swept = [k for k in varied if any(k in c for c in changed.values())]
    overrides = {id(e): [k for k in changed.get(id(e), []) if k in swept] for e in experiments}
    by_baseline = len(baselines) > 1

    tables = []
    for p in swept:
        crossed = sorted({q for c in overrides.values() if p in c for q in c if q != p}, key=swept.index)
        allowed = {p, *crossed}
        exps = [e for e in done if set(overrides[id(e)]) <= allowed]
        rows = _merge(exps, varied, by_baseline)
        order = [p, *crossed]
        rows.sort(key=lambda r: ([sort_key(r.param(k)) for k in order], r.exp.baseline, r.exp.name))
        others = [k for k in varied if k not in order and _varies([r.param(k) for r in rows])]
        tables.append(Table(param=p, crossed=crossed, columns=[*order, *others], rows=rows))

    overview = None
    if done and not swept:
        rows = _merge(done, varied, by_baseline)
        rows.sort(key=lambda r: (r.exp.baseline, r.exp.name))
        overview = Table(param="", crossed=[], columns=varied, rows=rows)
    return Ablation(experiments=experiments, baselines=baselines, varied=varied, swept=swept, overrides=overrides,
                    tables=tables, overview=overview)


def _fmt_metric(v: Any) -> str:
    return MISSING if v is None else fmt(v)


def _fmt_param(v: Any) -> str:
    return MISSING if v is _ABSENT else fmt(v)


def table_rows(table: Table, with_baseline: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows of cells) of one table: experiment [, baseline], the shown params, the key metrics."""
    header = ["experiment", *(["baseline"] if with_baseline else []), *table.columns, *(k for k, _ in KEY_METRICS)]
    rows = []
    for r in table.rows:
        rows.append([r.label, *([r.exp.baseline] if with_baseline else []),
                     *(_fmt_param(r.param(k)) for k in table.columns),
                     *(_fmt_metric(r.metric(k)) for k, _ in KEY_METRICS)])
    return header, rows


# ----------------------------------------------------------------------------- plot data


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (x, y), sorted by x
    dashed: bool = False


@dataclass
class Plot:
    """One figure: what to draw, or why it is skipped (then `series` is empty and `skipped` says what to queue)."""

    filename: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    log_x: bool = False
    skipped: str | None = None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else None


def _series(rows: list[Row], x: Callable[[Row], Any], y: str, label: str, dashed: bool = False) -> Series:
    pts = [(_number(x(r)), _number(r.metric(y))) for r in rows]
    return Series(label, sorted((a, b) for a, b in pts if a is not None and b is not None), dashed)


def _nfe(r: Row) -> float | None:
    """refine.nfe (evaluate's copy when refine's is missing); not positive -> None (the x axis is logarithmic)."""
    for key in (NFE, NFE_FALLBACK):
        v = _number(r.metric(key))
        if v is not None:
            return v if v > 0 else None
    return None


def _skip_if_constant(plot: Plot, rows: list[Row], x: Callable[[Row], Any], x_name: str, hint: str) -> bool:
    """Mark `plot` skipped (and return True) when x takes fewer than two values across `rows`."""
    if len({v for r in rows if (v := _number(x(r))) is not None}) >= 2:
        return False
    plot.skipped = (f"`{x_name}` does not vary across the completed experiments; to get it, queue {hint} "
                    f"({DOCS} has the full command)")
    return True


def _skip_if_empty(plot: Plot, x_name: str, metrics: list[str]) -> None:
    if not plot.series:
        names = ", ".join(f"`{m}`" for m in metrics)
        plot.skipped = (f"no completed experiment of the `{x_name}` sweep has {names} "
                        "(they stopped before the stage that writes them)")


def _scale(r: Row) -> Any:
    """The scale an experiment sampled at: its pinned value, the resolved one when `auto`, or the
    value of the key it had in experiments made before the move."""
    value = r.param(BANDWIDTH)
    if value == "auto":
        return r.metric(BANDWIDTH)
    return r.param(LEGACY_BANDWIDTH) if value is _ABSENT else value


def _bandwidth_plot(plot: Plot, rows: list[Row], series: list[tuple[str, str, bool]]) -> Plot:
    if _skip_if_constant(plot, rows, _scale, BANDWIDTH, SWEEP_HINT[BANDWIDTH]):
        return plot
    plot.series = [s for metric, label, dashed in series if (s := _series(rows, _scale, metric, label, dashed)).points]
    _skip_if_empty(plot, BANDWIDTH, [m for m, _, _ in series])
    return plot


def plot_data(ab: Ablation) -> list[Plot]:
    """The three figures' data. The bandwidth plots use the experiments that change, among the swept params, only
    sample_kde.bandwidth_scale (or kde.bandwidth_scale, its key before); the NFE plot those that change only refine.steps, refine.schedule or refine.solver."""
    bw_rows = ab.rows_changing_only({BANDWIDTH, LEGACY_BANDWIDTH})
    fid_bw = _bandwidth_plot(Plot("fid_vs_bandwidth.png", "FID against the KDE bandwidth scale", BANDWIDTH, "FID"),
                             bw_rows,
                             [("eval.kde_fid", "KDE (stage 1)", False),
                              ("eval.refined_fid", "refined (stage 2)", False),
                              ("eval.real_fid", "real held-out data (floor)", True)])
    mem_bw = _bandwidth_plot(Plot("memorization_vs_bandwidth.png",
                                  "Diversity and memorization against the bandwidth scale", BANDWIDTH,
                                  "fraction of refined samples"),
                             bw_rows,
                             [("eval.refined_recall", "recall (diversity)", False),
                              ("eval.refined_copy_fraction", "copy fraction (d1/d2 < copy_ratio)", False),
                              ("eval.refined_anchor_fraction", "anchor fraction (nearest = own KDE anchor)", False),
                              ("eval.refined_authenticity_pixel", "authenticity (pixel)", False)])

    rows = ab.rows_changing_only({STEPS, SCHEDULE, SOLVER})
    nfe = Plot("fid_vs_nfe.png", "Refined FID against the number of network evaluations", f"NFE (`{NFE}`)", "FID",
               log_x=True)
    if _skip_if_constant(nfe, rows, _nfe, NFE, SWEEP_HINT[STEPS]):
        return [fid_bw, mem_bw, nfe]
    # one line per schedule (and per solver when that varies too)
    schedules = sorted({_fmt_param(r.param(SCHEDULE)) for r in rows})
    solvers = sorted({_fmt_param(r.param(SOLVER)) for r in rows})
    for sched in schedules:
        for solver in solvers:
            sub = [r for r in rows if _fmt_param(r.param(SCHEDULE)) == sched and _fmt_param(r.param(SOLVER)) == solver]
            label = f"refined, {sched}" + (f" ({solver})" if len(solvers) > 1 else "")
            if (s := _series(sub, _nfe, "eval.refined_fid", label)).points:
                nfe.series.append(s)
    _skip_if_empty(nfe, NFE, ["eval.refined_fid"])
    kde = [v for r in rows if (v := _number(r.metric("eval.kde_fid"))) is not None]
    if nfe.series and kde:  # the KDE samples do not depend on refine.*: one level, drawn across
        xs = [x for s in nfe.series for x, _ in s.points]
        level = sum(kde) / len(kde)
        nfe.series.append(Series("KDE (stage 1, before debiasing)", [(min(xs), level), (max(xs), level)], dashed=True))
    return [fid_bw, mem_bw, nfe]


# ----------------------------------------------------------------------------- markdown


def _values(rows: list[Row], key: str) -> str:
    vals = sorted({json.dumps(sort_key(r.param(key)), default=str): r.param(key) for r in rows}.values(), key=sort_key)
    return ", ".join(_fmt_param(v) for v in vals)


def render(ab: Ablation, plots: list[Plot], plot_dir: str | None) -> str:
    """The report. `plot_dir`: the plots' folder relative to the markdown file (None: plots not written)."""
    done, pending = ab.done, ab.pending
    several = len(ab.baselines) > 1
    counts: dict[str, int] = {}
    for e in ab.experiments:
        counts[e.state] = counts.get(e.state, 0) + 1
    order = ["success", "running", "queued", "failed"]
    states = sorted(counts, key=lambda s: (order.index(s) if s in order else len(order), s))
    summary = ", ".join(f"{counts[s]} {'completed' if s == 'success' else s}" for s in states)
    out = ["# Ablations", "",
           f"Baseline{'s' if several else ''}: {', '.join(f'`{b}`' for b in ab.baselines)}. "
           f"Experiments: {summary} (`dvc exp show --json`; written by `python -m pipeline ablation`).", ""]
    if ab.swept:
        swept = "; ".join(f"`{t.param}` ({_values(t.rows, t.param)})" for t in ab.tables)
        out += [f"Swept: {swept}.", "",
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
        title = f"## `{t.param}`" + (f" (with {', '.join(f'`{c}`' for c in t.crossed)})" if t.crossed else "")
        out += [title, "", md_table(*table_rows(t, several)), ""]
    if ab.overview is not None:
        out += ["## Completed experiments", "", md_table(*table_rows(ab.overview, several)), ""]

    if done:
        out += ["## Plots", ""]
        if plot_dir is not None:  # the figures first, then one line per figure skipped
            out += [line for p in plots if not p.skipped for line in (f"![{p.title}]({plot_dir}/{p.filename})", "")]
        out += [f"- {p.title}: skipped: {p.skipped}." if p.skipped else f"- {p.title}: not written (`--out -`)."
                for p in plots if p.skipped or plot_dir is None]
        out.append("")

    if ab.tables or ab.overview is not None:
        out += ["## Metrics", "", *(f"- `{k}`: {meaning}" for k, meaning in KEY_METRICS), ""]

    if pending:
        out += ["## Not completed", "",
                "Failed runs: `dvc queue logs NAME` shows why. Queued ones run with `dvc queue start`.", ""]
        rows = []
        for e in sorted(pending, key=lambda e: (e.state, e.baseline, e.name)):
            changes = ", ".join(f"{k}={_fmt_param(e.params.get(k, _ABSENT))}" for k in changed_params(e)) or "(none)"
            rows.append([e.name, e.state, *([e.baseline] if several else []), changes])
        out += [md_table(["experiment", "state", *(["baseline"] if several else []), "params changed"], rows), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def no_experiments_message(all_commits: bool, baseline: str | None) -> str:
    where = "in the repository" if all_commits else (f"on baseline `{baseline}`" if baseline else "on HEAD")
    return f"ablation: no experiments {where}; {QUEUE_HINT}. Nothing written."


# ----------------------------------------------------------------------------- files


def write_plot(plot: Plot, path: Path) -> None:
    """One PNG (matplotlib Agg), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    try:
        for s in plot.series:
            xs, ys = zip(*s.points)
            ax.plot(xs, ys, linestyle="--" if s.dashed else "-", marker=None if s.dashed else "o", label=s.label)
        xs_all = sorted({x for s in plot.series if not s.dashed for x, _ in s.points})
        if plot.log_x:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        if xs_all:
            ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_title(plot.title, fontsize=10)
        ax.set_xlabel(plot.xlabel.replace("`", ""))
        ax.set_ylabel(plot.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def write_outputs(text: str, plots: list[Plot], out: Path) -> list[Path]:
    """The markdown at `out`, the plots in `out` without its suffix (reports/ablations/); returns the plots written."""
    plot_dir = out.with_suffix("")
    written = []
    for p in plots:
        target = plot_dir / p.filename
        if p.skipped:
            target.unlink(missing_ok=True)
        else:
            write_plot(p, target)
            written.append(target)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return written


# ----------------------------------------------------------------------------- running DVC


def exp_show_all(all_commits: bool, cwd: str | Path | None = None) -> list[dict[str, Any]]:
    """The parsed `dvc exp show --json --hide-workspace` (HEAD's experiments, or every commit's with -A)."""
    try:
        cmd = [dvc_executable(), "exp", "show", "--json", "--hide-workspace"]
    except CompareError as exc:
        raise AblationError(str(exc).replace("compare:", "ablation:", 1)) from exc
    if all_commits:
        cmd.append("--all-commits")
    r = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, DVC_NO_ANALYTICS="1"), capture_output=True, text=True)
    if r.returncode != 0:
        raise AblationError(str(dvc_error(r.stderr, None)).replace("compare:", "ablation:", 1))
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise AblationError(f"ablation: could not parse the JSON of `dvc exp show` ({exc})") from exc


def run_ablation(out: str = DEFAULT_OUT, all_commits: bool = False, cwd: str | Path | None = None) -> int:
    """The CLI command: print the report, write it to `out` and the plots next to it (`-`: print only)."""
    entries = exp_show_all(all_commits, cwd)
    experiments = experiments_from_exp_show(entries)
    if not experiments:
        base = next((e for e in entries if e.get("rev") != WORKSPACE), None)
        label = (base.get("name") or str(base.get("rev") or "")[:7]) if base else None
        print(no_experiments_message(all_commits, label))
        return 0
    ab = analyse(experiments)
    plots = plot_data(ab)
    if out == "-":
        print(render(ab, plots, None), end="")
        return 0
    path = Path(cwd or ".") / out
    text = render(ab, plots, path.with_suffix("").name)
    written = write_outputs(text, plots, path)
    print(text, end="")
    print(f"wrote {out}" + (f" and {len(written)} plot(s) in {Path(out).with_suffix('')}/" if written else ""),
          file=sys.stderr)
    return 0

