"""params.yaml, the schema, dvc.yaml and the stage registry must agree."""

from __future__ import annotations

import pytest
import yaml

from pipeline import params as P
from pipeline.registry import STAGES
from tests.conftest import REPO


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _outs(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_default_params_validate_and_equal_schema_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    loaded = P.validate(raw)
    assert loaded == P.Params()  # params.yaml spells out exactly the schema defaults


def test_every_registered_stage_is_in_dvc_yaml_and_back(dvc_stages):
    assert set(dvc_stages) == set(STAGES)


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_lists_exactly_the_keys_the_stage_reads(dvc_stages, name):
    spec = STAGES[name]
    model = type(P.section(P.Params(), spec.section))
    assert sorted(dvc_stages[name]["params"]) == sorted(P.leaf_keys(model, spec.section))


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_yaml_paths_and_command_match_the_registry(dvc_stages, name):
    spec, stage = STAGES[name], dvc_stages[name]
    assert stage["cmd"] == spec.cmd
    assert _outs(stage["outs"]) == set(spec.outs)
    code = {d for d in stage["deps"] if d.endswith(".py")}
    assert {d for d in stage["deps"] if d not in code} == set(spec.deps)
    for c in code:
        assert (REPO / c).is_file(), f"dvc.yaml code dependency {c} does not exist"
    if spec.module:
        assert spec.module.replace(".", "/") + ".py" in code  # a stage re-runs when its code changes
        assert list(spec.load().OUTPUTS) == list(spec.outs)


def test_metrics_and_plots_declared_at_top_level_exist_as_outputs():
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())
    outs = set().union(*(set(s.outs) for s in STAGES.values()))
    assert set(top["metrics"]) <= outs
    plots = {next(iter(p)) if isinstance(p, dict) else p for p in top["plots"]}
    assert plots <= outs and all(p.endswith(".png") for p in plots)  # image plots render offline


@pytest.mark.parametrize(
    "mutate, key, fragment",
    [
        (lambda r: r["prepare"].update(dataset="cifar"), "prepare.dataset", "mnist5k"),
        (lambda r: r["kde"].update(bandwidth=-0.3), "kde.bandwidth", "positive number (got -0.3)"),
        (lambda r: r["kde"].update(bandwidth="loo"), "kde.bandwidth", "got 'loo'"),
        (lambda r: r["kde"].update(bandwidth_scale=0), "kde.bandwidth_scale", "greater than 0"),
        (lambda r: r["kde"].update(grid_min=2.0, grid_max=1.0), "kde.grid_max", "grid is empty"),
        (lambda r: r["kde"].update(topk_k=3), "kde.topk_k", "unknown key"),
        (lambda r: r.update(evaluation={}), "evaluation", "unknown key"),
        (lambda r: r["gates"]["kde"].update(enforce="maybe"), "gates.kde.enforce", "boolean"),
        (lambda r: r["prepare"].update(val_fraction=0.6, test_fraction=0.5), "prepare.test_fraction", "below 1"),
        (lambda r: r["refine"].update(steps=0), "refine.steps", "greater than or equal to 1"),
        (lambda r: r["refine"].update(eta=1.5), "refine.eta", "less than or equal to 1"),
        (lambda r: r["refine"].update(gamma=0.5), "refine.gamma", "greater than 0.5"),
        (lambda r: r["debiaser"].update(arch="transformer"), "debiaser.arch", "'unet', 'dae' or 'mlp'"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(mutate, key, fragment):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    with pytest.raises(P.ParamsError) as err:
        P.validate(raw)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"params.yaml: {key}:" in msg and fragment in msg


def test_missing_and_unparsable_params_file(tmp_path):
    with pytest.raises(P.ParamsError, match="file not found"):
        P.load_params(tmp_path / "params.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("kde: [unclosed\n")
    with pytest.raises(P.ParamsError, match="not valid YAML"):
        P.load_params(bad)
