"""Tests for reasondiff.activations: one forward, hidden.l + prenorm.L, errors."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from _checkpoints import make_bert, make_qwen2

from reasondiff.activations import FORWARD_COUNTER, extract_activations, find_block_list
from reasondiff.errors import NonFiniteError, TraceError
from reasondiff.models import LoadedModel, load_model

IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_qwen2(tmp_path_factory.mktemp("q") / "ckpt", seed=4), name="tiny-qwen")


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(make_bert(tmp_path_factory.mktemp("b") / "ckpt", seed=5), name="tiny-bert")


def test_keys_shapes_dtype_and_one_forward(qwen: LoadedModel) -> None:
    FORWARD_COUNTER.reset()
    acts = extract_activations(qwen, IDS)
    assert FORWARD_COUNTER.count == 1
    assert sorted(acts) == ["hidden.0", "hidden.1", "hidden.2", "prenorm.2"]
    for t in acts.values():
        assert t.shape == (len(IDS), 32)
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
    FORWARD_COUNTER.reset()
    assert FORWARD_COUNTER.count == 0


def test_values_match_the_model(qwen: LoadedModel) -> None:
    """hidden.0 is the embedding lookup; hidden.L = final_norm(prenorm.L) != prenorm.L."""
    acts = extract_activations(qwen, IDS)
    inner = qwen.model.model  # type: ignore[union-attr]
    with torch.no_grad():
        emb = inner.embed_tokens(torch.tensor(IDS))
        normed = inner.norm(acts["prenorm.2"])
    torch.testing.assert_close(acts["hidden.0"], emb)
    torch.testing.assert_close(acts["hidden.2"], normed)
    assert not torch.allclose(acts["prenorm.2"], acts["hidden.2"])


def test_layer_subset_still_has_prenorm(qwen: LoadedModel) -> None:
    full = extract_activations(qwen, IDS)
    sub = extract_activations(qwen, IDS, layers=[1])
    assert sorted(sub) == ["hidden.1", "prenorm.2"]
    torch.testing.assert_close(sub["hidden.1"], full["hidden.1"], rtol=0, atol=0)


def test_bare_module_works_too(qwen: LoadedModel) -> None:
    acts = extract_activations(qwen.model, IDS[:5], name="bare")
    assert acts["hidden.1"].shape == (5, 32)


def test_bert_prenorm_equals_last_hidden(bert: LoadedModel) -> None:
    acts = extract_activations(bert, IDS)
    assert sorted(acts) == ["hidden.0", "hidden.1", "hidden.2", "prenorm.2"]
    torch.testing.assert_close(acts["prenorm.2"], acts["hidden.2"], rtol=0, atol=0)
    assert (
        acts["prenorm.2"].untyped_storage().data_ptr()
        != acts["hidden.2"].untyped_storage().data_ptr()
    )


def test_bf16_model_returns_float32(tmp_path: Path) -> None:
    lm = load_model(make_qwen2(tmp_path / "ckpt", seed=6), dtype="bfloat16", name="b16")
    acts = extract_activations(lm, IDS)
    assert all(t.dtype == torch.float32 for t in acts.values())


@pytest.mark.parametrize(
    ("ids", "layers", "match"),
    [
        ([], None, "empty token sequence"),
        (
            [1, 2, 100],
            None,
            r"outside its vocabulary \(size 100\) at \(position, id\) \[\(2, 100\)\]",
        ),
        ([1, -1], None, r"\(1, -1\)"),
        (IDS, [0, 3], r"layers \[3\] out of range; hidden states exist for 0..2"),
    ],
)
def test_bad_input_is_named(
    qwen: LoadedModel, ids: list[int], layers: list[int] | None, match: str
) -> None:
    FORWARD_COUNTER.reset()
    with pytest.raises(TraceError, match=match) as exc:
        extract_activations(qwen, ids, layers=layers)
    assert "tiny-qwen" in str(exc.value)
    assert FORWARD_COUNTER.count == 0  # rejected before any forward


def test_nan_names_model_layer_and_positions(tmp_path: Path) -> None:
    lm = load_model(make_qwen2(tmp_path / "ckpt", seed=7), name="broken")
    with torch.no_grad():
        lm.model.model.embed_tokens.weight[7] = float("nan")  # type: ignore[union-attr]
    with pytest.raises(NonFiniteError) as exc:
        extract_activations(lm, [1, 7, 3, 7, 5])
    msg = str(exc.value)
    assert "broken" in msg and "hidden.0" in msg and "layer 0" in msg and "[1, 3]" in msg


def test_find_block_list_prefers_the_blocks(qwen: LoadedModel, bert: LoadedModel) -> None:
    assert find_block_list(qwen.model, 2) is qwen.model.model.layers  # type: ignore[union-attr]
    assert find_block_list(bert.model, 2) is bert.model.encoder.layer  # type: ignore[union-attr]
    with pytest.raises(TraceError, match="no ModuleList of 5 blocks"):
        find_block_list(qwen.model, 5)


class _TinyNet(torch.nn.Module):
    """Not a transformers model: forward has no use_cache, blocks are plain Linears, and a
    smaller ModuleList of the same length (norms) must not be mistaken for the blocks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.config = types.SimpleNamespace(num_hidden_layers=2, vocab_size=10)
        self.emb = torch.nn.Embedding(10, 4)
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(4, elementwise_affine=False)] * 2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.final = torch.nn.LayerNorm(4)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, output_hidden_states: bool
    ) -> types.SimpleNamespace:
        h = self.emb(input_ids)
        states = [h]
        for block in self.blocks:
            h = block(h)
            states.append(h)
        states[-1] = self.final(h)
        return types.SimpleNamespace(hidden_states=tuple(states))


def test_generic_module_without_use_cache() -> None:
    net = _TinyNet().eval()
    assert find_block_list(net, 2) is net.blocks
    acts = extract_activations(net, [1, 2, 3, 4, 5], name="tiny-net")
    with torch.no_grad():
        raw = net.blocks[1](net.blocks[0](net.emb(torch.tensor([1, 2, 3, 4, 5]))))
    torch.testing.assert_close(acts["prenorm.2"], raw)
    torch.testing.assert_close(acts["hidden.2"], net.final(raw).detach())


def test_nan_in_a_later_layer_names_it() -> None:
    net = _TinyNet().eval()
    with torch.no_grad():
        for block, gain in zip(net.blocks, (1.0, 10.0), strict=True):
            block.weight.copy_(torch.eye(4) * gain)
            block.bias.zero_()
        net.emb.weight[6] = 1e38  # finite in hidden.0 and hidden.1; x10 overflows in block 2
    with pytest.raises(NonFiniteError, match=r"hidden\.2 \(layer 2\) at token positions \[1, 3\]"):
        extract_activations(net, [1, 6, 3, 6], name="tiny-net")
