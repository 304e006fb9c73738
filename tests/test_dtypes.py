"""``--dtype``: one resolution for loader and cache keys, recorded; what bf16 does to the toy.

``auto`` is the checkpoint's own dtype on CUDA and float32 on the CPU (issue 11.2: the
old default, bf16 on every CUDA run, broke the float32 toy family's planted bathtub).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _checkpoints import copy_checkpoint, make_qwen2

from reasondiff import models
from reasondiff.dtypes import (
    checkpoint_dtype,
    dtype_note,
    dtypes_from_notes,
    pair_dtype_key,
    resolve_dtype,
)
from reasondiff.errors import ModelLoadError
from reasondiff.options import DiffOptions
from reasondiff.session import DiffSession


# ---------------------------------------------------------------- resolution
@pytest.mark.parametrize(
    ("option", "device", "config", "want"),
    [
        ("auto", "cpu", {"dtype": "bfloat16"}, "float32"),  # bf16 matmuls crawl on CPU
        ("auto", "cuda:0", {"dtype": "bfloat16"}, "bfloat16"),
        ("auto", "cuda:1", {"torch_dtype": "float16"}, "float16"),  # transformers < 4.56 key
        ("auto", "cuda:0", {"dtype": "float32"}, "float32"),  # the toy family
        ("auto", "cuda:0", {"torch_dtype": "torch.bfloat16"}, "bfloat16"),
        ("auto", "cuda:0", {"text_config": {"dtype": "bfloat16"}}, "bfloat16"),
        ("auto", "cuda:0", {}, "float32"),  # declares none
        ("auto", "cuda:0", None, "float32"),
        ("auto", "cuda:0", {"dtype": "float64"}, "float32"),  # not one this suite runs
        ("bfloat16", "cpu", {"dtype": "float32"}, "bfloat16"),  # explicit wins everywhere
        ("float32", "cuda:0", {"dtype": "bfloat16"}, "float32"),
    ],
)
def test_resolve_dtype(option: str, device: str, config: dict | None, want: str) -> None:
    assert resolve_dtype(option, device, config) == want


def test_unknown_dtype_is_named() -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu", {})
    assert checkpoint_dtype({"dtype": "auto"}) is None


def test_models_exports_the_one_resolver() -> None:
    assert models.resolve_dtype is resolve_dtype


def _bf16_config_copy(src: Path, dst: Path) -> Path:
    path = copy_checkpoint(src, dst)
    cfg = json.loads((path / "config.json").read_text("utf-8"))
    cfg["dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(cfg), "utf-8")
    return path


def test_cache_key_dtype_is_the_loaders_dtype_on_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session keys activations by the dtype the loader will use, per checkpoint.

    The old key (and the loader) said bfloat16 for every model on CUDA, the float32 toy
    family included; both now follow the checkpoint's config, through one function.
    """
    f32 = make_qwen2(tmp_path / "f32", seed=0)
    bf16 = _bf16_config_copy(f32, tmp_path / "bf16")
    monkeypatch.setattr(models, "pick_device", lambda device: "cuda:0")
    opts = DiffOptions(base=str(f32), candidate=str(bf16), diff_cache=str(tmp_path / "c"))
    session = DiffSession.create(opts)
    assert session.engine.dtype_for(f32) == "float32"
    assert session.engine.dtype_for(bf16) == "bfloat16"
    pair = session.pairs[0]
    note = session.engine._dtype_note(pair, f32, bf16)
    assert "float32 (base" in note and "bfloat16 (descendant" in note and "on cuda" in note
    assert dtypes_from_notes([note]) == {"activations": ["bfloat16", "float32"], "device": "cuda"}
    assert pair_dtype_key("float32", "bfloat16") == "float32,bfloat16"


def test_note_round_trip_and_one_line_for_a_uniform_run() -> None:
    a = dtype_note("float32", "float32", base="b", descendant="x", option="auto", device="cpu")
    b = dtype_note("float32", "float32", base="b", descendant="y", option="auto", device="cpu")
    assert a == b == "activations computed in float32; --dtype auto on cpu"
    assert dtypes_from_notes(["something else", a]) == {
        "activations": ["float32"],
        "device": "cpu",
    }
    assert dtypes_from_notes(["no dtype here"]) == {}


# ---------------------------------------------------------------- bf16 on the planted toy
def _two_traces(src: Path, dst: Path) -> Path:
    lines = [ln for ln in src.read_text("utf-8").splitlines() if ln.strip()]
    header = [ln for ln in lines[:1] if "reasondiff_traces" in ln]
    rows = [ln for ln in lines if "reasondiff_traces" not in ln][:2]
    dst.write_text("\n".join([*header, *rows]) + "\n", "utf-8")
    return dst


def _linear_at(session: DiffSession) -> dict[int, float]:
    result = session.pair_result(session.pairs[0])
    by_layer: dict[int, list[float]] = {}
    for r in result.cka:
        if r.metric == "linear":
            by_layer.setdefault(r.layer, []).append(r.value)
    return {lay: sum(v) / len(v) for lay, v in by_layer.items()}


@pytest.mark.slow
def test_bf16_leaves_the_planted_carrier_unerased(tmp_path: Path) -> None:
    """``--dtype bfloat16`` on CPU: the toy-massive bathtub does not recover at layers 8-9.

    bf16 rounds the ~3e4 carrier to a multiple of 128, so the float32-calibrated erase
    in block 7 leaves a residue of ~256 on the sink token (measured: linear CKA 0.02-0.06
    at layers 8-9 against 1.000 in float32; the H200 run measured 0.034 / 0.041).
    Narrow on purpose: one pair, two traces, three layers (+ the final one).
    """
    from reasondiff.fixtures.toy import ensure_toy_model
    from reasondiff.fixtures.toy_traces import ensure_toy_traces

    cache = tmp_path / "cache"
    ensure_toy_model(cache / "toy", "massive")
    traces = _two_traces(ensure_toy_traces(cache / "toy", "a"), tmp_path / "t.jsonl")
    common = {
        "base": "toy:base",
        "candidate": "toy:massive",
        "traces": str(traces),
        "layers": (3, 8, 9),
        "device": "cpu",
        "bootstrap": 10,
        "diff_cache": str(cache),
    }
    f32 = DiffSession.create(DiffOptions(**common, dtype="auto"))
    bf16 = DiffSession.create(DiffOptions(**common, dtype="bfloat16"))
    got32, got16 = _linear_at(f32), _linear_at(bf16)

    assert got32[3] > 0.999 and got16[3] > 0.999  # before the write: unaffected
    for lay in (8, 9):  # after the erase: recovered in float32 only
        assert got32[lay] > 0.999, (lay, got32)
        assert got16[lay] < 0.2, (lay, got16)
    assert got16[10] > 0.99  # the final norm hides the residue again
    notes16 = bf16.pair_result(bf16.pairs[0]).notes
    assert "activations computed in bfloat16; --dtype bfloat16 on cpu" in notes16
    notes32 = f32.pair_result(f32.pairs[0]).notes
    assert "activations computed in float32; --dtype auto on cpu" in notes32


def test_bundle_config_records_the_resolved_dtypes(tmp_path: Path) -> None:
    """results.json's config says what ``--dtype auto`` became, from the pairs' notes."""
    from reasondiff.bundle import read_bundle
    from reasondiff.pytest_plugin import _write_outputs
    from reasondiff.records import PairInfo, PairResult, ReportData

    note = dtype_note(
        "bfloat16", "bfloat16", base="b", descendant="d", option="auto", device="cuda:0"
    )
    result = PairResult(info=PairInfo("b__d", "b", "d", "b", "d", None, None), notes=[note])

    class Done:  # what _write_outputs reads from a finished DiffSession
        def __init__(self) -> None:
            self.options = DiffOptions()
            self.notes: list[str] = []

        def ordered_results(self) -> list[PairResult]:
            return [result]

        def ordered_verdicts(self) -> list:
            return []

        def report_data(self) -> ReportData:
            return ReportData(notes=[note])

    _write_outputs(Done(), tmp_path)  # type: ignore[arg-type]
    config = read_bundle(tmp_path).config
    assert config["dtype"] == "auto"
    assert config["dtype_resolved"] == {"activations": ["bfloat16"], "device": "cuda"}
