"""The stages under torchrun (2 gloo processes on the CPU) against one process: train_debiaser's
weights match up to float summation order, refine (batches shared by rank, each sample from its own
seed) is bit-identical; rank 0 alone writes the outputs and reports to Prefect."""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import artifacts
from tests.conftest import offline_env, pin_point, run_stages, write_params

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(root: Path, stage: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    # one thread per process on both sides: the same kernels, so refine can be compared bit for bit
    env = offline_env(root.parent / f"net-{root.name}.log", OMP_NUM_THREADS="1", DKGM_NO_PREFECT="0")
    cmd = [sys.executable, "-m", "pipeline", "run", stage, *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(_port()), *cmd[1:]]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root.parent / f"net-{root.name}.log").exists()
    return r


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "base"
    root.mkdir()
    write_params(root, {"sample_kde": {"n_samples": 96}, "refine": {"batch_size": 16}})
    run_stages(root, "prepare", "fit_kde", "gate_kde")
    return root


def _flow_runs(root: Path) -> list[str]:
    db = root / ".prefect" / "prefect.db"
    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("select name from flow_run"))


def test_train_debiaser_and_refine_under_torchrun_match_one_process(base, tmp_path):
    one, two = (tmp_path / "one", tmp_path / "two")
    for d in (one, two):
        shutil.copytree(base, d)
    shutil.copy(Path(__file__).resolve().parents[1] / "prefect.toml", two / "prefect.toml")
    _run(one, "train_debiaser", 1, "--no-prefect")
    r = _run(two, "train_debiaser", 2)  # rank 0 inside a Prefect flow, rank 1 called directly
    a, b = (torch.load(d / artifacts.DEBIASER_SNAPSHOT, weights_only=True) for d in (one, two))
    for k in a["ema"]:  # the same global batch; only the gradient all-reduce's summation order differs
        torch.testing.assert_close(b["ema"][k], a["ema"][k], rtol=1e-4, atol=1e-5, msg=k)
    ma, mb = (json.loads((d / "reports/train/metrics.json").read_text()) for d in (one, two))
    assert mb["val_mse_at_h"] == pytest.approx(ma["val_mse_at_h"], rel=1e-3)
    assert json.loads((two / "reports/train/timings.json").read_text())["world_size"] == 2
    assert _flow_runs(two) == ["train_debiaser"]  # one flow run: rank 1 never talked to Prefect
    assert "Traceback" not in r.stderr

    # refine from the one-process debiaser, alone and on two ranks
    shutil.copy(one / artifacts.DEBIASER_SNAPSHOT, two / artifacts.DEBIASER_SNAPSHOT)
    for d in (one, two):
        run_stages(d, "gate_debiaser")
        pin_point(d)
        run_stages(d, "sample_kde")
    _run(one, "refine", 1, "--no-prefect")
    _run(two, "refine", 2, "--no-prefect")
    for name in ("samples.npy",):
        assert np.array_equal(np.load(one / artifacts.REFINED / name), np.load(two / artifacts.REFINED / name))
    assert (one / "reports/refine/metrics.json").read_bytes() == (two / "reports/refine/metrics.json").read_bytes()
    for rel in ("manifest.parquet", "meta.json"):
        assert (one / artifacts.REFINED / rel).read_bytes() == (two / artifacts.REFINED / rel).read_bytes(), rel
    staging = two / ".dkgm" / "staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_a_single_process_stage_runs_on_rank_0_only(base, tmp_path):
    """prepare has no distributed work: under torchrun rank 1 exits at once, rank 0 runs it."""
    root = tmp_path / "p"
    shutil.copytree(base, root)
    before = (root / artifacts.PREPARED / "data.npy").stat().st_mtime_ns
    env = offline_env(tmp_path / "net.log", RANK="1", WORLD_SIZE="2", DKGM_NO_PREFECT="0")
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "prepare"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 0 and "rank 1: prepare runs on rank 0 only" in r.stderr, r.stderr
    assert (root / artifacts.PREPARED / "data.npy").stat().st_mtime_ns == before and not (root / ".prefect").exists()
