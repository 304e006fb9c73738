"""Real models never silently get the toy traces (issue 11.5); toy models still default to them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasondiff.errors import TraceError
from reasondiff.options import DiffOptions
from reasondiff.registry import Registry, adhoc_pair
from reasondiff.trace_choice import group_trace_file, trace_specs


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load([])


def _adhoc(base: str, candidate: str, **opts: str) -> tuple[DiffOptions, list]:
    options = DiffOptions(base=base, candidate=candidate, **opts)
    return options, [adhoc_pair(base, candidate)]


def test_toy_group_and_toy_adhoc_pairs_default_to_the_toy_traces(registry: Registry) -> None:
    options = DiffOptions()
    assert trace_specs(options, registry, registry.pairs("toy")) == ("toy", "toy")
    options, pairs = _adhoc("toy:base", "toy:massive")
    assert trace_specs(options, registry, pairs) == ("toy", "toy")


@pytest.mark.parametrize("group", ["distill7b", "qwenmath7b", "distill1.5b"])
def test_real_group_without_traces_is_an_error_saying_how_to_make_them(
    registry: Registry, group: str
) -> None:
    options = DiffOptions(model_group=group, model_group_given=True)
    with pytest.raises(TraceError) as info:
        trace_specs(options, registry, registry.pairs(group))
    msg = str(info.value)
    assert f"group {group!r} compares real models" in msg
    assert "reasondiff-traces" in msg and "--traces toy" in msg


def test_adhoc_pair_with_one_real_model_names_it(registry: Registry) -> None:
    options, pairs = _adhoc("/ckpt/base", "toy:copy")
    with pytest.raises(TraceError, match=r"the ad-hoc pair compares real models \(.*base"):
        trace_specs(options, registry, pairs)


def test_explicit_traces_are_used_and_toy_may_be_asked_for(registry: Registry) -> None:
    options, pairs = _adhoc("org/base", "org/rl", traces="t.jsonl")
    assert trace_specs(options, registry, pairs) == ("t.jsonl", None)
    options, pairs = _adhoc("org/base", "org/rl", traces="t.jsonl", traces_alt="u.jsonl")
    assert trace_specs(options, registry, pairs) == ("t.jsonl", "u.jsonl")
    options, pairs = _adhoc("org/base", "org/rl", traces="toy")
    assert trace_specs(options, registry, pairs) == ("toy", "toy")
    group = DiffOptions(model_group="distill7b", traces="toy")
    assert trace_specs(group, registry, registry.pairs("distill7b")) == ("toy", "toy")


# ---------------------------------------------------------------- --traces DIR (issue 19.6)
def _group_set(path: Path, count: int, rows: int) -> None:
    header = {"reasondiff_traces": 1, "name": path.stem, "recipe": {"problems": {"count": count}}}
    trace = {"id": "x", "text": "", "token_ids": [1, 2, 3, 4]}
    path.write_text("".join(json.dumps(r) + "\n" for r in [header] + [trace] * rows))


def test_traces_directory_finds_the_groups_sets(registry: Registry, tmp_path: Path) -> None:
    options = DiffOptions(model_group="distill7b", traces=str(tmp_path))
    pairs = registry.pairs("distill7b")
    with pytest.raises(TraceError) as info:
        trace_specs(options, registry, pairs)
    assert "no trace set of group 'distill7b' there (expected distill7b-primary.jsonl)" in str(
        info.value
    )
    assert f"reasondiff-traces --group distill7b --out {tmp_path}" in str(info.value)
    primary = group_trace_file(tmp_path, "distill7b", "primary")
    _group_set(primary, count=2, rows=2)
    assert trace_specs(options, registry, pairs) == (str(primary), None)
    alt = group_trace_file(tmp_path, "distill7b", "alternative")
    _group_set(alt, count=2, rows=2)
    assert trace_specs(options, registry, pairs) == (str(primary), str(alt))
    given = DiffOptions(model_group="distill7b", traces=str(tmp_path), traces_alt="u.jsonl")
    assert trace_specs(given, registry, pairs) == (str(primary), "u.jsonl")


def test_an_interrupted_groups_set_is_refused(registry: Registry, tmp_path: Path) -> None:
    _group_set(group_trace_file(tmp_path, "toy", "primary"), count=50, rows=41)
    options = DiffOptions(model_group="toy", traces=str(tmp_path))
    with pytest.raises(TraceError, match=r"incomplete \(41 of 50 traces.*rerun `reasondiff-traces"):
        trace_specs(options, registry, registry.pairs("toy"))


def test_traces_directory_needs_a_group(registry: Registry, tmp_path: Path) -> None:
    options, pairs = _adhoc("org/base", "org/rl", traces=str(tmp_path))
    with pytest.raises(TraceError, match=r"an ad-hoc pair needs --traces FILE\.jsonl"):
        trace_specs(options, registry, pairs)
