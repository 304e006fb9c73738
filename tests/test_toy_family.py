"""The toy family realizes its planted ground truth (real builds, real forward passes).

The family is built once per session (~10-30 s on 2 cores); every test that needs it
is marked slow. Trace-set tests need no model and stay fast.
"""

from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from reasondiff.errors import RegistryError
from reasondiff.fixtures import toy
from reasondiff.fixtures.toy_traces import (
    MAX_TOKENS,
    MIN_TOKENS,
    TOY_VERSION,
    TRACES_PER_SET,
    build_toy_tokenizer,
    ensure_toy_traces,
)
from reasondiff.metrics import cka_without, linear_cka, massive_activations
from reasondiff.registry import Registry
from reasondiff.traces import load_trace_set, tokenizer_identity

# One worker runs the whole module (loadgroup), so the family is built once per run.
pytestmark = pytest.mark.xdist_group("toy-family")

L = toy.LAYERS
WINDOW = range(toy.WRITE_LAYER + 1, toy.ERASE_LAYER + 1)  # hidden_states carrying the carrier


# ---------------------------------------------------------------- fixtures / helpers
@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return toy.ensure_toy_family(tmp_path_factory.mktemp("toyfam"))


@pytest.fixture(scope="session")
def traces_a(tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    ts = load_trace_set(ensure_toy_traces(tmp_path_factory.mktemp("toytraces"), "a"))
    return [list(t.token_ids) for t in ts.traces[:4]]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _norm_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((b - a).norm() / (0.5 * a.norm() + 0.5 * b.norm()))


def _diffs(base: Path, desc: Path) -> dict[str, float]:
    ta, tb = _tensors(base), _tensors(desc)
    assert ta.keys() == tb.keys()
    return {k: _norm_diff(ta[k], tb[k]) for k in ta}


def _layer_totals(diffs: dict[str, float]) -> list[float]:
    tot = [0.0] * L
    for name, v in diffs.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            tot[int(m.group(1))] += v
    return tot


def _hidden(path: Path, traces: list[list[int]]) -> list[list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [
            [
                h[0]
                for h in model(input_ids=torch.tensor([t]), output_hidden_states=True).hidden_states
            ]
            for t in traces
        ]


def _curve(base: list[list[torch.Tensor]], desc: list[list[torch.Tensor]], fn: Any) -> list[float]:
    return [
        sum(fn(b[lay], d[lay]) for b, d in zip(base, desc, strict=True)) / len(base)
        for lay in range(L + 1)
    ]


# ---------------------------------------------------------------- API and layout
def test_recipes_match_the_registry() -> None:
    reg = Registry.load()
    toy_sources = {m.source for m in reg.models.values() if m.source.startswith("toy:")}
    assert toy_sources == {f"toy:{r}" for r in toy.TOY_RECIPES}


def test_unknown_recipe_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(
        RegistryError, match=r"unknown toy recipe 'sft-c'; known recipes: base, copy, sft-a"
    ):
        toy.ensure_toy_model(tmp_path, "sft-c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_checkpoints_are_real_loadable_qwen2(family: dict[str, Path]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    assert set(family) == set(toy.TOY_RECIPES)
    ident = tokenizer_identity(build_toy_tokenizer())
    for recipe, path in family.items():
        assert path == path.parent.parent / TOY_VERSION / recipe
        cfg = AutoConfig.from_pretrained(path)
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("qwen2", L, toy.HIDDEN)
        assert cfg.tie_word_embeddings is False
        tok = AutoTokenizer.from_pretrained(path)
        assert tokenizer_identity(tok) == ident
        assert tok.bos_token == "<|bos|>" and tok.eos_token and tok.pad_token
        assert toy.recipe_info(path)["recipe"] == recipe
    assert (family["base"] / "model.safetensors.index.json").is_file()  # sharded
    assert len(list(family["base"].glob("model-*.safetensors"))) > 1
    assert (family["sft-a"] / "model.safetensors").is_file()  # single file


# ---------------------------------------------------------------- planted weights
@pytest.mark.slow
def test_base_reserves_trigger_and_carrier_dims(family: dict[str, Path]) -> None:
    t = _tensors(family["base"])
    k, m, u = toy.TRIGGER_DIM, toy.CARRIER_DIM, toy.RESERVED_UNIT
    emb = t["model.embed_tokens.weight"]
    bos = build_toy_tokenizer().bos_token_id
    assert emb[bos, k] == toy.SINK_TRIGGER
    assert torch.count_nonzero(emb[:, k]) == 1
    pad = build_toy_tokenizer().pad_token_id
    assert torch.count_nonzero(emb[:, m]) == emb.shape[0] - 1  # small random values ...
    assert not emb[pad].any()  # ... except the padding row, which init zeroes
    for i in range(L):
        p = f"model.layers.{i}."
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            assert not t[p + name + ".weight"][:, [k, m]].any(), f"layer {i} {name} reads k or m"
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            assert not t[p + name + ".weight"][[k, m], :].any(), f"layer {i} {name} writes k or m"
        assert (
            not t[p + "mlp.gate_proj.weight"][u].any()
            and not t[p + "mlp.down_proj.weight"][:, u].any()
        )
        assert t[p + "self_attn.q_proj.bias"].abs().sum() > 0


@pytest.mark.slow
def test_copy_is_byte_identical(family: dict[str, Path]) -> None:
    names = sorted(f.name for f in family["base"].iterdir() if f.name != toy.MARKER)
    assert names == sorted(f.name for f in family["copy"].iterdir() if f.name != toy.MARKER)
    for n in names:
        assert (family["base"] / n).read_bytes() == (family["copy"] / n).read_bytes(), n


@pytest.mark.slow
def test_sft_changes_every_layer_far_more_than_rl(family: dict[str, Path]) -> None:
    base = family["base"]
    totals = {r: _layer_totals(_diffs(base, family[r])) for r in ("sft-a", "sft-b", "rl-a", "rl-b")}
    for r, tot in totals.items():
        assert min(tot) > 0, f"{r} leaves a layer unchanged: {tot}"
        assert max(tot) / sum(tot) < 2.0 / L, f"{r} is not distributed: {tot}"
    for i in range(L):
        sft = min(totals["sft-a"][i], totals["sft-b"][i])
        rl = max(totals["rl-a"][i], totals["rl-b"][i])
        assert sft > 10 * rl, f"layer {i}: SFT {sft:.3f} vs RL {rl:.3f}"
    # per matrix too: every SFT block matrix moved more than every RL block matrix
    shapes = {k: v.dim() for k, v in _tensors(base).items()}
    blocks = {
        r: [
            v
            for k, v in _diffs(base, family[r]).items()
            if k.startswith("model.layers.") and shapes[k] == 2
        ]
        for r in ("sft-a", "rl-a")
    }
    assert min(blocks["sft-a"]) > max(blocks["rl-a"])


@pytest.mark.slow
def test_local_changes_one_block_only(family: dict[str, Path]) -> None:
    diffs = _diffs(family["base"], family["local"])
    changed = {k for k, v in diffs.items() if v > 0}
    assert changed, "local changed nothing"
    assert all(k.startswith(f"model.layers.{toy.LOCAL_LAYER}.") for k in changed), changed
    tot = _layer_totals(diffs)
    assert tot[toy.LOCAL_LAYER] / sum(tot) == 1.0


@pytest.mark.slow
def test_massive_edits_only_the_write_and_erase_blocks(family: dict[str, Path]) -> None:
    diffs = _diffs(family["base"], family["massive"])
    changed = {k.split(".")[2] for k, v in diffs.items() if v > 0}
    assert changed == {str(toy.WRITE_LAYER), str(toy.ERASE_LAYER)}


# ---------------------------------------------------------------- planted activations
@pytest.mark.slow
def test_sun_criterion_fires_in_the_window_for_massive_only(
    family: dict[str, Path], traces_a: list[list[int]]
) -> None:
    for recipe, path in family.items():
        hidden = _hidden(path, traces_a[:2])
        for trace in hidden:
            for lay, h in enumerate(trace):
                found = massive_activations(h)
                if recipe == "massive" and lay in WINDOW:
                    assert found.positions == (0,), f"layer {lay}: {found.positions}"
                    assert found.values.abs().max() > 0.9 * toy.CARRIER_VALUE
                else:
                    assert found.positions == (), f"{recipe} layer {lay}: {found.positions}"


@pytest.mark.slow
def test_massive_makes_a_bathtub_explained_by_the_sink(
    family: dict[str, Path], traces_a: list[list[int]]
) -> None:
    base = _hidden(family["base"], traces_a)
    desc = _hidden(family["massive"], traces_a)
    lin = _curve(base, desc, linear_cka)
    without_sink = _curve(base, desc, lambda x, y: cka_without(x, y, [0]))
    for lay in range(L + 1):
        if lay in WINDOW:
            assert lin[lay] < 0.1, f"layer {lay}: {lin}"
        else:
            assert lin[lay] > 0.99, f"layer {lay}: {lin}"
        assert without_sink[lay] > 0.99, f"layer {lay}: {without_sink}"


@pytest.mark.slow
def test_other_descendants_have_no_dip_and_copy_is_exact(
    family: dict[str, Path], traces_a: list[list[int]]
) -> None:
    base = _hidden(family["base"], traces_a[:2])
    for recipe in ("copy", "sft-a", "rl-a", "local"):
        lin = _curve(base, _hidden(family[recipe], traces_a[:2]), linear_cka)
        if recipe == "copy":
            assert lin == pytest.approx([1.0] * (L + 1), abs=1e-6)
        inner = lin[1:L]
        bottom = inner.index(min(inner))
        recovery = max(inner[bottom:]) - inner[bottom]
        assert recovery < 0.05, f"{recipe}: {lin}"
    assert linear_cka(base[0][L], _hidden(family["rl-a"], traces_a[:1])[0][L]) > 0.9


# ---------------------------------------------------------------- building
@pytest.mark.slow
def test_build_is_deterministic_and_recovers_from_a_crash(
    family: dict[str, Path], tmp_path: Path
) -> None:
    other = tmp_path / "again"
    for recipe in ("base", "rl-a", "local"):
        again = toy.ensure_toy_model(other, recipe)
        a, b = _tensors(family[recipe]), _tensors(again)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{recipe}: {k} differs between two builds"
    # a directory without its marker (a crash) is rebuilt, not trusted
    junk = other / TOY_VERSION / "copy"
    junk.mkdir()
    (junk / "half.safetensors").write_bytes(b"\0")
    path = toy.ensure_toy_model(other, "copy")
    assert not (path / "half.safetensors").exists()
    assert (path / toy.MARKER).is_file()
    log = (other / TOY_VERSION / "builds.log").read_text().splitlines()
    assert [line.split()[0] for line in log] == ["base", "rl-a", "local", "copy"]


def _ensure_in_child(root: str, recipe: str) -> str:
    return str(toy.ensure_toy_model(Path(root), recipe))


@pytest.mark.slow
def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap(_ensure_in_child, [(str(tmp_path), "massive")] * 2)
    assert paths[0] == paths[1]
    log = (tmp_path / TOY_VERSION / "builds.log").read_text().splitlines()
    assert sorted(line.split()[0] for line in log) == ["base", "massive"]
    leftovers = [p.name for p in (tmp_path / TOY_VERSION).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


# ---------------------------------------------------------------- traces
def test_toy_trace_sets_are_valid_distinct_and_deterministic(tmp_path: Path) -> None:
    tok = build_toy_tokenizer()
    sets = {}
    for which in ("a", "b"):
        path = ensure_toy_traces(tmp_path / "one", which)
        assert path == tmp_path / "one" / TOY_VERSION / f"traces-{which}.jsonl"
        again = ensure_toy_traces(tmp_path / "two", which)
        assert path.read_bytes() == again.read_bytes()
        ts = load_trace_set(path)
        assert ts.name == f"toy-{which}" and ts.tokenizer == tokenizer_identity(tok)
        assert len(ts) >= TRACES_PER_SET
        for t in ts.traces:
            assert MIN_TOKENS <= len(t.token_ids) <= MAX_TOKENS
            assert t.token_ids[0] == tok.bos_token_id  # the sink at position 0
            assert tok.bos_token_id not in t.token_ids[1:]
            assert tok.decode(list(t.token_ids), skip_special_tokens=False) == t.text
            assert "<think>" in t.text and "\\boxed{" in t.text
        sets[which] = ts
    assert not {t.text for t in sets["a"].traces} & {t.text for t in sets["b"].traces}


def test_unknown_trace_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown toy trace set 'c'; known: a, b"):
        ensure_toy_traces(tmp_path, "c")


def test_recipe_info_records_the_planted_layers(tmp_path: Path) -> None:
    info = toy._recipe_info("massive", 1.0)
    assert info["planted"]["massive_hidden_layers"] == list(WINDOW)
    assert json.loads(json.dumps(info)) == info
