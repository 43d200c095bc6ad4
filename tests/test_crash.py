"""Crash safety with real processes: `python -m pipeline run STAGE` is killed with SIGKILL at
seeded random points of its work, several times; after each kill no output of the stage is there
half-written (absent, as before the run, or complete), and a final run ends with exactly the
artifacts of an uninterrupted run (CPU, same seed). train_debiaser resumes from its states."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline import registry
from stages import artifacts
from tests.conftest import cli_env, pin_point, run_stages, write_params

pytestmark = pytest.mark.slow

# a longer tiny run (1.92 kimg, a state every 0.48 kimg: ~7 s of training on 2 cores) so that
# kills land inside the training; 240 KDE samples so that refine takes a few seconds
OVERRIDES = {"debiaser": {"total_kimg": 1.92, "state_every_kimg": 0.48}, "sample_kde": {"n_samples": 240}}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash")
    write_params(root, OVERRIDES)
    run_stages(root, "prepare", "fit_kde", "gate_kde")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _start(root: Path, stage: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", stage, "--no-prefect"], cwd=root,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))


def _run(root: Path, stage: str) -> float:
    log = root / f".{stage}.log"
    t0 = time.perf_counter()
    proc = _start(root, stage, log)
    assert proc.wait(timeout=600) == 0, log.read_text()
    return time.perf_counter() - t0


def _kill_during(root: Path, stage: str, marker: str | None, delay: float) -> bool:
    """Start the stage, wait for `marker` in its log (its work has begun; None: do not wait),
    SIGKILL it `delay` s later. True when it was killed, False when it finished first."""
    log = root / f".{stage}.kill.log"
    proc = _start(root, stage, log)
    deadline = time.monotonic() + 300
    while marker is not None and marker not in log.read_text():
        if proc.poll() is not None:
            break
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text()
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return True


def _outputs(stage: str) -> list[str]:
    return [o.path for o in registry.get(stage).outs]


def _assert_absent_or_complete(root: Path, ref: Path, stage: str, same) -> None:
    """Each declared output is either not there (the run never published) or identical to the
    uninterrupted run's: never a partial file or folder."""
    for rel in _outputs(stage):
        if (root / rel).exists():
            same(root, ref, rel)


def _same_file(root: Path, ref: Path, rel: str) -> None:
    a, b = root / rel, ref / rel
    if b.is_dir():
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()), rel
        for p in b.iterdir():
            _same_file(root, ref, f"{rel}/{p.name}")
    elif rel.endswith(("timings.json", ".png", "log.parquet")):
        assert a.stat().st_size > 0  # times differ between runs; complete is all that is asked
    elif rel.endswith(".pt"):
        sa, sb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
        assert sa.keys() == sb.keys()
        for k in sb["ema"]:
            assert torch.equal(sa["ema"][k], sb["ema"][k]), f"{rel}: EMA weight {k}"
    else:
        assert a.read_bytes() == b.read_bytes(), rel


def _staging_clean(root: Path) -> bool:
    staging = root / ".dkgm" / "staging"
    return not staging.exists() or not any(staging.iterdir())


def _kill_repeatedly(root: Path, ref: Path, stage: str, marker: str | None, seconds: float, seed: int,
                     kills: int = 3, start: float = 0.0) -> int:
    rng = random.Random(seed)
    killed = 0
    for i in range(kills):
        # spread over the stage's working time: early, middle, late (and seeded jitter)
        delay = seconds * (start + (1 - start) * rng.uniform(i / kills, (i + 1) / kills))
        killed += _kill_during(root, stage, marker, delay)
        _assert_absent_or_complete(root, ref, stage, _same_file)
    return killed


def test_train_debiaser_killed_repeatedly_resumes_to_the_uninterrupted_weights(base, tmp_path):
    ref = _copy(base, tmp_path / "ref")
    seconds = _run(ref, "train_debiaser")
    run = _copy(base, tmp_path / "run")
    killed = _kill_repeatedly(run, ref, "train_debiaser", "states in checkpoints", 0.8 * seconds, seed=1)
    assert killed >= 2
    states = sorted((run / "checkpoints" / "debiaser").glob("*/state-*.pt"))
    for st in states:  # every state that is there loads: none is half-written
        torch.load(st, map_location="cpu", weights_only=True)
    _run(run, "train_debiaser")
    for rel in _outputs("train_debiaser"):
        _same_file(run, ref, rel)
    m_ref, m_run = (json.loads((p / "reports/train/metrics.json").read_text()) for p in (ref, run))
    assert m_run == m_ref  # results identical; only the timings file differs
    assert _staging_clean(run)
    assert not list((run / "checkpoints").rglob("*.tmp"))  # a killed state write leaves no temp file behind


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory) -> Path:
    root = _copy(base, tmp_path_factory.mktemp("trained") / "p")
    run_stages(root, "train_debiaser", "gate_debiaser", "reference")
    pin_point(root)
    run_stages(root, "sample_kde")
    return root


def test_refine_killed_repeatedly_then_rerun_gives_identical_samples(trained, tmp_path):
    ref = _copy(trained, tmp_path / "ref")
    seconds = _run(ref, "refine")
    run = _copy(trained, tmp_path / "run")
    # refine logs its progress every 10 s at the earliest: kills are timed from its start, past the imports
    killed = _kill_repeatedly(run, ref, "refine", None, 0.95 * seconds, seed=2, kills=2, start=0.4)
    assert killed >= 1
    assert not (run / artifacts.REFINED).exists() or (run / artifacts.REFINED / "samples.npy").is_file()
    _run(run, "refine")
    for rel in _outputs("refine"):
        _same_file(run, ref, rel)
    assert np.array_equal(np.load(run / artifacts.REFINED / "samples.npy"), np.load(ref / artifacts.REFINED / "samples.npy"))
    assert _staging_clean(run)


def test_evaluate_killed_repeatedly_then_rerun_gives_identical_metrics(trained, tmp_path):
    ref = _copy(trained, tmp_path / "ref")
    _run(ref, "refine")
    run = _copy(ref, tmp_path / "run")
    seconds = _run(ref, "evaluate")
    # evaluate logs only when its features are done: kills are timed from its start, past the imports
    killed = _kill_repeatedly(run, ref, "evaluate", None, 0.95 * seconds, seed=3, kills=2, start=0.4)
    assert killed >= 1
    _run(run, "evaluate")
    for rel in _outputs("evaluate"):
        _same_file(run, ref, rel)
    assert _staging_clean(run)


def test_dvc_repro_killed_repeatedly_ends_with_the_uninterrupted_outputs(dvc_project, tmp_path):
    """SIGKILL the whole `dvc repro` (DVC and the stage it runs, one process group) at seeded points
    of a tiny run's first five stages: after each kill every declared output is absent or identical
    to an uninterrupted run's once the next stage start has recovered the staging folder, and a
    final `dvc repro` ends with the uninterrupted run's dvc.lock hashes and nothing left to do."""
    import os

    from stages.common import recover_staging
    from tests.conftest import VENV_BIN, set_param

    prefix = ["prepare", "fit_kde", "gate_kde", "train_debiaser", "gate_debiaser"]
    root = dvc_project
    for key, value in (("debiaser.total_kimg", 1.92), ("debiaser.state_every_kimg", 0.48)):
        set_param(root, key, value)
    ref = _copy(root, tmp_path / "ref")

    def repro(where: Path, log: Path) -> subprocess.Popen:
        return subprocess.Popen([str(VENV_BIN / "dvc"), "repro", prefix[-1]], cwd=where, env=cli_env(DKGM_NO_PREFECT="1"),
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    t0 = time.perf_counter()
    assert repro(ref, tmp_path / "ref.log").wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()
    seconds = time.perf_counter() - t0
    rng, killed, killed_in = random.Random(21), 0, []
    for i in range(3):
        log = tmp_path / f"kill{i}.log"
        proc = repro(root, log)
        if i == 1:  # one kill inside the training, a seeded moment after DVC started it
            deadline = time.monotonic() + 600
            while "Running stage 'train_debiaser'" not in log.read_text() and proc.poll() is None:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            delay = 3.0 + rng.uniform(0.0, 3.0)  # past the stage's imports (~2.5 s), before its end
        else:
            delay = seconds * rng.uniform(0.1 + 0.4 * i, 0.4 + 0.4 * i)
        try:
            proc.wait(timeout=delay)
            assert proc.returncode == 0, log.read_text()
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            killed += 1
            killed_in += re.findall(r"Running stage '(\w+)'", log.read_text())[-1:]
        recover_staging(root)  # what the next stage's start does
        for stage in prefix:
            _assert_absent_or_complete(root, ref, stage, _same_file)
    assert killed >= 2 and "train_debiaser" in killed_in, killed_in  # at least one kill inside the training
    final = subprocess.run([str(VENV_BIN / "dvc"), "repro", prefix[-1]], cwd=root, env=cli_env(DKGM_NO_PREFECT="1"),
                           capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout + final.stderr
    lock = {r: yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (root, ref)}
    hashes = {r: {o["path"]: o["md5"] for s in prefix for o in lock[r][s].get("outs", [])
                  if not (o["path"].endswith("timings.json") or o["path"] == "reports/train/log.parquet")} for r in lock}
    assert hashes[root] == hashes[ref] and len(hashes[ref]) >= 8
    for stage in prefix:
        for rel in _outputs(stage):
            _same_file(root, ref, rel)
    status = subprocess.run([str(VENV_BIN / "dvc"), "status", prefix[-1], "--json"], cwd=root, env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert status.stdout.strip() in ("{}", ""), status.stdout
    assert _staging_clean(root)
