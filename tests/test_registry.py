"""The model registry: the built-in data is complete and consistent, user files work,
and every kind of bad input gets an error that names the key and lists what is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from reasondiff.errors import RegistryError
from reasondiff.registry import FINDINGS, Registry, adhoc_pair, slug

STUDY_HUB_IDS = {
    "open-r1/OpenR1-Distill-7B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "nvidia/AceReason-Nemotron-1.1-7B",
    "sail/Qwen2.5-Math-7B-Oat-Zero",
    "Nickyang/ConciseR-Zero-7B",
    "Qwen/Qwen2.5-Math-7B",
    "nvidia/AceReason-Nemotron-7B",
    "Skywork/Skywork-OR1-7B",
    "qihoo360/Light-R1-7B-DS",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B",
    "nvidia/Nemotron-Research-Reasoning-Qwen-1.5B",
    "Zyphra/ZR1-1.5B",
    "agentica-org/DeepScaleR-1.5B-Preview",
    "agentica-org/DeepCoder-1.5B-Preview",
    "knoveleng/Open-RS3",
    "oumi-ai/MiniMath-R1-1.5B",
    "Nickyang/FastCuRL-1.5B-V3",
    "zwhe99/DeepMath-1.5B",
    "RUC-AIBOX/STILL-3-1.5B-preview",
    "GD-ML/Open-RS1",
    "open-r1/Qwen2.5-Math-7B-RoPE-300k",
}


@pytest.fixture(scope="module")
def reg() -> Registry:
    return Registry.load()


def test_builtin_registry_has_every_study_model(reg: Registry) -> None:
    sources = {m.source for m in reg.models.values()}
    assert sources >= STUDY_HUB_IDS, sorted(STUDY_HUB_IDS - sources)


@pytest.mark.parametrize(
    ("group", "n_pairs", "bases"),
    [
        ("distill7b", 3, {"r1-distill-qwen-7b"}),
        ("qwenmath7b", 5, {"qwen25-math-7b", "qwen25-math-7b-rope300k"}),
        ("distill1.5b", 10, {"r1-distill-qwen-1_5b"}),
        ("toy", 7, {"toy-base"}),
    ],
)
def test_groups_have_the_study_pairs(
    reg: Registry, group: str, n_pairs: int, bases: set[str]
) -> None:
    pairs = reg.pairs(group)
    assert len(pairs) == n_pairs
    assert {p.base.key for p in pairs} == bases
    if group != "toy":  # toy controls (copy, planted edit) are not trained: no method
        assert all(p.method in ("SFT", "RL", "SFT+RL") for p in pairs)


def test_openr1_descends_from_the_context_extended_base(reg: Registry) -> None:
    assert reg.model("openr1-distill-7b").base == "qwen25-math-7b-rope300k"


def test_pair_ids_are_stable_ascii_and_sorted(reg: Registry) -> None:
    ids = [p.pair_id for p in reg.pairs("toy")]
    assert ids == sorted(ids)
    assert ids[0] == "toy-base__toy-copy"
    assert all(i.isascii() and " " not in i for i in ids)


def test_toy_expectations_cover_positive_and_negative_cases(reg: Registry) -> None:
    """Every finding must have a pair expecting True and one expecting False in the toy
    group, else a finding test could pass vacuously on the embedded default."""
    pairs = reg.pairs("toy")
    for finding in FINDINGS:
        if finding == "trace_invariant":
            continue  # invariance is expected everywhere; its negative control is a flipped registry
        values = {p.expect.get(finding) for p in pairs} - {None}
        assert values == {True, False}, finding


def test_study_bathtub_expectations(reg: Registry) -> None:
    """METHODS §8: distill7b descendants dip from about layer 12 to 21 of 28; the 1.5B
    descendants have no bathtub; Qwen-Math leaves it unset (the study does not say which
    two descendants dip at layer 4)."""
    for p in reg.pairs("distill7b"):
        assert p.expect.get("bathtub") is True, p.pair_id
        assert p.descendant.study_dip == (12, 21), p.pair_id
    for p in reg.pairs("distill1.5b"):
        assert p.expect.get("bathtub") is False, p.pair_id
        assert p.descendant.study_dip is None
    for p in reg.pairs("qwenmath7b"):
        assert "bathtub" not in p.expect and "bathtub_explained" not in p.expect, p.pair_id
        assert p.descendant.study_dip is None


def test_user_registry_file_adds_models_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "mine.toml"
    f.write_text(
        """
[groups.mine]
description = "my checkpoints"

[models.my-ckpt]
source = "/data/ckpt-42"
base = "toy-base"
method = "RL"
groups = ["mine"]
expect = { bathtub = false }
""",
        encoding="utf-8",
    )
    reg = Registry.load([f])
    (pair,) = reg.pairs("mine")
    assert pair.pair_id == "toy-base__my-ckpt"
    assert pair.expect == {"bathtub": False}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[models.x]\nbase = 'toy-base'\n", "has no 'source'"),
        (
            "[models.x]\nsource = 'a/b'\nmethod = 'DPO'\n",
            "method 'DPO' is not one of SFT, RL, SFT+RL",
        ),
        ("[models.x]\nsource = 'a/b'\nbase = 'nope'\n", "base 'nope' is not in the registry"),
        (
            "[models.x]\nsource = 'a/b'\nexpect = { bathtubb = true }\n",
            "unknown finding 'bathtubb'",
        ),
        ("[models.x]\nsource = 'a/b'\nexpect = { bathtub = 'yes' }\n", "must be true or false"),
        ("[models.x]\nsource = 'a/b'\nsorce = 1\n", "unknown key(s) ['sorce']"),
        ("[modls.x]\nsource = 'a/b'\n", "unknown top-level table(s) ['modls']"),
        (
            "[models.x]\nsource = 'a/b'\nstudy_dip = [21, 12]\n",
            "study_dip must be [start, recover]",
        ),
        ("[models.x]\nsource = 'a/b'\nstudy_dip = 12\n", "got 12"),
        ("[models.x\n", "is not valid TOML"),
    ],
)
def test_bad_registry_files_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        Registry.load([f])
    assert fragment in str(info.value)
    if "TOML" not in fragment and "top-level" not in fragment:
        assert "models.x" in str(info.value)


def test_unreadable_registry_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"cannot read registry file .*missing\.toml"):
        Registry.load([tmp_path / "missing.toml"])


def test_unknown_group_and_model_list_the_known_ones(reg: Registry) -> None:
    with pytest.raises(
        RegistryError, match=r"unknown model group 'distill8b'; known groups: .*distill7b"
    ):
        reg.pairs("distill8b")
    with pytest.raises(RegistryError, match=r"unknown model 'toy-bsae'; known models: .*toy-base"):
        reg.model("toy-bsae")


def test_adhoc_pair_is_keyed_by_label() -> None:
    p = adhoc_pair("/ckpts/base", "/ckpts/run-17", label="nightly RL", method="RL")
    assert p.pair_id == "nightly-rl"
    assert p.expect == {}
    assert adhoc_pair("org/base", "org/new@abc123").pair_id == "base__new"
    with pytest.raises(RegistryError, match="--method 'PPO'"):
        adhoc_pair("a", "b", method="PPO")


def test_find_by_source_matches_hub_id_with_or_without_revision(reg: Registry) -> None:
    m = reg.find_by_source("Skywork/Skywork-OR1-7B@main")
    assert m is not None and m.key == "skywork-or1-7b"
    assert reg.find_by_source("someone/unknown") is None


def test_slug_rejects_empty() -> None:
    assert slug("Qwen/Qwen2.5 Math") == "qwen-qwen2.5-math"
    with pytest.raises(RegistryError):
        slug("///")


# ------------------------------------------------------------ validation (issue 15.4)
def _load_extra(tmp_path: Path, text: str) -> Registry:
    f = tmp_path / "bad.toml"
    f.write_text(text, encoding="utf-8")
    return Registry.load([f])


def test_a_model_that_is_its_own_base_is_refused_naming_it_and_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        RegistryError, match=r"bad\.toml: \[models\.ms\]: the model is its own base"
    ):
        _load_extra(
            tmp_path, '[groups.g]\n[models.ms]\nsource = "toy:copy"\nbase = "ms"\ngroups = ["g"]\n'
        )


def test_a_cycle_of_bases_is_refused_naming_the_models(tmp_path: Path) -> None:
    text = (
        '[groups.g]\n[models.a]\nsource = "toy:copy"\nbase = "b"\ngroups = ["g"]\n'
        '[models.b]\nsource = "toy:massive"\nbase = "a"\ngroups = ["g"]\n'
    )
    with pytest.raises(RegistryError, match=r"bad\.toml: the bases form a cycle: a -> b -> a"):
        _load_extra(tmp_path, text)


def test_a_model_in_an_undeclared_group_is_refused(tmp_path: Path) -> None:
    text = '[models.m]\nsource = "toy:copy"\nbase = "toy-base"\ngroups = ["nowhere"]\n'
    with pytest.raises(
        RegistryError, match=r"bad\.toml: \[models\.m\]: group\(s\) 'nowhere' not declared"
    ):
        _load_extra(tmp_path, text)


def test_the_builtin_registry_passes_validation() -> None:
    reg = Registry.load([])
    assert "toy" in reg.groups and all(m.base != m.key for m in reg.models.values())
