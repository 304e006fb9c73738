"""Block-streamed hidden states equal the whole-model forward's (reasondiff.streaming).

References are independent of the streaming code: ``extract_activations`` on a model
loaded whole by transformers, and the CKA rows scored from those. Models are small random
Qwen2 (also with sliding-window layers), Qwen3, Llama and Mistral configs; every
descendant is sharded, so the index path is covered for each family.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _checkpoints import make_bert, make_qwen2, shard_checkpoint

from reasondiff.activations import FORWARD_COUNTER, extract_activations
from reasondiff.errors import ArchitectureMismatch, ModelLoadError, TraceError
from reasondiff.metrics.layer import prepare_base_layer, score_layer
from reasondiff.models import load_model
from reasondiff.streaming import (
    StreamingUnsupported,
    StreamModel,
    memory_bound,
    stream_layers,
    supports_streaming,
)

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 120,
    "max_position_embeddings": 128,
}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2": ("Qwen2", {}),
    # layers 1-2 attend through a 5-token window: a second mask the recorder must route.
    "qwen2-sliding": (
        "Qwen2",
        {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3", {"head_dim": 8}),
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {"sliding_window": None}),
}
TRACES = [
    [int(x) for x in torch.randint(0, 120, (23,), generator=torch.Generator().manual_seed(1))],
    [5, 7, 7, 7, 9, 11, 2, 0, 119, 64, 3, 3, 18],
    [42, 42, 17, 3, 42, 99, 17, 5, 60, 42, 1, 88, 71],
]


def _make(path: Path, family: str, *, seed: int) -> Path:
    import transformers

    prefix, extra = FAMILIES[family]
    cfg = getattr(transformers, f"{prefix}Config")(**SMALL, **extra, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(cfg)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp(request.param)
    base = _make(root / "base", request.param, seed=0)
    whole = _make(root / "desc-whole", request.param, seed=1)
    return base, shard_checkpoint(whole, root / "desc", shards=3)


def _streamed(base: Path, desc: Path, **kw: Any) -> dict[tuple[str, str, int], torch.Tensor]:
    out = {}
    models = [StreamModel("base", base), StreamModel("desc", desc)]
    for kind, layer, states in stream_layers(models, TRACES, **kw):
        for key, per_trace in states.items():
            for t, x in enumerate(per_trace):
                out[(key, f"{kind}.{layer}", t)] = x.to(torch.float32).clone()
    return out


def _whole(path: Path) -> list[dict[str, torch.Tensor]]:
    model = load_model(path, device="cpu", dtype="float32")
    return [extract_activations(model, t) for t in TRACES]


def test_streamed_hidden_states_equal_the_whole_forward(family_pair: tuple[Path, Path]) -> None:
    base, desc = family_pair
    FORWARD_COUNTER.reset()
    streamed = _streamed(base, desc)
    assert FORWARD_COUNTER.count == 2 * len(TRACES)  # one streamed forward per (model, trace)
    keys = {"hidden.0", "hidden.1", "hidden.2", "hidden.3", "prenorm.3"}
    assert {k[1] for k in streamed} == keys
    for key, path in (("base", base), ("desc", desc)):
        for t, acts in enumerate(_whole(path)):
            assert set(acts) == keys
            for name, ref in acts.items():
                got = streamed[(key, name, t)]
                assert got.shape == ref.shape == (len(TRACES[t]), 32)
                scale = float(ref.abs().max())
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * scale)
    # the two models really differ, so a swapped model key could not pass
    assert not torch.allclose(streamed[("base", "hidden.2", 0)], streamed[("desc", "hidden.2", 0)])


def test_cka_rows_equal_the_whole_paths(family_pair: tuple[Path, Path]) -> None:
    base, desc = family_pair
    streamed = _streamed(base, desc)
    whole_base, whole_desc = _whole(base), _whole(Path(str(desc)))
    for t in range(len(TRACES)):
        for name in whole_base[t]:
            ref = score_layer(
                prepare_base_layer(whole_base[t][name], name="b", k=3), whole_desc[t][name], k=3
            )
            side = prepare_base_layer(streamed[("base", name, t)], name="b", k=3)
            got = score_layer(side, streamed[("desc", name, t)], k=3)
            assert got["massive"] == ref["massive"]
            for metric, value in ref["metrics"].items():
                assert abs(got["metrics"][metric] - value) <= 1e-9, (t, name, metric)


def test_layer_selection_and_no_prenorm(family_pair: tuple[Path, Path]) -> None:
    base, _ = family_pair
    got = [
        (k, layer)
        for k, layer, _ in stream_layers(
            [StreamModel("b", base)], TRACES[:1], layers=[3, 1], prenorm=False
        )
    ]
    assert got == [("hidden", 1), ("hidden", 3)]
    layers = stream_layers([StreamModel("b", base)], TRACES[:1])
    next(layers)
    assert torch.is_grad_enabled()  # no_grad does not leak into the caller between layers
    layers.close()
    with pytest.raises(TraceError, match=r"layers \[4\] out of range.*0\.\.3"):
        next(stream_layers([StreamModel("b", base)], TRACES[:1], layers=[4]))


def test_block_size_in_the_bound_is_the_models(family_pair: tuple[Path, Path]) -> None:
    base, _ = family_pair
    model = load_model(base, device="cpu", dtype="float32")
    block = sum(p.numel() for p in model.model.model.layers[0].parameters()) * 4
    config = json.loads((base / "config.json").read_text())
    bound = memory_bound([config, config], [10, 20], dtype=torch.float32)
    assert bound.block_bytes == block
    assert bound.states_bytes == 2 * 30 * 32 * 4
    assert bound.total == block + bound.states_bytes + bound.rows_bytes


def test_unsupported_architecture_falls_back_with_its_name(tmp_path: Path) -> None:
    ok, reason = supports_streaming({"model_type": "bert", "architectures": ["BertModel"]})
    assert not ok and "BertModel" in reason and "falls back to whole-model passes" in reason
    ok, reason = supports_streaming({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert not ok and "GPT2LMHeadModel" in reason
    ok, reason = supports_streaming({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    assert ok, reason
    pickled = make_qwen2(tmp_path / "pk")
    model = load_model(pickled, device="cpu", dtype="float32")
    (pickled / "model.safetensors").unlink()
    torch.save(model.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(StreamingUnsupported, match=r"model 'pk': pickle weights.*falls back"):
        next(stream_layers([StreamModel("pk", pickled)], TRACES[:1]))
    bert = make_bert(tmp_path / "bert")
    with pytest.raises(StreamingUnsupported, match=r"model 'enc'.*BertModel.*falls back"):
        next(stream_layers([StreamModel("enc", bert)], TRACES[:1]))


def test_bad_inputs_name_the_model(tmp_path: Path) -> None:
    base = _make(tmp_path / "a", "qwen2", seed=0)
    with pytest.raises(TraceError, match=r"model a: trace 1 has token ids outside.*\(2, 500\)"):
        next(stream_layers([StreamModel("a", base)], [[1, 2], [3, 4, 500]]))
    wide = tmp_path / "wide"
    import transformers

    cfg = transformers.Qwen2Config(**{**SMALL, "hidden_size": 64})
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(wide)
    with pytest.raises(ArchitectureMismatch, match="hidden size"):
        next(stream_layers([StreamModel("a", base), StreamModel("w", wide)], [[1, 2]]))
    # a missing block tensor is named, with its model
    shard = shard_checkpoint(base, tmp_path / "s", shards=2)
    index = json.loads((shard / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    gone = tmp_path / "gone"
    gone.mkdir()
    from safetensors.torch import load_file, save_file

    for f in shard.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(f)
            t.pop("model.layers.1.mlp.up_proj.weight", None)
            save_file(t, gone / f.name)
        else:
            (gone / f.name).write_bytes(f.read_bytes())
    (gone / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model 'g'.*model\.layers\.1\.mlp\.up_proj\.weight"):
        list(stream_layers([StreamModel("g", gone)], [[1, 2]]))


# ---------------------------------------------------------------------- memory
_CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    import transformers.models.qwen2.modeling_qwen2  # both modes run this code: import first
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from reasondiff.activations import extract_activations
    from reasondiff.models import load_model
    from reasondiff.streaming import StreamModel, stream_layers
    mode, paths, traces = sys.argv[1], sys.argv[2:4], json.loads(sys.argv[4])
    torch.set_num_threads(2)  # the overhead grows a little with threads: fix it (README)
    def status(key):  # kB; ru_maxrss would be inherited from the (larger) parent via fork
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1])
    before = status("VmRSS")
    if mode == "whole":
        models = [load_model(p, device="cpu", dtype="float32") for p in paths]
        for t in traces:
            for m in models:
                extract_activations(m, t)
    else:
        for _ in stream_layers([StreamModel(str(i), p) for i, p in enumerate(paths)], traces):
            pass
    after = status("VmHWM")  # the peak RSS of this process
    print(json.dumps({"before_kib": before, "after_kib": after}))
    """
)


def _peak_growth_mib(mode: str, paths: list[Path], traces: list[list[int]]) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, *map(str, paths), json.dumps(traces)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    return (rss["after_kib"] - rss["before_kib"]) / 1024


#: What a streamed pass holds beyond :func:`memory_bound` that does not scale with the
#: model: code paths first used inside the pass (transformers' AutoModel and mask code
#: imported lazily, the first aten kernels, the OpenMP pool starting) and the allocator's
#: slack. Measured on this test's pair (2026-12-07, 2-core shared box): streamed growth
#: 35-41 MiB at 2 threads (4 runs), 32-39 at 1-8 threads, 41-44 at 16-32 threads, over a
#: bound of 13.8 MiB and a forward transient of 4.5 MiB, i.e. 14-25 MiB; a pass warmed up
#: first grew 22-30 MiB, so about 10 MiB of it is first use. 32 MiB leaves ~7 MiB over
#: the worst run seen for the run-to-run spread (6 MiB at 2 threads).
FIXED_OVERHEAD = 32 * 2**20


def forward_transient_bytes(config: Any, tokens: int, elem: int = 4) -> int:
    """The largest intermediates of one trace through one block, alive together: the
    MLP's gate, up, act(gate) and their product (4 x N x I), the attention's q, k, v and
    output (4 x N x D) and its N x N scores per head (the CPU SDPA math path makes them)."""
    d, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    return (4 * tokens * inter + 4 * tokens * d + heads * tokens * tokens) * elem


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_streaming_peak_rss_is_a_fraction_of_whole_loads(tmp_path: Path) -> None:
    """Peak RSS (VmHWM) over the RSS after importing torch and the model's code, measured in
    fresh subprocesses: a pair of 8-block models (~220 MiB float32 each, untied 32k vocab)
    loaded whole grows by at least their size; streamed, by at most the README's bound
    (one block + a layer of states + used rows, :func:`memory_bound`) plus one trace's
    forward intermediates through one block plus :data:`FIXED_OVERHEAD`."""
    import transformers

    cfg = transformers.Qwen2Config(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=32000,
        max_position_embeddings=512,
    )
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"m{seed}"
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
        paths.append(path)
    weights = sum(f.stat().st_size for f in paths[0].glob("*.safetensors")) / 2**20
    gen = torch.Generator().manual_seed(0)
    traces = [torch.randint(0, 32000, (128,), generator=gen).tolist() for _ in range(3)]
    whole = _peak_growth_mib("whole", paths, traces)
    streamed = _peak_growth_mib("streamed", paths, traces)
    config = json.loads((paths[0] / "config.json").read_text())
    bound = memory_bound([config, config], [len(t) for t in traces], dtype=torch.float32)
    transient = forward_transient_bytes(cfg, max(map(len, traces)))
    limit = (bound.total + transient + FIXED_OVERHEAD) / 2**20
    print(
        f"peak RSS growth: whole {whole:.0f} MiB, streamed {streamed:.1f} MiB ({weights:.0f} "
        f"MiB each); bound {bound.total / 2**20:.1f} MiB + transient {transient / 2**20:.1f} "
        f"MiB + fixed {FIXED_OVERHEAD / 2**20:.0f} MiB = {limit:.1f} MiB"
    )
    assert whole >= 1.5 * weights, (whole, weights)  # the whole path really holds both
    assert streamed <= limit, (streamed, limit)
    assert streamed <= 0.5 * whole, (streamed, whole)
