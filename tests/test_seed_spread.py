"""The seed-spread benchmark's bookkeeping (benchmarks/seed_spread.py): which records a table reads,
and how a DKGM-only variant is named and kept apart from the default recipe's records. No training."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spread():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("seed_spread", ROOT / "benchmarks" / "seed_spread.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(seed, recipe, fid, dkgm_set=None):
    row = {"fid": fid, "fid_se": 1.0, "zu_pixel": 1.0, "scale": 6.25, "floor_fid": 14.0}
    return {"seed": seed, "n": 500, "recipe": recipe, "dkgm_set": dkgm_set or {}, "dkgm": row,
            "control": {**row, "fid": fid + 1.0}, "baseline": {**row, "fid": fid + 20.0}}


def test_a_variant_changes_only_dkgm_keys_and_names_its_own_network(spread):
    recipe = {"debiaser": {"p_std": 1.2, "channels": 24}, "baseline": {"sigma_max": 80.0}}
    dk_set = spread.dkgm_only(["sigma_dist=lognormal_truncated", "p_std=0.8"])
    assert dk_set == {"sigma_dist": "lognormal_truncated", "p_std": 0.8}
    mine = spread.variant_recipe(recipe, dk_set)
    assert mine["debiaser"] == {"p_std": 0.8, "channels": 24, "sigma_dist": "lognormal_truncated"}
    assert recipe["debiaser"]["p_std"] == 1.2, "the params recipe is not modified"
    assert spread.variant_recipe(recipe, {}) is recipe
    # the variant's network is another folder; the baseline's (named by the params recipe) is shared
    assert spread._named("dkgm", 0, mine) != spread._named("dkgm", 0, recipe)
    assert spread._named("dkgm", 0, recipe) == spread._named("dkgm", 0, dict(recipe))


@pytest.mark.parametrize("pairs, key", [(["channels=32"], "channels"), (["seed=3"], "seed"), (["p_std=-1"], "p_std")])
def test_a_shared_key_or_a_bad_value_is_refused_naming_it(spread, pairs, key):
    with pytest.raises((SystemExit, ValueError)) as err:  # ValueError: pydantic's ValidationError
        spread.dkgm_only(pairs)
    assert key in str(err.value)


def test_tables_read_only_their_own_recipes_records(spread, capsys):
    base = {"debiaser": {"p_std": 1.2}}
    var = spread.variant_recipe(base, {"p_std": 0.8})
    records = [_record(0, base, 27.0), _record(1, base, 28.0), _record(0, var, 25.0, {"p_std": 0.8}),
               _record(2, {"debiaser": {"p_std": 9.9}}, 40.0)]
    kept = spread.current_records(records, base)
    assert [r["dkgm"]["fid"] for r in kept] == [27.0, 28.0]
    err = capsys.readouterr().err
    assert "1 record(s) of DKGM-only variants left out" in err and "p_std=0.8" in err
    assert "seeds [2]" in err  # the other recipe's record, told apart from the variant
    kept = spread.current_records(records, var)
    assert [r["dkgm"]["fid"] for r in kept] == [25.0]
    summary = spread.summarise(kept)
    assert summary["dkgm_minus_control"]["per_seed"] == {0: -1.0}
    with pytest.raises(SystemExit, match="same --set"):
        spread.current_records(records, spread.variant_recipe(base, {"p_std": 0.5}))


def test_a_variant_table_names_its_keys_and_a_copying_control(spread, tmp_path):
    base = {"debiaser": {"p_mean": -1.2}}
    var = spread.variant_recipe(base, {"p_mean": -1.6})
    rec = _record(0, var, 30.0, {"p_mean": -1.6})
    rec["control"].update(probe_zu=-2.44, candidates=[{"scale": 6.0, "passed": False}])
    md = tmp_path / "variant.md"
    spread.table([rec], md, tmp_path / "variant.json", tmp_path / "rows.jsonl", {"p_mean": -1.6})
    text = md.read_text()
    assert text.startswith("# A DKGM-only variant, `p_mean=-1.6`: 1 training seed(s)")
    assert "--set p_mean=-1.6 --out " in text
    assert "- DKGM - control: seed 0: -1.00" in text
    assert "control's own probe fails the novelty rule" in text and "seed 0 (probe pixel Z_U -2.44)" in text
    rec["control"]["candidates"] = [{"scale": 6.0, "passed": True}]
    spread.table([rec], md, tmp_path / "variant.json", tmp_path / "rows.jsonl", {"p_mean": -1.6})
    assert "novelty rule" not in md.read_text()
