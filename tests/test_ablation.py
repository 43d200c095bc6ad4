"""`python -m pipeline ablation`: sweeps, tables and plots from `dvc exp show --json`, and end to end through DVC.

EXP_SHOW was captured from DVC 3.67.1 (`dvc exp show --json --hide-workspace`) on the tiny project of
tests/conftest.py (deps and outs trimmed: ablation does not read them) after
    dvc exp run --queue -S 'kde.bandwidth_scale=1,2' sample_kde && dvc exp run --run-all -j 2   # techy-user (1), ...
    (captured before the operating point moved the scale to sample_kde.bandwidth_scale: ablation reads both)
    dvc exp run --queue -n bad -S kde.bandwidth_scale=-1 sample_kde && dvc exp run --run-all    # failed (bad value)
    dvc exp run --queue -n waiting -S kde.bandwidth_scale=3 sample_kde                         # left queued
    dvc exp run -n ws15 -S kde.bandwidth_scale=1.5 sample_kde                                  # run in the workspace
(the second queued experiment of the first line is left out). The baseline commit has no dvc.lock, so its metrics
files are all FileNotFoundError entries; experiments that ran only up to sample_kde have the later ones as such.
Experiments of the whole pipeline are built from these entries by `add_exp` (same shape, other values).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import ablation as A
from tests.conftest import VENV_BIN, cli_env, run_cli

EXP_SHOW = json.loads(r"""
[
  {
    "rev": "52eea39a7735d1c2f3729a9430a568770707b558",
    "name": "master",
    "data": {
      "rev": "52eea39a7735d1c2f3729a9430a568770707b558",
      "timestamp": "2026-11-29T01:26:31",
      "params": {
        "params.yaml": {
          "data": {
            "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1, "limit": 800,
               "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
            "kde": {"bandwidth": "cv", "bandwidth_scale": 1.0, "topk": 128, "grid_min": "auto", "grid_max": "auto",
               "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
            "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16,
               "grid_samples": 8},
            "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
               "attn_resolutions": [8], "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002,
               "sigma_max_factor": 1.5, "batch_size": 32, "total_kimg": 0.64, "lr": 0.001, "weight_decay": 0.0,
               "warmup_kimg": 0.1, "grad_clip": 10.0, "ema_halflife_kimg": 5, "ema_rampup_ratio": 0.1, "seed": 0,
               "log_every": 20, "state_every_kimg": 0.32, "keep_states": 2, "precision": "fp32", "compile": false,
               "device": "auto", "eval_images": 50},
            "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler", "sigma_min": 0.002,
               "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250, "precision": "fp32", "device": "auto",
               "grid_samples": 64, "trajectory_samples": 8},
            "reference": {"weights": "auto", "weights_sha256": null, "allow_download": false, "train_images": 2000,
               "seed": 0, "batch_size": 50, "device": "auto"},
            "evaluate": {"n_samples": 500, "batch_size": 50, "device": "auto", "kid_subsets": 100,
               "kid_subset_size": 1000, "pr_k": 3, "copy_ratio": 0.3333333333333333, "is_splits": 10, "seed": 0,
               "nn_rows": 8},
            "report": {"title": "DKGM proof-of-concept review", "nn_pairs": 8},
            "gates": {"kde": {"enforce": true, "require_interior_optimum": true, "min_loglik_gain_per_dim": -0.2,
               "max_truncation_bound": 0.001}, "debiaser": {"enforce": true, "max_error_ratio": 0.99,
               "max_val_mse": 1.0}, "eval": {"enforce": true, "max_fid": 100.0, "min_debias_gain": 0.0,
               "max_copy_fraction": 0.1, "max_anchor_fraction": 1.0}}
          }
        }
      },
      "metrics": {
        "reports/prepare/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/prepare/metrics.json'"}
        },
        "reports/kde/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/kde/metrics.json'"}
        },
        "reports/sample_kde/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/sample_kde/metrics.json'"}
        },
        "reports/train/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
        },
        "reports/refine/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
        },
        "reports/reference/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/reference/metrics.json'"}
        },
        "reports/eval/metrics.json": {
          "error": {"type": "FileNotFoundError",
             "msg": "[Errno 2] No such file or directory: 'reports/eval/metrics.json'"}
        }
      },
      "meta": {}
    },
    "error": null,
    "experiments": [
      {
        "revs": [
          {
            "rev": "7421f61dc154b76196af82d1a44d36dbb8b77fc9",
            "name": "ws15",
            "data": {
              "rev": "7421f61dc154b76196af82d1a44d36dbb8b77fc9",
              "timestamp": "2026-11-29T01:28:07",
              "params": {
                "params.yaml": {
                  "data": {
                    "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
                       "limit": 800, "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
                    "kde": {"bandwidth": "cv", "bandwidth_scale": 1.5, "topk": 128, "grid_min": "auto",
                       "grid_max": "auto", "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
                    "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16,
                       "grid_samples": 8},
                    "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                       "attn_resolutions": [8], "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002,
                       "sigma_max_factor": 1.5, "batch_size": 32, "total_kimg": 0.64, "lr": 0.001,
                       "weight_decay": 0.0, "warmup_kimg": 0.1, "grad_clip": 10.0, "ema_halflife_kimg": 5,
                       "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20, "state_every_kimg": 0.32,
                       "keep_states": 2, "precision": "fp32", "compile": false, "device": "auto",
                       "eval_images": 50},
                    "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler",
                       "sigma_min": 0.002, "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250,
                       "precision": "fp32", "device": "auto", "grid_samples": 64, "trajectory_samples": 8},
                    "reference": {"weights": "auto", "weights_sha256": null, "allow_download": false,
                       "train_images": 2000, "seed": 0, "batch_size": 50, "device": "auto"},
                    "evaluate": {"n_samples": 500, "batch_size": 50, "device": "auto", "kid_subsets": 100,
                       "kid_subset_size": 1000, "pr_k": 3, "copy_ratio": 0.3333333333333333, "is_splits": 10,
                       "seed": 0, "nn_rows": 8},
                    "report": {"title": "DKGM proof-of-concept review", "nn_pairs": 8},
                    "gates": {"kde": {"enforce": true, "require_interior_optimum": true,
                       "min_loglik_gain_per_dim": -0.2, "max_truncation_bound": 0.001}, "debiaser": {"enforce": true,
                       "max_error_ratio": 0.99, "max_val_mse": 1.0}, "eval": {"enforce": true, "max_fid": 100.0,
                       "min_debias_gain": 0.0, "max_copy_fraction": 0.1, "max_anchor_fraction": 1.0}}
                  }
                }
              },
              "metrics": {
                "reports/prepare/metrics.json": {
                  "data": {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80,
                     "pixel_mean": -0.8040191531181335}
                },
                "reports/kde/metrics.json": {
                  "data": {"bandwidth_scale": 1.5, "baseline_loglik_per_dim": -0.6183206278338319,
                     "cv_loglik_per_dim": -0.4120503166659246, "cv_on_boundary": false, "device": "cpu", "dim": 1024,
                     "distance_pass_seconds": 0.32937890899938793, "grid_max": 1.4462849053056117,
                     "grid_min": 0.018078561316320147, "h": 0.5445739640520845, "h_cv": 0.3630493093680563,
                     "h_scott": 0.44549530706469087, "h_selected": 0.3630493093680563,
                     "h_silverman": 0.4430978709126861, "loglik_gain_per_dim": 0.07860320913431129,
                     "loglik_per_dim": -0.5397174186995206, "n_train": 640, "n_val": 80,
                     "nn_rms_median": 0.36157122632640293, "scott_loglik_per_dim": -0.4487469800704194,
                     "sigma_hat": 0.4483042752278286, "silverman_loglik_per_dim": -0.44695421230384236, "topk": 128,
                     "truncation_bound_opt": 1.4462585681734164e-150,
                     "truncation_error_opt": 1.9161461750627495e-07}
                },
                "reports/sample_kde/metrics.json": {
                  "data": {"distinct_anchors": 40, "fraction_outside_range": 0.4765869140625,
                     "h": 0.5445739640520845, "kernel": "gaussian", "n_samples": 40,
                     "rms_offset_over_h": 0.9982882738113403, "samples_per_second": 1854.5843586210158,
                     "seconds": 0.02156817500053876}
                },
                "reports/train/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
                },
                "reports/refine/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
                },
                "reports/reference/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/reference/metrics.json'"}
                },
                "reports/eval/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/eval/metrics.json'"}
                }
              },
              "meta": {}
            },
            "error": null,
            "experiments": null
          }
        ],
        "executor": null,
        "name": "ws15"
      },
      {
        "revs": [
          {
            "rev": "0da6795e0cff8068fe6502518822c2c717ed23c0",
            "name": "techy-user",
            "data": {
              "rev": "0da6795e0cff8068fe6502518822c2c717ed23c0",
              "timestamp": "2026-11-29T01:27:10",
              "params": {
                "params.yaml": {
                  "data": {
                    "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
                       "limit": 800, "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
                    "kde": {"bandwidth": "cv", "bandwidth_scale": 1, "topk": 128, "grid_min": "auto",
                       "grid_max": "auto", "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
                    "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16,
                       "grid_samples": 8},
                    "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                       "attn_resolutions": [8], "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002,
                       "sigma_max_factor": 1.5, "batch_size": 32, "total_kimg": 0.64, "lr": 0.001,
                       "weight_decay": 0.0, "warmup_kimg": 0.1, "grad_clip": 10.0, "ema_halflife_kimg": 5,
                       "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20, "state_every_kimg": 0.32,
                       "keep_states": 2, "precision": "fp32", "compile": false, "device": "auto",
                       "eval_images": 50},
                    "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler",
                       "sigma_min": 0.002, "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250,
                       "precision": "fp32", "device": "auto", "grid_samples": 64, "trajectory_samples": 8},
                    "reference": {"weights": "auto", "weights_sha256": null, "allow_download": false,
                       "train_images": 2000, "seed": 0, "batch_size": 50, "device": "auto"},
                    "evaluate": {"n_samples": 500, "batch_size": 50, "device": "auto", "kid_subsets": 100,
                       "kid_subset_size": 1000, "pr_k": 3, "copy_ratio": 0.3333333333333333, "is_splits": 10,
                       "seed": 0, "nn_rows": 8},
                    "report": {"title": "DKGM proof-of-concept review", "nn_pairs": 8},
                    "gates": {"kde": {"enforce": true, "require_interior_optimum": true,
                       "min_loglik_gain_per_dim": -0.2, "max_truncation_bound": 0.001}, "debiaser": {"enforce": true,
                       "max_error_ratio": 0.99, "max_val_mse": 1.0}, "eval": {"enforce": true, "max_fid": 100.0,
                       "min_debias_gain": 0.0, "max_copy_fraction": 0.1, "max_anchor_fraction": 1.0}}
                  }
                }
              },
              "metrics": {
                "reports/prepare/metrics.json": {
                  "data": {"n_items": 800, "n_test": 80, "n_train": 640, "n_val": 80,
                     "pixel_mean": -0.8040191531181335}
                },
                "reports/kde/metrics.json": {
                  "data": {"bandwidth_scale": 1.0, "baseline_loglik_per_dim": -0.3602257572965111,
                     "cv_loglik_per_dim": -0.4120503166659246, "cv_on_boundary": false, "device": "cpu", "dim": 1024,
                     "distance_pass_seconds": 0.47334548300023016, "grid_max": 1.4462849053056117,
                     "grid_min": 0.018078561316320147, "h": 0.3630493093680563, "h_cv": 0.3630493093680563,
                     "h_scott": 0.44549530706469087, "h_selected": 0.3630493093680563,
                     "h_silverman": 0.4430978709126861, "loglik_gain_per_dim": -0.05182455936941355,
                     "loglik_per_dim": -0.4120503166659246, "n_train": 640, "n_val": 80,
                     "nn_rms_median": 0.36157122632640293, "scott_loglik_per_dim": -0.4487469800704194,
                     "sigma_hat": 0.4483042752278286, "silverman_loglik_per_dim": -0.44695421230384236, "topk": 128,
                     "truncation_bound_opt": 1.4462585681734164e-150,
                     "truncation_error_opt": 1.9161461750627495e-07}
                },
                "reports/sample_kde/metrics.json": {
                  "data": {"distinct_anchors": 40, "fraction_outside_range": 0.469580078125, "h": 0.3630493093680563,
                     "kernel": "gaussian", "n_samples": 40, "rms_offset_over_h": 0.9982882738113403,
                     "samples_per_second": 1864.075092737374, "seconds": 0.021458363000419922}
                },
                "reports/train/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
                },
                "reports/refine/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
                },
                "reports/reference/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/reference/metrics.json'"}
                },
                "reports/eval/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/eval/metrics.json'"}
                }
              },
              "meta": {}
            },
            "error": null,
            "experiments": null
          }
        ],
        "executor": {
          "state": "success",
          "name": "dvc-task",
          "local": {"root": null,
             "log": "/tmp/abl/proj/.dvc/tmp/exps/run/c32a6a996828349d3e04ff2563c9fa99abdd20de/c32a6a996828349d3e04ff2563c9fa99abdd20de.out",
             "pid": 19650, "returncode": 0, "task_id": "c32a6a996828349d3e04ff2563c9fa99abdd20de"}
        },
        "name": "techy-user"
      },
      {
        "revs": [
          {
            "rev": "c7cd1d08f0055afd5c0a6458f9e6a9db3e6215c9",
            "name": "waiting",
            "data": {
              "rev": "c7cd1d08f0055afd5c0a6458f9e6a9db3e6215c9",
              "timestamp": "2026-11-29T01:27:46",
              "params": {
                "params.yaml": {
                  "data": {
                    "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
                       "limit": 800, "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
                    "kde": {"bandwidth": "cv", "bandwidth_scale": 3, "topk": 128, "grid_min": "auto",
                       "grid_max": "auto", "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
                    "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16,
                       "grid_samples": 8},
                    "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                       "attn_resolutions": [8], "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002,
                       "sigma_max_factor": 1.5, "batch_size": 32, "total_kimg": 0.64, "lr": 0.001,
                       "weight_decay": 0.0, "warmup_kimg": 0.1, "grad_clip": 10.0, "ema_halflife_kimg": 5,
                       "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20, "state_every_kimg": 0.32,
                       "keep_states": 2, "precision": "fp32", "compile": false, "device": "auto",
                       "eval_images": 50},
                    "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler",
                       "sigma_min": 0.002, "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250,
                       "precision": "fp32", "device": "auto", "grid_samples": 64, "trajectory_samples": 8},
                    "reference": {"weights": "auto", "weights_sha256": null, "allow_download": false,
                       "train_images": 2000, "seed": 0, "batch_size": 50, "device": "auto"},
                    "evaluate": {"n_samples": 500, "batch_size": 50, "device": "auto", "kid_subsets": 100,
                       "kid_subset_size": 1000, "pr_k": 3, "copy_ratio": 0.3333333333333333, "is_splits": 10,
                       "seed": 0, "nn_rows": 8},
                    "report": {"title": "DKGM proof-of-concept review", "nn_pairs": 8},
                    "gates": {"kde": {"enforce": true, "require_interior_optimum": true,
                       "min_loglik_gain_per_dim": -0.2, "max_truncation_bound": 0.001}, "debiaser": {"enforce": true,
                       "max_error_ratio": 0.99, "max_val_mse": 1.0}, "eval": {"enforce": true, "max_fid": 100.0,
                       "min_debias_gain": 0.0, "max_copy_fraction": 0.1, "max_anchor_fraction": 1.0}}
                  }
                }
              },
              "metrics": {},
              "meta": {}
            },
            "error": null,
            "experiments": null
          }
        ],
        "executor": {
          "state": "queued",
          "name": "dvc-task",
          "local": {"root": null, "log": null, "pid": null, "returncode": null,
             "task_id": "c7cd1d08f0055afd5c0a6458f9e6a9db3e6215c9"}
        },
        "name": "waiting"
      },
      {
        "revs": [
          {
            "rev": "af2faf3b182537619426b91fbb833c8cac92b6e5",
            "name": "bad",
            "data": {
              "rev": "af2faf3b182537619426b91fbb833c8cac92b6e5",
              "timestamp": "2026-11-29T01:27:28",
              "params": {
                "params.yaml": {
                  "data": {
                    "prepare": {"dataset": "mnist5k", "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
                       "limit": 800, "image_size": 32, "swissroll_points": 10000, "swissroll_noise": 0.02},
                    "kde": {"bandwidth": "cv", "bandwidth_scale": -1, "topk": 128, "grid_min": "auto",
                       "grid_max": "auto", "grid_points": 41, "refine_tol": 0.0001, "device": "auto"},
                    "sample_kde": {"n_samples": 40, "kernel": "gaussian", "seed": 1000000, "batch_size": 16,
                       "grid_samples": 8},
                    "debiaser": {"arch": "unet", "channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                       "attn_resolutions": [8], "dropout": 0.0, "embedding": "positional", "sigma_min": 0.002,
                       "sigma_max_factor": 1.5, "batch_size": 32, "total_kimg": 0.64, "lr": 0.001,
                       "weight_decay": 0.0, "warmup_kimg": 0.1, "grad_clip": 10.0, "ema_halflife_kimg": 5,
                       "ema_rampup_ratio": 0.1, "seed": 0, "log_every": 20, "state_every_kimg": 0.32,
                       "keep_states": 2, "precision": "fp32", "compile": false, "device": "auto",
                       "eval_images": 50},
                    "refine": {"schedule": "geometric", "steps": 10, "eta": 0.0, "solver": "euler",
                       "sigma_min": 0.002, "rho": 7.0, "a0": 0.3, "gamma": 0.55, "batch_size": 250,
                       "precision": "fp32", "device": "auto", "grid_samples": 64, "trajectory_samples": 8},
                    "reference": {"weights": "auto", "weights_sha256": null, "allow_download": false,
                       "train_images": 2000, "seed": 0, "batch_size": 50, "device": "auto"},
                    "evaluate": {"n_samples": 500, "batch_size": 50, "device": "auto", "kid_subsets": 100,
                       "kid_subset_size": 1000, "pr_k": 3, "copy_ratio": 0.3333333333333333, "is_splits": 10,
                       "seed": 0, "nn_rows": 8},
                    "report": {"title": "DKGM proof-of-concept review", "nn_pairs": 8},
                    "gates": {"kde": {"enforce": true, "require_interior_optimum": true,
                       "min_loglik_gain_per_dim": -0.2, "max_truncation_bound": 0.001}, "debiaser": {"enforce": true,
                       "max_error_ratio": 0.99, "max_val_mse": 1.0}, "eval": {"enforce": true, "max_fid": 100.0,
                       "min_debias_gain": 0.0, "max_copy_fraction": 0.1, "max_anchor_fraction": 1.0}}
                  }
                }
              },
              "metrics": {
                "reports/prepare/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/prepare/metrics.json'"}
                },
                "reports/kde/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/kde/metrics.json'"}
                },
                "reports/sample_kde/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/sample_kde/metrics.json'"}
                },
                "reports/train/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/train/metrics.json'"}
                },
                "reports/refine/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/refine/metrics.json'"}
                },
                "reports/reference/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/reference/metrics.json'"}
                },
                "reports/eval/metrics.json": {
                  "error": {"type": "FileNotFoundError",
                     "msg": "[Errno 2] No such file or directory: 'reports/eval/metrics.json'"}
                }
              },
              "meta": {}
            },
            "error": {"msg": "Experiment run failed", "type": ""},
            "experiments": null
          }
        ],
        "executor": {
          "state": "failed",
          "name": null,
          "local": {"root": null,
             "log": "/tmp/abl/proj/.dvc/tmp/exps/run/af2faf3b182537619426b91fbb833c8cac92b6e5/af2faf3b182537619426b91fbb833c8cac92b6e5.out",
             "pid": 21247, "returncode": 255, "task_id": "af2faf3b182537619426b91fbb833c8cac92b6e5"}
        },
        "name": "bad"
      }
    ]
  }
]""")

BASELINE_SHA = EXP_SHOW[0]["rev"]
TEMPLATES = {g["name"]: g for g in EXP_SHOW[0]["experiments"]}  # ws15, techy-user, bad, waiting


# ----------------------------------------------------------------------------- building exp show JSON


def eval_metrics(kde_fid: float, refined_fid: float, *, recall: float = 0.5, copy: float = 0.01, anchor: float = 0.3,
                 nfe: int = 10, real_fid: float = 4.2, debias_gain: float | None = -1.0) -> dict:
    """reports/eval/metrics.json of an image run, with the keys stages/evaluate.py writes."""
    return {
        "kind": "images", "n_samples": 500, "n_reference": 2000, "n_real": 500, "n_train": 4000, "weights": "ema",
        "nfe": nfe, "copy_ratio": 0.3333333333333333, "real_copy_fraction": 0.0, "real_nn_distance": 0.28,
        "kde_copy_fraction": 0.0, "kde_nn_distance": 0.35, "kde_anchor_fraction": 1.0, "kde_anchor_distance": 0.32,
        "refined_copy_fraction": copy, "refined_nn_distance": 0.21, "refined_anchor_fraction": anchor,
        "refined_anchor_distance": 0.08, "anchor_distance_ratio": 0.29, "feature_network": "fid-helper default_1.pt",
        "weights_sha256": "0" * 64, "weights_source": "local", "feature_images_per_second": 8.1,
        "real_laplacian_energy": 0.11, "kde_fid": kde_fid, "kde_kid": 0.2, "kde_precision": 0.1, "kde_recall": 0.9,
        "kde_copy_fraction_inception": 0.0, "kde_inception_score": None, "kde_sharpness": 3.1,
        "refined_fid": refined_fid, "refined_kid": 0.01, "refined_precision": 0.6, "refined_recall": recall,
        "refined_copy_fraction_inception": 0.0, "refined_inception_score": None, "refined_sharpness": 1.1,
        "real_fid": real_fid, "real_kid": 0.0, "real_precision": 0.7, "real_recall": 0.7,
        "real_copy_fraction_inception": 0.0, "real_inception_score": None, "fid_gain": kde_fid - refined_fid,
        "kid_gain": 0.19, "primary_metric": "fid",
        "debias_gain": (1 - refined_fid / kde_fid) if debias_gain == -1.0 else debias_gain, "seconds": 151.0,
    }


def refine_metrics(steps: int = 10, schedule: str = "geometric", eta: float = 0.0) -> dict:
    return {"device": "cpu", "eta": eta, "h": 0.3174, "kde_rms_distance_to_anchor": 0.3175, "n_samples": 2000,
            "nfe": steps, "precision": "bf16", "rms_distance_to_anchor": 0.0769, "samples_per_second": 36.6,
            "schedule": schedule, "seconds": 54.6, "solver": "euler", "steps": steps}


def set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def add_exp(entries: list, name: str, params: dict | None = None, metrics: dict | None = None,
            state: str = "success", baseline: int = 0) -> dict:
    """Add an experiment shaped like DVC 3.67's to baseline entry `baseline`: `params` dotted params.yaml keys,
    `metrics` {stage: values} merged into reports/STAGE/metrics.json. `state`: success (a queued run), workspace
    (run in the workspace: no executor), failed or queued (the captured entries of those states)."""
    template = {"success": "techy-user", "workspace": "ws15", "failed": "bad", "queued": "waiting"}[state]
    group = copy.deepcopy(TEMPLATES[template])
    rev = hashlib.sha1(name.encode()).hexdigest()
    group["name"] = name
    entry = group["revs"][0]
    entry["rev"] = entry["data"]["rev"] = rev
    entry["name"] = name
    base_params = copy.deepcopy(entries[baseline]["data"]["params"]["params.yaml"]["data"])
    entry["data"]["params"]["params.yaml"]["data"] = base_params
    for k, v in (params or {}).items():
        set_dotted(base_params, k, v)
    if state in ("success", "workspace"):
        files = entry["data"]["metrics"]
        for stage, values in (metrics or {}).items():
            f = files.setdefault(f"reports/{stage}/metrics.json", {})
            f.pop("error", None)
            f["data"] = {**f.get("data", {}), **values}
    entries[baseline].setdefault("experiments", [])
    if entries[baseline]["experiments"] is None:
        entries[baseline]["experiments"] = []
    entries[baseline]["experiments"].insert(0, group)  # DVC lists the newest first
    return group


def empty_show() -> list:
    """EXP_SHOW without experiments: a baseline commit only (`"experiments": null`, as DVC writes it)."""
    entries = copy.deepcopy(EXP_SHOW)
    entries[0]["experiments"] = None
    return entries


def full_run(scale: float = 1.0, **eval_kw) -> dict:
    """Metrics of an experiment that ran the whole pipeline."""
    kde_fid, refined_fid = eval_kw.pop("kde_fid", 80.0), eval_kw.pop("refined_fid", 20.0)
    steps, schedule = eval_kw.pop("steps", 10), eval_kw.pop("schedule", "geometric")
    return {"kde": {"h": 0.3174 * scale, "bandwidth_scale": scale}, "refine": refine_metrics(steps, schedule),
            "eval": eval_metrics(kde_fid, refined_fid, nfe=steps, **eval_kw)}


def sweeps_show() -> list:
    """A bandwidth sweep (queued out of order), an eta sweep, one failed and one queued experiment, on one baseline."""
    entries = empty_show()
    fids = {0.5: (60.0, 30.0), 1: (80.0, 20.0), 1.5: (95.0, 18.0), 2: (120.0, 19.0), 3: (170.0, 25.0)}
    recall = {0.5: 0.2, 1: 0.45, 1.5: 0.55, 2: 0.6, 3: 0.62}
    copies = {0.5: 0.3, 1: 0.05, 1.5: 0.01, 2: 0.0, 3: 0.0}
    def run(scale, **kw):
        kde_fid, refined_fid = fids[scale]
        kw = {"kde_fid": kde_fid, "refined_fid": refined_fid, "recall": recall[scale], "copy": copies[scale],
              "anchor": 0.5 * copies[scale] + 0.1, **kw}
        return full_run(scale, **kw)

    for scale in (2, 0.5, 3, 1, 1.5):
        add_exp(entries, f"bw-{scale}", {"kde.bandwidth_scale": scale}, run(scale))
    for eta, refined_fid in ((0.0, 20.0), (1, 14.0), (0.5, 16.5)):  # eta 0 is the baseline, as bw-1: same results
        add_exp(entries, f"eta-{eta}", {"refine.eta": eta}, run(1, refined_fid=refined_fid))
    add_exp(entries, "broken", {"kde.bandwidth_scale": -1}, state="failed")
    add_exp(entries, "later", {"debiaser.arch": "dae"}, state="queued")
    return entries


# ----------------------------------------------------------------------------- reading the report


def sections(md: str) -> dict[str, str]:
    """{heading (without `## ` and backticks): its text}."""
    out, name = {}, ""
    for line in md.splitlines():
        if line.startswith("## "):
            name = line[3:].replace("`", "").strip()
            out[name] = ""
        else:
            out[name] = out.get(name, "") + line + "\n"
    return out


def table(text: str) -> list[dict[str, str]]:
    """The first markdown table in `text` as dicts keyed by the header."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|") and not re.fullmatch(r"\|( :?-+:? \|)+", ln)]
    rows = [[c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")] for ln in lines]
    return [dict(zip(rows[0], r)) for r in rows[1:]]


def report(entries: list) -> tuple[A.Ablation, list[A.Plot], str]:
    ab = A.analyse(A.experiments_from_exp_show(entries))
    plots = A.plot_data(ab)
    return ab, plots, A.render(ab, plots, "ablations")


# ----------------------------------------------------------------------------- parsing DVC's JSON


def test_parse_the_captured_exp_show():
    exps = {e.name: e for e in A.experiments_from_exp_show(EXP_SHOW)}
    assert set(exps) == {"ws15", "techy-user", "bad", "waiting"}
    assert {n: e.state for n, e in exps.items()} == {"ws15": "success", "techy-user": "success", "bad": "failed",
                                                     "waiting": "queued"}
    assert all(e.baseline == "master" for e in exps.values())
    t = exps["techy-user"]
    assert t.done and t.rev.startswith("0da6795")
    assert t.params["kde.bandwidth_scale"] == 1 and t.reference["kde.bandwidth_scale"] == 1.0
    assert t.metrics["kde.h"] == pytest.approx(0.3630493093680563)
    assert "eval.refined_fid" not in t.metrics  # FileNotFoundError entries carry no values
    assert exps["ws15"].params["kde.bandwidth_scale"] == 1.5 and exps["ws15"].metrics["kde.h"] == pytest.approx(
        1.5 * t.metrics["kde.h"])
    assert exps["bad"].metrics == {} and exps["bad"].log.endswith(".out")
    assert exps["waiting"].metrics == {} and exps["waiting"].params["kde.bandwidth_scale"] == 3
    assert A.changed_params(exps["waiting"]) == ["kde.bandwidth_scale"]
    assert A.changed_params(t) == []  # 1 == 1.0


def test_workspace_is_not_an_experiment_and_commits_are_baselines():
    workspace = copy.deepcopy(EXP_SHOW[0])
    workspace.update(rev="workspace", name=None, experiments=None)
    other = copy.deepcopy(EXP_SHOW[0])
    other.update(rev="f" * 40, name=None, experiments=None)
    entries = [workspace, *copy.deepcopy(EXP_SHOW), other]  # what --all-commits returns, with the workspace
    add_exp(entries, "old-exp", {"kde.bandwidth_scale": 4}, state="workspace", baseline=2)
    exps = A.experiments_from_exp_show(entries)
    assert len(exps) == 5
    assert {e.baseline for e in exps} == {"master", "fffffff"}
    assert A.experiments_from_exp_show(empty_show()) == []


# ----------------------------------------------------------------------------- sweeps and tables


def test_experiments_grouped_by_swept_param_and_sorted():
    ab, _, md = report(sweeps_show())
    assert ab.swept == ["kde.bandwidth_scale", "refine.eta"]  # not debiaser.arch: only a queued experiment has it
    s = sections(md)
    bw = table(s["kde.bandwidth_scale"])
    assert [r["kde.bandwidth_scale"] for r in bw] == ["0.5", "1", "1.5", "2", "3"]
    # bw-1 and eta-0.0 are both the baseline point: one row (named after the newer, listed first by DVC), in both
    assert [r["experiment"] for r in bw] == ["bw-0.5", "eta-0.0 (= bw-1)", "bw-1.5", "bw-2", "bw-3"]
    assert "refine.eta" not in bw[0]  # constant within this table
    eta = table(s["refine.eta"])
    assert [(r["experiment"], r["refine.eta"]) for r in eta] == [("eta-0.0 (= bw-1)", "0"), ("eta-0.5", "0.5"),
                                                                 ("eta-1", "1")]
    assert "Swept: `kde.bandwidth_scale` (0.5, 1, 1.5, 2, 3); `refine.eta` (0, 0.5, 1)." in md
    assert "8 completed, 1 queued, 1 failed" in md


def test_table_metrics_match_the_experiments():
    _, _, md = report(sweeps_show())
    rows = {r["kde.bandwidth_scale"]: r for r in table(sections(md)["kde.bandwidth_scale"])}
    assert list(rows["2"])[:2] == ["experiment", "kde.bandwidth_scale"]
    assert [k for k in rows["2"]][2:] == [k for k, _ in A.KEY_METRICS]
    r = rows["2"]
    assert (r["eval.refined_fid"], r["eval.kde_fid"]) == ("19", "120")
    assert float(r["eval.debias_gain"]) == pytest.approx(1 - 19 / 120, abs=1e-5)
    assert (r["eval.refined_copy_fraction"], r["eval.refined_anchor_fraction"], r["eval.refined_recall"]) == \
        ("0", "0.1", "0.6")
    assert r["refine.nfe"] == "10"
    assert float(rows["2"]["kde.h"]) == pytest.approx(2 * float(rows["1"]["kde.h"]), rel=1e-4)
    eta = {r["refine.eta"]: r for r in table(sections(md)["refine.eta"])}
    assert eta["0.5"]["eval.refined_fid"] == "16.5" and eta["1"]["eval.refined_fid"] == "14"


def test_missing_metrics_show_a_dash():
    entries = copy.deepcopy(EXP_SHOW)  # ws15, techy-user: only up to sample_kde
    add_exp(entries, "no-gain", {"kde.bandwidth_scale": 2},
            {**full_run(2.0), "eval": {**eval_metrics(80.0, 20.0), "debias_gain": None, "refined_recall": None}})
    _, _, md = report(entries)
    rows = {r["experiment"]: r for r in table(sections(md)["kde.bandwidth_scale"])}
    assert [r for r in rows] == ["techy-user", "ws15", "no-gain"]
    t = rows["techy-user"]
    assert t["kde.h"] == "0.36305"
    assert all(t[k] == "—" for k, _ in A.KEY_METRICS if k != "kde.h")
    assert rows["no-gain"]["eval.debias_gain"] == "—" and rows["no-gain"]["eval.refined_recall"] == "—"
    assert rows["no-gain"]["eval.refined_fid"] == "20"


def test_failed_and_queued_experiments_are_listed_not_tabulated():
    _, _, md = report(copy.deepcopy(EXP_SHOW))
    s = sections(md)
    pending = {r["experiment"]: r for r in table(s["Not completed"])}
    assert pending == {
        "bad": {"experiment": "bad", "state": "failed", "params changed": "kde.bandwidth_scale=-1"},
        "waiting": {"experiment": "waiting", "state": "queued", "params changed": "kde.bandwidth_scale=3"},
    }
    assert "dvc queue logs NAME" in s["Not completed"]
    assert [r["experiment"] for r in table(s["kde.bandwidth_scale"])] == ["techy-user", "ws15"]
    assert "2 completed, 1 queued, 1 failed" in md


def test_only_queued_experiments():
    entries = empty_show()
    add_exp(entries, "q1", {"refine.eta": 1}, state="queued")
    _, plots, md = report(entries)
    assert "No completed experiment yet" in md and "## Plots" not in md
    assert table(sections(md)["Not completed"]) == [{"experiment": "q1", "state": "queued",
                                                     "params changed": "refine.eta=1"}]


def test_gate_params_never_define_a_sweep():
    entries = empty_show()
    add_exp(entries, "a", {"kde.bandwidth_scale": 2, "gates.eval.enforce": False}, full_run(2.0))
    add_exp(entries, "b", {"kde.bandwidth_scale": 3, "gates.eval.enforce": True}, full_run(3.0))
    ab, _, md = report(entries)
    assert ab.swept == ["kde.bandwidth_scale"]
    assert "gates." not in md


def test_a_common_override_is_not_a_sweep_and_one_experiment_gets_an_overview():
    entries = empty_show()
    add_exp(entries, "quick-1", {"debiaser.total_kimg": 10, "kde.bandwidth_scale": 1}, full_run(1.0))
    add_exp(entries, "quick-2", {"debiaser.total_kimg": 10, "kde.bandwidth_scale": 2}, full_run(2.0))
    ab, _, md = report(entries)
    assert ab.swept == ["kde.bandwidth_scale"]  # total_kimg is the same in both
    assert "debiaser.total_kimg" not in md.split("## Not completed")[0]

    entries = empty_show()
    add_exp(entries, "only", {"refine.eta": 0.5}, full_run())
    ab, _, md = report(entries)
    assert ab.swept == [] and ab.tables == []
    assert [r["experiment"] for r in table(sections(md)["Completed experiments"])] == ["only"]
    assert "No param is swept" in md


def test_a_grid_is_one_table_per_param_with_the_other_crossed():
    entries = empty_show()
    for steps in (1, 5, 10, 40):
        for sched, base in (("geometric", 30.0), ("karras", 25.0)):
            add_exp(entries, f"{sched[0]}{steps}", {"refine.steps": steps, "refine.schedule": sched},
                    full_run(steps=steps, schedule=sched, refined_fid=base + 40 / steps))
    add_exp(entries, "bw-2", {"kde.bandwidth_scale": 2}, full_run(2.0))
    ab, plots, md = report(entries)
    steps_t = next(t for t in ab.tables if t.param == "refine.steps")
    assert steps_t.crossed == ["refine.schedule"]
    assert steps_t.columns == ["refine.steps", "refine.schedule"]
    s = sections(md)
    rows = table(s["refine.steps (with refine.schedule)"])
    assert [(r["refine.steps"], r["refine.schedule"]) for r in rows] == [
        (str(n), sch) for n in (1, 5, 10, 40) for sch in ("geometric", "karras")]
    assert "bw-2" not in [r["experiment"] for r in rows]  # bandwidth is not swept with the steps
    assert [r["kde.bandwidth_scale"] for r in table(s["kde.bandwidth_scale"])] == ["1", "2"]  # g10 is the baseline

    nfe = next(p for p in plots if p.filename == "fid_vs_nfe.png")
    assert nfe.skipped is None and nfe.log_x
    lines = {s.label: s.points for s in nfe.series}
    assert list(lines) == ["refined, geometric", "refined, karras", "KDE (stage 1, before debiasing)"]
    assert lines["refined, karras"] == [(1.0, 65.0), (5.0, 33.0), (10.0, 29.0), (40.0, 26.0)]
    assert lines["KDE (stage 1, before debiasing)"] == [(1.0, 80.0), (40.0, 80.0)]


def test_bandwidth_plot_reads_the_scale_under_its_new_and_its_old_key():
    """Experiments made before the operating point moved to sample_kde swept kde.bandwidth_scale; newer
    ones pin sample_kde.bandwidth_scale, or leave it `auto` and record the scale calibrate chose."""
    entries = empty_show()
    add_exp(entries, "old", {"kde.bandwidth_scale": 3}, full_run(3.0, refined_fid=40.0))
    base = entries[0]["data"]["params"]["params.yaml"]["data"]
    base["sample_kde"]["bandwidth_scale"] = "auto"
    for name, scale, fid in (("pinned-2", 2, 30.0), ("pinned-4", 4, 50.0)):
        add_exp(entries, name, {"sample_kde.bandwidth_scale": scale}, full_run(scale, refined_fid=fid))
    chosen = full_run(2.5, refined_fid=35.0)
    chosen["sample_kde"] = {"bandwidth_scale": 2.5}  # auto: what calibrate chose
    add_exp(entries, "auto", {"refine.steps": 10}, chosen)
    _, plots, _ = report(entries)
    fid = next(p for p in plots if p.filename == "fid_vs_bandwidth.png")
    refined = next(s for s in fid.series if s.label.startswith("refined"))
    # "auto" changes no swept param (it is the reference point): drawn at the scale calibrate chose
    assert refined.points == [(2.0, 30.0), (2.5, 35.0), (3.0, 40.0), (4.0, 50.0)]


# ----------------------------------------------------------------------------- plots


def is_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    return struct.unpack(">II", data[16:24])


def test_plot_data_against_the_bandwidth():
    _, plots, _ = report(sweeps_show())
    fid, mem, nfe = plots
    assert fid.skipped is None and [s.label for s in fid.series] == ["KDE (stage 1)", "refined (stage 2)",
                                                                     "real held-out data (floor)"]
    assert fid.series[0].points == [(0.5, 60.0), (1.0, 80.0), (1.5, 95.0), (2.0, 120.0), (3.0, 170.0)]
    assert fid.series[1].points == [(0.5, 30.0), (1.0, 20.0), (1.5, 18.0), (2.0, 19.0), (3.0, 25.0)]
    assert fid.series[2].dashed
    assert {s.label.split(" ")[0]: [y for _, y in s.points] for s in mem.series} == {
        "recall": [0.2, 0.45, 0.55, 0.6, 0.62], "copy": [0.3, 0.05, 0.01, 0.0, 0.0],
        "anchor": pytest.approx([0.25, 0.125, 0.105, 0.1, 0.1])}
    assert all(x == [0.5, 1.0, 1.5, 2.0, 3.0] for x in ([x for x, _ in s.points] for s in mem.series))
    # the eta sweep changes no step count: no NFE plot, and a line saying which sweep to queue
    assert nfe.skipped and "refine.steps=1,2,5,10,20,40" in nfe.skipped and not nfe.series


def test_plots_are_written_as_png_and_linked(tmp_path):
    ab, plots, _ = report(sweeps_show())
    out = tmp_path / "reports" / "ablations.md"
    stale = out.with_suffix("") / "fid_vs_nfe.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    text = A.render(ab, plots, "ablations")
    written = A.write_outputs(text, plots, out)
    assert sorted(p.name for p in written) == ["fid_vs_bandwidth.png", "memorization_vs_bandwidth.png"]
    for p in written:
        w, h = is_png(p)
        assert w > 300 and h > 200
    assert not stale.exists()  # skipped now: the old file is gone
    assert sorted(p.name for p in (tmp_path / "reports").rglob("*")) == [
        "ablations", "ablations.md", "fid_vs_bandwidth.png", "memorization_vs_bandwidth.png"]  # no temp files
    md = out.read_text()
    assert md == text
    assert "![FID against the KDE bandwidth scale](ablations/fid_vs_bandwidth.png)" in md
    assert "- Refined FID against the number of network evaluations: skipped: `refine.nfe` does not vary" in md

    entries = empty_show()  # the grid: the NFE plot, log x
    for steps in (1, 2, 10):
        for sched in ("geometric", "robbins_monro"):
            add_exp(entries, f"{sched}{steps}", {"refine.steps": steps, "refine.schedule": sched},
                    full_run(steps=steps, schedule=sched, refined_fid=20 + 10 / steps))
    ab, plots, _ = report(entries)
    written = A.write_outputs(A.render(ab, plots, "ablations"), plots, out)
    assert [p.name for p in written] == ["fid_vs_nfe.png"]
    is_png(written[0])
    assert not (out.with_suffix("") / "fid_vs_bandwidth.png").exists()


def test_plots_skipped_when_their_x_never_varies():
    entries = empty_show()
    for eta in (0.5, 1):
        add_exp(entries, f"eta-{eta}", {"refine.eta": eta}, full_run())
    _, plots, md = report(entries)
    assert all(p.skipped for p in plots)
    lines = [ln for ln in sections(md)["Plots"].splitlines() if ln.startswith("- ")]
    assert len(lines) == 3
    assert "`sample_kde.bandwidth_scale` does not vary" in lines[0]
    assert "`dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`" in lines[0] and "docs/ablations.md" in lines[0]
    assert "`dvc exp run --queue -S 'refine.steps=1,2,5,10,20,40'`" in lines[2]

    # x varies, but the experiments stopped before evaluate: said so
    _, plots, _ = report(copy.deepcopy(EXP_SHOW))
    assert "no completed experiment of the `sample_kde.bandwidth_scale` sweep has `eval.kde_fid`" in plots[0].skipped


def test_print_only_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(A, "exp_show_all", lambda all_commits, cwd=None: sweeps_show())
    assert A.run_ablation("-", cwd=tmp_path) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Ablations\n") and "not written (`--out -`)" in out
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- no experiments, errors


def test_no_experiments_prints_how_to_queue_them_and_writes_nothing(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(all_commits, cwd=None):
        calls.append(all_commits)
        return empty_show()

    monkeypatch.setattr(A, "exp_show_all", fake)
    assert A.run_ablation("reports/ablations.md", cwd=tmp_path) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [out.strip()]
    assert out.startswith("ablation: no experiments on baseline `master`; queue a sweep, e.g. "
                          "`dvc exp run --queue -S 'sample_kde.bandwidth_scale=0.5,1,1.5,2,3'`, then `dvc queue start`")
    assert "docs/ablations.md" in out and "Nothing written." in out
    assert list(tmp_path.iterdir()) == []
    assert A.run_ablation("reports/ablations.md", all_commits=True, cwd=tmp_path) == 0
    assert "no experiments in the repository" in capsys.readouterr().out
    assert calls == [False, True]


def test_cli_outside_a_dvc_repo_exits_2(tmp_path):
    r = run_cli(["ablation"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: ablation: not inside a DVC repository "
                                             "(run it in the project, where `dvc init` was run)"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- end to end


def sh(root: Path, *cmd: str) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), cwd=root, env=cli_env(DKGM_NO_PREFECT="1"), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.mark.slow
def test_queued_bandwidth_sweep_end_to_end(dvc_project):
    root = dvc_project
    dvc = str(VENV_BIN / "dvc")
    t0 = time.monotonic()
    r = run_cli(["ablation"], cwd=root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ablation: no experiments on baseline") and not (root / "reports").exists()

    # DVC's grid syntax: one queued experiment per value (sweeps need --queue)
    sh(root, dvc, "exp", "run", "--queue", "-S", "kde.bandwidth=0.3,0.6", "fit_kde")
    r = run_cli(["ablation", "--out", "-"], cwd=root)
    assert r.returncode == 0, r.stderr
    pending = table(sections(r.stdout)["Not completed"])
    assert sorted((p["state"], p["params changed"]) for p in pending) == [("queued", "kde.bandwidth=0.3"),
                                                                         ("queued", "kde.bandwidth=0.6")]
    t_cli = time.monotonic() - t0

    sh(root, dvc, "exp", "run", "--run-all", "-j", "2")
    t_run = time.monotonic() - t0 - t_cli

    r = run_cli(["ablation"], cwd=root)
    assert r.returncode == 0, r.stderr
    md = (root / "reports/ablations.md").read_text()
    assert r.stdout == md
    rows = table(sections(md)["kde.bandwidth"])
    assert [row["kde.bandwidth"] for row in rows] == ["0.3", "0.6"]
    assert {row["experiment"] for row in rows} == {p["experiment"] for p in pending}
    h1, h2 = (float(row["kde.h"]) for row in rows)
    assert (h1, h2) == (0.3, 0.6)  # a fixed density bandwidth is used as given
    assert all(row["eval.refined_fid"] == "—" for row in rows)  # fit_kde only
    assert "2 completed" in md and "## Not completed" not in md
    assert not list((root / "reports").rglob("*.png"))  # no FID yet: plots skipped, each with a line
    assert md.count("skipped:") == 3
    print(f"\nqueue + ablation: {t_cli:.1f} s, dvc exp run --run-all -j 2: {t_run:.1f} s, "
          f"total {time.monotonic() - t0:.1f} s")


def test_the_baseline_commits_own_run_is_the_reference_row():
    """A sweep that never repeats the baseline value still shows it: the baseline commit's own metrics."""
    entries = empty_show()
    for name, scale in (("bw-2", 2), ("bw-3", 3)):
        add_exp(entries, name, {"kde.bandwidth_scale": scale}, full_run(scale, refined_fid=30.0 + scale))
    add_exp(entries, "eta-1", {"refine.eta": 1}, full_run(1, refined_fid=15.0))
    base_metrics = full_run(1, refined_fid=22.0)
    entries[0]["data"]["metrics"] = {f"reports/{stage}/metrics.json": {"data": v} for stage, v in base_metrics.items()}
    _, _, md = report(entries)
    s = sections(md)
    bw = table(s["kde.bandwidth_scale"])
    assert [(r["experiment"], r["kde.bandwidth_scale"], r["eval.refined_fid"]) for r in bw] == [
        ("master (baseline)", "1", "22"), ("bw-2", "2", "32"), ("bw-3", "3", "33")]
    eta = table(s["refine.eta"])
    assert [(r["experiment"], r["eval.refined_fid"]) for r in eta] == [("master (baseline)", "22"), ("eta-1", "15")]
    # without metrics of its own (never run at that commit) the baseline adds no row
    entries[0]["data"]["metrics"] = {}
    assert "master (baseline)" not in report(entries)[2]
