"""End to end through DVC on a tiny git + DVC project: repro, no-op, partial re-runs, gates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from stages import artifacts, fit_kde, gates, sample_kde
from tests.conftest import VENV_BIN, cli_env, offline_env, run_cli, set_param

pytestmark = pytest.mark.slow


def dvc(root, *args, check=True, env=None) -> subprocess.CompletedProcess:
    r = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=root, env=env or cli_env(DKGM_NO_PREFECT="1"),
                       capture_output=True, text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def ran(result: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", result.stdout + result.stderr)


ALL = ["prepare", "fit_kde", "gate_kde", "train_debiaser", "gate_debiaser", "reference", "calibrate", "gate_calibrate",
       "sample_kde", "refine", "evaluate", "gate_eval", "train_baseline", "sample_baseline", "evaluate_baseline",
       "comparison", "report"]
AFTER_REFINE = ["evaluate", "gate_eval", "comparison", "report"]


def test_repro_noop_and_partial_rerun(dvc_project):
    root = dvc_project
    # the whole default pipeline (tiny configuration) with the network blocked: every Python process
    # (dvc and each stage) may connect to loopback only, and none tried anything else
    net_log = root.parent / "network-attempts.log"
    first = dvc(root, "repro", env=offline_env(net_log, DKGM_NO_PREFECT="1"))
    assert ran(first) == ALL, ran(first)
    assert not net_log.exists(), net_log.read_text()
    assert (root / artifacts.KDE_SAMPLES / "samples.npy").is_file()
    assert ran(dvc(root, "repro")) == []  # a second repro is a no-op
    dry = run_cli(["run", "refine", "--dry-run"], root)
    assert "inputs (DVC: the stage is up to date):" in dry.stdout and f"  {artifacts.KDE_SAMPLES}  (exists, as in dvc.lock)" in dry.stdout
    assert _changed_stages(root) == set()
    assert_edits_mark_exactly_the_importers(root)

    subprocess.run(["git", "add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline run"], cwd=root, check=True, capture_output=True)
    h_kde = json.loads((root / fit_kde.METRICS).read_text())["h"]

    # a DVC remote round trip (a local folder as the remote): push, lose the cache and every cached
    # output, pull: the workspace is whole again and `dvc repro` has nothing to do
    remote = root.parent / "remote"
    dvc(root, "remote", "add", "-d", "store", str(remote))
    dvc(root, "push")
    refined = (root / artifacts.REFINED / "samples.npy").read_bytes()
    for rel in (".dvc/cache", "data", "models"):
        shutil.rmtree(root / rel)
    assert dvc(root, "status", "--json").stdout.strip() not in ("{}", "")
    dvc(root, "pull")
    assert (root / artifacts.REFINED / "samples.npy").read_bytes() == refined
    assert dvc(root, "status", "--json").stdout.strip() in ("{}", "")
    assert ran(dvc(root, "repro")) == []

    # an experiment in a temporary workspace (as `dvc exp run --queue` runs them) resumes from the
    # project's training states: a longer budget continues the finished run instead of starting over
    states = sorted((root / "checkpoints" / "debiaser").glob("*/state-*.pt"))
    longer = float(yaml.safe_load((root / "params.yaml").read_text())["debiaser"]["total_kimg"]) + 0.32
    exp = dvc(root, "exp", "run", "--temp", "train_debiaser", "-S", f"debiaser.total_kimg={longer}")
    out = exp.stdout + exp.stderr
    assert f"resumed from a state at {int(round((longer - 0.32) * 1000))} images" in out, out
    new_states = sorted((root / "checkpoints" / "debiaser").glob("*/state-*.pt"))
    assert new_states[-1].name == f"state-{int(round(longer * 1000)):09d}.pt" and new_states[-1] not in states
    assert not list((root / ".dvc" / "tmp" / "exps").rglob("state-*.pt"))  # none left in the temporary copy

    # an identical run of the prefix that has randomness in it (the data split, the bandwidth search and the
    # training, from scratch) gives identical metrics and artifacts: timings live in timings.json, which is
    # no DVC metric, so `dvc metrics diff` prints nothing at all, and what follows is still up to date
    timings = json.loads((root / "reports/train/timings.json").read_text())
    assert timings["train_seconds"] > 0 and timings["images_per_second"] > 0
    prefix = ["prepare", "fit_kde", "gate_kde", "train_debiaser", "gate_debiaser"]
    before = _lock_hashes(root, prefix)
    shutil.rmtree(root / "checkpoints")
    assert ran(dvc(root, "repro", "-f", "gate_debiaser")) == prefix
    assert dvc(root, "metrics", "diff").stdout.strip() == ""
    assert json.loads(dvc(root, "metrics", "diff", "--json").stdout) == {}
    assert _lock_hashes(root, prefix) == before  # the data, the bandwidth, the network: byte for byte
    # downstream, only what reads the wall-clock columns (timings.json, the training log's images/s) is stale
    stale = {dep for stage in json.loads(dvc(root, "status", "--json").stdout or "{}").values() for change in stage
             if isinstance(change, dict) for dep in change.get("changed deps", {})}
    assert stale and all(d.endswith("timings.json") or d == "reports/train/log.parquet" for d in stale), stale

    # a pinned operating point re-runs the sampling and what follows: not the bandwidth search,
    # the training, the calibration or the reference
    # (1.5: not on the tiny calibration grid, so not what calibrate chose)
    exp = dvc(root, "exp", "run", "-S", "sample_kde.bandwidth_scale=1.5")
    assert ran(exp) == ["sample_kde", "refine", *AFTER_REFINE], ran(exp)  # nor the baseline branch
    sampled = json.loads((root / sample_kde.METRICS).read_text())
    assert sampled["h"] == pytest.approx(1.5 * h_kde) and sampled["bandwidth_scale_source"].startswith("pinned")
    diff = json.loads(dvc(root, "params", "diff", "--json").stdout)
    change = diff["params.yaml"]["sample_kde.bandwidth_scale"]
    assert (change["old"], change["new"]) == ("auto", 1.5)

    # a gate threshold that keeps the decision re-runs the gate (and the report that shows it), not the sampler
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=root, check=True)
    dvc(root, "checkout", "-q")
    set_param(root, "gates.kde.max_truncation_bound", 0.01)
    assert ran(dvc(root, "repro")) == ["gate_kde", "report"]
    # a sampler setting re-runs the calibration (the operating point is the sampler's), the sampler and what
    # reads them: no retraining, no reference, no bandwidth search, no baseline
    set_param(root, "refine.steps", 3)
    again = ran(dvc(root, "repro"))
    assert {"calibrate", "refine", "comparison", "report"} <= set(again), again
    assert not set(again) & {"prepare", "fit_kde", "train_debiaser", "reference", "train_baseline", "sample_baseline"}
    # a baseline setting re-runs the baseline branch and the comparison, none of DKGM's stages
    set_param(root, "sample_baseline.steps", 3)
    assert ran(dvc(root, "repro")) == ["sample_baseline", "evaluate_baseline", "report"]
    set_param(root, "baseline.p_std", 1.0)
    assert ran(dvc(root, "repro")) == ["train_baseline", "sample_baseline", "evaluate_baseline", "comparison", "report"]


def test_failing_gate_stops_repro_and_override_continues(dvc_project):
    root = dvc_project
    set_param(root, "gates.kde.min_loglik_gain_per_dim", 5.0)
    r = dvc(root, "repro", check=False)
    assert r.returncode != 0
    assert ran(r) == ["prepare", "fit_kde", "gate_kde"]
    assert "gate kde: NO-GO: loglik_gain_per_dim" in r.stdout + r.stderr
    record = json.loads((root / gates.gate_record("kde")).read_text())
    assert record["decision"] == "NO-GO"
    assert [c["params_key"] for c in record["checks"] if not c["passed"]] == ["gates.kde.min_loglik_gain_per_dim"]
    assert not (root / artifacts.KDE_SAMPLES).exists()

    set_param(root, "gates.kde.enforce", False)
    r = dvc(root, "repro", "gate_debiaser")  # the override lets the next phase run (the full run: the test above)
    assert ran(r) == ["gate_kde", "train_debiaser", "gate_debiaser"], ran(r)
    assert (root / gates.gate_token("kde")).read_text().strip() == "NO-GO (overridden)"
    assert json.loads((root / gates.gate_record("kde")).read_text())["decision"] == "NO-GO (overridden)"


def _lock_hashes(root, stages: list[str]) -> dict[str, str]:
    """md5 of every output of these stages in dvc.lock, except the wall-clock records (timings, the training log)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for name in stages for o in lock[name].get("outs", [])
            if not (o["path"].endswith("timings.json") or o["path"] == "reports/train/log.parquet")}


def _changed_stages(root) -> set[str]:
    """Stage names `dvc status` reports as changed (code, params or data)."""
    status = json.loads(dvc(root, "status", "--json").stdout or "{}")
    return {name.split(":")[-1] for name in status}


def assert_edits_mark_exactly_the_importers(root) -> None:
    """Editing a shared helper marks as changed exactly the stages whose code imports it."""
    from pipeline import dvcyaml, registry

    for helper in ("dkgm/inception.py", "dkgm/sampler.py", "stages/common.py"):
        importers = {s.name for s in registry.all_stages().values() if helper in dvcyaml.code_deps(s)}
        path = root / helper
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        try:
            assert _changed_stages(root) == importers, helper
        finally:
            path.write_text(original)
    # the evaluation code reaches every stage that scores with Inception, and no training stage
    assert {"reference", "calibrate", "gate_calibrate", "evaluate", "gate_eval", "evaluate_baseline", "comparison",
            "report"} == {s.name for s in registry.all_stages().values() if "dkgm/inception.py" in dvcyaml.code_deps(s)}


TOY = '''"""A toy stage (test only): the number of prepared items times a factor."""

from pathlib import Path

from pydantic import Field

from stages.artifacts import PREPARED, load_prepared
from stages.common import staged_outputs, write_metrics
from stages.contract import Out, Section, Stage

COUNT = "reports/toy/metrics.json"


class ToyParams(Section):
    factor: int = Field(3, ge=1)  # what the item count is multiplied by


def run(cfg: ToyParams, root: Path) -> dict:
    n = len(load_prepared(Path(root)).data)
    with staged_outputs(root, "toy") as out:
        write_metrics(out, COUNT, {"items_times_factor": n * cfg.factor, "seconds": 0.5})
    return {}


STAGES = (Stage(name="toy", doc="count the prepared items", section="toy", params=ToyParams, deps=(PREPARED,),
                outs=(Out(COUNT, "metrics"),), run=run),)
'''


def test_a_new_stage_is_one_module(dvc_project):
    root = dvc_project
    (root / "stages" / "toy.py").write_text(TOY)
    r = subprocess.run([sys.executable, "-m", "pipeline", "dvc-yaml"], cwd=root, env=cli_env(), capture_output=True,
                       text=True, check=True)
    assert "added toy to" in r.stderr and "wrote" in r.stderr
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    assert sorted(line[3:] for line in changed.splitlines()) == ["dvc.yaml", "params.yaml", "stages/toy.py"]
    stage = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["toy"]
    assert stage["cmd"] == "python -m pipeline run toy" and stage["params"] == ["toy.factor"]
    assert stage["deps"][0] == "data/prepared" and "stages/toy.py" in stage["deps"] and "dkgm/data.py" in stage["deps"]
    # its timings file comes with the metrics file, added by the contract
    assert stage["outs"] == [{"reports/toy/metrics.json": {"cache": False}}, {"reports/toy/timings.json": {"cache": False}}]
    assert yaml.safe_load((root / "params.yaml").read_text())["toy"] == {"factor": 3}
    top = yaml.safe_load((root / "dvc.yaml").read_text())
    assert "reports/toy/metrics.json" in top["metrics"]
    assert "reports/toy/metrics.json" in top["stages"]["report"]["deps"]  # the report shows every stage
    check = subprocess.run([sys.executable, "-m", "pipeline", "dvc-yaml", "--check"], cwd=root, env=cli_env(),
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert ran(dvc(root, "repro", "toy")) == ["prepare", "toy"]
    n = json.loads((root / "reports/prepare/metrics.json").read_text())["n_items"]
    assert json.loads((root / "reports/toy/metrics.json").read_text()) == {"items_times_factor": 3 * n}
    timings = json.loads((root / "reports/toy/timings.json").read_text())
    assert timings.pop("peak_rss_mib") > 0  # the contract adds the stage's peak memory
    assert timings == {"seconds": 0.5}
    set_param(root, "toy.factor", 5)
    assert ran(dvc(root, "repro", "toy")) == ["toy"]
    assert json.loads((root / "reports/toy/metrics.json").read_text()) == {"items_times_factor": 5 * n}
