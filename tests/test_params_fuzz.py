"""Property-based: whatever params.yaml holds, `python -m pipeline check` answers with success or
with one line that names the bad key, and exit status 2 -- never a traceback."""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.__main__ import main
from tests.conftest import REPO

DEFAULT = yaml.safe_load((REPO / "params.yaml").read_text())


def _leaves(node, prefix=()):
    """Every (path, value) of the default params, sections included."""
    out = [(prefix, node)] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _leaves(v, (*prefix, k))
    return out


PATHS = [p for p, _ in _leaves(DEFAULT)]

values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["auto", "cv", "", "1e-3", "-1", "nan"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def broken_params(draw):
    """The default params with one to three edits: a value replaced, an unknown key added, a key or
    section dropped; or a file that is not YAML at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from(["prepare: [unclosed", "a: b: c", "\t- x", ": :", "%YAML 9.9\n---\n{}",
                                     "key: 'unterminated", "{", "- 1\n- 2", "just text", "42", "", "~"]))
    raw = yaml.safe_load(yaml.safe_dump(DEFAULT))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        node = raw
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            if not isinstance(node, dict):
                continue
            action = draw(st.sampled_from(["replace", "replace", "replace", "add", "drop"]))
            if action == "replace":
                node[path[-1]] = draw(values)
            elif action == "add":
                node[draw(st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))] = draw(values)
            else:
                node.pop(path[-1], None)
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def _check(text: str) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text, encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["check", "--params", str(path)])
        return rc, err.getvalue()


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(broken_params())
def test_any_params_file_gets_success_or_one_line_naming_the_key(text):
    rc, err = _check(text)
    assert rc in (0, 2), err
    if rc == 0:
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    line = lines[0]
    # the line names the file and, for a parsed mapping, a dotted key with the reason after it
    assert "params.yaml" in line, line
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        assert "not valid YAML" in line or "tabs are not allowed in YAML indentation: use spaces" in line, line
        return
    if isinstance(raw, dict) and raw:
        assert ": " in line.split("params.yaml: ", 1)[-1] or "expected a mapping" in line, line


def test_the_default_params_pass_and_known_bad_values_name_their_key():
    assert _check(yaml.safe_dump(DEFAULT))[0] == 0
    cases = {
        ("debiaser", "total_kimg"): (-1, "debiaser.total_kimg"),
        ("debiaser", "channels"): ("wide", "debiaser.channels"),
        ("debiaser", "lr"): (math.nan, "debiaser.lr"),
        ("kde", "bandwidth"): ([1, 2], "kde.bandwidth"),
        ("evaluate", "n_samples"): (0, "evaluate.n_samples"),
    }
    for (sec, key), (value, name) in cases.items():
        raw = yaml.safe_load(yaml.safe_dump(DEFAULT))
        raw[sec][key] = value
        rc, err = _check(yaml.safe_dump(raw))
        assert rc == 2 and name in err and len(err.strip().splitlines()) == 1, (sec, key, err)
    for text, says in (("", "empty"), ("~", "empty"), ("- 1", "expected a mapping"), ("a: [1", "not valid YAML")):
        rc, err = _check(text)
        assert rc == 2 and says in err and len(err.strip().splitlines()) == 1, (text, err)
    raw = yaml.safe_load(yaml.safe_dump(DEFAULT))
    raw["debiaser"]["totl_kimg"] = 3
    rc, err = _check(yaml.safe_dump(raw))
    assert rc == 2 and "debiaser.totl_kimg: unknown key (did you mean debiaser.total_kimg?)" in err
