"""Shared fixtures: a tiny project directory with its own params.yaml, and helpers to run stages."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one thread each, stages included
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread count above)
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# small enough for a 2-core machine, large enough for every statistic to be defined
TINY = {
    "prepare": {"limit": 800},
    # a random 800 digits are too few for the KDE to beat its diagonal-Gaussian baseline
    # (-0.05 nats/dim; the full 4,000 give +0.006): the tiny project accepts a small loss
    "gates": {"kde": {"min_loglik_gain_per_dim": -0.2},
              "debiaser": {"max_error_ratio": 0.99, "max_val_mse": 1.0, "max_start_ratio": 10.0},
              # a 0.6-kimg debiaser scored on 20 samples: the tiny project records the gates, never stops at them
              "calibrate": {"enforce": False},
              "eval": {"max_fid_ratio": 1e6, "min_debias_gain": -1e6, "min_zu_pixel": -1e6, "min_zu_inception": -1e6,
                       "copy_allowance": 1.0, "max_authenticity_drop": 1.0}},
    # two scales x two noise levels on a 16-sample probe: seconds
    "calibrate": {"scales": [1.0, 2.0], "etas": [0.0, 1.0], "probe_samples": 16, "pca_dims": 8, "fid_samples": 8},
    # Inception features run at ~8 images/s on 2 cores: 40 reference + 80 test + 2 x 20 samples
    "reference": {"train_images": 40},
    "evaluate": {"n_samples": 20, "kid_subsets": 10, "ct_cells": 2},
    "sample_kde": {"n_samples": 40, "batch_size": 16, "grid_samples": 8},
    "refine": {"precision": "fp32"},
    "sample_baseline": {"n_samples": 20, "batch_size": 16, "precision": "fp32", "steps": 4, "grid_samples": 8},
    "comparison": {"n_samples": 8, "dkgm_steps": [1, 2], "dkgm_solvers": ["euler"], "baseline_steps": [2],
                   "control_noise_steps": 2, "precision": "fp32", "denoise_images": 8},
    # a 0.1M-parameter U-Net for 0.64 kimg: seconds, and it already denoises a little
    "debiaser": {"channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8], "total_kimg": 0.64,
                 "batch_size": 32, "state_every_kimg": 0.32, "eval_images": 50, "warmup_kimg": 0.1, "precision": "fp32"},
}


class StubFeatures(torch.nn.Module):
    """A stand-in for the Inception network, for every test that is not about Inception itself
    (tests/test_inception.py keeps the real one): the (N, 3, 299, 299) network input average-pooled to
    13 x 13 and sent through a fixed random projection and a tanh to 2048 features. It is fast
    (the real network runs at ~8 images/s on 2 cores), deterministic, and distinct images get
    distinct features, which is all the stages' code needs from it."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(20261206)
        self.register_buffer("proj", torch.randn(3 * 13 * 13, 2048, generator=gen) / (3 * 13 * 13) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 13).reshape(x.shape[0], -1)
        return torch.tanh(3.0 * pooled @ self.proj)


@pytest.fixture(scope="session", autouse=True)
def stub_features(tmp_path_factory) -> Path:
    """The stub feature network as a TorchScript file, pinned in the tiny params (reference.weights and its
    SHA-256), so every tiny project scores with it."""
    from dkgm.inception import sha256_file

    import warnings

    path = tmp_path_factory.mktemp("stub_inception") / "stub_features.pt"
    with warnings.catch_warnings():  # torch 2.14 deprecates TorchScript; the pipeline reads Inception as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(StubFeatures().eval()), str(path))
    TINY["reference"].update(weights=str(path), weights_sha256=sha256_file(path))
    return path


def deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = deep_update(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_params(root: Path, overrides: dict | None = None) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = deep_update(raw, deep_update(TINY, overrides or {}))
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project root with a tiny params.yaml (no git, no DVC): for calling stages directly."""
    write_params(tmp_path)
    return tmp_path


FULL_CHAIN = ("prepare", "fit_kde", "gate_kde", "reference", "train_debiaser", "gate_debiaser", "calibrate",
              "gate_calibrate", "sample_kde", "refine")
EVERY_STAGE = (*FULL_CHAIN, "evaluate", "gate_eval", "train_baseline", "sample_baseline", "evaluate_baseline",
               "comparison", "report")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny project after every stage, run once for the whole session (about a minute with the
    stub features): what most tests read. Read it, never write into it: a test that changes files
    takes `tiny_copy`."""
    root = tmp_path_factory.mktemp("tiny_run")
    write_params(root)
    run_stages(root, *EVERY_STAGE)
    return root


@pytest.fixture
def tiny_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny run (artifacts, reports and training states) that a test may change."""
    root = tmp_path / "tiny"
    shutil.copytree(tiny_run, root)
    return root


def pin_point(root: Path, scale: float = 1.0, eta: float = 0.0) -> None:
    """An operating point written by hand, as calibrate would leave it (with its gate's token): for
    tests of sample_kde and what follows that need no trained debiaser."""
    from stages.artifacts import OPERATING_POINT
    from stages.gates import gate_token

    for rel, text in ((OPERATING_POINT, json.dumps({"scale": scale, "eta": eta, "steps": 10, "passed": True})),
                      (gate_token("calibrate"), "GO\n")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def run_stages(root: Path, *stages: str) -> None:
    from pipeline.runner import run_gate, run_stage_direct

    for s in stages:
        if s.startswith("gate_"):
            run_gate(s[len("gate_") :], root / "params.yaml", root)
        else:
            run_stage_direct(s, root / "params.yaml", root)


def set_param(root: Path, dotted: str, value) -> None:
    """Set one key of root/params.yaml (e.g. "kde.bandwidth_scale")."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update({"DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}, **extra)
    return env


NO_NETWORK = REPO / "tests" / "scripts" / "no_network"  # a sitecustomize that allows loopback sockets only


def offline_env(log: Path, **extra: str) -> dict[str, str]:
    """cli_env for processes that must not reach the network: every Python process started with it
    (dvc, prefect, the stages) may connect to loopback only; refused attempts are written to `log`."""
    env = cli_env(**extra)
    env["PYTHONPATH"] = f"{NO_NETWORK}{os.pathsep}{env['PYTHONPATH']}"
    env["DKGM_NET_LOG"] = str(log)
    return env


def run_cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def dvc_project(tmp_path: Path) -> Path:
    """A git + DVC repo holding this project's pipeline files and a tiny params.yaml."""
    root = tmp_path / "proj"
    root.mkdir()
    for name in ("dvc.yaml", "prefect.toml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    write_params(root)
    env = cli_env(DKGM_NO_PREFECT="1")

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "test@example.invalid")
    sh("git", "config", "user.name", "test")
    sh(str(VENV_BIN / "dvc"), "init", "-q")
    sh(str(VENV_BIN / "dvc"), "config", "core.analytics", "false")
    # dvc.yaml lists code deps (dkgm/, stages/, pipeline/): copy them into the project
    for pkg in ("dkgm", "stages", "pipeline"):
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "tiny project")
    return root
