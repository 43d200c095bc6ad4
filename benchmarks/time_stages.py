"""Where a whole run's time goes: run a command that runs stages (default `dvc repro`), stamp each
"Running stage '<name>'" line DVC prints, and print one row per stage: its wall time (from its
start line to the next stage's: process start, imports, DVC's hashing and lock writes included)
and the seconds the stage itself measured (reports/<stage>/timings.json: `seconds`,
`train_seconds`, `score_seconds`, whichever it writes), with the images the feature cache answered.

    python benchmarks/time_stages.py                       # dvc repro in this project
    python benchmarks/time_stages.py --cwd build/first-look -- dvc repro
    python benchmarks/time_stages.py --out benchmarks/results/stage_times.md -- dvc repro -f

The command's own output goes through unchanged (stamped with seconds since the start). A markdown
table is printed at the end and written to --out when given.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
OWN = ("seconds", "train_seconds", "invocation_seconds", "score_seconds")


def own_seconds(root: Path, stage: str) -> tuple[float | None, int | None]:
    """(the stage's own measured seconds, feature-cache hits) from its timings files, if any."""
    from pipeline import registry

    try:
        spec = registry.get(stage)
    except Exception:  # noqa: BLE001 - a stage this checkout does not know
        return None, None
    seconds, hits = None, None
    for out in spec.outs:
        if out.kind != "timings" or not (root / out.path).is_file():
            continue
        t = json.loads((root / out.path).read_text())
        for key in OWN:
            if isinstance(t.get(key), (int, float)):
                seconds = (seconds or 0.0) + float(t[key])
                break
        if isinstance(t.get("feature_cache_hits"), int):
            hits = (hits or 0) + t["feature_cache_hits"]
    return seconds, hits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cwd", default=".", help="the project to run in (default: here)")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("command", nargs="*", help="the command (default: dvc repro); put it after --")
    args = ap.parse_args(argv)
    cmd = args.command or ["dvc", "repro"]
    root = Path(args.cwd).resolve()
    sys.path.insert(0, str(root))
    t0 = time.perf_counter()
    starts: list[tuple[str, float]] = []
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        sys.stdout.write(f"{now:7.1f} {line}")
        sys.stdout.flush()
        m = STAGE_LINE.search(line)
        if m:
            starts.append((m.group(1), now))
    rc = proc.wait()
    total = time.perf_counter() - t0
    rows = ["| stage | wall s | own s | overhead s | feature-cache hits |", "| --- | ---: | ---: | ---: | ---: |"]
    ends = [s for _, s in starts[1:]] + [total]
    for (stage, start), end in zip(starts, ends):
        wall = end - start
        own, hits = own_seconds(root, stage)
        rows.append(f"| {stage} | {wall:.1f} | {'' if own is None else f'{own:.1f}'} | "
                    f"{'' if own is None else f'{max(wall - own, 0.0):.1f}'} | {'' if hits is None else hits} |")
    before = starts[0][1] if starts else total
    rows.append(f"| (before the first stage) | {before:.1f} | | | |")
    rows.append(f"| **total** (`{' '.join(cmd)}`, exit {rc}) | **{total:.1f}** | | | |")
    table = "\n".join(rows)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
