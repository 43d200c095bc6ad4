"""One place per stage contract: the stage modules, the assembled schema, params.yaml and the
derived dvc.yaml must agree; imports run one way; every stage's code is its dependency."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest
import yaml

from pipeline import dvcyaml, registry
from pipeline import params as P
from tests.conftest import REPO

STAGES = registry.all_stages()


@pytest.fixture(scope="module")
def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _outs(entries) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_committed_dvc_yaml_is_what_the_stage_modules_say():
    committed = (REPO / "dvc.yaml").read_text()
    assert committed == dvcyaml.render(list(STAGES.values()), REPO), (
        "dvc.yaml is out of date: run `python -m pipeline dvc-yaml` and commit it")


def test_every_key_is_described_once_in_its_stage_module_and_params_yaml_shows_that():
    undescribed = [f"{s.section}.{k}" for s in STAGES.values() if s.section and s.params
                   for k, info in s.params.model_fields.items() if not (info.description or "").strip()]
    assert undescribed == [], "give these keys Field(description=...) in their stage module"
    text = (REPO / "params.yaml").read_text()
    assert P.sync_comments(text) == (text, []), "params.yaml comments are stale: run `python -m pipeline dvc-yaml`"


def test_comment_sync_rewrites_only_comments_and_is_idempotent():
    text = ("# header\nkde:                 # the section's own comment stays\n  bandwidth: 0.5  # old words\n"
            "  grid_points: 8\n\ngates:\n  kde:\n    enforce: true   # stale\n")
    wanted = {"kde.bandwidth": "the bandwidth", "kde.grid_points": "grid size", "gates.kde.enforce": "false: go on",
              "kde.absent": "never written"}
    synced, changed = P.sync_comments(text, wanted)
    assert changed == ["kde.bandwidth", "kde.grid_points", "gates.kde.enforce"]
    assert yaml.safe_load(synced) == yaml.safe_load(text)  # values untouched
    lines = synced.splitlines()
    assert lines[:2] == text.splitlines()[:2] and lines[4:6] == ["", "gates:"]
    assert lines[2] == "  bandwidth: 0.5  # the bandwidth"  # the comment keeps its column
    assert lines[3] == "  grid_points: 8".ljust(P.COMMENT_COLUMN) + "# grid size"
    assert lines[7] == "    enforce: true   # false: go on"
    assert P.sync_comments(synced, wanted) == (synced, [])


def test_dvc_yaml_check_names_a_stale_comment_and_the_command_fixes_it(tmp_path, capsys):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    text = (tmp_path / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("# smallest training noise level", "# hand-edited", 1))
    assert dvcyaml.run_dvc_yaml(tmp_path, check=True) == 1
    assert "debiaser.sigma_min" in capsys.readouterr().err
    assert dvcyaml.run_dvc_yaml(tmp_path) == 0
    assert (tmp_path / "params.yaml").read_text() == text
    assert dvcyaml.run_dvc_yaml(tmp_path, check=True) == 0


def test_default_params_validate_and_equal_schema_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert P.validate(raw) == P.defaults()  # params.yaml spells out exactly the schema defaults
    assert dvcyaml.missing_sections(REPO / "params.yaml") == ({}, [])


def test_every_stage_reads_exactly_its_section_keys(dvc_stages):
    assert list(dvc_stages) == list(STAGES)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, spec in STAGES.items():
        if spec.all_params:
            assert dvc_stages[name]["params"] == [{"params.yaml": None}]
            continue
        keys = dvc_stages[name]["params"]
        own = dvcyaml.leaf_keys(spec.params, spec.section) if spec.section else []
        assert keys == [*own, *spec.reads]  # its own section, then the other sections' keys it names one by one
        assert not set(spec.reads) & set(own) and all(not k.startswith(spec.section + ".") or not spec.section
                                                      for k in spec.reads)
        for key in keys:  # DVC refuses a params dependency that params.yaml lacks
            node = raw
            for part in key.split("."):
                assert part in node, f"{name}: params.yaml has no {key}"
                node = node[part]


def test_dvc_yaml_artifacts_and_command_match_the_stage(dvc_stages):
    for name, spec in STAGES.items():
        stage = dvc_stages[name]
        assert stage["cmd"] == spec.command
        assert _outs(stage["outs"]) == set(spec.out_paths)
        cached = {next(iter(e)) if isinstance(e, dict) else e: not isinstance(e, dict) for e in stage["outs"]}
        assert all(cached[o.path] == o.cached for o in spec.outs)
        artifacts = [d for d in stage["deps"] if not d.endswith((".py", ".j2", ".css"))]
        assert artifacts == list(spec.deps)
        assert spec.module.replace(".", "/") + ".py" in stage["deps"]  # a stage re-runs when its code changes


def test_every_input_is_some_stage_s_output():
    produced = {p for s in STAGES.values() for p in s.out_paths}
    for spec in STAGES.values():
        assert set(spec.deps) <= produced, (spec.name, set(spec.deps) - produced)


def test_metrics_and_plots_declared_at_top_level_are_outputs():
    top = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert top["metrics"] == [o.path for s in STAGES.values() for o in s.outs_of("metrics")]
    plots = [o.path for s in STAGES.values() for o in s.outs_of("figure")]
    assert top["plots"] == plots and all(p.endswith(".png") for p in plots)  # image plots render offline


# ----------------------------------------------------------------------------- layers and code deps


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package, forbidden", [("dkgm", ("stages", "pipeline", "prefect", "pydantic", "dvc")),
                                                ("stages", ("pipeline", "prefect", "dvc"))])
def test_imports_run_one_way(package, forbidden):
    """pipeline -> stages -> dkgm: no module of a lower layer imports a higher one (anywhere in the file)."""
    for path in sorted((REPO / package).glob("*.py")):
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in forbidden)
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_stage_modules_never_import_each_other():
    """A stage module reaches another stage's code only through the library or a shared helper
    module, never by importing that stage: its code deps (the import closure) hold no other stage
    module, so an edit to one stage re-runs that stage and what reads its outputs, nothing else."""
    modules = {s.module for s in STAGES.values() if s.module.startswith("stages.")}  # (the report reads them all)
    files = {m: dvcyaml.module_file(m).relative_to(REPO).as_posix() for m in modules}
    assert len(modules) >= 10  # the registry found the stage modules
    for module in sorted(modules):
        closure = dvcyaml.import_closure(module)
        others = sorted(m for m, f in files.items() if m != module and f in closure)
        assert not others, f"{module} imports the stage modules {others} (directly or through a helper)"


def _stages_package(root, files: dict[str, str]) -> None:
    """A toy `stages` package under root: {module name: source}, plus an empty __init__.py."""
    pkg = root / "stages"
    pkg.mkdir()
    for name, source in {"__init__": "", **files}.items():
        (pkg / f"{name}.py").write_text(source)


def test_the_stage_import_check_sees_an_indirect_import(tmp_path):
    """The rule's own test: a helper that imports a stage module puts it in the closure."""
    _stages_package(tmp_path, {"one": "from stages import helper\n",
                               "helper": "def f():\n    from stages.two import STAGES\n    return STAGES\n",
                               "two": "STAGES = ()\n"})
    assert "stages/two.py" in dvcyaml.import_closure("stages.one", tmp_path)


def test_code_deps_cover_what_each_stage_process_imports(dvc_stages):
    """Import each stage's module in a fresh interpreter: every project file it loads is a declared
    dependency (the static closure may hold more: imports inside functions)."""
    modules = sorted({s.module for s in STAGES.values()})
    script = (
        "import json, sys, importlib; from pathlib import Path\n"
        "root = Path(sys.argv[1]).resolve(); own = [root / p for p in ('dkgm', 'stages', 'pipeline')]; out = {}\n"
        "for name in sys.argv[2:]:\n"
        "    importlib.import_module(name)\n"
        "    files = [Path(m.__file__).resolve() for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "    out[name] = sorted(str(f.relative_to(root)) for f in files if any(f.is_relative_to(o) for o in own))\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('dkgm', 'stages', 'pipeline')]:\n"
        "        del sys.modules[m]\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(REPO), *modules], cwd=REPO, capture_output=True, text=True,
                       check=True)
    loaded = json.loads(r.stdout)
    for name, spec in STAGES.items():
        declared = {d for d in dvc_stages[name]["deps"] if d.endswith((".py", ".j2"))}
        missing = set(loaded[spec.module]) - declared
        assert not missing, f"{name} imports {sorted(missing)} but dvc.yaml does not list them"
        assert "pipeline/__main__.py" not in declared and "pipeline/flows.py" not in declared  # orchestration only


def test_declarations_and_cli_load_without_torch():
    """Every stage's declaration, the CLI and the gate code import without torch: a gate, prepare,
    `stages`, `--help` or `dvc-yaml` process does not pay ~2.5 s for it (stage modules import torch
    and the torch-based library modules inside the functions that use them)."""
    script = ("import sys\nfrom pipeline import registry, runner, __main__ as cli, dvcyaml\n"
              "registry.all_stages(); registry.gates()\nfrom stages import common\ncommon.peak_memory()\n"
              "print(sorted(m for m in ('torch', 'torchvision', 'scipy', 'matplotlib') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", f"imported at declaration time: {r.stdout.strip()}"


def test_static_closure_follows_lazy_and_relative_imports(tmp_path):
    _stages_package(tmp_path, {"a": "from . import b\n\ndef f():\n    from stages.c import g\n    return g\n",
                               "b": "import numpy\n", "c": "from dkgm import nothing_here\n",
                               "d": ""})  # d: imported by nobody
    assert dvcyaml.import_closure("stages.a", tmp_path) == {"stages/__init__.py", "stages/a.py", "stages/b.py",
                                                            "stages/c.py"}


# ----------------------------------------------------------------------------- params errors


@pytest.mark.parametrize(
    "mutate, key, fragment",
    [
        (lambda r: r["prepare"].update(dataset="cifar"), "prepare.dataset", "mnist5k"),
        (lambda r: r["kde"].update(bandwidth=-0.3), "kde.bandwidth", "positive number (got -0.3)"),
        (lambda r: r["kde"].update(bandwidth="loo"), "kde.bandwidth", "got 'loo'"),
        (lambda r: r["kde"].update(topk=0), "kde.topk", "greater than or equal to 1"),
        (lambda r: r["kde"].update(grid_min=2.0, grid_max=1.0), "kde.grid_max", "grid is empty"),
        (lambda r: r["kde"].update(topk_k=3), "kde.topk_k", "unknown key (did you mean kde.topk?)"),
        (lambda r: r["kde"].update(bandwidth_scale=2), "kde.bandwidth_scale", "moved to sample_kde.bandwidth_scale"),
        (lambda r: r["sample_kde"].update(bandwidth_scale=0), "sample_kde.bandwidth_scale", "auto or a number above 0"),
        (lambda r: r["refine"].update(eta="high"), "refine.eta", "auto or a number at least 0 and at most 1"),
        (lambda r: r.update(evaluation={}), "evaluation", "unknown key (did you mean evaluate?)"),
        (lambda r: r["gates"]["kde"].update(enforce="maybe"), "gates.kde.enforce", "boolean"),
        (lambda r: r["prepare"].update(val_fraction=0.6, test_fraction=0.5), "prepare.test_fraction", "below 1"),
        (lambda r: r["refine"].update(steps=0), "refine.steps", "greater than or equal to 1"),
        (lambda r: r["refine"].update(eta=1.5), "refine.eta", "(got 1.5)"),
        (lambda r: r["calibrate"].update(etas=[0.5, 2]), "calibrate.etas", "must lie in [0, 1]"),
        (lambda r: r["refine"].update(gamma=0.5), "refine.gamma", "greater than 0.5"),
        (lambda r: r["refine"].update(device="gpu"), "refine.device", "must be auto, cpu, cuda or cuda:N"),
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


def test_stage_order_is_topological_and_keeps_gates_next_to_their_stage():
    names = list(STAGES)
    producer = {p: s.name for s in STAGES.values() for p in s.out_paths}
    for s in STAGES.values():
        assert all(names.index(producer[d]) < names.index(s.name) for d in s.deps)
    for gate in registry.gates().values():
        gated = producer[gate.deps[0]]
        assert names.index(gate.name) == names.index(gated) + 1
    assert names[-1] == "report"


@pytest.mark.parametrize(
    "mutate, keys",
    [
        (lambda r: r["evaluate"].update(n_samples=r["sample_kde"]["n_samples"] + 1),
         ("evaluate.n_samples", "sample_kde.n_samples")),
        (lambda r: r["sample_baseline"].update(n_samples=r["evaluate"]["n_samples"] - 1),
         ("evaluate.n_samples", "sample_baseline.n_samples")),
        (lambda r: r["sample_baseline"].update(seed=r["sample_kde"]["seed"] + 1), ("sample_baseline.seed", "sample_kde.seed")),
        (lambda r: r["sample_kde"].update(bandwidth_scale=1.5 * max(r["calibrate"]["scales"]) + 0.5),
         ("sample_kde.bandwidth_scale", "debiaser.sigma_max_margin", "calibrate.scales")),
        (lambda r: r["refine"].update(sigma_min=r["debiaser"]["sigma_min"] / 2), ("refine.sigma_min", "debiaser.sigma_min")),
        (lambda r: r["calibrate"].update(fid_samples=r["calibrate"]["probe_samples"] + 1),
         ("calibrate.fid_samples", "calibrate.probe_samples")),
    ],
)
def test_cross_section_mistakes_are_refused_naming_both_keys(mutate, keys):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    with pytest.raises(P.ParamsError) as err:
        P.validate(raw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("params.yaml: ") and all(k in msg for k in keys), msg


def test_cross_section_rules_hold_at_their_edges():
    """Each rule's boundary is allowed: equal sample counts, a pinned scale at the top of the
    trained range, the baseline's counts ignored when it is off."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["evaluate"]["n_samples"] = raw["sample_kde"]["n_samples"]
    raw["sample_baseline"]["n_samples"] = 4
    raw["baseline"]["enabled"] = False
    raw["sample_kde"]["bandwidth_scale"] = raw["debiaser"]["sigma_max_margin"] * max(raw["calibrate"]["scales"])
    raw["refine"]["sigma_min"] = raw["debiaser"]["sigma_min"]
    raw["calibrate"]["fid_samples"] = raw["calibrate"]["probe_samples"]
    P.validate(raw)


def test_a_tab_in_params_is_named_with_its_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("prepare:\n  limit: 3\n\tseed: 1\n")
    with pytest.raises(P.ParamsError) as err:
        P.load_params(bad)
    assert str(err.value) == f"{bad}: line 3: tabs are not allowed in YAML indentation: use spaces"
