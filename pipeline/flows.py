"""Prefect wrappers: one flow per stage run, tasks that pass paths and small values only.

DVC decides what runs and caches results, so Prefect's own caching and result persistence
are off. Quiet settings live in prefect.toml (home .prefect, analytics off, WARNING logs,
a 120 s server start-up timeout); a process without a PREFECT_API_URL starts a temporary
local server (about 10 s), one started with `prefect server start` is reused and the runs
show in its UI.
"""

from __future__ import annotations

import os
from typing import Any

from dkgm.errors import DKGMError


def _quiet_environment() -> None:
    os.environ.setdefault("DO_NOT_TRACK", "1")


def run_stage(stage: str, params_path: str, root: str) -> dict[str, Any]:
    """Run one stage inside a Prefect flow; user errors come back as DKGMError, not tracebacks."""
    _quiet_environment()
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from pipeline.runner import run_stage_direct

    @task(name=stage, task_run_name=stage, cache_policy=NO_CACHE, persist_result=False, log_prints=False)
    def stage_task(stage: str, params_path: str, root: str):
        try:
            return run_stage_direct(stage, params_path, root)
        except DKGMError as exc:  # a bad input: a failed state with one line, no traceback
            return Failed(message=str(exc))

    # the run is named after its stage (Prefect would pick a random "adjective-animal" name)
    @flow(name=f"dkgm-{stage.replace('_', '-')}", flow_run_name=stage, persist_result=False, log_prints=False,
          validate_parameters=False)
    def stage_flow(stage: str, params_path: str, root: str):
        state = stage_task(stage, params_path, root, return_state=True)
        if state.is_failed():
            return Failed(message=state.message)
        return state.result()

    state = stage_flow(stage, params_path, root, return_state=True)
    if state.is_failed():
        raise DKGMError(state.message or f"stage {stage} failed")
    return state.result()
