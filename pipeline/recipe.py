"""What makes two runs comparable apart from the training seed: the recipe of a params set, and
the keys in which two recipes differ. A leaf module (pydantic only): the report and the
seed-spread benchmark read it without the params schema or the stage registry."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# keys that do not change what a network or a sampler is (speed, devices, logging, bookkeeping)
_NOT_RECIPE = {"seed", "device", "precision", "compile", "log_every", "state_every_kimg", "keep_states", "eval_images"}


def training_recipe(params: BaseModel | dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' networks and samples comparable apart from the training seed: the debiaser
    and baseline sections (both networks' recipe), the sampler and the data. A seed-spread table made
    under another recipe does not describe this run (pipeline.report says so). `params`: the validated
    params (pipeline.params.load_params) or their JSON dump."""
    dump = params if isinstance(params, dict) else params.model_dump(mode="json")
    return {"prepare": {k: v for k, v in dump["prepare"].items() if k not in ("allow_download", "path")},
            "debiaser": {k: v for k, v in dump["debiaser"].items() if k not in _NOT_RECIPE},
            "baseline": dump["baseline"],
            "refine": {k: v for k, v in dump["refine"].items() if k not in _NOT_RECIPE | {"batch_size", "grid_samples",
                                                                                         "trajectory_samples"}},
            "sample_baseline": {k: dump["sample_baseline"][k] for k in ("steps", "solver", "eta", "rho", "sigma_min")}}


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two training_recipe dicts."""
    return sorted(f"{sec}.{k}" for sec in set(a) | set(b) for k in set(a.get(sec, {})) | set(b.get(sec, {}))
                  if a.get(sec, {}).get(k) != b.get(sec, {}).get(k))
