"""Named params presets (pipeline/presets/<name>.yaml): the keys a setup changes from params.yaml.

A preset holds only the keys it changes. Three ways to use one:

- `python -m pipeline preset NAME` shows what it would change against params.yaml;
- `python -m pipeline preset NAME --apply` writes those values into params.yaml (comments kept),
  then `dvc repro` or `dvc exp run` runs it;
- `dvc exp run $(python -m pipeline preset NAME --set-args)` runs it as an experiment without
  touching params.yaml (the values become `-S key=value` overrides; also with `--queue`).

Every preset is validated against the schema merged over the defaults, so an unknown key or a bad
value is one line naming the preset file and the key.
"""

from __future__ import annotations

import json
import os
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from dkgm.errors import DKGMError
from pipeline.experiments import flatten  # nested sections -> dotted keys (lists are values)

PRESET_DIR = Path(__file__).parent / "presets"


def names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def path_of(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = get_close_matches(name, names(), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise DKGMError(f"unknown preset {name!r}{hint}: the presets are {', '.join(names())}")
    return path


def description(name: str) -> str:
    """The preset file's leading comment, joined into one paragraph."""
    lines = []
    for line in path_of(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def load(name: str) -> dict[str, Any]:
    """The preset's dotted keys and values, checked against the schema over the defaults."""
    from pipeline.params import defaults, validate

    path = path_of(name)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DKGMError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise DKGMError(f"{path}: a preset is a mapping of params sections")
    merged = defaults().model_dump(mode="json")
    for dotted, value in flatten(tree).items():
        _set(merged, dotted, value, create=True)
    validate(merged, source=str(path))
    return flatten(tree)


def _set(tree: dict[str, Any], dotted: str, value: Any, create: bool = False) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        if part not in node and create:
            node[part] = {}
        node = node[part]
    node[leaf] = value


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _yaml_value(value: Any) -> str:
    """A value as `-S key=value` needs it: YAML flow style on one line (lists as [1,2,2])."""
    if isinstance(value, list):
        return "[" + ",".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return value if yaml.safe_load(value) == value else json.dumps(value)  # "1.0" or "true" stay strings
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def set_args(name: str) -> list[str]:
    """`-S key=value` arguments for `dvc exp run`, safe to pass through an unquoted $(...)."""
    args = []
    for dotted, value in load(name).items():
        text = _yaml_value(value)
        if any(c.isspace() for c in text) or any(c in text for c in "*?'\"$`\\"):
            raise DKGMError(f"preset {name}: {dotted} = {value!r} cannot pass through $(...): use --apply instead")
        args += ["-S", f"{dotted}={text}"]
    return args


def changes(name: str, params_path: str | Path) -> list[tuple[str, Any, Any]]:
    """(key, value in params.yaml, value in the preset) for every key the preset sets."""
    current = yaml.safe_load(Path(params_path).read_text()) or {}
    return [(k, _get(current, k), v) for k, v in load(name).items()]


def _flow(value: Any) -> Any:
    """Lists in flow style ([1, 2, 2]), as params.yaml writes them."""
    if not isinstance(value, list):
        return value
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(value)
    seq.fa.set_flow_style()
    return seq


def apply(name: str, params_path: str | Path) -> list[tuple[str, Any, Any]]:
    """Write the preset's values into params.yaml, keeping its comments and layout (ruamel's
    round trip, as `dvc exp run -S` does); the result is validated before it replaces the file."""
    from ruamel.yaml import YAML

    from pipeline.params import validate

    path = Path(params_path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(path.read_text())
    diff = changes(name, path)
    for dotted, old, value in diff:
        if old != value:  # untouched keys keep their exact text
            _set(doc, dotted, _flow(value), create=True)
    tmp = path.with_name(f".{path.name}.preset.tmp")
    with tmp.open("w") as fh:
        rt.dump(doc, fh)
    try:
        validate(yaml.safe_load(tmp.read_text()), source=f"{path} with preset {name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff
