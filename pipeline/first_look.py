"""`python -m pipeline first-look`: the whole pipeline at smoke scale, in minutes, in a workspace of
its own.

It copies what `dvc repro` needs (dvc.yaml, params.yaml with the `first_look` preset applied, the
code that dvc.yaml lists as dependencies, prefect.toml) into `build/first-look/` (by default),
makes that a DVC project of its own (`dvc init --no-scm`: its cache and lock stay there), and runs
`dvc repro` in it. The stages are called directly (DKGM_NO_PREFECT=1) unless `prefect=True`: a
Prefect server's first start in a fresh workspace takes ~20 s and each flow run ~3 s, a fifth of a
five-minute budget spent on orchestration that `make repro` exercises anyway. The project's own
artifacts, dvc.lock and reports are not touched. It ends by naming the report, whose verdict says
that the run is a smoke test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from dkgm.errors import DKGMError

PRESET = "first_look"
COPIED = ("dvc.yaml", "params.yaml", "prefect.toml", ".dvcignore")
CODE = ("dkgm", "stages", "pipeline")


def dvc_executable() -> str:
    """The venv's dvc (next to this Python, so stage commands use its python), else the one on PATH."""
    here = Path(sys.executable).parent / ("dvc.exe" if os.name == "nt" else "dvc")
    found = str(here) if here.is_file() else shutil.which("dvc")
    if not found:
        raise DKGMError(f"first-look: dvc not found (neither in {here.parent} nor on PATH)")
    return found


def prepare_workspace(root: Path, out: Path) -> Path:
    """A fresh DVC project at `out` holding the pipeline, its code and the preset's params."""
    from pipeline import presets

    here, there = root.resolve(), out.resolve()
    project_entries = {here / p.name for p in here.iterdir() if p.name not in ("build",)}
    if there == here or there in here.parents or there in project_entries:
        raise DKGMError(f"first-look: {out} would overwrite the project itself: choose another --dir "
                        "(default build/first-look)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in COPIED:
        if (root / name).is_file():
            shutil.copy2(root / name, out / name)
    for pkg in CODE:
        shutil.copytree(root / pkg, out / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    presets.apply(PRESET, out / "params.yaml")
    env = _env()
    dvc = dvc_executable()
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=out, env=env, check=True)
    # what `dvc init --no-scm` wrote plus two `dvc config core.<key> false`, without two more dvc starts
    (out / ".dvc" / "config").write_text("[core]\n    no_scm = True\n    analytics = false\n    check_update = false\n")
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ, DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_first_look(root: Path, out: Path, prefect: bool = False) -> int:
    """Prepare the workspace and run `dvc repro` in it; the exit status of the run."""
    t0 = time.perf_counter()
    out = prepare_workspace(root, out)
    print(f"first-look: workspace {out} (preset {PRESET}); running dvc repro", flush=True)
    cmd, env = [dvc_executable(), "repro"], _env()
    if prefect and os.environ.get("DKGM_NO_PREFECT", "") in ("", "0"):
        cmd = [sys.executable, "-m", "pipeline", "serve", "--", *cmd]
    else:
        env["DKGM_NO_PREFECT"] = "1"
    rc = subprocess.run(cmd, cwd=out, env=env, check=False).returncode
    seconds = time.perf_counter() - t0
    report = out / "reports" / "report.html"
    if rc == 0 and report.is_file():
        print(f"first-look: done in {seconds:.0f} s; open {report} (or {out / 'reports' / 'report.md'})")
    else:
        print(f"first-look: dvc repro exited {rc} after {seconds:.0f} s; see the log above", file=sys.stderr)
    return 0 if rc == 0 else rc
