"""`python -m pipeline compare [REV_OR_EXPERIMENT ...]`: params that differ, metrics side by side.

    python -m pipeline compare                  # HEAD against the workspace (like `dvc metrics diff`)
    python -m pipeline compare HEAD~1           # HEAD~1 against the workspace
    python -m pipeline compare HEAD~1 HEAD      # two revisions: adds a delta column (right minus left)
    python -m pipeline compare main bw3 bw4     # any number of commits, branches, tags, `dvc exp run` names
    python -m pipeline compare HEAD~1 HEAD --out -             # print only
    python -m pipeline compare HEAD~1 HEAD --out cmp/bw.md     # default: reports/compare.md

The table is printed and written as markdown. It has two parts: the params whose values differ
between the compared revisions (no other params), and the metrics that differ (`--all`: every
metric found in any of them), with `—` where a revision has no value. Timings are not metrics
(each stage writes them to its own timings.json), so identical runs compare as equal.

Where the values come from: one `dvc exp show --json --num 1 --rev REV` per revision (with
`--hide-workspace` when the workspace is not compared; without it the same call also returns the
workspace). DVC resolves REV itself, so commits, branches, tags and experiment names made by
`dvc exp run` all work, and each entry carries the revision's full params files and the metrics
files listed under `metrics:` in dvc.yaml. (`dvc params diff`/`dvc metrics diff` compare only two
revisions, take the workspace only as the second one, and with `--all` they return nothing when both
revisions are the same commit, so they are not used.)

Row names:
  params   `section.key` for params.yaml (e.g. `kde.bandwidth_scale`); `FILE:section.key` for any
           other params file.
  metrics  `STAGE.key` for `reports/STAGE/metrics.json` (e.g. `kde.h` is `h` in
           reports/kde/metrics.json, `sample_kde.h` the one in reports/sample_kde/metrics.json);
           `PATH:key` for a metrics file anywhere else. Nested keys are joined with dots.
Numbers have 5 significant digits; booleans are `true`/`false`, a null param is `null`.

Errors (one line, exit status 2 through the CLI): an unknown revision or experiment, or not being
inside a DVC repository.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dkgm.atomic import write_atomic
from dkgm.errors import DKGMError

DEFAULT_OUT = "reports/compare.md"
WORKSPACE = "workspace"
MISSING = "—"
MAX_CELL = 40  # longer text values are shortened in the table
PARAMS_FILE = "params.yaml"
METRICS_PREFIX, METRICS_SUFFIX = "reports/", "/metrics.json"


class CompareError(DKGMError):
    """The comparison cannot be made: a bad revision, no DVC repository, DVC failing."""


@dataclass
class Snapshot:
    """One compared revision: the label the user gave, the commit DVC resolved, flat params and metrics."""

    label: str
    rev: str  # full commit sha, or "workspace"
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- parsing DVC's JSON


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one level with dotted keys; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def metric_name(path: str, key: str) -> str:
    """`reports/kde/metrics.json`, `h` -> `kde.h`; any other file -> `PATH:key`."""
    path = path.replace(os.sep, "/")
    if path.startswith(METRICS_PREFIX) and path.endswith(METRICS_SUFFIX):
        stage = path[len(METRICS_PREFIX) : -len(METRICS_SUFFIX)]
        if stage:
            return f"{stage}.{key}"
    return f"{path}:{key}"


def param_name(path: str, key: str) -> str:
    """params.yaml keys stay `section.key`; another params file's get `FILE:` in front."""
    return key if path.replace(os.sep, "/") == PARAMS_FILE else f"{path}:{key}"


def _files(section: Any) -> dict[str, dict[str, Any]]:
    """{path: flat values} from an exp show `params`/`metrics` block; files that failed to load are left out."""
    out: dict[str, dict[str, Any]] = {}
    for path, entry in (section or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("data"), dict):
            out[path] = flatten(entry["data"])
    return out


def snapshot_from_entry(entry: dict[str, Any], label: str) -> Snapshot:
    """A Snapshot from one top-level entry of `dvc exp show --json` (the workspace or a baseline commit)."""
    data = entry.get("data") or {}
    params = {param_name(p, k): v for p, values in _files(data.get("params")).items() for k, v in values.items()}
    metrics = {metric_name(p, k): v for p, values in _files(data.get("metrics")).items() for k, v in values.items()}
    return Snapshot(label=label, rev=str(entry.get("rev") or data.get("rev") or ""), params=params, metrics=metrics)


def split_exp_show(entries: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(workspace entry, baseline entry) of one `dvc exp show --json --num 1 [--rev REV]` answer."""
    workspace = next((e for e in entries if e.get("rev") == WORKSPACE), None)
    baseline = next((e for e in entries if e.get("rev") != WORKSPACE), None)
    return workspace, baseline


# ----------------------------------------------------------------------------- rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def same(a: Any, b: Any) -> bool:
    """Equal values (1 == 1.0; True is not 1; NaN equals NaN)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if _is_number(a) and _is_number(b):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


_ABSENT = object()


def _union_keys(dicts: list[dict[str, Any]]) -> list[str]:
    keys: dict[str, None] = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def param_rows(snaps: list[Snapshot]) -> list[list[str]]:
    """[name, value per snapshot] for each param whose value is not the same in all snapshots."""
    rows = []
    for key in _union_keys([s.params for s in snaps]):
        values = [s.params.get(key, _ABSENT) for s in snaps]
        first = values[0]
        if all(v is not _ABSENT and first is not _ABSENT and same(first, v) for v in values[1:]):
            continue
        rows.append([key, *(MISSING if v is _ABSENT else fmt(v) for v in values)])
    return rows


def metric_rows(snaps: list[Snapshot], everything: bool = False) -> list[list[str]]:
    """[name, value per snapshot (+ delta, right minus left, for exactly two)] for the metrics that
    differ between the snapshots (every metric in any of them with `everything`)."""
    rows = []
    for key in _union_keys([s.metrics for s in snaps]):
        values = [s.metrics.get(key, _ABSENT) for s in snaps]
        if not everything and all(v is not _ABSENT and same(values[0], v) for v in values[1:]) and \
                values[0] is not _ABSENT:
            continue
        row = [key, *(MISSING if v is _ABSENT else fmt(v) for v in values)]
        if len(snaps) == 2:
            row.append(fmt_delta(values[0], values[1]))
        rows.append(row)
    return rows


def fmt(v: Any) -> str:
    """A value for the table: 5 significant digits for floats, ints whole, JSON for anything else;
    text longer than MAX_CELL characters is shortened."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.5g}"
    text = v if isinstance(v, str) else json.dumps(v)
    # a long note (e.g. why IS is null) would widen every row of the padded table
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def fmt_delta(a: Any, b: Any) -> str:
    """b - a for two numbers (signed, 5 significant digits); `—` otherwise."""
    if not (_is_number(a) and _is_number(b)):
        return MISSING
    d = b - a
    if d == 0:
        return "0"
    return f"{d:+d}" if isinstance(d, int) else f"{d:+.5g}"


# ----------------------------------------------------------------------------- markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, padded so that it also reads as plain text; value columns right-aligned."""
    cells = [[_cell(c) for c in r] for r in [header, *rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    rule = "| " + " | ".join(":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def render(snaps: list[Snapshot], everything: bool = False) -> str:
    """The whole report: a title, the revisions compared, the params that differ, the metrics that
    differ (all of them with `everything`)."""
    labels = [s.label for s in snaps]
    described = ", ".join(f"`{s.label}`" + ("" if s.rev in (WORKSPACE, s.label) else f" ({s.rev[:7]})") for s in snaps)
    out = [f"# Compare: {' vs '.join(labels)}", "", f"Revisions: {described}.", "", "## Params that differ", ""]
    prows = param_rows(snaps)
    out += [md_table(["param", *labels], prows) if prows else "No params differ.", "",
            "## Metrics" if everything else "## Metrics that differ", ""]
    mrows = metric_rows(snaps, everything)
    header = ["metric", *labels] + ([f"Δ ({labels[1]} − {labels[0]})"] if len(snaps) == 2 else [])
    total = len(_union_keys([s.metrics for s in snaps]))
    if mrows:
        out += [md_table(header, mrows)]
        if not everything:
            out += ["", f"{total - len(mrows)} of {total} metrics are equal in every revision (`--all` lists them)."]
    elif total:
        out += [f"All {total} metrics are equal in every revision (`--all` lists them)."]
    else:
        out += ["No metrics in any of them (dvc.yaml `metrics:` files)."]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- running DVC


def dvc_executable() -> str:
    """The venv's dvc (next to this Python), else the one on PATH."""
    here = Path(sys.executable).parent / ("dvc.exe" if os.name == "nt" else "dvc")
    if here.is_file():
        return str(here)
    found = shutil.which("dvc")
    if not found:
        raise CompareError(f"compare: dvc not found (neither in {here.parent} nor on PATH)")
    return found


def dvc_error(stderr: str, rev: str | None) -> CompareError:
    """One clear line for a failed `dvc exp show`."""
    text = stderr.strip()
    if "not inside of a DVC repository" in text:
        return CompareError("compare: not inside a DVC repository (run it in the project, where `dvc init` was run)")
    if rev is not None and "unknown Git revision" in text:
        return CompareError(
            f"compare: unknown revision or experiment '{rev}' (not a git commit, branch or tag, nor a `dvc exp run` name)"
        )
    if rev is not None and "ambiguous" in text:
        return CompareError(f"compare: ambiguous revision or experiment '{rev}' (give the commit sha instead)")
    errors = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("ERROR")]
    detail = errors[-1] if errors else (text.splitlines()[-1] if text else "no output")
    what = f" for '{rev}'" if rev is not None else ""
    return CompareError(f"compare: dvc exp show failed{what}: {detail}")


def exp_show(rev: str | None, with_workspace: bool, cwd: str | Path | None = None) -> list[dict[str, Any]]:
    """The parsed `dvc exp show --json --num 1` for one revision (None: HEAD)."""
    cmd = [dvc_executable(), "exp", "show", "--json", "--num", "1", "--hide-queued", "--hide-failed"]
    if rev is not None:
        cmd += ["--rev", rev]
    if not with_workspace:
        cmd.append("--hide-workspace")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise dvc_error(r.stderr, rev)
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError as exc:
        raise CompareError(f"compare: could not parse the JSON of `dvc exp show` ({exc})") from exc


def collect(revs: list[str], cwd: str | Path | None = None) -> list[Snapshot]:
    """Snapshots in table order: none -> HEAD, workspace; one -> REV, workspace; more -> those revisions."""
    if len(revs) <= 1:
        rev = revs[0] if revs else None
        workspace, baseline = split_exp_show(exp_show(rev, with_workspace=True, cwd=cwd))
        if workspace is None or baseline is None:
            raise CompareError(f"compare: dvc exp show returned no {'workspace' if workspace is None else rev or 'HEAD'}")
        return [snapshot_from_entry(baseline, rev or "HEAD"), snapshot_from_entry(workspace, WORKSPACE)]
    snaps = []
    for rev in revs:
        _, baseline = split_exp_show(exp_show(rev, with_workspace=False, cwd=cwd))
        if baseline is None:
            raise CompareError(f"compare: dvc exp show returned nothing for '{rev}'")
        snaps.append(snapshot_from_entry(baseline, rev))
    return snaps


def run_compare(revs: list[str], out: str = DEFAULT_OUT, everything: bool = False) -> int:
    """The CLI command: print the report and write it to `out` (`-`: print only)."""
    text = render(collect(revs), everything)
    print(text, end="")
    if out != "-":
        path = write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        print(f"wrote {path}", file=sys.stderr)
    return 0
