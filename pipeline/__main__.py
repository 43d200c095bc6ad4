"""Command line: `python -m pipeline {run,gate,check,stages,compare,ablation} ...`.

    python -m pipeline run fit_kde              # the stage as a Prefect flow
    python -m pipeline run fit_kde --no-prefect # the stage called directly (or DKGM_NO_PREFECT=1)
    python -m pipeline run fit_kde --dry-run    # resolved params and planned outputs, nothing run
    python -m pipeline gate kde                 # evaluate a go/no-go gate (exit 1 on an enforced NO-GO)
    python -m pipeline check                    # validate params.yaml
    python -m pipeline compare HEAD~1 HEAD      # params that differ, metrics side by side (reports/compare.md)
    python -m pipeline ablation                 # every experiment, a table per swept param, plots (reports/ablations.md)

Exit status: 0 done, 1 a gate said NO-GO, 2 a bad input (one line on stderr naming what to fix).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from dkgm.errors import DKGMError

EXIT_NO_GO, EXIT_USAGE = 1, 2


def _parser() -> argparse.ArgumentParser:
    from pipeline.registry import GATE_STAGES, RUNNABLE

    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        sp.add_argument("--root", default=".", help="project root that artifact paths are relative to (default: .)")
        sp.add_argument("--dry-run", action="store_true", help="print the resolved params and planned outputs, run nothing")
        sp.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")

    run = sub.add_parser("run", help="run one pipeline stage", description="Run one pipeline stage (as a Prefect flow by default).")
    run.add_argument("stage", choices=RUNNABLE, help="stage name, as in dvc.yaml")
    run.add_argument("--no-prefect", action="store_true", help="call the stage directly (also: DKGM_NO_PREFECT=1)")
    common(run)

    gate = sub.add_parser("gate", help="evaluate a go/no-go gate", description="Evaluate a gate; exit 1 on an enforced NO-GO.")
    gate.add_argument("name", choices=sorted(GATE_STAGES), help="gate name (dvc.yaml stage gate_<name>)")
    common(gate)

    chk = sub.add_parser("check", help="validate params.yaml", description="Validate params.yaml against the schema.")
    chk.add_argument("--params", default="params.yaml")

    sub.add_parser("stages", help="list the stages, their params sections and outputs")

    cmp = sub.add_parser("compare", help="compare params and metrics of revisions or experiments",
                         description="Print, and write as markdown, the params that differ and the metrics side by side. "
                         "No REV: HEAD against the workspace; one: REV against the workspace; more: those, in order.")
    cmp.add_argument("revs", nargs="*", metavar="REV_OR_EXPERIMENT", help="git commit, branch, tag or `dvc exp run` name")
    cmp.add_argument("--out", default="reports/compare.md", help="markdown file to write (default: reports/compare.md; -: print only)")

    abl = sub.add_parser("ablation", help="tabulate and plot the experiments of the documented sweeps",
                         description="Collect the experiments of `dvc exp show --json` (HEAD's by default), find the swept "
                         "params, and write a table per swept param plus plots (FID and memorization against the bandwidth "
                         "scale, FID against NFE). Queue the sweeps first: docs/ablations.md.")
    abl.add_argument("--out", default="reports/ablations.md",
                     help="markdown file to write; plots go to its name without .md (default: reports/ablations.md; -: print only)")
    abl.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only of HEAD")
    return p


def _dry_run(stage_name: str, params_path: str) -> None:
    from pipeline.params import load_params, section
    from pipeline.registry import STAGES

    spec = STAGES[stage_name]
    cfg = section(load_params(params_path), spec.section)
    print(f"stage {spec.name}: {spec.cmd}")
    print(f"params ({spec.section}):")
    for key, value in cfg.model_dump().items():
        print(f"  {spec.section}.{key}: {json.dumps(value)}")
    print("inputs:")
    for d in spec.deps:
        print(f"  {d}")
    print("outputs:")
    for o in spec.outs:
        print(f"  {o}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from stages.common import setup_logging

    setup_logging(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        return _dispatch(args)
    except DKGMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _dispatch(args: argparse.Namespace) -> int:
    from pipeline.params import load_params
    from pipeline.registry import GATE_STAGES, STAGES

    if args.command == "stages":
        for spec in STAGES.values():
            print(f"{spec.name:12s} params: {spec.section:12s} outs: {', '.join(spec.outs)}")
        return 0
    if args.command == "check":
        load_params(args.params)
        print(f"{args.params}: ok")
        return 0
    if args.command == "compare":
        from pipeline.compare import run_compare

        return run_compare(args.revs, args.out)
    if args.command == "ablation":
        from pipeline.ablation import run_ablation

        return run_ablation(args.out, args.all_commits)
    if args.command == "gate":
        if args.dry_run:
            _dry_run(GATE_STAGES[args.name].name, args.params)
            return 0
        from pipeline.runner import run_gate

        result = run_gate(args.name, args.params, Path(args.root))
        for c in result.failures():
            print(f"gate {args.name}: {result.decision}: {c.line()}", file=sys.stderr)
        if not result.failures():
            print(f"gate {args.name}: GO ({len(result.checks)} checks passed)", file=sys.stderr)
        return EXIT_NO_GO if result.stops else 0

    # run
    if args.dry_run:
        _dry_run(args.stage, args.params)
        return 0
    load_params(args.params)  # fail fast, before Prefect starts a server
    from pipeline.runner import check_inputs

    check_inputs(args.stage, Path(args.root))
    if args.no_prefect or os.environ.get("DKGM_NO_PREFECT", "") not in ("", "0"):
        from pipeline.runner import run_stage_direct

        run_stage_direct(args.stage, args.params, args.root)
    else:
        from pipeline.flows import run_stage

        run_stage(args.stage, str(args.params), str(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
