"""Tests for reasondiff.weightdiff: by-name matching, notes, shards, errors, memory."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from _checkpoints import copy_checkpoint, edit_tensors, make_qwen2, shard_checkpoint
from safetensors.torch import load_file

from reasondiff import weightdiff
from reasondiff.errors import ModelLoadError, NonFiniteError
from reasondiff.records import WeightRecord
from reasondiff.weightdiff import parse_tensor_name, stream_weight_diff


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2(tmp_path_factory.mktemp("base") / "ckpt", seed=10)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2(tmp_path_factory.mktemp("tied") / "ckpt", seed=11, tie=True)


def _diff(a: Path, b: Path, **kw: object) -> list[WeightRecord]:
    return stream_weight_diff(a, b, base_name="base", desc_name="desc", **kw)  # type: ignore[arg-type]


def _by_name(records: list[WeightRecord]) -> dict[str, WeightRecord]:
    names = [r.tensor for r in records]
    assert len(names) == len(set(names)), "one record per tensor"
    return {r.tensor: r for r in records}


def test_parse_tensor_name() -> None:
    assert parse_tensor_name("model.layers.12.mlp.up_proj.weight") == (12, "mlp.up_proj.weight")
    assert parse_tensor_name("encoder.layer.3.attention.self.query.bias") == (
        3,
        "attention.self.query.bias",
    )
    assert parse_tensor_name("transformer.h.0.attn.c_attn.weight") == (0, "attn.c_attn.weight")
    assert parse_tensor_name("model.embed_tokens.weight") == (-1, "model.embed_tokens.weight")
    assert parse_tensor_name("model.norm.weight") == (-1, "model.norm.weight")


def test_identical_checkpoints_are_all_zero(base: Path, tmp_path: Path) -> None:
    other = copy_checkpoint(base, tmp_path / "copy")
    records = _diff(base, other)
    n_float = len(load_file(base / "model.safetensors"))
    assert len(records) == n_float
    for r in records:
        assert (r.normalized_diff, r.relative_diff, r.mean_abs_diff, r.note) == (0.0, 0.0, 0.0, "")
        assert (r.base, r.descendant) == ("base", "desc")
    rec = _by_name(records)["model.layers.1.self_attn.q_proj.weight"]
    assert (rec.layer, rec.component, rec.shape) == (1, "self_attn.q_proj.weight", (32, 32))
    assert [r.layer for r in records] == sorted(r.layer for r in records)


def test_single_layer_edit_only_shows_in_that_layer(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    name = "model.layers.1.mlp.up_proj.weight"
    w = load_file(base / "model.safetensors")[name]
    delta = torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    edit_tensors(desc, {name: w + delta})
    records = _by_name(_diff(base, desc))
    changed = {n for n, r in records.items() if r.normalized_diff > 0}
    assert changed == {name}
    r = records[name]
    d64, a64, b64 = delta.double(), w.double(), (w + delta).double()
    expect = d64.norm() / (0.5 * a64.norm() + 0.5 * b64.norm())
    assert r.normalized_diff == pytest.approx(float(expect), rel=1e-5)
    assert r.relative_diff == pytest.approx(float(d64.norm() / a64.norm()), rel=1e-5)
    assert r.mean_abs_diff == pytest.approx(float(d64.abs().mean()), rel=1e-4)


def test_sharded_equals_single_file(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_tensors(desc, {name: load_file(base / "model.safetensors")[name] * 1.5})
    single = _diff(base, desc)
    sharded = _diff(
        shard_checkpoint(base, tmp_path / "bs"), shard_checkpoint(desc, tmp_path / "ds")
    )
    assert single == sharded
    assert _by_name(single)[name].normalized_diff == pytest.approx(0.4)  # 0.5 / 1.25


def test_resized_vocabulary_compared_on_shared_rows(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    w = load_file(base / "model.safetensors")
    extra = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))
    edit_tensors(
        desc,
        {
            "model.embed_tokens.weight": torch.cat([w["model.embed_tokens.weight"], extra]),
            "lm_head.weight": torch.cat([w["lm_head.weight"] * 2, extra]),
        },
    )
    records = _by_name(_diff(base, desc))
    emb = records["model.embed_tokens.weight"]
    assert emb.note == "resized:100" and emb.shape == (100, 32)
    assert emb.normalized_diff == 0.0  # the shared rows did not change
    head = records["lm_head.weight"]
    assert head.note == "resized:100" and head.normalized_diff == pytest.approx(2 / 3)


def test_tied_lm_head_on_one_side_compares_the_embedding(tied_base: Path, tmp_path: Path) -> None:
    w = load_file(tied_base / "model.safetensors")
    assert "lm_head.weight" not in w
    untied = copy_checkpoint(tied_base, tmp_path / "untied")
    edit_tensors(untied, {"lm_head.weight": w["model.embed_tokens.weight"].clone()})
    cfg = json.loads((untied / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(cfg))
    head = _by_name(_diff(tied_base, untied))["lm_head.weight"]
    assert head.note == "tied" and head.normalized_diff == 0.0
    back = _by_name(_diff(untied, tied_base))["lm_head.weight"]
    assert back.note == "tied" and back.normalized_diff == 0.0


def test_tied_on_both_sides_is_one_nan_record(tied_base: Path, tmp_path: Path) -> None:
    records = _by_name(_diff(tied_base, copy_checkpoint(tied_base, tmp_path / "c")))
    head = records["lm_head.weight"]
    assert head.note == "tied" and math.isnan(head.normalized_diff)
    assert head.shape == (100, 32) and head.layer == -1
    assert [r.tensor for r in records.values() if r.note] == ["lm_head.weight"]


def test_missing_renamed_mismatched_and_int_tensors(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    w = load_file(base / "model.safetensors")
    edit_tensors(
        desc,
        {
            "model.layers.0.mlp.gate_proj.weight": None,  # missing in descendant
            "model.layers.1.extra.weight": torch.ones(4),  # missing in base
            "model.norm.weight": None,  # renamed without "model." prefix
            "norm.weight": w["model.norm.weight"],
            "model.layers.1.input_layernorm.weight": torch.ones(16),  # shape mismatch
            "model.position_ids": torch.arange(10),  # int buffer: skipped
        },
    )
    records = _by_name(_diff(base, desc))
    gate = records["model.layers.0.mlp.gate_proj.weight"]
    assert gate.note == "missing_in_descendant" and math.isnan(gate.relative_diff)
    extra = records["model.layers.1.extra.weight"]
    assert extra.note == "missing_in_base" and extra.shape == (4,) and extra.layer == 1
    norm = records["model.norm.weight"]
    assert norm.note == "renamed:norm.weight" and norm.normalized_diff == 0.0
    assert "norm.weight" not in records
    ln = records["model.layers.1.input_layernorm.weight"]
    assert ln.note == "shape_mismatch" and ln.shape == (32,) and math.isnan(ln.mean_abs_diff)
    assert "model.position_ids" not in records


def test_truncated_file_names_model_and_file(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    f = desc / "model.safetensors"
    with open(f, "rb+") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(ModelLoadError) as exc:
        _diff(base, desc)
    msg = str(exc.value)
    assert "'desc'" in msg and str(f) in msg and "truncated or corrupt" in msg


def test_missing_shard_is_named(base: Path, tmp_path: Path) -> None:
    sharded = shard_checkpoint(base, tmp_path / "s")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00003\.safetensors"):
        _diff(base, sharded)


def test_pickle_refused_unless_allowed(base: Path, tmp_path: Path) -> None:
    pick = tmp_path / "pickle"
    pick.mkdir()
    (pick / "config.json").write_text((base / "config.json").read_text())
    torch.save(load_file(base / "model.safetensors"), pick / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        _diff(base, pick)
    assert _diff(base, pick, allow_pickle=True) == _diff(
        base, copy_checkpoint(base, tmp_path / "c")
    )


def test_nan_weight_is_named(base: Path, tmp_path: Path) -> None:
    desc = copy_checkpoint(base, tmp_path / "desc")
    name = "model.layers.1.self_attn.o_proj.weight"
    w = load_file(base / "model.safetensors")[name].clone()
    w[3, 4] = float("inf")
    edit_tensors(desc, {name: w})
    with pytest.raises(
        NonFiniteError, match=r"'desc': 1 NaN/Inf values in weight .*o_proj.* \(block 1\)"
    ):
        _diff(base, desc)


def test_progress_reports_each_tensor(base: Path) -> None:
    lines: list[str] = []
    records = _diff(base, base, progress=lines.append)
    assert len(lines) == len(records)
    assert lines[-1].startswith(f"weights desc vs base: {len(records)}/{len(records)} ")


def _alive_probe(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], int, dict[str, set[int]]]:
    """Diff two shardings of ``base`` with each tensor read tracked by a weakref, per
    checkpoint: (per read, how many earlier tensors of that checkpoint were alive;
    records; what is still alive after). Tensors held, not process memory."""
    alive: dict[str, set[int]] = {}
    peak: list[int] = []
    counter = iter(range(10**6))
    real_get = weightdiff._Source.get

    def tracked_get(self: weightdiff._Source, tensor: str) -> torch.Tensor:
        mine = alive.setdefault(self.name, set())
        peak.append(len(mine))
        t = real_get(self, tensor)
        ident = next(counter)
        mine.add(ident)
        weakref.finalize(t, mine.discard, ident)
        return t

    monkeypatch.setattr(weightdiff._Source, "get", tracked_get)
    records = _diff(shard_checkpoint(base, tmp_path / "a"), shard_checkpoint(base, tmp_path / "b"))
    return peak, len(records), alive


def test_at_most_two_tensors_of_a_checkpoint_alive(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a read starts, at most ``READER_THREADS - 1`` earlier tensors of that
    checkpoint (the other reader's) are alive: never more than two open at once."""
    peak, records, alive = _alive_probe(base, tmp_path, monkeypatch)
    assert weightdiff.READER_THREADS == 2
    assert len(peak) == 2 * records
    assert max(peak) <= weightdiff.READER_THREADS - 1
    assert not any(alive.values())


def test_one_reader_thread_holds_one_tensor_per_checkpoint(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one reader, no earlier tensor of a checkpoint is alive at the next read."""
    monkeypatch.setattr(weightdiff, "READER_THREADS", 1)
    peak, records, _ = _alive_probe(base, tmp_path, monkeypatch)
    assert len(peak) == 2 * records
    assert max(peak) == 0


def test_encoder_without_lm_head(tmp_path: Path) -> None:
    """BertModel ties by default but has no lm_head: no 'tied' record is invented."""
    from _checkpoints import make_bert

    a = make_bert(tmp_path / "a", seed=1)
    records = _by_name(_diff(a, copy_checkpoint(a, tmp_path / "b")))
    assert "lm_head.weight" not in records
    assert all(r.note == "" and r.normalized_diff == 0.0 for r in records.values())
    assert {r.layer for r in records.values()} == {-1, 0, 1}
    assert records["encoder.layer.1.attention.self.query.weight"].component == (
        "attention.self.query.weight"
    )


def _write(directory: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": False}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _mapped_rss(root: Path) -> dict[str, int]:
    """Resident bytes of this process's mappings of files under ``root`` (smaps ``Rss``)."""
    rss: dict[str, int] = {}
    path = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            path = head[5] if len(head) > 5 and head[5].startswith(str(root)) else None
        elif path is not None and head[:1] == ["Rss:"]:
            rss[path] = rss.get(path, 0) + int(head[1]) * 1024
    return rss


#: Pages a fault maps at once besides the window: fault-around's 64 KiB block, or a
#: large page-cache folio (up to a 2 MiB PMD), on either side of a window.
_FAULT_SPAN = 2 * 2**20


@pytest.mark.parametrize("keep", [False, True], ids=["given back", "negative control: kept"])
@pytest.mark.parametrize("form", ["fused kernel", "torch"])
def test_streamed_in_windows_equals_whole_tensor_metric_and_keeps_no_file_resident(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str, keep: bool
) -> None:
    """Many small windows (a resized bf16 embedding read as a row prefix) give exactly the
    whole-tensor result; each file is mapped, but only about a window per reader stays
    resident at a time (sampled after each tensor), nothing stays mapped after, and the
    torch thread setting is restored. The control keeps every page: it is caught."""
    from reasondiff.metrics import weight_diff_metrics
    from reasondiff.metrics.weights import DISABLE_ENV, REDUCE_BLOCK, kernel_for

    monkeypatch.setenv(DISABLE_ENV, "1" if form == "torch" else "0")
    if form != "torch" and kernel_for(torch.bfloat16) is None:
        pytest.skip("no C compiler here: the torch form runs (the other case)")
    if keep:  # neither path gives pages back
        monkeypatch.setattr(weightdiff, "_drop_pages", lambda *a: None)
        real_address = weightdiff._Tensor.address
        monkeypatch.setattr(
            weightdiff._Tensor, "address", lambda self: (real_address(self)[0], None)
        )
    g = torch.Generator().manual_seed(3)
    emb = (torch.randn(20000, 448, generator=g) * 0.02).to(torch.bfloat16)  # 17.9 MB
    grown = torch.cat([emb + 0.001, torch.ones(7, 448, dtype=torch.bfloat16)])
    up = torch.randn(40, 30, generator=g)
    a = _write(tmp_path / "a", {"model.embed_tokens.weight": emb, "model.layers.0.up": up})
    b = _write(tmp_path / "b", {"model.embed_tokens.weight": grown, "model.layers.0.up": -up})
    window = 2 * REDUCE_BLOCK  # bytes: 1093 windows of bf16 per embedding side
    monkeypatch.setattr(weightdiff, "WINDOW_BYTES", window)
    resident: list[int] = []

    def progress(_: str) -> None:
        resident.extend(_mapped_rss(tmp_path).values())

    threads = torch.get_num_threads()
    records = _by_name(_diff(a, b, progress=progress))
    assert torch.get_num_threads() == threads
    assert not _mapped_rss(tmp_path)  # unmapped after the diff
    bound = weightdiff.READER_THREADS * (window + 2 * _FAULT_SPAN)
    assert emb.numel() * 2 > 2 * bound  # a kept file shows
    assert resident and (max(resident) > bound if keep else max(resident) <= bound)
    rec = records["model.embed_tokens.weight"]
    assert rec.note == "resized:20000"
    want = weight_diff_metrics(emb, grown[:20000])
    assert (rec.normalized_diff, rec.relative_diff, rec.mean_abs_diff) == pytest.approx(
        want, rel=1e-12
    )
    assert records["model.layers.0.up"].normalized_diff == pytest.approx(2.0)


@pytest.mark.parametrize("form", ["fused kernel", "torch"])
def test_overflowing_difference_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """Both forms square in float32, where (3e38 - (-3e38))^2 overflows: they say so."""
    from reasondiff.errors import MetricInputError
    from reasondiff.metrics.weights import DISABLE_ENV

    monkeypatch.setenv(DISABLE_ENV, "1" if form == "torch" else "0")
    big = torch.full((4, 4), 3e38)
    a = _write(tmp_path / "a", {"w": big})
    b = _write(tmp_path / "b", {"w": -big})
    with pytest.raises(MetricInputError, match=r"weights w of 'base' vs w of 'desc'.*float32"):
        _diff(a, b)


def test_mapped_pairs_are_summed_in_one_kernel_call_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel, a same-dtype pair is one call over the mapped files (pages given
    back window by window); a pair of mixed dtypes goes through the chunked path, and
    both agree with the in-memory metric."""
    from reasondiff.metrics import _weights_kernel, weight_diff_metrics
    from reasondiff.metrics.weights import kernel_for

    if kernel_for(torch.float32) is None:
        pytest.skip("no C compiler here: the torch form runs (tested elsewhere)")
    calls: list[tuple[int, int, bool]] = []
    real = _weights_kernel.Kernel.sums

    def spy(self: Any, a: int, b: int, n: int, out: Any, **kw: Any) -> None:
        calls.append((n, kw.get("window", 0), kw.get("a_map") is not None))
        real(self, a, b, n, out, **kw)

    monkeypatch.setattr(_weights_kernel.Kernel, "sums", spy)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, 70, generator=g)
    v = torch.randn(33, generator=g).to(torch.bfloat16)
    a = _write(tmp_path / "a", {"model.layers.0.w": w, "model.layers.0.v": v})
    b = _write(
        tmp_path / "b",
        {"model.layers.0.w": w * 1.01, "model.layers.0.v": v.float() + 0.5},  # v: bf16 vs f32
    )
    records = _by_name(_diff(a, b))
    assert (w.numel(), weightdiff.WINDOW_BYTES // 4 // 8192 * 8192, True) in calls
    assert len([c for c in calls if c[2]]) == 1  # v is not one call: its dtypes differ
    got = records["model.layers.0.w"]
    assert (got.normalized_diff, got.relative_diff, got.mean_abs_diff) == pytest.approx(
        weight_diff_metrics(w, w * 1.01), rel=1e-12
    )
    assert records["model.layers.0.v"].normalized_diff == pytest.approx(
        weight_diff_metrics(v.float(), v.float() + 0.5)[0], rel=1e-6
    )
