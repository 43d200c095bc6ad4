"""Measure the test suite's teeth: apply deliberate one-line bugs, one at a time, to a copy of the
tracked files and expect the fast tests of the matching files to fail on each.

    .venv/bin/python scripts/mutation_check.py            # all mutations, a table, exit 1 if one survives
    .venv/bin/python scripts/mutation_check.py --list     # what would be applied

Each mutation is a bug a reviewer would plausibly miss (a wrong weight, a dropped factor, a looser
threshold). tests/test_mutations.py checks that every `old` text still occurs exactly once in its
file, so this list fails loudly instead of silently testing nothing when the code moves.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("heun 0.6/0.4 average", "dkgm/sampler.py",
             "x_next = x + (s_hat - s) * 0.5 * (slope + slope2)",
             "x_next = x + (s_hat - s) * (0.6 * slope + 0.4 * slope2)", ("tests/test_sampler.py",)),
    Mutation("EDM c_out without sigma_data", "dkgm/debias.py",
             "c_out = sigma * self.sigma_data / (s2 + sd2).sqrt()",
             "c_out = sigma / (s2 + sd2).sqrt()", ("tests/test_training.py",)),
    Mutation("FID cross term -1.9 (n < d path)", "dkgm/metrics.py",
             "trace1 + np.trace(s2) - 2.0 * cross))", "trace1 + np.trace(s2) - 1.9 * cross))", ("tests/test_metrics.py",)),
    Mutation("EMA half-life doubled", "dkgm/training.py",
             "halflife = cfg.ema_halflife_kimg * 1000", "halflife = cfg.ema_halflife_kimg * 2000",
             ("tests/test_training.py",)),
    Mutation("copy threshold 20% looser (metric)", "dkgm/metrics.py",
             "return float(np.mean(d1 / np.maximum(d2, 1e-12) < threshold))",
             "return float(np.mean(d1 / np.maximum(d2, 1e-12) < 1.2 * threshold))", ("tests/test_metrics.py",)),
    Mutation("copy threshold 20% looser (params.yaml)", "params.yaml",
             "  copy_ratio: 0.3333333333333333  # a sample is a copy",
             "  copy_ratio: 0.4  # a sample is a copy", ("tests/test_metrics.py",)),
    Mutation("Euler step without the step size", "dkgm/sampler.py",
             "x_next = x + a * (d - x)", "x_next = d", ("tests/test_sampler.py",)),
    Mutation("churn noise std sigma_up - sigma_k", "dkgm/sampler.py",
             "x = x + math.sqrt(s * s - ladder.sigmas[k] ** 2) * noise(k, x.shape)",
             "x = x + (s - ladder.sigmas[k]) * noise(k, x.shape)", ("tests/test_sampler.py",)),
    Mutation("truncated log-normal bounds not standardised", "dkgm/debias.py",
             "lo, hi = ((math.log(s) - p_mean) / p_std for s in (sigma_min, sigma_max))",
             "lo, hi = ((math.log(s) - p_mean) for s in (sigma_min, sigma_max))", ("tests/test_training.py",)),
    Mutation("bisection keeps the wrong half", "dkgm/operating_point.py",
             "lo, hi = (lo, mid) if row[\"passed\"] else (mid, hi)",
             "lo, hi = (mid, hi) if row[\"passed\"] else (lo, mid)", ("tests/test_calibrate.py",)),
    Mutation("KID without the diagonal removed", "dkgm/metrics.py",
             "return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))",
             "return float((kxx.sum()) / (m * (m - 1))", ("tests/test_metrics.py",)),
    Mutation("feature cache key without the code digest", "dkgm/feature_cache.py",
             'text = "\\n".join((weights_sha256, resize, device, code))',
             'text = "\\n".join((weights_sha256, resize, device))', ("tests/test_feature_cache.py",)),
    Mutation("feature cache puts computed rows in the wrong place", "dkgm/inception.py",
             "cached_f[i] = new.features[j]", "cached_f[i] = new.features[0]", ("tests/test_feature_cache.py",)),
    # the novelty statistics (issue 21: each one-line change of a statistic must fail a test)
    Mutation("authenticity threshold 10% smaller", "dkgm/novelty.py",
             "return float(np.mean(d > own[idx]))", "return float(np.mean(d > 0.9 * own[idx]))", ("tests/test_novelty.py",)),
    Mutation("Z_U continuity correction of the wrong sign", "dkgm/novelty.py",
             "(u - (m * n / 2 - 0.5))", "(u - (m * n / 2 + 0.5))", ("tests/test_novelty.py",)),
    Mutation("tied ranks not averaged", "dkgm/novelty.py",
             "mean_rank = (starts + ends + 1) / 2.0", "mean_rank = starts + 1.0", ("tests/test_novelty.py",)),
    Mutation("Z_U effect over m + n instead of m n", "dkgm/novelty.py",
             "return z * math.sqrt(m * n * (m + n + 1) / 12) / (m * n)",
             "return z * math.sqrt(m * n * (m + n + 1) / 12) / (m + n)", ("tests/test_novelty.py",)),
    Mutation("C_T weighted by the generated share", "dkgm/novelty.py",
             "value = float((weight[kept] * z[kept]).sum() / weight[kept].sum())",
             "value = float((share[kept] * z[kept]).sum() / share[kept].sum())", ("tests/test_novelty.py",)),
    Mutation("FID bootstrap without re-centring the resample", "dkgm/metrics.py",
             "k = k - k.mean(0) - k.mean(1)[:, None] + k.mean()  # C K C", "k = k  # C K C", ("tests/test_metrics.py",)),
    Mutation("cross-section check off by one", "pipeline/params.py",
             "if ev.n_samples > skde.n_samples:", "if ev.n_samples > skde.n_samples + 1:", ("tests/test_contract.py",)),
)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]


def copy_tree(dst: Path) -> None:
    for rel in tracked_files():
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def apply(root: Path, m: Mutation) -> None:
    path = root / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(f"mutation {m.name!r}: expected the text once in {m.file}, found {text.count(m.old)} times")
    path.write_text(text.replace(m.old, m.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider", *tests],
                       cwd=root, env=env, capture_output=True, text=True, check=False)
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    return r.returncode != 0, time.perf_counter() - t0, failed[0] if failed else r.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--only", default="", help="run the mutations whose name contains this text")
    args = ap.parse_args(argv)
    mutations = [m for m in MUTATIONS if args.only.lower() in m.name.lower()]
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.file}: {m.old!r} -> {m.new!r}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        broken, secs, last = run_tests(clean, tuple(sorted({t for m in mutations for t in m.tests})))
        if broken:
            print(f"the unmutated fast tests fail ({last}): fix them first", file=sys.stderr)
            return 2
        print(f"{'mutation':42s} {'tests':26s} {'result':9s} {'s':>6s}  first failure")
        survived = 0
        for m in mutations:
            work = Path(tmp) / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(clean, work)
            apply(work, m)
            caught, secs, first = run_tests(work, m.tests)
            survived += not caught
            print(f"{m.name:42s} {','.join(Path(t).name for t in m.tests):26s} {'caught' if caught else 'SURVIVED':9s} "
                  f"{secs:6.1f}  {first if caught else ''}")
        print(f"{len(mutations) - survived} of {len(mutations)} mutations caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
