"""The Prefect path: a stage runs as a flow, and a bad input inside the flow still comes back
as one line (not a traceback). One subprocess, so Prefect's server starts once per test."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline import paths
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def test_stage_runs_as_a_prefect_flow(project):
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    r = run_cli(["run", "prepare"], project, DKGM_NO_PREFECT="0")
    assert r.returncode == 0, r.stderr
    assert json.loads((project / paths.PREPARE_METRICS).read_text())["n_items"] == 800
    assert (project / ".prefect").is_dir()  # prefect.toml's home: the project, not ~/.prefect
    assert "Traceback" not in r.stderr


def test_bad_input_inside_a_flow_is_one_line(project, monkeypatch):
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    # prepared data from one dataset, a bandwidth from another: only the stage itself can tell
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    (project / "data" / "kde").mkdir(parents=True)
    (project / paths.KDE_BANDWIDTH).write_text(json.dumps({"h": 0.3, "dataset": "swissroll", "n_train": 3}))
    (project / paths.GATES).mkdir(parents=True)
    (project / paths.gate_token("kde")).write_text("GO\n")
    r = run_cli(["run", "sample_kde"], project, DKGM_NO_PREFECT="0")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "re-run fit_kde" in errors[0]
    assert not (project / paths.KDE_SAMPLES).exists()
