"""The Prefect path: a stage runs as a flow, and a bad input inside the flow still comes back
as one line (not a traceback). One subprocess, so Prefect's server starts once per test."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys

import pytest

from stages import artifacts, gates, prepare
from tests.conftest import REPO, offline_env, pin_point, run_cli

pytestmark = pytest.mark.slow


def test_stage_runs_as_a_prefect_flow_without_network(project):
    """Prefect's temporary server listens on loopback: with every other connection refused (a
    sitecustomize in each Python process), the stage runs and nothing tried to reach out."""
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    net_log = project / "network-attempts.log"
    r = subprocess.run([sys.executable, "-m", "pipeline", "run", "prepare"], cwd=project, capture_output=True, text=True,
                       env=offline_env(net_log, DKGM_NO_PREFECT="0"), timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads((project / prepare.METRICS).read_text())["n_items"] == 800
    assert (project / ".prefect").is_dir()  # prefect.toml's home: the project, not ~/.prefect
    assert "Traceback" not in r.stderr
    assert not net_log.exists(), net_log.read_text()


SHOW_RUNS = """
from prefect.client.orchestration import get_client
from pipeline.flows import run_stage
run_stage("prepare", "params.yaml", ".")
with get_client(sync_client=True) as client:
    print("runs:", sorted(f.name for f in client.read_flow_runs()), client.api_url)
"""


def test_serve_runs_a_command_against_one_local_server(project):
    """`python -m pipeline serve -- CMD` (what `make repro` runs): one server on loopback for the
    whole command, the stage's flow run recorded in it, the server stopped afterwards; offline."""
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    net_log = project / "network-attempts.log"
    env = offline_env(net_log, DKGM_NO_PREFECT="0")
    env.pop("PREFECT_API_URL", None)
    r = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--", sys.executable, "-c", SHOW_RUNS], cwd=project,
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("runs:"))
    assert "['prepare']" in line and "http://127.0.0.1:" in line
    assert "serve: Prefect server at http://127.0.0.1:" in r.stderr and "serve: Prefect server stopped" in r.stderr
    port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    with socket.socket() as s:  # stopped: nothing listens on its port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert not net_log.exists(), net_log.read_text()
    # the command's own exit status comes back
    r = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--", sys.executable, "-c", "raise SystemExit(3)"],
                       cwd=project, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert r.returncode == 3, r.stderr


def test_bad_input_inside_a_flow_is_one_line(project, monkeypatch):
    shutil.copy(REPO / "prefect.toml", project / "prefect.toml")
    # prepared data from one dataset, a bandwidth from another: only the stage itself can tell
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    (project / "data" / "kde").mkdir(parents=True)
    (project / artifacts.BANDWIDTH).write_text(json.dumps({"h": 0.3, "dataset": "swissroll", "n_train": 3}))
    (project / gates.GATES_DIR).mkdir(parents=True)
    (project / gates.gate_token("kde")).write_text("GO\n")
    pin_point(project)
    r = run_cli(["run", "sample_kde"], project, DKGM_NO_PREFECT="0")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "re-run fit_kde" in errors[0]
    assert not (project / artifacts.KDE_SAMPLES).exists()


def test_flow_and_task_runs_are_named_after_the_stage(project):
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from pipeline.flows import run_stage

    with prefect_test_harness(server_startup_timeout=120):
        metrics = run_stage("prepare", str(project / "params.yaml"), str(project))
        with get_client(sync_client=True) as client:
            flows = client.read_flow_runs()
            tasks = client.read_task_runs()
    assert metrics["n_items"] == 800
    assert [f.name for f in flows] == ["prepare"] and [t.name for t in tasks] == ["prepare"]
