"""Each group's trace recipe (registry) and `reasondiff-traces --group` following it (issue 19.6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasondiff import generate
from reasondiff.errors import RegistryError
from reasondiff.options import DiffOptions
from reasondiff.registry import Registry
from reasondiff.trace_choice import group_trace_file, trace_specs
from reasondiff.traces import load_trace_set, trace_set_generator


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load([])


@pytest.mark.parametrize("group", ["distill7b", "qwenmath7b", "distill1.5b"])
def test_study_groups_follow_the_studys_recipe(registry: Registry, group: str) -> None:
    recipe = registry.group(group).trace_recipe
    assert recipe is not None
    assert (recipe.dataset, recipe.split, recipe.field, recipe.limit) == (
        "HuggingFaceH4/MATH-500",
        "test",
        "problem",
        50,
    )
    bases = {p.base.key for p in registry.pairs(group)}
    members = bases | {p.descendant.key for p in registry.pairs(group)}
    assert recipe.generator in bases  # the group's base model
    assert recipe.alternative in members and recipe.alternative != recipe.generator
    assert list(recipe.generators()) == ["primary", "alternative"]


def test_a_bad_recipe_is_a_named_registry_error(tmp_path: Path) -> None:
    bad = tmp_path / "r.toml"
    bad.write_text('[groups.g.trace_recipe]\ndataset = "d"\ngenerator = "m"\nlimit = 0\n')
    with pytest.raises(
        RegistryError, match=r"\[groups\.g\.trace_recipe\]\.limit must be an integer >= 1"
    ):
        Registry.load([bad])
    bad.write_text('[groups.g.trace_recipe]\ndataset = "d"\n')
    with pytest.raises(RegistryError, match=r"\[groups\.g\.trace_recipe\] has no 'generator'"):
        Registry.load([bad])
    bad.write_text('[groups.g.trace_recipe]\ndataset = "d"\ngenerator = "m"\nmodel = "x"\n')
    with pytest.raises(RegistryError, match=r"unknown key\(s\) \['model'\]"):
        Registry.load([bad])


def test_group_makes_its_recipes_sets_and_traces_dir_finds_them(
    registry: Registry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REASONDIFF_CACHE", str(tmp_path / "cache"))  # toy models built here
    problems = tmp_path / "math500.jsonl"  # stands in for the dataset offline
    rows = [{"id": f"m{i}", "problem": f"What is {i} * {i + 2}?"} for i in range(3)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "traces"
    argv = ["--group", "toy", "--problems", str(problems), "--out", str(out), "--device", "cpu"]
    assert generate.main([*argv, "--max-new-tokens", "6"]) == 0
    err = capsys.readouterr().err
    recipe = registry.group("toy").trace_recipe
    assert recipe is not None
    for role, key in (("primary", recipe.generator), ("alternative", recipe.alternative)):
        path = group_trace_file(out, "toy", role)
        assert f"wrote 3 traces to {path}" in err
        ts = load_trace_set(path)
        assert ts.name == f"toy-{role}" and ts.ids == ["m0", "m1", "m2"]
        assert ts.provenance is not None
        gen = ts.provenance["generator"]
        assert (gen["key"], gen["source"]) == (key, registry.model(str(key)).source)
        assert trace_set_generator(ts).startswith(f"{key} (toy:")
        assert ts.provenance["recipe"]["group"] == "toy"
        assert ts.provenance["recipe"]["role"] == role
        assert ts.provenance["problems_from"] == "file math500.jsonl"
    assert generate.main(argv) == 2  # the recipe's max_new_tokens (64) is another setting
    assert "decoding:" in capsys.readouterr().err
    options = DiffOptions(model_group="toy", traces=str(out))
    assert trace_specs(options, registry, registry.pairs("toy")) == (
        str(group_trace_file(out, "toy", "primary")),
        str(group_trace_file(out, "toy", "alternative")),
    )


def test_group_without_a_recipe_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    extra = tmp_path / "r.toml"
    extra.write_text('[groups.mine]\ndescription = "no recipe"\n')
    argv = ["--group", "mine", "--registry", str(extra), "--out", str(tmp_path / "t")]
    assert generate.main(argv) == 2
    assert "group 'mine' has no trace recipe" in capsys.readouterr().err
