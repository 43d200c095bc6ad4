"""Command line: `python -m pipeline {run,gate,check,stages,preset,dvc-yaml,compare,ablation,first-look,serve} ...`.

    python -m pipeline run fit_kde              # the stage as a Prefect flow
    python -m pipeline run fit_kde --no-prefect # the stage called directly (or DKGM_NO_PREFECT=1)
    python -m pipeline run fit_kde --dry-run    # resolved params and planned outputs, nothing run
    python -m pipeline gate kde                 # evaluate a go/no-go gate (exit 1 on an enforced NO-GO)
    python -m pipeline check                    # validate params.yaml
    python -m pipeline stages                   # the stages (from the stage modules), their params and outputs
    python -m pipeline dvc-yaml                 # write dvc.yaml from the stage modules (--check: only compare)
    python -m pipeline compare HEAD~1 HEAD      # params that differ, metrics side by side (reports/compare.md)
    python -m pipeline ablation                 # every experiment, a table per swept param, plots (reports/ablations.md)
    python -m pipeline serve -- dvc repro       # one local Prefect server for the whole command (make repro)
    python -m pipeline first-look               # the whole chain at smoke scale in its own workspace (make first-look)

Exit status: 0 done, 1 a gate said NO-GO, 2 a bad input (one line on stderr naming what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dkgm.devices import process_rank
from dkgm.errors import DKGMError

EXIT_NO_GO, EXIT_USAGE = 1, 2


def _parser() -> argparse.ArgumentParser:
    from pipeline import registry

    names, gate_names = list(registry.all_stages()), sorted(registry.gates())
    # names are checked by the registry (one line with "did you mean"), not by argparse's choices

    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sp.add_argument("--root", default=".", help="project root that artifact paths are relative to (default: .)")
        sp.add_argument("--dry-run", action="store_true", help="print the resolved params and planned outputs, run nothing")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    run = sub.add_parser("run", help="run one pipeline stage", add_help=False,
                         description="Run one pipeline stage (as a Prefect flow by default). "
                         "`run STAGE --help` also lists that stage's params with their defaults.")
    run.add_argument("-h", "--help", action="store_true", help="show this help (with STAGE: also its params) and exit")
    run.add_argument("stage", nargs="?", metavar="STAGE", help=f"stage name, as in dvc.yaml: {', '.join(names)}")
    run.add_argument("--no-prefect", action="store_true", help="call the stage directly (also: DKGM_NO_PREFECT=1)")
    common(run)

    gate = sub.add_parser("gate", help="evaluate a go/no-go gate", description="Evaluate a gate; exit 1 on an enforced NO-GO.")
    gate.add_argument("name", metavar="NAME", help=f"gate name (dvc.yaml stage gate_<name>): {', '.join(gate_names)}")
    common(gate)

    chk = sub.add_parser("check", help="validate params.yaml", description="Validate params.yaml against the schema.")
    chk.add_argument("--params", default="params.yaml")

    sub.add_parser("stages", help="list the stages, their params sections and outputs")

    pre = sub.add_parser("preset", help="list, show, apply or pass on a params preset (a dataset's setup)",
                         description="Presets are the keys a setup changes (pipeline/presets/NAME.yaml). No NAME: "
                         "list them. NAME: show what it changes against params.yaml. --apply: write it into "
                         "params.yaml (comments kept). --set-args: print `-S key=value` arguments, as in "
                         "`dvc exp run $(python -m pipeline preset NAME --set-args)`.")
    pre.add_argument("name", nargs="?", metavar="NAME", help="preset name")
    how = pre.add_mutually_exclusive_group()
    how.add_argument("--apply", action="store_true", help="write the preset's values into the params file")
    how.add_argument("--set-args", action="store_true", help="print -S arguments for `dvc exp run` on one line")
    pre.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")

    dy = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage modules",
                        description="Write dvc.yaml from the stage modules (commands, artifact and code deps, params, "
                        "outs, metrics, plots), add to params.yaml any section it lacks, at the schema defaults, and set "
                        "each params.yaml key's comment to its description in the stage module. "
                        "--check only compares and exits 1 when dvc.yaml is out of date.")
    dy.add_argument("--check", action="store_true", help="compare only; exit 1 if dvc.yaml or params.yaml's comments differ from the modules")
    dy.add_argument("--root", default=".", help="project root (default: .)")

    cmp = sub.add_parser("compare", help="compare params and metrics of revisions or experiments",
                         description="Print, and write as markdown, the params that differ and the metrics side by side. "
                         "No REV: HEAD against the workspace; one: REV against the workspace; more: those, in order.")
    cmp.add_argument("revs", nargs="*", metavar="REV_OR_EXPERIMENT", help="git commit, branch, tag or `dvc exp run` name")
    cmp.add_argument("--out", default="reports/compare.md", help="markdown file to write (default: reports/compare.md; -: print only)")
    cmp.add_argument("--all", action="store_true", help="every metric, also those equal in every revision")

    abl = sub.add_parser("ablation", help="tabulate and plot the experiments of the documented sweeps",
                         description="Collect DVC's experiments (`dvc exp show`; HEAD's by default), find the swept "
                         "params, and write a table per swept param plus plots (FID and memorization against the bandwidth "
                         "scale, FID against NFE). Queue the sweeps first: docs/ablations.md.")
    abl.add_argument("--out", default="reports/ablations.md",
                     help="markdown file to write; plots go to its name without .md (default: reports/ablations.md; -: print only)")
    abl.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only of HEAD")
    fl = sub.add_parser("first-look", help="the whole pipeline at smoke scale in minutes, in its own workspace",
                        description="Copy the pipeline into its own DVC workspace (default build/first-look/), apply "
                        "the first_look preset (a 600-digit subset, 1.28 kimg per network, small n, no gate enforced) and "
                        "run `dvc repro` there: every stage, the baseline and the comparison, ending in the same "
                        "report, marked as a smoke test. The project's own artifacts are not touched.")
    fl.add_argument("--dir", default="build/first-look", help="the workspace (replaced; default: build/first-look)")
    fl.add_argument("--prefect", action="store_true",
                    help="run the stages as Prefect flows under one local server, as `make repro` does (about a minute "
                    "more: the server's first start in a fresh workspace and ~3 s per stage); default: called directly")
    srv = sub.add_parser("serve", help="run a command with one local Prefect server up (make repro uses it)",
                         description="Start one Prefect server on loopback, run COMMAND with PREFECT_API_URL set to "
                         "it, stop the server afterwards; exit with COMMAND's status. Nothing is started when "
                         "PREFECT_API_URL is set or DKGM_NO_PREFECT=1.")
    srv.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the command, e.g. -- dvc repro")
    p.run_parser = run  # type: ignore[attr-defined]  # `run STAGE --help` prints it with the stage's params
    return p


def _stage_help(stage_name: str) -> str:
    """The params of one stage: every key of its section (and of what it reads) with default and comment."""
    from pipeline import registry
    from pipeline.params import defaults, descriptions, section

    spec = registry.get(stage_name)
    lines = [f"stage {spec.name}: {spec.doc}", f"  command: {spec.command}", "",
             f"params (params.yaml; defaults and descriptions from {(spec.code_module or spec.run.__module__).replace('.', '/')}.py):"]
    sections = ([spec.section] if spec.section else []) + list(spec.reads)
    if not sections:
        lines.append("  none")
    for key in sections:
        value = section(defaults(), key)
        if not hasattr(value, "model_dump"):
            lines.append(f"  {key}: {json.dumps(value)}")
            continue
        comments = descriptions(type(value))
        dumped = value.model_dump(mode="json")
        for name in type(value).model_fields:
            if key != spec.section and key in spec.reads and name not in dumped:
                continue
            note = f"  # {comments[name]}" if comments.get(name) else ""
            lines.append(f"  {key}.{name}: {json.dumps(dumped[name])}{note}")
    return "\n".join(lines)


def _dvc_changes(stage: str, root: Path) -> dict[str, str] | None:
    """{path: why} for what DVC sees changed in this stage's deps and outs; None when the root is no
    DVC project or DVC cannot tell (then nothing is claimed)."""
    import subprocess

    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        return None
    try:
        r = subprocess.run([sys.executable, "-m", "dvc", "status", stage, "--json"], cwd=root, capture_output=True,
                           text=True, timeout=120, check=False)
        entries = json.loads(r.stdout or "{}").get(stage, []) if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return None
    if entries is None:
        return None
    changed: dict[str, str] = {}
    for entry in entries:
        if isinstance(entry, dict):
            for paths in entry.values():
                for path, why in (paths or {}).items():
                    changed[path] = f"{why} since dvc.lock" if why in ("modified", "deleted", "new") else str(why)
        else:
            changed["(stage)"] = str(entry)
    return changed


def _dry_run(stage_name: str, params_path: str, root: Path) -> None:
    from dkgm.devices import resolve_device
    from pipeline import registry
    from pipeline.params import load_params, section

    spec = registry.get(stage_name)
    params = load_params(params_path)
    print(f"stage {spec.name}: {spec.command}")
    print(f"  {spec.doc}")
    print(f"params ({spec.section or 'no section of its own'}):")
    cfg = section(params, spec.section) if spec.section else None
    if cfg is not None:
        for key, value in cfg.model_dump(mode="json").items():
            print(f"  {spec.section}.{key}: {json.dumps(value)}")
    for key in spec.reads:
        value = section(params, key)
        print(f"  {key}: {json.dumps(value.model_dump(mode='json') if hasattr(value, 'model_dump') else value)}")
    if cfg is not None and hasattr(cfg, "device"):
        print(f"device: {spec.section}.device = {cfg.device} -> {resolve_device(cfg.device, f'{spec.section}.device')}")
    changes = _dvc_changes(spec.name, root)
    if changes is None:
        print("inputs (not a DVC project here: staleness unknown):")
    elif not changes:
        print("inputs (DVC: the stage is up to date):")
    else:
        print("inputs (DVC: the stage would re-run):")

    def state(path: str) -> str:
        there = "exists" if (root / path).exists() else "missing"
        if changes is None:
            return there
        return f"{there}, {changes[path]}" if path in changes else f"{there}, as in dvc.lock"

    for d in spec.deps:
        print(f"  {d}  ({state(d)})")
    print("outputs:")
    for o in spec.outs:
        print(f"  {o.path}  ({state(o.path)})")
    if changes and "(stage)" in changes:
        print(f"  DVC: {changes['(stage)']}")


def _out_of_sync_note(stage: str, root: Path) -> None:
    """After a stage ran by hand in a DVC project: its outputs no longer match dvc.lock."""
    if os.environ.get("DVC_STAGE") or not (root / "dvc.yaml").is_file():
        return  # under `dvc repro` (DVC sets DVC_STAGE), or no DVC project
    print(f"note: {stage} rewrote DVC-tracked outputs outside `dvc repro`; `dvc status` shows them as changed: "
          f"`dvc commit {stage}` keeps them, `dvc repro -s {stage}` re-runs it under DVC", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from stages.common import setup_logging

    setup_logging(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return _dispatch(args)
    except DKGMError as exc:  # one line, whatever the message quotes (a key or a value with a line break)
        print("error: " + str(exc).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        return EXIT_USAGE


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline import registry
    from pipeline.params import load_params

    if args.command == "stages":
        for spec in registry.all_stages().values():
            print(f"{spec.name:15s} {spec.doc}")
            params = ", ".join(filter(None, (spec.section, *spec.reads))) or "none"
            if spec.all_params:
                params = "every key (it shows them all)"
            print(f"{'':15s} run: {spec.command}; params: {params}; outs: {', '.join(spec.out_paths)}")
        return 0
    if args.command == "preset":
        return _preset(args)
    if args.command == "serve":
        from pipeline.server import run_with_server

        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        return run_with_server(cmd, Path.cwd())
    if args.command == "dvc-yaml":
        from pipeline.dvcyaml import run_dvc_yaml

        return run_dvc_yaml(Path(args.root), check=args.check)
    if args.command == "check":
        load_params(args.params)
        print(f"{args.params}: ok")
        return 0
    if args.command == "first-look":
        from pipeline.first_look import run_first_look

        return run_first_look(Path("."), Path(args.dir), prefect=args.prefect)
    if args.command == "compare":
        from pipeline.experiments import run_compare

        return run_compare(args.revs, args.out, args.all)
    if args.command == "ablation":
        from pipeline.experiments import run_ablation

        return run_ablation(args.out, args.all_commits)
    if args.command == "gate":
        if args.name not in registry.gates():
            from difflib import get_close_matches

            close = get_close_matches(args.name, registry.gates(), n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise DKGMError(f"unknown gate {args.name!r}{hint}: the gates are {', '.join(registry.gates())}")
        return _gate(registry.gates()[args.name].name, args)

    # run
    if args.stage is None and not args.help:
        raise DKGMError(f"run needs a STAGE: one of {', '.join(registry.all_stages())}")
    if args.help:
        print(_parser().run_parser.format_help().rstrip())
        if args.stage is not None:
            print()
            print(_stage_help(args.stage))
        return 0
    registry.get(args.stage)  # an unknown name: one line with "did you mean"
    if args.dry_run:
        _dry_run(args.stage, args.params, Path(args.root))
        return 0
    load_params(args.params)  # fail fast, before Prefect starts a server
    if registry.get(args.stage).gate:  # a gate is cheap: never worth a Prefect server
        return _gate(args.stage, args)
    from pipeline.runner import check_inputs

    stage = registry.get(args.stage)
    rank = process_rank()[0]
    if rank != 0 and not stage.distributed:  # under torchrun: a single-process stage runs on rank 0 only
        print(f"rank {rank}: {stage.name} runs on rank 0 only", file=sys.stderr)
        return 0
    check_inputs(stage, Path(args.root))
    if rank != 0:  # the other ranks share the work; rank 0 alone reports to Prefect and writes
        from pipeline.runner import run_stage_direct

        run_stage_direct(args.stage, args.params, args.root)
        return 0
    if args.no_prefect or os.environ.get("DKGM_NO_PREFECT", "") not in ("", "0"):
        from pipeline.runner import run_stage_direct

        run_stage_direct(args.stage, args.params, args.root)
    else:
        from pipeline.flows import run_stage

        run_stage(args.stage, str(args.params), str(args.root))
    _out_of_sync_note(args.stage, Path(args.root))
    return 0


def _preset(args: argparse.Namespace) -> int:
    from pipeline import presets

    if args.name is None:
        if args.apply or args.set_args:
            raise DKGMError("preset --apply / --set-args need a NAME: one of " + ", ".join(presets.names()))
        for name in presets.names():
            print(f"{name:18s} {presets.description(name)}")
        return 0
    if args.set_args:
        print(" ".join(presets.set_args(args.name)))
        return 0
    diff = presets.apply(args.name, args.params) if args.apply else presets.changes(args.name, args.params)
    width = max(len(k) for k, _, _ in diff)
    for key, old, new in diff:
        mark = "  " if old == new else "* "
        print(f"{mark}{key:{width}s}  {old!r} -> {new!r}")
    changed = sum(old != new for _, old, new in diff)
    if args.apply:
        print(f"{args.params}: preset {args.name} applied ({changed} values changed); run it with `dvc repro` or "
              "`dvc exp run`; undo with `git checkout " + args.params + "`")
    else:
        print(f"preset {args.name}: {changed} of {len(diff)} values differ from {args.params} (* above). Apply: "
              f"`python -m pipeline preset {args.name} --apply`, or as an experiment: "
              f"`dvc exp run $(python -m pipeline preset {args.name} --set-args)`")
    return 0


def _gate(stage: str, args: argparse.Namespace) -> int:
    if args.dry_run:
        _dry_run(stage, args.params, Path(args.root))
        return 0
    from pipeline.runner import run_stage_direct

    result = run_stage_direct(stage, args.params, Path(args.root))
    _out_of_sync_note(stage, Path(args.root))
    for c in result.failures():
        print(f"gate {result.name}: {result.decision}: {c.line()}", file=sys.stderr)
    if not result.failures():
        print(f"gate {result.name}: GO ({len(result.checks)} checks passed)", file=sys.stderr)
    return EXIT_NO_GO if result.stops else 0


if __name__ == "__main__":
    sys.exit(main())
