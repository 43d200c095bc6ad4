"""The command line: help, dry runs, one-line errors, exit codes."""

from __future__ import annotations

import json

from stages import artifacts, gates
from tests.conftest import run_cli, write_params


def test_help_everywhere(project):
    for args in ([], ["run"], ["gate"]):
        r = run_cli([*args, "--help"], project)
        assert r.returncode == 0 and "usage:" in r.stdout
    assert "fit_kde" in run_cli(["run", "--help"], project).stdout


def test_dry_run_prints_resolved_params_and_outputs_and_writes_nothing(project):
    write_params(project, {"kde": {"topk": 64}})
    r = run_cli(["run", "fit_kde", "--dry-run"], project)
    assert r.returncode == 0, r.stderr
    assert "kde.topk: 64" in r.stdout and artifacts.BANDWIDTH in r.stdout
    assert not (project / "data").exists() and not (project / "reports").exists()
    g = run_cli(["gate", "kde", "--dry-run"], project)
    assert "gates.kde.min_loglik_gain_per_dim" in g.stdout


def test_bad_params_one_line_exit_2(project):
    write_params(project, {"kde": {"bandwidth": 0}})
    r = run_cli(["run", "prepare", "--no-prefect"], project)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == ["error: params.yaml: kde.bandwidth: must be cv, scott, silverman or a positive number (got 0)"]
    assert not (project / "data").exists()


def test_missing_input_one_line_exit_2(project):
    r = run_cli(["run", "sample_kde"], project)  # checked before Prefect would start
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "input not found: data/prepared" in r.stderr


def test_gate_exit_codes_and_one_line_per_failure(project):
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    assert run_cli(["run", "fit_kde", "--no-prefect"], project).returncode == 0
    write_params(project, {"gates": {"kde": {"min_loglik_gain_per_dim": 3.0}}})
    r = run_cli(["gate", "kde"], project)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        line for line in r.stderr.strip().splitlines() if line.startswith("gate kde: NO-GO: loglik_gain_per_dim = ")
    ]
    assert "(gates.kde.min_loglik_gain_per_dim)" in r.stderr
    assert json.loads((project / gates.gate_record("kde")).read_text())["decision"] == "NO-GO"
    write_params(project)
    assert run_cli(["gate", "kde"], project).returncode == 0
