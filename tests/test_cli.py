"""The command line: help, dry runs, one-line errors, exit codes."""

from __future__ import annotations

import json

from pipeline import registry
from stages import artifacts, gates
from tests.conftest import run_cli, write_params

STAGES = list(registry.all_stages())


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


def _errors(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def test_unknown_names_get_did_you_mean(project):
    r = run_cli(["run", "refin"], project)
    assert r.returncode == 2
    assert _errors(r) == [f"error: unknown stage 'refin' (did you mean refine?): the stages are {', '.join(STAGES)}"]
    r = run_cli(["gate", "kd"], project)
    assert r.returncode == 2
    assert _errors(r) == [f"error: unknown gate 'kd' (did you mean kde?): the gates are {', '.join(registry.gates())}"]
    r = run_cli(["run"], project)
    assert r.returncode == 2 and _errors(r) == [f"error: run needs a STAGE: one of {', '.join(STAGES)}"]
    write_params(project, {"refine": {"stepz": 3}})
    r = run_cli(["check"], project)
    assert r.returncode == 2 and len(_errors(r)) == 1 and "refine.stepz" in r.stderr and "did you mean refine.steps" in r.stderr


def test_run_gate_stage_works_and_a_no_go_names_the_gate_downstream(project):
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    assert run_cli(["run", "fit_kde", "--no-prefect"], project).returncode == 0
    ok = run_cli(["run", "gate_kde"], project)  # the dvc.yaml name works as well as `gate kde`
    assert ok.returncode == 0 and _errors(ok) == ["gate kde: GO (3 checks passed)"]
    write_params(project, {"gates": {"kde": {"min_loglik_gain_per_dim": 3.0}}})
    assert run_cli(["run", "gate_kde"], project).returncode == 1
    assert not (project / gates.gate_token("kde")).exists()
    r = run_cli(["run", "train_debiaser"], project)
    assert r.returncode == 2
    assert _errors(r) == [f"error: stage train_debiaser: gate kde said NO-GO (see {gates.gate_record('kde')}); fix what "
                          "it names, or set gates.kde.enforce: false to continue anyway"]


def test_device_errors_name_their_key(project, monkeypatch):
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has CUDA: the missing-device message cannot be provoked")
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    write_params(project, {"kde": {"device": "cuda"}})
    r = run_cli(["run", "fit_kde", "--no-prefect"], project)
    assert r.returncode == 2
    assert _errors(r) == ["error: kde.device: 'cuda' but this machine has no CUDA device: set kde.device to auto or cpu"]
    from dkgm.devices import resolve_device
    from dkgm.errors import DKGMError

    try:
        resolve_device("tpu", "refine.device")
    except DKGMError as exc:
        assert str(exc) == "refine.device: 'tpu' is not a device (use auto, cpu, cuda or cuda:N)"
    else:
        raise AssertionError("an unknown device was accepted")


def test_run_outside_dvc_says_the_outputs_are_out_of_sync(project):
    (project / "dvc.yaml").write_text("stages: {}\n")  # a DVC project (the note needs no DVC run)
    r = run_cli(["run", "prepare", "--no-prefect"], project)
    assert r.returncode == 0
    notes = [ln for ln in r.stderr.splitlines() if ln.startswith("note:")]
    assert notes == ["note: prepare rewrote DVC-tracked outputs outside `dvc repro`; `dvc status` shows them as "
                     "changed: `dvc commit prepare` keeps them, `dvc repro -s prepare` re-runs it under DVC"]
    under_dvc = run_cli(["run", "prepare", "--no-prefect"], project, DVC_STAGE="prepare")  # as `dvc repro` runs it
    assert under_dvc.returncode == 0 and "note:" not in under_dvc.stderr


def test_stage_help_lists_its_params_with_defaults_and_comments(project):
    r = run_cli(["run", "refine", "--help"], project)
    assert r.returncode == 0 and "usage:" in r.stdout
    assert "stage refine: " in r.stdout
    assert '  refine.steps: 10  # K ladder steps (NFE = K with euler, 2K - 1 with heun)' in r.stdout
    assert '  refine.device: "auto"  # auto | cpu | cuda | cuda:N' in r.stdout
    gate = run_cli(["run", "gate_eval", "--help"], project)
    assert '  gates.eval.enforce: true  # false: record "NO-GO (overridden)" and continue' in gate.stdout


def test_dry_run_shows_the_device_and_the_state_of_each_input(project):
    assert run_cli(["run", "prepare", "--no-prefect"], project).returncode == 0
    r = run_cli(["run", "fit_kde", "--dry-run"], project)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "device: kde.device = auto -> cpu" in lines or "device: kde.device = auto -> cuda" in lines
    assert "inputs (not a DVC project here: staleness unknown):" in lines
    assert f"  {artifacts.PREPARED}  (exists)" in lines
    assert f"  {artifacts.BANDWIDTH}  (missing)" in lines


def test_stages_lists_the_keys_read_through_other_sections(project):
    r = run_cli(["stages"], project)
    assert r.returncode == 0 and "params: ;" not in r.stdout
    lines = dict(zip(*[iter(r.stdout.splitlines())] * 2))
    by_name = {head.split()[0]: body for head, body in lines.items()}
    assert set(by_name) == set(registry.all_stages())
    assert "params: evaluate.n_samples, evaluate.batch_size" in by_name["evaluate_baseline"]
    assert "params: baseline, debiaser.arch, " in by_name["train_baseline"]
    assert "params: every key" in by_name["report"]
