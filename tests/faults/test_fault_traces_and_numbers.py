"""Rows 6 and 7 (session level): bad numbers and bad traces give named errors, never rows.

Each test drives a real ``DiffSession`` (as ``--base/--candidate`` creates it) over the
toy base and a damaged copy, with a two-trace set so a run takes a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _faultkit import copy_checkpoint, entries, make_session, small_trace_file

from reasondiff import models
from reasondiff.errors import NonFiniteError, TokenizerMismatch, TraceError


def _trace_file(path: Path, model: Path, traces: list[dict[str, Any]]) -> Path:
    """A trace set whose header says its ids come from ``model``'s tokenizer (used as-is)."""
    from reasondiff.models import load_tokenizer
    from reasondiff.traces import tokenizer_identity

    header = {
        "reasondiff_traces": 1,
        "name": "t",
        "tokenizer": tokenizer_identity(load_tokenizer(model)),
    }
    path.write_text("\n".join(json.dumps(x) for x in [header, *traces]) + "\n", "utf-8")
    return path


def _good(toy_traces: Path) -> dict[str, Any]:
    line = next(ln for ln in toy_traces.read_text("utf-8").splitlines() if '"token_ids"' in ln)
    good: dict[str, Any] = json.loads(line)
    return good


@pytest.mark.parametrize(
    ("bad_ids", "match"),
    [
        ([], r"t\.jsonl:3: trace 'bad' is empty"),
        ([1, 7, 9], r"t\.jsonl:3: trace 'bad' has 3 tokens; at least 4"),
        (
            [1, 7, "V", 9, 11],  # "V": the model's vocab size, the first id outside it
            r"trace 'bad': token id {V} at position 2 is outside the vocabulary of model 'base'",
        ),
    ],
    ids=["empty", "short", "out-of-vocab"],
)
def test_bad_trace_is_a_named_error(
    toy_base: Path,
    toy_copy: Path,
    toy_traces: Path,
    tmp_path: Path,
    bad_ids: list[Any],
    match: str,
) -> None:
    vocab = int(json.loads((toy_base / "config.json").read_text())["vocab_size"])
    ids = [vocab if t == "V" else t for t in bad_ids]
    good = _good(toy_traces)
    bad = {"id": "bad", "text": good["text"], "token_ids": ids}
    traces = _trace_file(tmp_path / "t.jsonl", toy_base, [good, bad])
    session, pair = make_session(
        tmp_path / "cache", toy_base, toy_copy, traces=str(traces), max_tokens=32
    )
    with pytest.raises(TraceError, match=match.replace("{V}", str(vocab))):
        session.pair_result(pair)
    assert not [p for p in entries(tmp_path / "cache") if p.suffix == ".safetensors"]


def test_tokenizer_disagreement_is_named(
    toy_base: Path, toy_copy: Path, toy_traces: Path, tmp_path: Path
) -> None:
    cand = copy_checkpoint(toy_copy, tmp_path / "cand")
    tok_file = cand / "tokenizer.json"
    tok = json.loads(tok_file.read_text("utf-8"))
    vocab = tok["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]  # the descendant swaps two digits
    tok_file.write_text(json.dumps(tok), "utf-8")
    # a trace with both digits, so it cannot tokenize the same way for both models
    good = _good(toy_traces)
    assert "1" in good["text"] and "2" in good["text"], good["text"][:200]
    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=2)
    session, pair = make_session(
        tmp_path / "cache", toy_base, cand, traces=str(traces), max_tokens=32
    )
    with pytest.raises(TokenizerMismatch) as info:
        session.pair_result(pair)
    msg = str(info.value)
    assert "'base'" in msg and "'cand'" in msg and "disagree on trace" in msg and "position" in msg


def test_nan_activations_name_model_layer_and_positions_and_are_not_cached(
    toy_base: Path,
    toy_copy: Path,
    toy_traces: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finite weights, NaN activations (injected after block 3 at positions 2 and 5)."""
    cand = copy_checkpoint(toy_copy, tmp_path / "cand")
    (cand / "note.txt").write_text("not a weight file")  # same weights, same fingerprint
    real_load = models.load_model

    def load_with_nan(path: Path, **kwargs: Any) -> Any:
        loaded = real_load(path, **kwargs)
        if kwargs.get("name") == "cand":

            def poison(_mod: Any, _inp: Any, out: Any) -> Any:
                hidden = out[0] if isinstance(out, tuple) else out
                hidden[:, [2, 5], :] = float("nan")
                return out

            loaded.model.model.layers[3].register_forward_hook(poison)
        return loaded

    monkeypatch.setattr(models, "load_model", load_with_nan)
    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=1)
    # A descendant with its own fingerprint: change one weight slightly (finite).
    from safetensors.torch import load_file, save_file

    idx = json.loads((cand / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.up_proj.weight"
    f = cand / idx[name]
    tensors = load_file(f)
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, f, metadata={"format": "pt"})

    cache = tmp_path / "cache"
    session, pair = make_session(
        cache, toy_base, cand, traces=str(traces), max_tokens=32, keep_activations=True
    )
    with pytest.raises(NonFiniteError) as info:
        session.pair_result(pair)
    msg = str(info.value)
    assert "model cand" in msg and "hidden.4 (layer 4)" in msg and "positions [2, 5]" in msg
    # the base's activations were cached; nothing of the poisoned model was
    acts = [p for p in entries(cache) if p.suffix == ".safetensors"]
    assert len(acts) == 1
    metric_entries = [p for p in entries(cache) if "metrics" in p.parts]
    assert metric_entries == []
