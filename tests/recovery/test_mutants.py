"""The mutants of `nox -s mutants` (benchmark/devtools/mutants.py) stay applicable: each pattern
is found exactly once in the current tree and each test meant to catch it exists, so a refactor
cannot silently turn a mutant into a no-op or point it at a test that is gone."""

from __future__ import annotations

import ast

import pytest

from benchmark.devtools.mutants import MUTANTS, REPO, apply, scratch_copy


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_pattern_is_found_exactly_once(mutant):
    assert (REPO / mutant.path).read_text().count(mutant.old) == 1
    assert mutant.old != mutant.new


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_every_mutant_names_tests_that_exist(mutant):
    assert mutant.tests
    for node in mutant.tests:
        path, _, name = node.partition("::")
        tree = ast.parse((REPO / path).read_text())
        functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
        function, _, param = name.partition("[")
        assert function in functions, node
        if param:  # the parameter is one of the parametrize list's literal strings, or of a dict's keys
            assert f'"{param.rstrip("]")}"' in (REPO / path).read_text(), node


def test_every_class_of_breakage_is_on_the_list():
    kinds = {m.kind for m in MUTANTS}
    assert {"an update zeroed", "a step skipped", "a learning rate quartered",
            "an apply that drops part of the artifact", "the score taken on the start",
            "a comparison arm broken"} <= kinds  # fmt: skip
    assert len({m.name for m in MUTANTS}) == len(MUTANTS)


def test_a_mutant_changes_only_its_scratch_copy(tmp_path):
    mutant = MUTANTS[0]
    root = scratch_copy(tmp_path / "tree")
    assert not (root / ".git").exists() and not (root / "results").exists()
    apply(mutant, root)
    assert (root / mutant.path).read_text().count(mutant.new) == 1
    assert (REPO / mutant.path).read_text().count(mutant.old) == 1  # the tree itself untouched
    with pytest.raises(SystemExit, match="found 0 times"):
        apply(mutant, root)  # applied twice: the pattern is gone
