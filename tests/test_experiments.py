"""pipeline/experiments.py (`compare`, `ablation`): known answers on hand-written runs, and real DVC on a tiny repo.

A `Run` is one row of DVC's experiments (what `dvc.api.exp_show` gives per row, with typed values and full names):
the rows below are written by hand; `entry()` builds the few `dvc exp show --json` entries the parsing tests need.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from pipeline import experiments as E
from tests.conftest import VENV_BIN, cli_env, run_cli

BW, ETA, STEPS, SCHED = E.BANDWIDTH, "refine.eta", E.STEPS, E.SCHEDULE
BASE = {BW: 1.0, ETA: 0.0, STEPS: 10, SCHED: "geometric", "refine.solver": "euler", "debiaser.arch": "unet",
        "gates.eval.enforce": True}


def run(label: str, changes: dict | None = None, metrics: dict | None = None, state: str = "success",
        baseline: str = "master", reference: dict = BASE) -> E.Run:
    return E.Run(label, rev=f"{abs(hash(label)):040x}"[:40], baseline=baseline, state=state,
                 params={**reference, **(changes or {})}, metrics=metrics or {}, reference=reference)


def full(scale: float = 1.0, kde_fid: float = 80.0, refined_fid: float = 20.0, steps: int = 10, recall: float = 0.5,
         copy: float = 0.01, **extra) -> dict:
    """The metrics of a run of the whole pipeline."""
    return {"kde.h": 0.3 * scale, "refine.nfe": steps, "eval.nfe": steps, "eval.kde_fid": kde_fid,
            "eval.refined_fid": refined_fid, "eval.debias_gain": 1 - refined_fid / kde_fid, "eval.real_fid": 4.2,
            "eval.refined_copy_fraction": copy, "eval.refined_anchor_fraction": 0.5 * copy + 0.1,
            "eval.refined_recall": recall, **extra}


BW_RESULTS = {0.5: (60.0, 30.0, 0.2, 0.3), 1: (80.0, 20.0, 0.45, 0.05), 1.5: (95.0, 18.0, 0.55, 0.01),
              2: (120.0, 19.0, 0.6, 0.0), 3: (170.0, 25.0, 0.62, 0.0)}  # kde_fid, refined_fid, recall, copy


def bw(scale: float, **kw) -> dict:
    kde_fid, refined_fid, recall, copy = BW_RESULTS[scale]
    return full(scale, **{"kde_fid": kde_fid, "refined_fid": refined_fid, "recall": recall, "copy": copy, **kw})


def sweeps() -> list[E.Run]:
    """In DVC's order (newest first): a failed and a queued run, an eta sweep, a bandwidth sweep queued out of
    order. eta-0.0 and bw-1 are both the baseline point."""
    return [run("broken", {BW: -1}, state="failed"), run("later", {"debiaser.arch": "dae"}, state="queued"),
            *(run(f"eta-{e}", {ETA: e}, bw(1, refined_fid=f)) for e, f in ((0.5, 16.5), (1, 14.0), (0.0, 20.0))),
            *(run(f"bw-{s}", {BW: s}, bw(s)) for s in (1.5, 1, 3, 0.5, 2))]


def report(runs: list[E.Run]) -> tuple[E.Ablation, list[E.Plot], str]:
    ab = E.analyse(runs)
    plots = E.plot_data(ab)
    return ab, plots, E.render_ablation(ab, plots, "ablations")


def sections(md: str) -> dict[str, str]:
    """{heading (without `## ` and backticks): its text}."""
    out, name = {}, ""
    for line in md.splitlines():
        if line.startswith("## "):
            name = line[3:].replace("`", "").strip()
        out[name] = out.get(name, "") + line + "\n"
    return out


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in `text` as dicts keyed by the header."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not re.fullmatch(r"\|[-:|]+\|", ln)]
    rows = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def entry(rev: str, params: dict, metrics: dict | None = None, name: str | None = None, **kw) -> dict:
    """One `dvc exp show --json` entry: {file: values} for params and metrics (a str value: that file failed)."""
    def files(d: dict) -> dict:
        return {p: {"error": {"type": "FileNotFoundError", "msg": v}} if isinstance(v, str) else {"data": v}
                for p, v in d.items()}

    return {"rev": rev, "name": name, "data": {"rev": rev, "params": files(params), "metrics": files(metrics or {})},
            "error": None, "experiments": None, **kw}


# ----------------------------------------------------------------------------- values and names


def test_one_flatten_union_canon_and_formatter():
    assert E.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}
    assert E.union([{"x": 1, "y": 2}, {"z": 3, "x": 4}]) == ["x", "y", "z"]
    assert [E.fmt(v) for v in (0.3630493093680563, 1596.8072, 1e-150, 2.0, 10000, 123456789, True, None, "cv",
                               [1, 2], E.ABSENT)] == \
        ["0.36305", "1596.8", "1e-150", "2", "10000", "123456789", "true", "null", "cv", "[1, 2]", "—"]
    long = "null: default_1.pt has no classifier layer; put the full network in place"
    assert len(E.fmt(long)) == E.MAX_CELL and E.fmt(long).endswith("…") and E.fmt(long)[:20] == long[:20]
    # the report's two spellings are this formatter too: metrics to 4 digits with null as n/a, params exact
    from pipeline import report

    assert [report.fmt(v) for v in (0.3630493093680563, None, [0.123456, "heun"], long)] == \
        ["0.363", "n/a", "[0.1235, heun]", long]
    assert [report.param_str(v) for v in (0.3630493093680563, None, ["euler", "heun"], 1e-3)] == \
        ["0.3630493093680563", "null", "[euler, heun]", "0.001"]
    assert [E.fmt_delta(*ab) for ab in ((1.0, 3), (3, 1), (0.5, 0.25), (1, 1.0), ("a", 1), (True, False))] == \
        ["+2", "-2", "-0.25", "0", "—", "—"]
    assert E.canon(1) == E.canon(1.0) and E.canon(True) != E.canon(1) and E.canon(float("nan")) == E.canon(float("nan"))
    assert E.canon(None) != E.canon(E.ABSENT)
    assert sorted([3, "b", None, 1.5, True, "a"], key=E.canon) == [None, True, 1.5, 3, "a", "b"]


def test_names_and_runs_from_one_entry():
    assert E.metric_name("reports/kde/metrics.json", "h") == "kde.h"
    assert E.metric_name("reports/sample_kde/metrics.json", "h") == "sample_kde.h"
    assert E.metric_name("eval/scores.json", "fid") == "eval/scores.json:fid"
    assert E.metric_name("reports/metrics.json", "x") == "reports/metrics.json:x"
    assert (E.param_name("params.yaml", "kde.bandwidth"), E.param_name("extra.yaml", "a.b")) == \
        ("kde.bandwidth", "extra.yaml:a.b")
    r = E.run_from_entry(entry("a620a24" + "0" * 33, {"params.yaml": {"kde": {"scale": 1.0}, "debiaser": {
        "mult": [1, 2]}, "gates": {"kde": {"min": -0.2}}}, "extra.yaml": {"x": None}},
        {"reports/kde/metrics.json": {"h": 0.36}, "reports/train/metrics.json": "[Errno 2] No such file"}), "HEAD~1")
    assert (r.label, r.rev[:7]) == ("HEAD~1", "a620a24")
    assert r.params == {"kde.scale": 1.0, "debiaser.mult": [1, 2], "gates.kde.min": -0.2, "extra.yaml:x": None}
    assert r.metrics == {"kde.h": 0.36}  # reports/train failed to load: no values, no error


# ----------------------------------------------------------------------------- compare


def three() -> list[E.Run]:
    common = {"prepare.n_items": 800, "kde.kernel": "gaussian", "kde.flag": False, "kde.tiny": 1.4462585681734164e-150}
    return [E.Run("HEAD~1", "a620a24" + "0" * 33, params={"kde.scale": 1.0, "prepare.limit": 800},
                  metrics={"kde.h": 0.3630493093680563, **common}),
            E.Run("HEAD", "6f0c865" + "0" * 33, params={"kde.scale": 2, "prepare.limit": 800.0},
                  metrics={"kde.h": 0.7260986187361126, **common}),
            E.Run("workspace", "workspace", params={"kde.scale": 3, "prepare.limit": 800},
                  metrics={"kde.h": 1.089147928104169, **common, "eval.fid": 12.3456789})]


def test_params_and_metrics_that_differ_with_a_delta_for_two():
    old, head, ws = three()
    assert E.diff_rows([old, head, ws], "params") == [["kde.scale", "1", "2", "3"]]  # 800 == 800.0
    assert E.diff_rows([old, old], "params") == [] and E.diff_rows([old, old], "metrics") == []
    a = E.Run("a", params={"x": 1, "y": True, "z": None, "only_a": "cv", "n": float("nan")})
    b = E.Run("b", params={"x": 1.0, "y": 1, "z": None, "n": float("nan"), "only_b": [1, 2]})
    assert E.diff_rows([a, b], "params") == [["y", "true", "1"], ["only_a", "cv", "—"], ["only_b", "—", "[1, 2]"]]
    every = {r[0]: r[1:] for r in E.diff_rows([old, head], "metrics", everything=True)}
    assert every == {"kde.h": ["0.36305", "0.7261", "+0.36305"], "prepare.n_items": ["800", "800", "0"],
                     "kde.kernel": ["gaussian", "gaussian", "—"], "kde.flag": ["false", "false", "—"],
                     "kde.tiny": ["1.4463e-150", "1.4463e-150", "0"]}
    assert E.diff_rows([old, head], "metrics") == [["kde.h", "0.36305", "0.7261", "+0.36305"]]
    del head.metrics["kde.h"]
    rows = {r[0]: r[1:] for r in E.diff_rows([old, head, ws], "metrics")}  # missing in one revision: differs
    assert rows == {"kde.h": ["0.36305", "—", "1.0891"], "eval.fid": ["—", "—", "12.346"]}  # no delta beyond two
    assert E.diff_rows([old, head], "metrics") == [["kde.h", "0.36305", "—", "—"]]


def test_render_compare():
    old, head, ws = three()
    md = E.render_compare([old, head])
    assert md.startswith("# Compare: HEAD~1 vs HEAD\n") and "Revisions: `HEAD~1` (a620a24), `HEAD` (6f0c865)." in md
    s = sections(md)
    assert table(s["Params that differ"]) == [{"param": "kde.scale", "HEAD~1": "1", "HEAD": "2"}]
    assert table(s["Metrics that differ"]) == [{"metric": "kde.h", "HEAD~1": "0.36305", "HEAD": "0.7261",
                                                "Δ (HEAD − HEAD~1)": "+0.36305"}]
    assert "4 of 5 metrics are equal in every revision (`--all` lists them)." in md
    full_md = E.render_compare([old, head], everything=True)
    lines = [ln for ln in sections(full_md)["Metrics"].splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 5 and len({len(ln) for ln in lines}) == 1  # padded: the columns line up
    same = E.render_compare([old, old])
    assert "No params differ." in same and "All 5 metrics are equal in every revision" in same
    assert "`HEAD` (6f0c865), `workspace`." in E.render_compare([head, ws])
    assert list(table(sections(E.render_compare([old, head, ws]))["Metrics that differ"])[0]) == \
        ["metric", "HEAD~1", "HEAD", "workspace"]  # no delta beyond two
    piped = E.render_compare([E.Run("a|b", "workspace", params={"p": "x|y"}), E.Run("c", "workspace")])
    assert table(sections(piped)["Params that differ"]) == [{"param": "p", "a|b": "x|y", "c": "—"}]
    assert "No metrics in any of them" in piped


def test_collect_orders_revisions_and_picks_the_workspace(monkeypatch):
    calls = []

    def fake(command, revs, workspace=False, **kw):
        calls.append((command, revs, workspace))
        return [[*([entry("workspace", {"params.yaml": {"k": 3}})] if workspace else []),
                 entry(f"{i}" * 40, {"params.yaml": {"k": i}}, experiments=[{"revs": []}])] for i, _ in enumerate(revs)]

    monkeypatch.setattr(E, "exp_show", fake)
    assert [(r.label, r.params) for r in E.collect([])] == [("HEAD", {"k": 0}), ("workspace", {"k": 3})]
    assert [r.label for r in E.collect(["v1"])] == ["v1", "workspace"]
    assert [(r.label, r.rev[0]) for r in E.collect(["a", "b", "c"])] == [("a", "0"), ("b", "1"), ("c", "2")]
    assert calls == [("compare", [None], True), ("compare", ["v1"], True), ("compare", ["a", "b", "c"], False)]


@pytest.mark.slow
def test_dvc_failing_is_one_line_naming_the_revision(tmp_path, monkeypatch):
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q", "--no-scm"], cwd=tmp_path, env=cli_env(), check=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(E.ExperimentsError) as err:  # a DvcException: experiments need git
        E.collect(["v2", "v3"])
    assert str(err.value).startswith("compare: dvc exp show failed for 'v2': Only supported for Git repositories.")
    assert "\n" not in str(err.value) and isinstance(err.value, E.DKGMError)


@pytest.mark.parametrize("args", [["compare", "HEAD~1", "HEAD"], ["ablation"]])
def test_cli_outside_a_dvc_repo_exits_2(tmp_path, args):
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {args[0]}: not inside a DVC repository "
                                             "(run it in the project, where `dvc init` was run)"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- ablation: runs and tables


def test_runs_from_states():
    params = {"params.yaml": {"sample_kde": {"bandwidth_scale": 1.0}}}
    exp = entry("e" * 40, {"params.yaml": {"sample_kde": {"bandwidth_scale": 1}}}, {"reports/kde/metrics.json":
                                                                                      {"h": 0.3}}, name="ws15")
    queued = entry("q" * 40, {"params.yaml": {"sample_kde": {"bandwidth_scale": 3}}}, name="waiting")
    bad = entry("b" * 40, {"params.yaml": {"sample_kde": {"bandwidth_scale": -1}}}, name="bad",
                error={"msg": "Experiment run failed"})
    entries = [entry("workspace", params),
               entry("a" * 40, params, {"reports/eval/metrics.json": {"refined_fid": 22.0}}, name="master",
                     experiments=[{"revs": [exp], "executor": None}, {"revs": [queued], "executor": {
                         "state": "queued"}}, {"revs": [bad], "executor": {"state": "success"}}]),
               entry("f" * 40, params, {"reports/eval/metrics.json": "missing"},
                     experiments=[{"revs": [{**exp, "name": None}], "name": "old-exp", "executor": None}])]
    runs = {r.label: r for r in E.runs_from_states(entries)}
    assert {n: (r.state, r.baseline) for n, r in runs.items()} == {
        "master (baseline)": ("success", "master"), "ws15": ("success", "master"), "waiting": ("queued", "master"),
        "bad": ("failed", "master"), "old-exp": ("success", "fffffff")}  # no metrics: fffffff adds no baseline row
    assert runs["ws15"].metrics == {"kde.h": 0.3} and runs["ws15"].changed() == []  # 1 == 1.0
    assert runs["waiting"].changed() == [BW] and runs["master (baseline)"].metrics == {"eval.refined_fid": 22.0}
    assert E.runs_from_states([entry("a" * 40, params, name="master")]) == []


def test_sweeps_one_table_per_param_sorted_and_merged():
    ab, _, md = report(sweeps())
    assert ab.swept == [BW, ETA]  # not debiaser.arch: only a queued experiment changes it
    s = sections(md)
    rows = table(s[BW])
    assert [(r["experiment"], r[BW]) for r in rows] == [("bw-0.5", "0.5"), ("eta-0.0 (= bw-1)", "1"),
                                                        ("bw-1.5", "1.5"), ("bw-2", "2"), ("bw-3", "3")]
    assert ETA not in rows[0]  # constant within this table
    assert list(rows[0]) == ["experiment", BW, *(k for k, _ in E.KEY_METRICS)]
    r = rows[3]
    assert (r["eval.refined_fid"], r["eval.kde_fid"], r["refine.nfe"], r["eval.refined_recall"]) == \
        ("19", "120", "10", "0.6")
    assert float(r["eval.debias_gain"]) == pytest.approx(1 - 19 / 120, abs=1e-5) and r["kde.h"] == "0.6"
    assert r["eval.refined_zu_pixel"] == "—"  # no such metric
    eta = table(s[ETA])
    assert [(r["experiment"], r[ETA], r["eval.refined_fid"]) for r in eta] == [
        ("eta-0.0 (= bw-1)", "0", "20"), ("eta-0.5", "0.5", "16.5"), ("eta-1", "1", "14")]
    assert f"Swept: `{BW}` (0.5, 1, 1.5, 2, 3); `{ETA}` (0, 0.5, 1)." in md
    assert "8 completed, 1 queued, 1 failed" in md and "gates." not in md


def test_failed_and_queued_runs_are_listed_not_tabulated():
    _, _, md = report(sweeps())
    s = sections(md)
    assert table(s["Not completed"]) == [{"experiment": "broken", "state": "failed", "params changed": f"{BW}=-1"},
                                         {"experiment": "later", "state": "queued",
                                          "params changed": "debiaser.arch=dae"}]
    assert "dvc queue logs NAME" in s["Not completed"]
    ab, plots, md = report([run("q1", {ETA: 1}, state="queued")])
    assert "No completed experiment yet" in md and "## Plots" not in md and ab.tables == []
    assert table(sections(md)["Not completed"]) == [{"experiment": "q1", "state": "queued",
                                                     "params changed": "refine.eta=1"}]


def test_gates_and_common_overrides_define_no_sweep_and_unswept_runs_get_an_overview():
    ab, _, md = report([run("a", {BW: 2, "gates.eval.enforce": False}, full(2)),
                        run("b", {BW: 3, "gates.eval.enforce": True}, full(3))])
    assert ab.swept == [BW] and "gates." not in md
    ab, _, md = report([run("quick-1", {"debiaser.total_kimg": 10, BW: 1}, full(1)),
                        run("quick-2", {"debiaser.total_kimg": 10, BW: 2}, full(2))])
    assert ab.swept == [BW] and "debiaser.total_kimg" not in md  # the same in both
    ab, _, md = report([run("only", {ETA: 0.5}, full())])
    assert ab.swept == [] and ab.tables == [] and "No param is swept" in md
    assert [r["experiment"] for r in table(sections(md)["Completed experiments"])] == ["only"]


def test_missing_and_null_metrics_show_a_dash():
    _, _, md = report([run("up-to-kde", {BW: 1}, {"kde.h": 0.36305}),
                       run("no-gain", {BW: 2}, full(2, **{"eval.debias_gain": None, "eval.refined_recall": None}))])
    rows = {r["experiment"]: r for r in table(sections(md)[BW])}
    assert rows["up-to-kde"]["kde.h"] == "0.36305"
    assert all(rows["up-to-kde"][k] == "—" for k, _ in E.KEY_METRICS if k != "kde.h")
    assert [rows["no-gain"][k] for k in ("eval.debias_gain", "eval.refined_recall", "eval.refined_fid")] == \
        ["—", "—", "20"]


def test_a_grid_is_one_table_per_param_with_the_other_crossed():
    runs = [run(f"{sched[0]}{n}", {STEPS: n, SCHED: sched}, full(steps=n, refined_fid=base + 40 / n))
            for n in (1, 5, 10, 40) for sched, base in (("geometric", 30.0), ("karras", 25.0))]
    ab, plots, md = report([*runs, run("bw-2", {BW: 2}, full(2))])
    steps = next(t for t in ab.tables if t.param == STEPS)
    assert (steps.crossed, steps.columns) == ([SCHED], [STEPS, SCHED])
    s = sections(md)
    rows = table(s[f"{STEPS} (with {SCHED})"])
    assert [(r[STEPS], r[SCHED]) for r in rows] == [(str(n), sc) for n in (1, 5, 10, 40)
                                                    for sc in ("geometric", "karras")]
    assert "bw-2" not in [r["experiment"] for r in rows]  # the bandwidth is not swept with the steps
    assert [r[BW] for r in table(s[BW])] == ["1", "2"]  # g10 is the baseline point
    nfe = plots[2]
    assert nfe.skipped is None and nfe.log_x
    assert list(nfe.lines) == ["refined, geometric", "refined, karras", "KDE (stage 1, before debiasing)"]
    assert list(nfe.lines["refined, karras"].items()) == [(1.0, 65.0), (5.0, 33.0), (10.0, 29.0), (40.0, 26.0)]
    assert list(nfe.lines["KDE (stage 1, before debiasing)"].items()) == [(1.0, 80.0), (40.0, 80.0)]


def test_the_baseline_commits_own_run_is_the_reference_row():
    runs = [run("master (baseline)", {}, full(refined_fid=22.0)), run("bw-2", {BW: 2}, full(2, refined_fid=32.0)),
            run("bw-3", {BW: 3}, full(3, refined_fid=33.0)), run("eta-1", {ETA: 1}, full(refined_fid=15.0))]
    s = sections(report(runs)[2])
    assert [(r["experiment"], r[BW], r["eval.refined_fid"]) for r in table(s[BW])] == [
        ("master (baseline)", "1", "22"), ("bw-2", "2", "32"), ("bw-3", "3", "33")]
    assert [(r["experiment"], r["eval.refined_fid"]) for r in table(s[ETA])] == [("master (baseline)", "22"),
                                                                                  ("eta-1", "15")]


# ----------------------------------------------------------------------------- ablation: plots and files


def test_plot_data_against_the_bandwidth():
    fid, mem, nfe = report(sweeps())[1]
    assert fid.skipped is None and list(fid.lines) == ["KDE (stage 1)", "refined (stage 2)",
                                                       "real held-out data (floor)"]
    assert fid.lines["KDE (stage 1)"].to_dict() == {0.5: 60.0, 1.0: 80.0, 1.5: 95.0, 2.0: 120.0, 3.0: 170.0}
    assert fid.lines["refined (stage 2)"].to_dict() == {0.5: 30.0, 1.0: 20.0, 1.5: 18.0, 2.0: 19.0, 3.0: 25.0}
    assert fid.dashed == ("real held-out data (floor)",)
    assert {k.split(" ")[0]: list(s) for k, s in mem.lines.items()} == {
        "recall": [0.2, 0.45, 0.55, 0.6, 0.62], "copy": [0.3, 0.05, 0.01, 0.0, 0.0],
        "anchor": pytest.approx([0.25, 0.125, 0.105, 0.1, 0.1])}
    # the eta sweep changes no step count: no NFE plot, and a line saying which sweep to queue
    assert "refine.steps=1,2,5,10,20,40" in nfe.skipped and not nfe.lines


def test_bandwidth_plot_reads_the_scale_under_its_new_and_its_old_key():
    """Experiments made before the operating point moved to sample_kde swept kde.bandwidth_scale; newer ones pin
    sample_kde.bandwidth_scale, or leave it `auto` and record the scale calibrate chose (its metric)."""
    ref = {E.LEGACY_BANDWIDTH: 1.0, STEPS: 10}
    old = run("old", {E.LEGACY_BANDWIDTH: 3}, full(3, refined_fid=40.0), reference=ref)
    ref = {BW: "auto", STEPS: 10}
    new = [run(f"pinned-{s}", {BW: s}, full(s, refined_fid=f), reference=ref) for s, f in ((2, 30.0), (4, 50.0))]
    auto = run("auto", {}, full(2.5, refined_fid=35.0, **{BW: 2.5}), reference=ref)  # the reference point
    fid = report([old, *new, auto])[1][0]
    assert fid.lines["refined (stage 2)"].to_dict() == {2.0: 30.0, 2.5: 35.0, 3.0: 40.0, 4.0: 50.0}


def png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plots_written_atomically_linked_and_stale_ones_removed(tmp_path):
    out = tmp_path / "reports" / "ablations.md"
    stale = out.with_suffix("") / "fid_vs_nfe.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    ab, plots, text = report(sweeps())
    written = E.write_outputs(text, plots, out)
    assert sorted(p.name for p in written) == ["fid_vs_bandwidth.png", "memorization_vs_bandwidth.png"]
    assert all(w > 300 and h > 200 for w, h in map(png_size, written))
    assert not stale.exists()  # skipped now: the old file is gone
    assert sorted(p.name for p in (tmp_path / "reports").rglob("*")) == [
        "ablations", "ablations.md", "fid_vs_bandwidth.png", "memorization_vs_bandwidth.png"]  # no temp files
    assert out.read_text() == text
    assert "![FID against the KDE bandwidth scale](ablations/fid_vs_bandwidth.png)" in text
    assert "- Refined FID against the number of network evaluations: skipped: `refine.nfe` does not vary" in text

    grid = [run(f"{sc}{n}", {STEPS: n, SCHED: sc}, full(steps=n, refined_fid=20 + 10 / n))
            for n in (1, 2, 10) for sc in ("geometric", "robbins_monro")]
    _, plots, text = report(grid)
    assert [p.name for p in E.write_outputs(text, plots, out)] == ["fid_vs_nfe.png"]
    png_size(stale)
    assert not (out.with_suffix("") / "fid_vs_bandwidth.png").exists()


def test_plots_skipped_when_their_x_never_varies():
    _, plots, md = report([run(f"eta-{e}", {ETA: e}, full()) for e in (0.5, 1)])
    assert all(p.skipped for p in plots)
    lines = [ln for ln in sections(md)["Plots"].splitlines() if ln.startswith("- ")]
    assert len(lines) == 3 and f"`{BW}` does not vary" in lines[0] and "docs/ablations.md" in lines[0]
    assert f"`dvc exp run --queue -S '{BW}=0.5,1,1.5,2,3'`" in lines[0]
    assert "`dvc exp run --queue -S 'refine.steps=1,2,5,10,20,40'`" in lines[2]
    # x varies, but the experiments stopped before evaluate: said so
    plots = report([run(f"bw-{s}", {BW: s}, {"kde.h": 0.3 * s}) for s in (1, 2)])[1]
    assert f"no completed experiment of the `{BW}` sweep has `eval.kde_fid`" in plots[0].skipped


def test_print_only_and_no_experiments_write_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []
    base = entry("a" * 40, {"params.yaml": {"sample_kde": {"bandwidth_scale": 1.0}}}, name="master")
    exps = [entry(f"{s}" * 40, {"params.yaml": {"sample_kde": {"bandwidth_scale": s}}},
                  {"reports/eval/metrics.json": {"kde_fid": 40.0 * s}}, name=f"bw-{s}") for s in (2, 3)]

    def fake(command, revs, all_commits=False, **kw):
        calls.append((command, all_commits))
        return [[{**base, "experiments": [{"revs": exps}] if len(calls) == 1 else None}]]

    monkeypatch.setattr(E, "exp_show", fake)
    assert E.run_ablation("-") == 0
    out = capsys.readouterr().out
    assert out.startswith("# Ablations\n") and "not written (`--out -`)" in out
    assert E.run_ablation("reports/ablations.md") == 0
    out = capsys.readouterr().out
    assert out == ("ablation: no experiments on baseline `master`; queue a sweep, e.g. `dvc exp run --queue -S "
                   "'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`, then `dvc queue start` (docs/ablations.md has every "
                   "sweep, with the gate overrides). Nothing written.\n")
    assert E.run_ablation("reports/ablations.md", all_commits=True) == 0
    assert "no experiments in the repository" in capsys.readouterr().out
    assert calls == [("ablation", False), ("ablation", False), ("ablation", True)]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- real DVC on a tiny repo


@pytest.mark.slow
def test_real_dvc_commits_experiments_queue_and_errors(tmp_path, monkeypatch, capsys):
    """git + DVC, no pipeline: params.yaml and metrics files committed, experiments saved and queued."""
    env = cli_env()

    def sh(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.strip()

    def state(scale: float, h: float) -> None:
        (tmp_path / "params.yaml").write_text(f"kde: {{bandwidth_scale: {scale}, kernel: gaussian}}\n")
        for stage, values in (("kde", {"h": h, "seconds": 1.0}), ("eval", {"refined_fid": 10 * h})):
            (tmp_path / "reports" / stage).mkdir(parents=True, exist_ok=True)
            (tmp_path / "reports" / stage / "metrics.json").write_text(json.dumps(values))

    dvc = str(VENV_BIN / "dvc")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.invalid"],
                ["git", "config", "user.name", "t"], [dvc, "init", "-q"]):
        sh(*cmd)
    (tmp_path / "dvc.yaml").write_text("stages:\n  kde:\n    cmd: echo\n    params: [kde.bandwidth_scale]\n"
                                       "metrics: [reports/kde/metrics.json, reports/eval/metrics.json]\n")
    for scale, h in ((1, 0.3), (2, 0.6)):
        state(scale, h)
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", f"scale {scale}")
    state(3, 0.9)
    sh(dvc, "exp", "save", "-n", "bw3")
    sh(dvc, "exp", "run", "--queue", "-n", "waiting", "-S", "kde.bandwidth_scale=4")
    monkeypatch.chdir(tmp_path)

    s = sections(E.render_compare(E.collect(["HEAD~1", "HEAD", "bw3"])))
    assert table(s["Params that differ"]) == [{"param": "kde.bandwidth_scale", "HEAD~1": "1", "HEAD": "2", "bw3": "3"}]
    assert [r["metric"] for r in table(s["Metrics that differ"])] == ["kde.h", "eval.refined_fid"]  # not seconds
    assert E.run_compare(["HEAD~1", "HEAD"]) == 0
    md = (tmp_path / "reports/compare.md").read_text()
    assert capsys.readouterr().out == md
    assert table(sections(md)["Metrics that differ"])[0] == {"metric": "kde.h", "HEAD~1": "0.3", "HEAD": "0.6",
                                                             "Δ (HEAD − HEAD~1)": "+0.3"}
    assert [r.label for r in E.collect([])] == ["HEAD", "workspace"]
    with pytest.raises(E.ExperimentsError, match=r"^compare: unknown revision or experiment 'no-such-exp' \("):
        E.collect(["HEAD", "no-such-exp"])

    assert E.run_ablation("-") == 0
    s = sections(capsys.readouterr().out)
    assert [(r["experiment"], r["kde.bandwidth_scale"], r["kde.h"]) for r in table(s["kde.bandwidth_scale"])] == [
        (f"{sh('git', 'branch', '--show-current')} (baseline)", "2", "0.6"), ("bw3", "3", "0.9")]
    assert table(s["Not completed"]) == [{"experiment": "waiting", "state": "queued",
                                          "params changed": "kde.bandwidth_scale=4"}]
