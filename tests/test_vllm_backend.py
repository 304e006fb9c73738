"""Contract test of the vLLM glue (issue 19.5), with a test double of vLLM's offline API.

vLLM does not run on CPU machines, so what is tested here is everything around it: the
prompts go in as ``{"prompt_token_ids": [...]}`` with ``SamplingParams(temperature=0,
max_tokens=N)``, and each ``RequestOutput``'s ``outputs[0].token_ids`` comes back as the
continuation (vLLM's documented ``LLM.generate`` output shape). The double is a contract,
not vLLM: the backend itself is verified only where vLLM runs.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from reasondiff import generate
from reasondiff.decode import Decoding, VllmBackend
from reasondiff.errors import ReasondiffError
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.traces import load_trace_set

EOS = 2


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput: the fields the glue reads
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16


@dataclass
class FakeLLM:
    """Continues each prompt with ids derived from it, ending in EOS (or max_tokens)."""

    calls: list[tuple[list[Any], SamplingParams]] = field(default_factory=list)
    fail_after: int | None = None

    def generate(self, prompts: list[Any], params: SamplingParams, use_tqdm: bool = True) -> Any:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("CUDA error: the test double's GPU fell over")
        self.calls.append((prompts, params))
        out = []
        for i, p in enumerate(prompts):
            ids = p["prompt_token_ids"]
            n = 3 + sum(ids) % 4
            cont = [10 + (sum(ids) + k) % 40 for k in range(n)][: params.max_tokens]
            if len(cont) < (params.max_tokens or 0):
                cont.append(EOS)
            out.append(RequestOutput(str(i), None, list(ids), [CompletionOutput(0, "", cont)]))
        return out  # vLLM returns outputs in request order


class LLM(FakeLLM):
    """``vllm.LLM`` as ``VllmBackend.load`` builds it: ``LLM(model=..., tokenizer=...,
    dtype=..., seed=...)``; its engine reports the dtype it chose, as vLLM's does
    (``llm.llm_engine.model_config.dtype``, a torch dtype)."""

    made: ClassVar[list[LLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs
        model_config = types.SimpleNamespace(dtype=torch.bfloat16)
        self.llm_engine = types.SimpleNamespace(model_config=model_config)
        LLM.made.append(self)


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in ``vllm`` module in ``sys.modules``: ``import vllm`` finds it."""
    module = types.ModuleType("vllm")
    module.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    module.LLM = LLM  # type: ignore[attr-defined]
    monkeypatch.setattr(LLM, "made", [])
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_contract_prompt_ids_in_token_ids_out(fake_vllm: types.ModuleType) -> None:
    llm = FakeLLM()
    backend = VllmBackend(llm, decoding=Decoding(max_new_tokens=5))
    counted: list[int] = []
    prompts = [[1, 5, 6], [1, 7, 8, 9]]
    conts = backend.generate(prompts, counted.append)
    ((sent, params),) = llm.calls
    assert sent == [{"prompt_token_ids": [1, 5, 6]}, {"prompt_token_ids": [1, 7, 8, 9]}]
    assert (params.temperature, params.max_tokens) == (0, 5)
    # the double's rule: 3 + sum % 4 ids from 10 + (sum + k) % 40, then EOS within max_tokens
    assert conts == [(22, 23, 24, EOS), (35, 36, 37, 38, EOS)]  # sums 12 and 25
    assert counted == [4, 5]


def test_outputs_for_other_prompts_are_refused(fake_vllm: types.ModuleType) -> None:
    class Shuffled(FakeLLM):
        def generate(
            self, prompts: list[Any], params: SamplingParams, use_tqdm: bool = True
        ) -> Any:
            return list(reversed(super().generate(prompts, params, use_tqdm)))

    backend = VllmBackend(Shuffled(), decoding=Decoding(max_new_tokens=5))
    with pytest.raises(ReasondiffError, match="prompt_token_ids differ"):
        backend.generate([[1, 5], [1, 6]])


def test_vllm_trace_set_header_and_resume(
    fake_vllm: types.ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toy = ensure_toy_model(tmp_path / "toy", "base")
    problems = [generate.Problem(f"q{i}", f"What is {i} + {i}?") for i in range(3)]
    settings = generate.Settings(
        decoding=Decoding(max_new_tokens=6), device="cuda", backend="vllm", batch_size=1
    )
    job = generate.Job(source=str(toy), key="toy-base", out=tmp_path / "v.jsonl", name="v")
    llm = FakeLLM(fail_after=1)

    def load(path: Path, tokenizer: Any, s: generate.Settings) -> Any:
        return VllmBackend(llm, decoding=s.decoding), "bfloat16", None

    with pytest.raises(RuntimeError, match="fell over"):
        generate.make_trace_set(job, problems, settings, load_backend=load)
    assert len(job.out.read_text().splitlines()) == 2  # header + the one finished trace
    llm.fail_after = None
    ts = generate.make_trace_set(job, problems, settings, load_backend=load)
    assert "resuming: 1 of 3 traces present" in capsys.readouterr().err
    assert len(llm.calls) == 3  # one per problem, none generated twice
    tok = generate.load_tokenizer(str(toy))
    for prob, trace in zip(problems, load_trace_set(job.out).traces, strict=True):
        prompt = generate.build_prompt_ids(tok, prob.problem)
        sent = [c for c in llm.calls if c[0][0]["prompt_token_ids"] == prompt]
        assert len(sent) == 1
        assert trace.token_ids[: len(prompt)] == tuple(prompt)
        assert trace.token_ids[len(prompt) :][-1] == EOS
    assert ts.provenance is not None
    assert (ts.provenance["backend"], ts.provenance["dtype"]) == ("vllm", "bfloat16")
    header = json.loads(job.out.read_text().splitlines()[0])
    assert header["batch_size"] == 1 and header["decoding"]["max_new_tokens"] == 6


def test_backend_vllm_without_vllm_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    toy = ensure_toy_model(tmp_path / "toy", "base")
    problems = tmp_path / "p.jsonl"
    problems.write_text('{"problem": "1 + 1?"}\n')
    argv = ["--model", str(toy), "--problems", str(problems), "--backend", "vllm"]
    assert generate.main([*argv, "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--backend vllm needs the optional 'vllm' package" in err
    assert "reasondiff[vllm]" in err and "--backend transformers" in err


def test_load_builds_the_llm_on_the_checkpoint(fake_vllm: types.ModuleType) -> None:
    backend = VllmBackend.load("/models/m", dtype="auto", decoding=Decoding(max_new_tokens=7))
    (llm,) = LLM.made
    assert backend.llm is llm
    assert llm.kwargs == {
        "model": "/models/m",
        "tokenizer": "/models/m",
        "dtype": "auto",
        "seed": 0,
    }
    assert (backend.params.temperature, backend.params.max_tokens) == (0, 7)
    assert backend.dtype == "bfloat16"  # what the engine chose, without the torch. prefix
    assert backend.generate([[1, 5, 6]]) == [(22, 23, 24, EOS)]


def test_cli_backend_vllm_loads_vllm_and_writes_its_traces(
    fake_vllm: types.ModuleType, tmp_path: Path
) -> None:
    """``reasondiff-traces --backend vllm`` end to end, through the real backend loader."""
    toy = ensure_toy_model(tmp_path / "toy", "base")
    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"problem": f"{i} + {i}?"}) + "\n" for i in range(3)))
    out = tmp_path / "v.jsonl"
    argv = ["--model", str(toy), "--problems", str(problems), "--backend", "vllm"]
    argv += ["--max-new-tokens", "6", "--out", str(out), "--quiet"]
    assert generate.main(argv) == 0
    (llm,) = LLM.made  # loaded once, on the checkpoint directory, with --dtype's value
    assert llm.kwargs == {"model": str(toy), "tokenizer": str(toy), "dtype": "auto", "seed": 0}
    ((sent, params),) = llm.calls  # auto batch for vLLM: all 3 prompts in one call
    assert (params.temperature, params.max_tokens) == (0, 6)
    header = json.loads(out.read_text().splitlines()[0])
    assert (header["backend"], header["dtype"], header["batch_size"]) == ("vllm", "bfloat16", 3)
    tok = generate.load_tokenizer(str(toy))
    ts = load_trace_set(out)
    assert [t.id for t in ts.traces] == ["p000", "p001", "p002"]
    for i, trace in enumerate(ts.traces):
        prompt = generate.build_prompt_ids(tok, f"{i} + {i}?")
        assert {"prompt_token_ids": prompt} in sent
        cont = trace.token_ids[len(prompt) :]
        assert trace.token_ids[: len(prompt)] == tuple(prompt)
        s = sum(prompt)  # the double's continuation rule (FakeLLM.generate), max_tokens 6
        want = [10 + (s + k) % 40 for k in range(3 + s % 4)]
        assert list(cont) == (want if len(want) == 6 else [*want, EOS])


def test_load_without_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ReasondiffError, match=r"optional 'vllm' package") as info:
        VllmBackend.load("/models/m", dtype="auto", decoding=Decoding(max_new_tokens=7))
    assert "reasondiff[vllm]" in str(info.value)
