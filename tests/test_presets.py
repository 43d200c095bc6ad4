"""Presets: every shipped preset validates, `--set-args` carries exactly the preset's values, and
`--apply` changes only the preset's keys, keeping every other line of params.yaml as it was."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from dkgm.errors import DKGMError
from pipeline import presets
from pipeline.params import validate
from tests.conftest import REPO


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_validates_and_set_args_carry_its_values(name):
    values = presets.load(name)
    assert values, name
    args = presets.set_args(name)
    assert args[::2] == ["-S"] * len(values)
    parsed = {}
    for pair in args[1::2]:
        key, _, text = pair.partition("=")
        parsed[key] = yaml.safe_load(text)  # how DVC reads a -S value
    assert parsed == values
    assert presets.description(name)


def test_the_paper_and_cpu_presets_exist():
    assert {"cifar10", "celeba64", "lsun_church128", "fashion_mnist", "fashion_mnist_cpu"} <= set(presets.names())
    cifar = presets.load("cifar10")  # DDPM's CIFAR-10 network
    assert (cifar["debiaser.channels"], cifar["debiaser.channel_mult"], cifar["debiaser.num_blocks"],
            cifar["debiaser.attn_resolutions"], cifar["debiaser.dropout"]) == (128, [1, 2, 2, 2], 2, [16], 0.1)


def test_apply_changes_only_the_preset_keys_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text().splitlines()
    diff = presets.apply("fashion_mnist", params)
    after = params.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(changed) == sum(old != new for _, old, new in diff)
    for a, b in changed:  # the value changed, the comment did not
        assert a.split("#", 1)[1:] == b.split("#", 1)[1:]
    data = yaml.safe_load(params.read_text())
    validate(data)
    for key, _, new in diff:
        node = data
        for part in key.split("."):
            node = node[part]
        assert node == new
    assert "channel_mult: [1, 2, 2]" in params.read_text()  # lists stay in flow style
    assert presets.apply("fashion_mnist", params) and params.read_text().splitlines() == after  # idempotent


def test_a_bad_preset_is_one_line_naming_file_and_key(tmp_path, monkeypatch):
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    (tmp_path / "typo.yaml").write_text("debiaser:\n  chanels: 64\n")
    with pytest.raises(DKGMError) as err:
        presets.load("typo")
    msg = str(err.value)
    assert "typo.yaml" in msg and "debiaser.chanels" in msg and "\n" not in msg
    (tmp_path / "range.yaml").write_text("refine:\n  steps: 0\n")
    with pytest.raises(DKGMError, match="refine.steps"):
        presets.load("range")
    with pytest.raises(DKGMError, match="did you mean typo"):
        presets.path_of("typos")


def test_cli_lists_shows_and_refuses(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "pipeline", "preset", *args], cwd=REPO, capture_output=True,
                              text=True)

    listing = cli()
    assert listing.returncode == 0 and "fashion_mnist_cpu" in listing.stdout
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    show = cli("fashion_mnist_cpu", "--params", str(params))
    assert show.returncode == 0 and "* prepare.dataset" in show.stdout
    assert params.read_text() == (REPO / "params.yaml").read_text()  # showing writes nothing
    bad = cli("nope")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unknown preset 'nope'" in bad.stderr


def test_first_look_workspace_is_a_project_of_its_own(tmp_path):
    """`make first-look` runs the pipeline in a copy: the smoke-scale preset applied there, a DVC project of
    its own (cache and lock inside), the same dvc.yaml and code, and the project's params untouched."""
    from pipeline.first_look import prepare_workspace
    from pipeline.params import load_params

    before = (REPO / "params.yaml").read_bytes()
    out = prepare_workspace(REPO, tmp_path / "fl")
    params = load_params(out / "params.yaml")  # valid against the schema
    for key, value in presets.load("first_look").items():
        node = params
        for part in key.split("."):
            node = getattr(node, part)
        assert node == (tuple(value) if isinstance(value, list) else value), key
    assert params.report.first_look and not params.gates.eval.enforce and params.prepare.limit == 600
    assert (out / "dvc.yaml").read_bytes() == (REPO / "dvc.yaml").read_bytes()
    from pipeline.first_look import dvc_executable

    listed = subprocess.run([dvc_executable(), "config", "--list", "--project"], cwd=out, capture_output=True,
                            text=True, check=True).stdout.split()  # the hand-written config, as DVC reads it
    assert {"core.no_scm=True", "core.analytics=false", "core.check_update=false"} <= set(listed)
    assert all((out / pkg / "__init__.py").is_file() for pkg in ("dkgm", "stages", "pipeline"))
    assert not list(out.rglob("__pycache__"))
    assert (REPO / "params.yaml").read_bytes() == before
    with pytest.raises(DKGMError, match="would overwrite the project itself"):
        prepare_workspace(REPO, REPO)
