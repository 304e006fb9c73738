"""Rows 4, 5 and 9: corrupt, mismatched and untrusted checkpoints.

A broken checkpoint must give one error naming the model and the file (and the tensor
where known) and leave no cache entry behind. Safetensors has no checksum, so a bit
flip inside tensor DATA cannot be detected by reading; what protects the cache is the
content fingerprint: it hashes the files, so a flipped byte (even one that keeps size
and mtime, like bit rot) keys new entries and no stale result is reused.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from _faultkit import (
    copy_checkpoint,
    entries,
    file_of_tensor,
    flip_bits,
    header_span,
    make_session,
    make_tiny_qwen2,
    small_trace_file,
    tensor_span,
    truncate_file,
)
from safetensors.torch import load_file, save_file

from reasondiff import activations, fingerprint
from reasondiff.errors import ArchitectureMismatch, ModelLoadError
from reasondiff.models import load_model
from reasondiff.weightdiff import stream_weight_diff

FLIPPED = "model.layers.1.mlp.down_proj.weight"


def _truncate(ckpt: Path) -> str:
    truncate_file(ckpt / "model.safetensors", keep=0.6)
    return "truncated"


def _flip_header(ckpt: Path) -> str:
    start, _ = header_span(ckpt / "model.safetensors")
    flip_bits(ckpt / "model.safetensors", start + 2, 0x01)  # '"' -> '#': invalid JSON
    return "corrupt"


@pytest.mark.parametrize("damage", [_truncate, _flip_header], ids=["truncated", "header-flip"])
def test_corrupt_checkpoint_is_named_and_poisons_no_cache(
    tiny_qwen: Path, tmp_path: Path, damage: object
) -> None:
    cand = copy_checkpoint(tiny_qwen, tmp_path / "cand")
    assert callable(damage)
    damage(cand)
    cache = tmp_path / "cache"
    session, pair = make_session(cache, tiny_qwen, cand)
    forwards = activations.FORWARD_COUNTER.count
    with pytest.raises(ModelLoadError) as info:
        session.pair_result(pair)
    msg = str(info.value)
    assert "'cand'" in msg and "model.safetensors" in msg and "truncated or corrupt" in msg
    assert activations.FORWARD_COUNTER.count == forwards
    assert entries(cache) == [], "a failed model left cache entries"
    # Loading the model directly names it the same way (not a bare SafetensorError).
    with pytest.raises(
        ModelLoadError, match=r"model 'cand'.*model\.safetensors.*truncated or corrupt"
    ):
        load_model(cand, device="cpu", name="cand")


def test_data_bit_flip_changes_the_fingerprint_so_no_stale_entry_is_reused(
    toy_base: Path,
    toy_copy: Path,
    toy_traces: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cand = copy_checkpoint(toy_copy, tmp_path / "cand")
    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=2)
    cache = tmp_path / "cache"
    opts = {"traces": str(traces), "max_tokens": 32, "layers": (0, 5), "keep_activations": True}
    s1, p1 = make_session(cache, toy_base, cand, **opts)
    first = s1.pair_result(p1)
    # a byte copy has the base's fingerprint: its activations ARE the base's (2 traces)
    assert s1.stats.weight_diffs_computed == 1 and s1.stats.activations_computed == 2
    act_entries = [p for p in entries(cache) if p.suffix == ".safetensors"]
    assert len(act_entries) == 2
    assert all(w.normalized_diff == 0 for w in first.weights if not w.note)

    # Silent bit rot: flip a sign bit inside one tensor's data, keep size and mtime.
    f = file_of_tensor(cand, FLIPPED)
    lo, _ = tensor_span(f, FLIPPED)
    before = fingerprint.fingerprint(cand)
    flip_bits(f, lo + 4 * 5 + 3, 0x80, keep_mtime=True)  # element 5 (element 0 is 0.0)
    monkeypatch.setattr(fingerprint, "_MEMO", {})  # the next run is a new process
    assert fingerprint.fingerprint(cand) != before

    s2, p2 = make_session(cache, toy_base, cand, **opts)
    second = s2.pair_result(p2)
    assert s2.stats.weight_diffs_computed == 1 and s2.stats.weight_diffs_loaded == 0
    # the base's activations are reused, the changed model's are recomputed under new keys
    assert s2.stats.activations_computed == 2 and s2.stats.activations_loaded == 2
    after = [p for p in entries(cache) if p.suffix == ".safetensors"]
    assert len(after) == 4 and set(act_entries) < set(after)
    changed = [w for w in second.weights if w.normalized_diff > 0]
    assert [w.tensor for w in changed] == [FLIPPED]


# ---------------------------------------------------------------- row 5: mismatches
@pytest.mark.parametrize(
    ("override", "what"),
    [({"num_hidden_layers": 3}, "decoder layers"), ({"hidden_size": 48}, "hidden size")],
    ids=["layers", "hidden"],
)
def test_architecture_mismatch_is_named_before_any_forward_or_diff(
    tiny_qwen: Path, tmp_path: Path, override: dict[str, int], what: str
) -> None:
    other = make_tiny_qwen2(tmp_path / "other", seed=1, **override)
    cache = tmp_path / "cache"
    session, pair = make_session(cache, tiny_qwen, other)
    forwards = activations.FORWARD_COUNTER.count
    with pytest.raises(ArchitectureMismatch) as info:
        session.pair_result(pair)
    msg = str(info.value)
    assert what in msg and "qwen" in msg and "other" in msg
    assert activations.FORWARD_COUNTER.count == forwards
    assert session.stats.weight_diffs_computed == 0
    assert entries(cache) == []


def test_missing_resized_and_tied_tensors_are_named_and_shared_parts_compared(
    tmp_path: Path,
) -> None:
    base = make_tiny_qwen2(tmp_path / "base", seed=0)
    cand = copy_checkpoint(base, tmp_path / "cand")
    f = cand / "model.safetensors"
    tensors = load_file(f)
    tensors.pop("model.layers.1.self_attn.k_proj.bias")  # a missing tensor
    emb = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = torch.cat([emb, torch.ones(4, emb.shape[1])])
    tensors.pop("lm_head.weight")  # the candidate ties lm_head to its (resized) embedding
    save_file(tensors, f, metadata={"format": "pt"})
    cfg = json.loads((cand / "config.json").read_text())
    cfg.update(vocab_size=104, tie_word_embeddings=True)
    (cand / "config.json").write_text(json.dumps(cfg))

    records = {r.tensor: r for r in stream_weight_diff(base, cand, base_name="b", desc_name="c")}
    assert records["model.layers.1.self_attn.k_proj.bias"].note == "missing_in_descendant"
    assert records["model.embed_tokens.weight"].note == "resized:100"
    assert records["model.embed_tokens.weight"].normalized_diff == 0.0  # shared rows equal
    assert records["lm_head.weight"].note == "tied"
    ordinary = [r for r in records.values() if not r.note]
    assert len(ordinary) >= 20
    assert all(r.normalized_diff == 0.0 for r in ordinary)  # everything shared was compared


# ---------------------------------------------------------------- row 9: untrusted code
class _Payload:
    """Unpickling this would run a shell command creating a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _pickle_only(src: Path, dst: Path, *, malicious: Path | None = None) -> Path:
    ckpt = copy_checkpoint(src, dst)
    state: dict[str, object] = dict(load_file(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    if malicious is not None:
        state["model.norm.weight"] = _Payload(malicious)
    torch.save(state, ckpt / "pytorch_model.bin")
    return ckpt


def test_pickle_only_checkpoint_needs_allow_pickle(tiny_qwen: Path, tmp_path: Path) -> None:
    ckpt = _pickle_only(tiny_qwen, tmp_path / "bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*--allow-pickle"):
        load_model(ckpt, device="cpu", name="bin")
    with pytest.raises(ModelLoadError, match=r"--allow-pickle"):
        stream_weight_diff(tiny_qwen, ckpt, base_name="q", desc_name="bin")
    loaded = load_model(ckpt, device="cpu", name="bin", allow_pickle=True)
    assert loaded.num_layers == 2


def test_malicious_pickle_is_refused_even_with_allow_pickle(
    tiny_qwen: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    ckpt = _pickle_only(tiny_qwen, tmp_path / "evil", malicious=marker)
    # sanity: the file really is a code-running pickle
    assert b"system" in (ckpt / "pytorch_model.bin").read_bytes()
    refused = r"model 'evil'.*refusing pickle.*pytorch_model\.bin.*more than plain tensors"
    with pytest.raises(ModelLoadError, match=refused) as info:
        load_model(ckpt, device="cpu", name="evil", allow_pickle=True)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(ModelLoadError, match=refused) as info:
        stream_weight_diff(tiny_qwen, ckpt, base_name="q", desc_name="evil", allow_pickle=True)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists(), "the pickle payload ran"


def test_remote_code_config_needs_trust_remote_code(tiny_qwen: Path, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_qwen, tmp_path / "remote")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "modeling_evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError, match=r"model 'remote'.*auto_map.*--trust-remote-code"):
        load_model(ckpt, device="cpu", name="remote")
    assert not (tmp_path / "pwned").exists()
