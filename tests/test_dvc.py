"""End to end through DVC on a tiny git + DVC project: repro, no-op, partial re-runs, gates."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from pipeline import paths
from tests.conftest import VENV_BIN, cli_env, set_param

pytestmark = pytest.mark.slow


def dvc(root, *args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=root, env=cli_env(DKGM_NO_PREFECT="1"),
                       capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", result.stdout + result.stderr)


ALL = ["prepare", "fit_kde", "gate_kde", "sample_kde", "train_debiaser", "gate_debiaser", "refine", "reference",
       "evaluate", "gate_eval", "report"]
AFTER_REFINE = ["evaluate", "gate_eval", "report"]


def test_repro_noop_and_partial_rerun(dvc_project):
    root = dvc_project
    first = dvc(root, "repro")
    assert ran(first) == ALL, ran(first)
    assert (root / paths.KDE_SAMPLES / "samples.npy").is_file()
    assert ran(dvc(root, "repro")) == []  # a second repro is a no-op

    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline run"], cwd=root, check=True, capture_output=True)
    h1 = json.loads((root / paths.KDE_METRICS).read_text())["h"]

    # the bandwidth scale re-runs what depends on it and nothing upstream
    exp = dvc(root, "exp", "run", "-S", "kde.bandwidth_scale=2")
    assert ran(exp) == ["fit_kde", "gate_kde", "sample_kde", "train_debiaser", "gate_debiaser", "refine", *AFTER_REFINE], ran(exp)
    assert json.loads((root / paths.KDE_METRICS).read_text())["h"] == pytest.approx(2 * h1)
    diff = json.loads(dvc(root, "params", "diff", "--json").stdout)
    change = diff["params.yaml"]["kde.bandwidth_scale"]
    assert (change["old"], change["new"]) == (1.0, 2)

    # a gate threshold that keeps the decision re-runs the gate (and the report that shows it), not the sampler
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, check=True)
    dvc(root, "checkout", "-q")
    set_param(root, "gates.kde.max_truncation_bound", 0.01)
    assert ran(dvc(root, "repro")) == ["gate_kde", "report"]
    # a sampler setting re-runs the sampler alone: no retraining
    set_param(root, "refine.steps", 3)
    assert ran(dvc(root, "repro")) == ["refine", *AFTER_REFINE]


def test_failing_gate_stops_repro_and_override_continues(dvc_project):
    root = dvc_project
    set_param(root, "gates.kde.min_loglik_gain_per_dim", 5.0)
    r = dvc(root, "repro", check=False)
    assert r.returncode != 0
    assert ran(r) == ["prepare", "fit_kde", "gate_kde"]
    assert "gate kde: NO-GO: loglik_gain_per_dim" in r.stdout + r.stderr
    record = json.loads((root / paths.gate_record("kde")).read_text())
    assert record["decision"] == "NO-GO"
    assert [c["params_key"] for c in record["checks"] if not c["passed"]] == ["gates.kde.min_loglik_gain_per_dim"]
    assert not (root / paths.KDE_SAMPLES).exists()

    set_param(root, "gates.kde.enforce", False)
    r = dvc(root, "repro")
    assert ran(r) == ["gate_kde", "sample_kde", "train_debiaser", "gate_debiaser", "refine", "reference", *AFTER_REFINE], ran(r)
    assert json.loads((root / paths.gate_record("kde")).read_text())["decision"] == "NO-GO (overridden)"
