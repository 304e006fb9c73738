"""Tests for reasondiff.models: sources, safety checks, loading, compatibility."""

from __future__ import annotations

import json
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from _checkpoints import install_in_hub_cache, make_bert, make_qwen2
from safetensors.torch import load_file

from reasondiff import fingerprint as fp_mod
from reasondiff import models
from reasondiff.errors import ArchitectureMismatch, ModelLoadError, ModelUnavailable
from reasondiff.registry import ModelSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2(tmp_path_factory.mktemp("qwen") / "ckpt", seed=1)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bert(tmp_path_factory.mktemp("bert") / "ckpt", seed=2)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in tmp, with HF_HUB_OFFLINE=1 as the environment says now."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# ---------------------------------------------------------------- resolve_source
def test_resolve_local_directory(qwen: Path, tmp_path: Path) -> None:
    spec = ModelSpec(key="local", source=str(qwen))
    assert models.resolve_source(spec, toy_root=tmp_path) == qwen


def test_resolve_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "deeper" / "ckpt"
    spec = ModelSpec(key="gone", source=str(missing))
    with pytest.raises(ModelLoadError, match="neither an existing directory") as exc:
        models.resolve_source(spec, toy_root=tmp_path)
    assert str(missing) in str(exc.value) and "'gone'" in str(exc.value)


def test_resolve_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    spec = ModelSpec(key="empty", source=str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        models.resolve_source(spec, toy_root=tmp_path)


def test_resolve_toy_calls_ensure_toy_model(
    qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, str]] = []

    def ensure_toy_model(root: Path, recipe: str) -> Path:
        calls.append((root, recipe))
        return qwen

    fake = types.ModuleType("reasondiff.fixtures.toy")
    fake.ensure_toy_model = ensure_toy_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reasondiff.fixtures.toy", fake)
    spec = ModelSpec(key="toy-base", source="toy:base")
    assert models.resolve_source(spec, toy_root=tmp_path) == qwen
    assert calls == [(tmp_path, "base")]


@pytest.mark.parametrize("suffix", ["", "@main", "@v1", f"@{COMMIT}"])
def test_resolve_hub_id_offline_from_cache(qwen: Path, offline_cache: Path, suffix: str) -> None:
    snap = install_in_hub_cache(qwen, offline_cache, "org/tiny", commit=COMMIT, refs=("main", "v1"))
    spec = ModelSpec(key="tiny", source=f"org/tiny{suffix}")
    path = models.resolve_source(spec, toy_root=offline_cache)
    assert path.resolve() == snap.resolve()
    loaded = models.load_model(path, name="tiny")
    ref = load_file(qwen / "model.safetensors")
    assert torch.equal(loaded.model.state_dict()["model.norm.weight"], ref["model.norm.weight"])


def test_resolve_missing_hub_id_is_unavailable_quickly(offline_cache: Path) -> None:
    spec = ModelSpec(key="ghost", source="org/ghost-7b@v2")
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as exc:
        models.resolve_source(spec, toy_root=offline_cache)
    assert time.monotonic() - start < 5
    msg = str(exc.value)
    for part in (
        "'ghost'",
        "org/ghost-7b@v2",
        "download org/ghost-7b --revision v2",
        "HF_HUB_OFFLINE",
    ):
        assert part in msg


def test_hub_offline_reads_environment_now(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not models.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert models.hub_offline()


# ---------------------------------------------------------------- safety
def _pickle_only(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    torch.save(load_file(src / "model.safetensors"), dst / "pytorch_model.bin")
    return dst


def test_pickle_only_refused_then_loaded_when_allowed(qwen: Path, tmp_path: Path) -> None:
    ckpt = _pickle_only(qwen, tmp_path / "bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle") as exc:
        models.load_model(ckpt, name="picky")
    assert "pytorch_model.bin" in str(exc.value)
    loaded = models.load_model(ckpt, name="picky", allow_pickle=True)
    ref = load_file(qwen / "model.safetensors")
    got = loaded.model.state_dict()
    assert torch.equal(
        got["model.layers.1.mlp.up_proj.weight"], ref["model.layers.1.mlp.up_proj.weight"]
    )


def test_remote_code_refused(qwen: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "remote"
    ckpt.mkdir()
    cfg = json.loads((qwen / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "model.safetensors").write_bytes((qwen / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="trust-remote-code") as exc:
        models.load_model(ckpt, name="evil")
    assert "'evil'" in str(exc.value) and "auto_map" in str(exc.value)


def test_no_weights_named(tmp_path: Path, qwen: Path) -> None:
    ckpt = tmp_path / "cfg-only"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((qwen / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no weight files"):
        models.load_model(ckpt, name="hollow")


# ---------------------------------------------------------------- loading
def test_load_qwen2_causal_lm(qwen: Path) -> None:
    messages: list[str] = []
    lm = models.load_model(qwen, name="q", progress=messages.append)
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"
    assert not lm.model.training
    assert (lm.num_layers, lm.hidden_size, lm.vocab_size) == (2, 32, 100)
    assert lm.device == "cpu" and lm.dtype == torch.float32
    assert next(lm.model.parameters()).dtype == torch.float32
    assert lm.name == "q" and lm.path == qwen
    assert messages and "q" in messages[0]


def test_load_bert_through_automodel(bert: Path) -> None:
    lm = models.load_model(bert)
    assert type(lm.model).__name__ == "BertModel"
    assert lm.name == "ckpt" and lm.num_layers == 2
    out = lm.model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert len(out.hidden_states) == 3


def test_load_explicit_bf16(qwen: Path) -> None:
    lm = models.load_model(qwen, dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_bad_dtype_and_device(qwen: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype 'fp8'"):
        models.load_model(qwen, dtype="fp8")
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'"):
        models.pick_device("tpu")


def test_pick_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.pick_device("auto") == "cpu"
    assert models.pick_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        models.pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert models.pick_device("auto") == "cuda:0"
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    assert models.pick_device("auto") == "cuda:1"
    assert models.pick_device("cuda:0") == "cuda:0"


def test_load_tokenizer_absent_and_present(qwen: Path, tmp_path: Path) -> None:
    assert models.load_tokenizer(qwen) is None
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, "two": 1, "plus": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(tmp_path / "tok")
    loaded = models.load_tokenizer(tmp_path / "tok")
    assert loaded is not None
    assert loaded("two plus two")["input_ids"] == [1, 2, 1]


# ---------------------------------------------------------------- compatibility
def test_check_compatible_names_both_models(tmp_path: Path, qwen: Path) -> None:
    deeper = make_qwen2(tmp_path / "deep", num_hidden_layers=3)
    with pytest.raises(ArchitectureMismatch) as exc:
        models.check_compatible_configs(qwen, deeper, base_name="base-a", desc_name="desc-b")
    msg = str(exc.value)
    assert "decoder layers" in msg and "base-a has 2" in msg and "desc-b has 3" in msg
    wider = make_qwen2(tmp_path / "wide", hidden_size=48, num_attention_heads=4)
    a, b = models.load_model(qwen), models.load_model(wider)
    with pytest.raises(
        ArchitectureMismatch, match="hidden size differ, base x has 32, descendant y has 48"
    ):
        models.check_compatible(a, b, base_name="x", desc_name="y")
    models.check_compatible(a, a.config, base_name="x", desc_name="x")  # same: no error


def test_check_compatible_reads_text_config() -> None:
    nested = {"text_config": {"num_hidden_layers": 2, "hidden_size": 32}}
    models.check_compatible(
        nested, {"num_hidden_layers": 2, "hidden_size": 32}, base_name="a", desc_name="b"
    )
    with pytest.raises(ArchitectureMismatch, match="b's config has no hidden size"):
        models.check_compatible(nested, {"num_hidden_layers": 2}, base_name="a", desc_name="b")


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_tracks_content(qwen: Path, tmp_path: Path) -> None:
    other = make_qwen2(tmp_path / "other", seed=1)
    assert models.fingerprint(qwen) == models.fingerprint(other)  # same seed, same bytes
    edited = make_qwen2(tmp_path / "edited", seed=3)
    assert models.fingerprint(edited) != models.fingerprint(qwen)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rope_theta"] = 1.0
    (other / "config.json").write_text(json.dumps(cfg))
    assert models.fingerprint(other) != models.fingerprint(qwen)


def test_fingerprint_uses_hub_blob_names_without_hashing(
    qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = install_in_hub_cache(qwen, tmp_path / "hub", "org/tiny", commit=COMMIT)

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(fp_mod, "_sha256_file", no_hashing)
    first = models.fingerprint(snap)  # no file hashed: the blob names are the digests
    again = install_in_hub_cache(qwen, tmp_path / "hub", "org/tiny", commit="b" * 40)
    assert again != snap and models.fingerprint(again) == first  # same blobs, other commit
    edited = make_qwen2(tmp_path / "edited", seed=3)
    changed = install_in_hub_cache(edited, tmp_path / "hub2", "org/tiny", commit=COMMIT)
    assert models.fingerprint(changed) != first  # other weights, other blob names


def test_fingerprint_memo_file_spares_a_rehash(
    qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = make_qwen2(tmp_path / "m", seed=5)
    memo = tmp_path / "memo"
    first = models.fingerprint(ckpt, memo_dir=memo)
    assert (memo / "fingerprints.json").is_file()
    monkeypatch.setattr(fp_mod, "_MEMO", {})  # a new process: in-memory memo empty

    def no_hashing(path: Path) -> str:
        raise AssertionError(f"hashed {path}")

    monkeypatch.setattr(fp_mod, "_sha256_file", no_hashing)
    assert models.fingerprint(ckpt, memo_dir=memo) == first


def test_fingerprint_requires_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        models.fingerprint(tmp_path)


def test_training_args_pickle_is_not_a_weight_file(qwen: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ft"
    ckpt.mkdir()
    for f in ("config.json", "model.safetensors"):
        (ckpt / f).write_bytes((qwen / f).read_bytes())
    before = models.fingerprint(ckpt)
    (ckpt / "training_args.bin").write_bytes(b"pickle of TrainingArguments")
    assert models.fingerprint(ckpt) == before
    assert models.checkpoint_files(ckpt, allow_pickle=True).format == "safetensors"
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weight files"):
        models.checkpoint_files(ckpt, allow_pickle=True, name="ft")
