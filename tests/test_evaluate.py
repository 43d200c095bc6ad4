"""Stages reference, evaluate and gate_eval on the tiny project: the metrics file, paired
samples, memorization known answers (exact copies), clear errors and no partial outputs, and
point data (the swiss roll) with a known-good refined set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from dkgm.errors import DKGMError
from stages import artifacts, evaluate, gates, sample_kde
from stages.gates import NO_GO
from tests.conftest import pin_point, run_stages, set_param, write_params


@pytest.fixture
def evaluated(tiny_run):
    """The session's tiny run (every stage, scored with the stub feature network)."""
    return tiny_run


@pytest.fixture
def project_copy(tiny_copy):
    return tiny_copy


def metrics(root) -> dict:
    return json.loads((root / evaluate.METRICS).read_text())


def test_metrics_file_names_the_network_and_scores_both_stages(evaluated, stub_features):
    from dkgm.inception import sha256_file

    m = metrics(evaluated)
    # the network the reference named (here the tests' stub, pinned by its SHA-256), and the EMA weights
    assert m["feature_network"] == stub_features.name and m["weights_sha256"] == sha256_file(stub_features)
    assert m["weights"] == "ema"
    assert m["n_samples"] == 20 and m["n_reference"] == 40
    assert m["n_real"] == 20  # the held-out floor is scored at the samples' n (80 test images in the tiny split)
    for s in ("kde", "refined", "real"):
        assert m[f"{s}_fid"] > 0 and 0 <= m[f"{s}_precision"] <= 1 and 0 <= m[f"{s}_recall"] <= 1
        assert m[f"{s}_inception_score"] is None  # a features-only network (as default_1.pt) has no classifier
        assert 0 < m[f"{s}_fid_se"] < m[f"{s}_fid"]  # the bootstrap spread at this n: present, positive, smaller
    assert "no classifier" in m["inception_score_note"]
    assert m["debias_gain"] == pytest.approx(1 - m["refined_fid"] / m["kde_fid"])
    assert m["fid_gain"] == pytest.approx(m["kde_fid"] - m["refined_fid"])
    # a KDE sample is its anchor plus N(0, h^2) per pixel, then clipped to [-1, 1] and quantized
    # (what is scored): the clipping on the black background takes part of the noise away
    h = json.loads((evaluated / sample_kde.METRICS).read_text())["h"]  # the operating point's s x h_kde
    assert 0.5 * min(h, 1) < m["kde_anchor_distance"] < h
    assert m["real_copy_fraction"] == 0.0
    for space in ("pixel", "inception"):  # the data-copying statistics of every set, and their floor
        assert {f"{s}_zu_{space}" for s in ("kde", "refined", "real")} <= set(m)
        assert all(0 <= m[f"{s}_authenticity_{space}"] <= 1 for s in ("kde", "refined", "real"))
    assert abs(m["real_zu_pixel"]) < 4  # two held-out sets: no copying either way
    per = pd.read_parquet(evaluated / evaluate.PER_SAMPLE)
    assert len(per) == 40 and set(per["set"]) == {"kde", "refined"}
    assert (evaluated / evaluate.NEAREST).stat().st_size > 1000


def test_exact_copies_are_flagged_and_stop_the_gate(project_copy):
    root = project_copy
    man = pd.read_parquet(root / artifacts.REFINED / "manifest.parquet")
    prepared = np.load(root / artifacts.PREPARED / "data.npy")
    np.save(root / artifacts.REFINED / "samples.npy", prepared[man["anchor_index"].to_numpy()])  # refined = anchors
    run_stages(root, "evaluate")
    m = metrics(root)
    assert m["refined_anchor_fraction"] == 1.0 and m["refined_copy_fraction"] == 1.0
    assert m["refined_anchor_distance"] == 0.0 and m["anchor_distance_ratio"] == 0.0
    # every data-copying statistic says so, against a floor that does not
    assert m["refined_zu_pixel"] < -5 < -abs(m["real_zu_pixel"]) and m["refined_authenticity_pixel"] == 0.0
    assert m["real_authenticity_pixel"] > 0.2
    write_params(root, {"gates": {"eval": {"min_zu_pixel": -3.0, "copy_allowance": 0.01, "max_authenticity_drop": 0.1}}})
    run_stages(root, "gate_eval")
    record = json.loads((root / gates.gate_record("eval")).read_text())
    failed = {c["params_key"] for c in record["checks"] if not c["passed"]}
    assert record["decision"] == NO_GO and failed == {"gates.eval.min_zu_pixel", "gates.eval.copy_allowance",
                                                      "gates.eval.max_authenticity_drop"}
    assert not (root / gates.gate_token("eval")).exists()


def test_samples_equal_to_reference_images_get_the_reference_features(project_copy):
    """The stage and the reference compute features identically: refined samples that are the
    reference's own training images sit at Inception distance ~0 from them (copies in both spaces)."""
    root = project_copy
    with np.load(root / artifacts.REFERENCE / "features.npz") as z:
        ref_rows = z["train_rows"]
    prepared = np.load(root / artifacts.PREPARED / "data.npy")
    n = metrics(root)["n_samples"]
    refined = np.load(root / artifacts.REFINED / "samples.npy")
    refined[:n] = prepared[ref_rows[:n]]
    np.save(root / artifacts.REFINED / "samples.npy", refined)
    run_stages(root, "evaluate")
    m = metrics(root)
    assert m["refined_copy_fraction_inception"] == 1.0 and m["refined_copy_fraction"] == 1.0
    per = pd.read_parquet(root / evaluate.PER_SAMPLE)
    assert (per[per["set"] == "refined"]["nn_row"].to_numpy() == ref_rows[:n]).all()


def test_a_reference_for_another_split_is_refused(project_copy):
    root = project_copy
    path = root / artifacts.REFERENCE / "features.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["test_rows"] = arrays["test_rows"][::-1] + 0  # same size, other rows order: another split
    arrays["test_rows"][0] = arrays["train_rows"][0]
    np.savez(path, **arrays)
    with pytest.raises(DKGMError, match="another train/test split"):
        run_stages(root, "evaluate")


def test_too_few_images_and_unpaired_samples_fail_cleanly(project_copy):
    root = project_copy
    before = (root / evaluate.METRICS).read_bytes()
    write_params(root, {"evaluate": {"pr_k": 30}})
    with pytest.raises(DKGMError, match=r"needs at least 31 samples evaluated per stage, got 20"):
        run_stages(root, "evaluate")
    assert (root / evaluate.METRICS).read_bytes() == before  # the previous file is untouched
    write_params(root)
    man_path = root / artifacts.REFINED / "manifest.parquet"
    man = pd.read_parquet(man_path)
    man["seed"] = man["seed"] + 1
    man.to_parquet(man_path, index=False)
    with pytest.raises(DKGMError, match="seeds differ"):
        run_stages(root, "evaluate")
    assert (root / evaluate.METRICS).read_bytes() == before


def test_changed_or_missing_weights_give_one_line(project_copy, monkeypatch):
    from dkgm import inception

    root = project_copy
    # a reference computed with a copy of the real features network (the file the auto search finds)
    real = inception.resolve_weights("auto")
    meta_path = root / artifacts.REFERENCE / "meta.json"
    meta = json.loads(meta_path.read_text())
    shutil.copy(real.path, root / "w.pt")
    meta["weights"] = {**real.to_dict(), "path": str(root / "w.pt")}
    meta_path.write_text(json.dumps(meta))
    # weights that changed after the reference was computed are refused, not silently mixed
    with open(root / "w.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DKGMError, match="changed since the reference was computed"):
        run_stages(root, "evaluate")
    (root / "w.pt").unlink()
    run_stages(root, "evaluate")  # gone, but the same file (same SHA-256) is found again: accepted
    monkeypatch.setattr(inception, "fid_helper_path", lambda: None)
    with pytest.raises(DKGMError, match="gone and not found elsewhere"):
        run_stages(root, "evaluate")
    # no weights anywhere (none named in params either): one line, no partial reference artifact
    set_param(root, "reference.weights", "auto")
    set_param(root, "reference.weights_sha256", None)
    monkeypatch.setattr(inception, "fid_helper_path", lambda: None)
    monkeypatch.setattr(inception, "cleanfid_full_path", lambda: root / "nowhere" / inception.FULL_NAME)
    shutil.rmtree(root / artifacts.REFERENCE)
    with pytest.raises(DKGMError, match="no Inception weights found") as err:
        run_stages(root, "reference")
    assert "\n" not in str(err.value)
    assert not (root / artifacts.REFERENCE).exists() and not list((root / ".dkgm").glob("staging/*"))


def test_swissroll_evaluation_known_good_refined_set(tmp_path):
    """Points: a refined set made of the KDE samples projected onto the true spiral must score a
    large debiasing gain, and the KDE samples a worse distribution distance than real points."""
    root = tmp_path
    write_params(root, {"prepare": {"dataset": "swissroll", "swissroll_points": 1500, "limit": None},
                        "sample_kde": {"n_samples": 300, "batch_size": 100}, "evaluate": {"n_samples": 300},
                        "sample_baseline": {"n_samples": 300}})
    run_stages(root, "prepare", "fit_kde", "gate_kde")
    pin_point(root, scale=4.0)
    run_stages(root, "sample_kde", "reference")
    from stages.artifacts import load_prepared
    from stages.common import write_json, write_parquet

    prepared = load_prepared(root)
    roll = prepared.manifold()
    x = np.load(root / artifacts.KDE_SAMPLES / "samples.npy")
    curve = roll.curve(np.linspace(roll.t_min, roll.t_max, 20000)).astype(np.float32)
    d = ((x[:, None] - curve[None]) ** 2).sum(-1)
    projected = curve[d.argmin(1)]
    man = pd.read_parquet(root / artifacts.KDE_SAMPLES / "manifest.parquet")
    out = root / artifacts.REFINED
    out.mkdir(parents=True)
    np.save(out / "samples.npy", projected)
    write_parquet(out / "manifest.parquet", {"sample_id": man["sample_id"], "seed": man["seed"],
                                             "anchor_index": man["anchor_index"], "nfe": np.zeros(len(man), int)})
    write_json(out / "meta.json", {"nfe": 0})
    run_stages(root, "evaluate")
    m = metrics(root)
    assert m["kind"] == "points" and m["primary_metric"] == "mean_distance_to_manifold"
    assert m["refined_mean_distance_to_manifold"] < 1e-3 and m["debias_gain"] > 0.9
    assert m["kde_mmd"] > m["real_mmd"] and m["kde_sliced_wasserstein"] > m["real_sliced_wasserstein"]
    assert "refined_fid" not in m
    run_stages(root, "gate_eval")  # no FID check for points
    checks = json.loads((root / gates.gate_record("eval")).read_text())["checks"]
    assert "refined_fid" not in {c["metric"] for c in checks}
