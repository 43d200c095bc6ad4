"""`python -m pipeline compare`: table building on captured `dvc exp show --json`, and end to end through DVC.

The JSON below was captured from DVC 3.67.1 on the tiny project of tests/conftest.py after `dvc repro sample_kde`
(deps, outs and the nested experiments' data trimmed: compare does not read them).
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time

import pytest

from pipeline import compare as C
from tests.conftest import VENV_BIN, cli_env, run_cli, set_param

# `dvc exp show --json --num 1 --hide-queued --hide-failed --rev HEAD~1 --hide-workspace` (kde.bandwidth_scale 1)
EXP_SHOW_REV = json.loads(r"""
[
  {
    "rev": "a620a240921c907ab1823dba60c9c0322b9c8759",
    "name": "v1",
    "data": {
      "rev": "a620a240921c907ab1823dba60c9c0322b9c8759",
      "timestamp": "2026-11-29T01:20:30",
      "params": {
        "params.yaml": {
          "data": {
            "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1, "limit": 800,
               "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
            "kde": {"bandwidth": "cv", "bandwidth_scale": 1.0, "topk": 128, "grid_min": "auto", "grid_max": "auto",
               "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
            "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16, "grid_samples": 8},
            "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
               "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002, "sigma_max_factor": 1.5,
               "batch_size": 32, "total_kimg": 0.64, "lr": 0.001, "weight_decay": 0.0, "warmup_kimg": 0.1,
               "grad_clip": 10.0, "ema_halflife_kimg": 5, "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20,
               "state_every_kimg": 0.32, "keep_states": 2, "precision": "fp32", "compile": false,
               "device": "auto", "eval_images": 50},
            "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler", "sigma_min": 0.002,
               "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250, "precision": "fp32", "device": "auto",
               "grid_samples": 64, "trajectory_samples": 8},
            "gates": {
              "kde": {"enforce": true, "require_interior_optimum": true, "min_loglik_gain_per_dim": -0.2,
                 "max_truncation_bound": 0.001},
              "debiaser": {"enforce": true, "max_error_ratio": 0.99, "max_val_mse": 1.0}
            }
          }
        }
      },
      "metrics": {
        "reports/prepare/metrics.json": {
          "data": {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80, "pixel_mean": -0.8040191531181335}
        },
        "reports/kde/metrics.json": {
          "data": {"bandwidth_scale": 1.0, "baseline_loglik_per_dim": -0.3602257572965111,
             "cv_loglik_per_dim": -0.4120503166659246, "cv_on_boundary": false, "device": "cpu", "dim": 1024,
             "distance_pass_seconds": 0.1927450110006248, "grid_max": 1.4462849053056117,
             "grid_min": 0.018078561316320147, "h": 0.3630493093680563, "h_cv": 0.3630493093680563,
             "h_scott": 0.44549530706469087, "h_selected": 0.3630493093680563, "h_silverman": 0.4430978709126861,
             "loglik_gain_per_dim": -0.05182455936941355, "loglik_per_dim": -0.4120503166659246, "n_train": 640,
             "n_val": 80, "nn_rms_median": 0.36157122632640293, "scott_loglik_per_dim": -0.4487469800704194,
             "sigma_hat": 0.4483042752278286, "silverman_loglik_per_dim": -0.44695421230384236, "topk": 128,
             "truncation_bound_opt": 1.4462585681734164e-150, "truncation_error_opt": 1.9161461750627495e-07}
        },
        "reports/sample_kde/metrics.json": {
          "data": {"distinct_anchors": 40, "fraction_outside_range": 0.469580078125, "h": 0.3630493093680563,
             "kernel": "gaussian", "n_samples": 40, "rms_offset_over_h": 0.9982882738113403,
             "samples_per_second": 1331.8155075864713, "seconds": 0.030034190000151284}
        },
        "reports/train/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
        },
        "reports/refine/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
        }
      },
      "meta": {}
    },
    "error": null,
    "experiments": null
  }
]
""")

# `dvc exp show --json --num 1 --hide-queued --hide-failed`: HEAD (kde.bandwidth_scale 2) and the workspace, which
# holds the results of experiment sated-rort (`dvc exp run -S kde.bandwidth_scale=3`)
EXP_SHOW_HEAD_AND_WORKSPACE = json.loads(r"""
[
  {
    "rev": "workspace",
    "name": null,
    "data": {
      "rev": "workspace",
      "timestamp": null,
      "params": {
        "params.yaml": {
          "data": {
            "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1, "limit": 800,
               "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
            "kde": {"bandwidth": "cv", "bandwidth_scale": 3, "topk": 128, "grid_min": "auto", "grid_max": "auto",
               "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
            "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16, "grid_samples": 8},
            "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
               "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002, "sigma_max_factor": 1.5,
               "batch_size": 32, "total_kimg": 0.64, "lr": 0.001, "weight_decay": 0.0, "warmup_kimg": 0.1,
               "grad_clip": 10.0, "ema_halflife_kimg": 5, "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20,
               "state_every_kimg": 0.32, "keep_states": 2, "precision": "fp32", "compile": false,
               "device": "auto", "eval_images": 50},
            "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler", "sigma_min": 0.002,
               "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250, "precision": "fp32", "device": "auto",
               "grid_samples": 64, "trajectory_samples": 8},
            "gates": {
              "kde": {"enforce": true, "require_interior_optimum": true, "min_loglik_gain_per_dim": -0.2,
                 "max_truncation_bound": 0.001},
              "debiaser": {"enforce": true, "max_error_ratio": 0.99, "max_val_mse": 1.0}
            }
          }
        }
      },
      "metrics": {
        "reports/prepare/metrics.json": {
          "data": {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80, "pixel_mean": -0.8040191531181335}
        },
        "reports/kde/metrics.json": {
          "data": {"bandwidth_scale": 3.0, "baseline_loglik_per_dim": -1.1292900238775074,
             "cv_loglik_per_dim": -0.4120503166659246, "cv_on_boundary": false, "device": "cpu", "dim": 1024,
             "distance_pass_seconds": 0.12738240199996653, "grid_max": 1.4462849053056117,
             "grid_min": 0.018078561316320147, "h": 1.089147928104169, "h_cv": 0.3630493093680563,
             "h_scott": 0.44549530706469087, "h_selected": 0.3630493093680563, "h_silverman": 0.4430978709126861,
             "loglik_gain_per_dim": 0.06315911635030602, "loglik_per_dim": -1.0661309075272014, "n_train": 640,
             "n_val": 80, "nn_rms_median": 0.36157122632640293, "scott_loglik_per_dim": -0.4487469800704194,
             "sigma_hat": 0.4483042752278286, "silverman_loglik_per_dim": -0.44695421230384236, "topk": 128,
             "truncation_bound_opt": 1.4462585681734164e-150, "truncation_error_opt": 1.9161461750627495e-07}
        },
        "reports/sample_kde/metrics.json": {
          "data": {"distinct_anchors": 40, "fraction_outside_range": 0.52451171875, "h": 1.089147928104169,
             "kernel": "gaussian", "n_samples": 40, "rms_offset_over_h": 0.9982882738113403,
             "samples_per_second": 1743.333460131556, "seconds": 0.02294454900038545}
        },
        "reports/train/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
        },
        "reports/refine/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
        }
      },
      "meta": {}
    },
    "error": null,
    "experiments": null
  },
  {
    "rev": "6f0c8658195fb5e534ae0f4b3b9fd46fa5f52aef",
    "name": "master",
    "data": {
      "rev": "6f0c8658195fb5e534ae0f4b3b9fd46fa5f52aef",
      "timestamp": "2026-11-29T01:20:38",
      "params": {
        "params.yaml": {
          "data": {
            "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1, "limit": 800,
               "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
            "kde": {"bandwidth": "cv", "bandwidth_scale": 2.0, "topk": 128, "grid_min": "auto", "grid_max": "auto",
               "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
            "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16, "grid_samples": 8},
            "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [8],
               "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002, "sigma_max_factor": 1.5,
               "batch_size": 32, "total_kimg": 0.64, "lr": 0.001, "weight_decay": 0.0, "warmup_kimg": 0.1,
               "grad_clip": 10.0, "ema_halflife_kimg": 5, "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20,
               "state_every_kimg": 0.32, "keep_states": 2, "precision": "fp32", "compile": false,
               "device": "auto", "eval_images": 50},
            "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler", "sigma_min": 0.002,
               "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250, "precision": "fp32", "device": "auto",
               "grid_samples": 64, "trajectory_samples": 8},
            "gates": {
              "kde": {"enforce": true, "require_interior_optimum": true, "min_loglik_gain_per_dim": -0.2,
                 "max_truncation_bound": 0.001},
              "debiaser": {"enforce": true, "max_error_ratio": 0.99, "max_val_mse": 1.0}
            }
          }
        }
      },
      "metrics": {
        "reports/prepare/metrics.json": {
          "data": {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80, "pixel_mean": -0.8040191531181335}
        },
        "reports/kde/metrics.json": {
          "data": {"bandwidth_scale": 2.0, "baseline_loglik_per_dim": -0.8184362225903304,
             "cv_loglik_per_dim": -0.4120503166659246, "cv_on_boundary": false, "device": "cpu", "dim": 1024,
             "distance_pass_seconds": 0.22364856700005475, "grid_max": 1.4462849053056117,
             "grid_min": 0.018078561316320147, "h": 0.7260986187361126, "h_cv": 0.3630493093680563,
             "h_scott": 0.44549530706469087, "h_selected": 0.3630493093680563, "h_silverman": 0.4430978709126861,
             "loglik_gain_per_dim": 0.08827678936738026, "loglik_per_dim": -0.7301594332229502, "n_train": 640,
             "n_val": 80, "nn_rms_median": 0.36157122632640293, "scott_loglik_per_dim": -0.4487469800704194,
             "sigma_hat": 0.4483042752278286, "silverman_loglik_per_dim": -0.44695421230384236, "topk": 128,
             "truncation_bound_opt": 1.4462585681734164e-150, "truncation_error_opt": 1.9161461750627495e-07}
        },
        "reports/sample_kde/metrics.json": {
          "data": {"distinct_anchors": 40, "fraction_outside_range": 0.4846923828125, "h": 0.7260986187361126,
             "kernel": "gaussian", "n_samples": 40, "rms_offset_over_h": 0.9982882738113403,
             "samples_per_second": 1596.8072158579405, "seconds": 0.025049987000784313}
        },
        "reports/train/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
        },
        "reports/refine/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
        }
      },
      "meta": {}
    },
    "error": null,
    "experiments": [
      {
        "name": "sated-rort",
        "revs": [
          {"rev": "f8f70e93a540ee3e6f2e05ee99ee9a1ecb737562", "name": "sated-rort", "data": "<trimmed>"}
        ]
      }
    ]
  }
]
""")


def snaps_3() -> list[C.Snapshot]:
    """HEAD~1 (scale 1), HEAD (scale 2), the workspace (scale 3), from the captured JSON."""
    workspace, head = C.split_exp_show(EXP_SHOW_HEAD_AND_WORKSPACE)
    _, old = C.split_exp_show(EXP_SHOW_REV)
    return [C.snapshot_from_entry(old, "HEAD~1"), C.snapshot_from_entry(head, "HEAD"),
            C.snapshot_from_entry(workspace, "workspace")]


# ----------------------------------------------------------------------------- parsing


def test_split_exp_show_finds_workspace_and_baseline_and_ignores_nested_experiments():
    workspace, head = C.split_exp_show(EXP_SHOW_HEAD_AND_WORKSPACE)
    assert workspace["rev"] == "workspace"
    assert head["rev"] == "6f0c8658195fb5e534ae0f4b3b9fd46fa5f52aef"
    workspace, only = C.split_exp_show(EXP_SHOW_REV)
    assert workspace is None and only["rev"].startswith("a620a24")


def test_snapshot_flattens_params_and_names_metrics():
    _, entry = C.split_exp_show(EXP_SHOW_REV)
    s = C.snapshot_from_entry(entry, "HEAD~1")
    assert (s.label, s.rev[:7]) == ("HEAD~1", "a620a24")
    assert s.params["kde.bandwidth_scale"] == 1.0
    assert s.params["debiaser.channel_mult"] == [1, 2]  # lists are values, not flattened
    assert s.params["gates.kde.min_loglik_gain_per_dim"] == -0.2
    assert s.params["prepare.limit"] == 800
    assert s.metrics["kde.h"] == pytest.approx(0.3630493093680563)
    assert s.metrics["sample_kde.kernel"] == "gaussian"
    assert s.metrics["prepare.n_items"] == 800
    # reports/train and reports/refine failed to load (FileNotFoundError): no values, no error
    assert not [k for k in s.metrics if k.startswith(("train.", "refine."))]


def test_row_names():
    assert C.metric_name("reports/kde/metrics.json", "h") == "kde.h"
    assert C.metric_name("reports/sample_kde/metrics.json", "h") == "sample_kde.h"
    assert C.metric_name("eval/scores.json", "fid") == "eval/scores.json:fid"
    assert C.metric_name("reports/metrics.json", "x") == "reports/metrics.json:x"
    assert C.param_name("params.yaml", "kde.bandwidth") == "kde.bandwidth"
    assert C.param_name("extra.yaml", "a.b") == "extra.yaml:a.b"
    assert C.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


# ----------------------------------------------------------------------------- rows


def test_param_rows_only_the_params_that_differ():
    rows = C.param_rows(snaps_3())
    assert rows == [["kde.bandwidth_scale", "1", "2", "3"]]
    old, head, _ = snaps_3()
    assert C.param_rows([old, old]) == []


def test_param_rows_missing_and_typed_values():
    a = C.Snapshot("a", "1" * 40, params={"x": 1, "y": True, "z": None, "only_a": "cv", "n": float("nan")})
    b = C.Snapshot("b", "2" * 40, params={"x": 1.0, "y": 1, "z": None, "n": float("nan"), "only_b": [1, 2]})
    assert C.param_rows([a, b]) == [["y", "true", "1"], ["only_a", "cv", "—"], ["only_b", "—", "[1, 2]"]]


def test_metric_rows_two_revisions_have_a_delta():
    old, head, _ = snaps_3()
    rows = {r[0]: r[1:] for r in C.metric_rows([old, head], everything=True)}
    assert len(rows) == len(old.metrics) == 38  # every metric, changed or not
    assert rows["kde.h"] == ["0.36305", "0.7261", "+0.36305"]
    assert rows["kde.bandwidth_scale"] == ["1", "2", "+1"]
    assert rows["prepare.n_items"] == ["800", "800", "0"]
    assert rows["sample_kde.kernel"] == ["gaussian", "gaussian", "—"]
    assert rows["kde.cv_on_boundary"] == ["false", "false", "—"]
    assert rows["kde.truncation_bound_opt"] == ["1.4463e-150", "1.4463e-150", "0"]
    # by default only what differs: equal values (also 1 == 1.0, NaN == NaN) are left out
    changed = {r[0]: r[1:] for r in C.metric_rows([old, head])}
    assert set(changed) == {k for k, v in rows.items() if v[0] != v[1]} and "kde.h" in changed
    assert "prepare.n_items" not in changed and "sample_kde.kernel" not in changed
    assert C.metric_rows([old, old]) == []


def test_metric_rows_union_with_missing_values_and_no_delta_beyond_two():
    old, head, ws = snaps_3()
    del head.metrics["kde.h"]
    head.metrics["eval.fid"] = 12.3456789
    rows = {r[0]: r[1:] for r in C.metric_rows([old, head, ws])}  # a value missing in one revision differs
    assert rows["kde.h"] == ["0.36305", "—", "1.0891"]
    assert rows["eval.fid"] == ["—", "12.346", "—"]
    assert all(len(r) == 3 for r in rows.values())
    rows2 = {r[0]: r[1:] for r in C.metric_rows([old, head])}
    assert rows2["kde.h"] == ["0.36305", "—", "—"]


def test_formatting():
    assert [C.fmt(v) for v in (0.3630493093680563, 1596.8072, 1e-150, 2.0, 10000, 123456789, True, None, "cv", [1, 2])] == \
        ["0.36305", "1596.8", "1e-150", "2", "10000", "123456789", "true", "null", "cv", "[1, 2]"]
    assert C.fmt_delta(1.0, 3) == "+2"
    assert C.fmt_delta(3, 1) == "-2"
    assert C.fmt_delta(0.5, 0.25) == "-0.25"
    assert C.fmt_delta(1, 1.0) == "0"
    assert C.fmt_delta("a", 1) == "—" and C.fmt_delta(True, False) == "—"
    long = "null: default_1.pt has no classifier layer; put the full network in place"
    assert len(C.fmt(long)) == C.MAX_CELL and C.fmt(long).endswith("…") and C.fmt(long)[:20] == long[:20]


def parse_tables(md: str) -> dict[str, list[list[str]]]:
    """{section title: rows (header first, the alignment rule dropped)} of a compare report."""
    tables: dict[str, list[list[str]]] = {}
    section = ""
    for line in md.splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("|") and not re.fullmatch(r"\|( :?-+:? \|)+", line):
            tables.setdefault(section, []).append([c.strip() for c in line.strip("|").split(" | ")])
    return tables


def test_render_markdown():
    old, head, ws = snaps_3()
    md = C.render([old, head])
    assert md.startswith("# Compare: HEAD~1 vs HEAD\n")
    assert "`HEAD~1` (a620a24), `HEAD` (6f0c865)" in md
    t = parse_tables(md)
    assert t["Params that differ"] == [["param", "HEAD~1", "HEAD"], ["kde.bandwidth_scale", "1", "2"]]
    changed = len(C.metric_rows([old, head]))
    assert t["Metrics that differ"][0] == ["metric", "HEAD~1", "HEAD", "Δ (HEAD − HEAD~1)"]
    assert len(t["Metrics that differ"]) == 1 + changed and 0 < changed < 38
    assert f"{38 - changed} of 38 metrics are equal in every revision" in md
    full = C.render([old, head], everything=True)
    metric_lines = [ln for ln in full.split("## Metrics")[1].splitlines() if ln.startswith("|")]
    assert len(metric_lines) == 2 + 38 and len({len(ln) for ln in metric_lines}) == 1  # padded: columns line up
    same = C.render([old, old])
    assert "No params differ." in same and "All 38 metrics are equal in every revision" in same
    ws.label = "workspace"
    assert "`workspace`." in C.render([head, ws])
    piped = C.Snapshot("a|b", "workspace", params={"p": "x|y"})
    assert "a\\|b" in C.render([piped, C.Snapshot("c", "workspace")])


# ----------------------------------------------------------------------------- revisions and errors


def test_collect_orders_revisions(monkeypatch):
    calls = []

    def fake(rev, with_workspace, cwd=None):
        calls.append((rev, with_workspace))
        return copy.deepcopy(EXP_SHOW_HEAD_AND_WORKSPACE if with_workspace else EXP_SHOW_REV)

    monkeypatch.setattr(C, "exp_show", fake)
    assert [s.label for s in C.collect([])] == ["HEAD", "workspace"]
    assert [s.label for s in C.collect(["v1"])] == ["v1", "workspace"]
    assert [s.label for s in C.collect(["a", "b", "c"])] == ["a", "b", "c"]
    assert calls == [(None, True), ("v1", True), ("a", False), ("b", False), ("c", False)]


def test_dvc_errors_are_one_line_naming_the_revision():
    e = C.dvc_error("ERROR: failed to show experiments - unknown Git revision 'nosuch'\n", "nosuch")
    assert isinstance(e, C.DKGMError) and "'nosuch'" in str(e) and "\n" not in str(e)
    e = C.dvc_error("ERROR: you are not inside of a DVC repository (checked up to mount point '/')\n", None)
    assert "not inside a DVC repository" in str(e)
    e = C.dvc_error("WARNING: x\nERROR: something else\n", "v2")
    assert str(e) == "compare: dvc exp show failed for 'v2': ERROR: something else"


def test_cli_outside_a_dvc_repo_exits_2(tmp_path):
    r = run_cli(["compare", "HEAD~1", "HEAD"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: compare: not inside a DVC repository")
    assert not (tmp_path / "reports").exists()


# ----------------------------------------------------------------------------- end to end


def sh(root, *cmd: str) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=root, env=cli_env(DKGM_NO_PREFECT="1"), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def kde_h(root) -> float:
    return json.loads((root / "reports/kde/metrics.json").read_text())["h"]


def values(table: list[list[str]], name: str) -> list[str]:
    return next(r[1:] for r in table if r[0] == name)


@pytest.mark.slow
def test_compare_commits_and_an_experiment(dvc_project):
    root = dvc_project
    dvc = str(VENV_BIN / "dvc")
    t0 = time.monotonic()
    set_param(root, "kde.bandwidth", 0.3)  # a fixed density bandwidth: fit_kde uses it as given
    sh(root, dvc, "repro", "fit_kde")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "bandwidth 0.3")
    h1 = kde_h(root)
    set_param(root, "kde.bandwidth", 0.6)
    sh(root, dvc, "repro", "fit_kde")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "bandwidth 0.6")
    h2 = kde_h(root)
    assert (h1, h2) == (0.3, 0.6)
    sh(root, dvc, "exp", "run", "-n", "bw3", "-S", "kde.bandwidth=0.9", "fit_kde")
    t_pipeline = time.monotonic() - t0

    r = run_cli(["compare", "HEAD~1", "HEAD"], cwd=root)
    assert r.returncode == 0, r.stderr
    md = (root / "reports/compare.md").read_text()
    assert r.stdout == md
    t = parse_tables(md)
    assert t["Params that differ"] == [["param", "HEAD~1", "HEAD"], ["kde.bandwidth", "0.3", "0.6"]]
    metrics = t["Metrics that differ"]
    assert metrics[0] == ["metric", "HEAD~1", "HEAD", "Δ (HEAD − HEAD~1)"]
    a, b, delta = values(metrics, "kde.h")
    assert (float(a), float(b), float(delta)) == (0.3, 0.6, pytest.approx(0.3))
    assert "prepare.n_items" not in {r[0] for r in metrics}  # equal in both: listed only with --all
    every = run_cli(["compare", "HEAD~1", "HEAD", "--all", "--out", "-"], cwd=root)
    assert values(parse_tables(every.stdout)["Metrics"], "prepare.n_items") == ["800", "800", "0"]

    # an experiment name, against a commit; print only
    r = run_cli(["compare", "HEAD", "bw3", "--out", "-"], cwd=root)
    assert r.returncode == 0, r.stderr
    t = parse_tables(r.stdout)
    assert t["Params that differ"] == [["param", "HEAD", "bw3"], ["kde.bandwidth", "0.6", "0.9"]]
    _, b, _ = values(t["Metrics that differ"], "kde.h")
    assert float(b) == 0.9

    # three revisions: no delta column; no argument: HEAD against the workspace (which holds bw3's results)
    t = parse_tables(run_cli(["compare", "HEAD~1", "HEAD", "bw3", "--out", "-"], cwd=root).stdout)
    assert t["Params that differ"][1] == ["kde.bandwidth", "0.3", "0.6", "0.9"]
    assert len(t["Metrics that differ"][0]) == 4
    t = parse_tables(run_cli(["compare", "--out", "-"], cwd=root).stdout)
    assert t["Params that differ"] == [["param", "HEAD", "workspace"], ["kde.bandwidth", "0.6", "0.9"]]

    r = run_cli(["compare", "HEAD", "no-such-exp"], cwd=root)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: compare: unknown revision or experiment 'no-such-exp' "
        "(not a git commit, branch or tag, nor a `dvc exp run` name)"
    ]
    print(f"\npipeline + experiment: {t_pipeline:.1f} s, compare calls: {time.monotonic() - t0 - t_pipeline:.1f} s")
