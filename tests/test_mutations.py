"""The mutation check (scripts/mutation_check.py) stays valid: every deliberate bug it applies still
matches exactly one place in the current code, and applying it changes the file."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("mutation_check", REPO / "scripts" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mutation_check  # its dataclasses look their module up there
spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("m", mutation_check.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_to_exactly_one_place(m, tmp_path):
    text = (REPO / m.file).read_text()
    assert text.count(m.old) == 1, f"{m.name}: the code moved; update scripts/mutation_check.py"
    assert m.old != m.new and all((REPO / t).is_file() for t in m.tests)
    (tmp_path / m.file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / m.file).write_text(text)
    mutation_check.apply(tmp_path, m)
    assert (tmp_path / m.file).read_text() != text
