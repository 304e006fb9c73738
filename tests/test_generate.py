"""reasondiff-traces: prompts, greedy generation with the toy base, the CLI, its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reasondiff import generate
from reasondiff.errors import ReasondiffError, TraceError
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.fixtures.toy_traces import build_toy_tokenizer
from reasondiff.traces import load_trace_set, tokenizer_identity

PROBLEMS = [
    {"id": "p-add", "problem": "What is 12 + 30?"},
    {"id": 7, "problem": "Compute 5 * 6 - 4."},
    {"problem": "What is 2 + 2?"},
]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_model(tmp_path_factory.mktemp("gen-toy"), "base")


def _problems_file(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


# ---------------------------------------------------------------- prompts
def test_prompt_uses_the_chat_template_and_forces_thinking() -> None:
    tok = build_toy_tokenizer()
    ids = generate.build_prompt_ids(tok, "What is 1 + 1?")
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|bos|>user: What is 1 + 1?\n" + generate.INSTRUCTION)
    assert text.endswith("assistant:\n<think>\n")
    assert ids[-2] == tok.convert_tokens_to_ids("<think>")  # the tokenizer's own id


def test_prompt_without_chat_template_uses_the_documented_fallback() -> None:
    tok = build_toy_tokenizer()
    tok.chat_template = None
    text = tok.decode(
        generate.build_prompt_ids(tok, "  What is 1 + 1? "), skip_special_tokens=False
    )
    expected = generate.FALLBACK_TEMPLATE.format(
        bos="<|bos|>", problem="What is 1 + 1?", instruction=generate.INSTRUCTION
    )
    assert text == expected + "<think>\n"


def test_template_that_already_opens_thinking_gets_no_second_think() -> None:
    tok = build_toy_tokenizer()
    tok.chat_template = tok.chat_template.replace("assistant:\\n", "assistant:\\n<think>\\n")
    ids = generate.build_prompt_ids(tok, "What is 1 + 1?")
    assert ids.count(tok.convert_tokens_to_ids("<think>")) == 1
    assert tok.decode(ids, skip_special_tokens=False).endswith("assistant:\n<think>\n")


# ---------------------------------------------------------------- problems files
def test_load_problems_ids_and_limit(tmp_path: Path) -> None:
    probs = generate.load_problems(_problems_file(tmp_path / "p.jsonl", PROBLEMS), limit=None)
    assert [p.id for p in probs] == ["p-add", "7", "p002"]
    assert len(generate.load_problems(tmp_path / "p.jsonl", limit=2)) == 2


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"problem": "x"', {"problem": "y"}], r"p\.jsonl:1: not valid JSON"),
        ([{"id": "a"}], r'p\.jsonl:1: expected an object with a non-empty string "problem"'),
        (
            [{"problem": "x", "id": "a"}, {"problem": "y", "id": "a"}],
            r":2: duplicate problem id 'a'",
        ),
        ([{"problem": "x", "id": [1]}], r':1: "id" must be a non-empty string or an integer'),
        ([""], r"p\.jsonl contains no problems"),
    ],
)
def test_bad_problems_files_name_file_and_line(
    tmp_path: Path, rows: list[Any], message: str
) -> None:
    with pytest.raises(TraceError, match=message):
        generate.load_problems(_problems_file(tmp_path / "p.jsonl", rows))


def _hide_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the huggingface_hub path even where the ``datasets`` package is installed."""
    real = generate.importlib.util.find_spec
    monkeypatch.setattr(
        generate.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "datasets" else real(name, *a),
    )


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache in tmp, HF_HUB_OFFLINE=1, and no ``datasets`` package."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hide_datasets(monkeypatch)
    return cache


def test_unreachable_dataset_error_names_the_dataset_and_the_problems_option(
    tmp_path: Path, offline_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = generate.main(["--group", "distill7b", "--out", str(tmp_path / "traces")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cannot load dataset 'HuggingFaceH4/MATH-500' split 'test'" in err
    assert "--problems FILE.jsonl" in err
    assert not (tmp_path / "traces").exists()  # nothing loaded, nothing written


def test_dataset_from_an_offline_hub_cache_without_the_datasets_package(
    offline_hub: Path,
) -> None:
    """The huggingface_hub path: MATH-500's layout (test.jsonl, field problem, unique_id)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "datasets--HuggingFaceH4--MATH-500"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    rows = [
        {"problem": f"Problem {i}", "answer": str(i), "unique_id": f"test/algebra/{i}.json"}
        for i in range(5)
    ]
    (snap / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    probs = generate.load_dataset_problems("HuggingFaceH4/MATH-500", limit=3)
    assert [(p.id, p.problem) for p in probs] == [
        (f"test/algebra/{i}.json", f"Problem {i}") for i in range(3)
    ]
    with pytest.raises(ReasondiffError, match=r"has no field 'question'; fields: answer, problem"):
        generate.load_dataset_problems("HuggingFaceH4/MATH-500", field="question")


def test_cli_help_runs_as_a_module() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "reasondiff.generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--max-new-tokens" in out.stdout and "--problems" in out.stdout
    assert "--batch-size" in out.stdout and "--backend" in out.stdout and "--group" in out.stdout
    # --dtype auto follows the checkpoint on CUDA (it used to claim "bf16 on GPU")
    help_text = " ".join(out.stdout.split())
    assert "checkpoint's own dtype on CUDA" in help_text and "bf16 on GPU" not in help_text


# ---------------------------------------------------------------- generation
def test_generate_with_the_toy_base_writes_a_loadable_trace_set(
    toy_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = _problems_file(tmp_path / "p.jsonl", PROBLEMS)
    out = tmp_path / "traces.jsonl"
    argv = ["--model", str(toy_base), "--problems", str(problems), "--limit", "2"]
    argv += ["--max-new-tokens", "8", "--device", "cpu", "--out", str(out)]
    assert generate.main(argv) == 0
    assert "wrote 2 traces" in capsys.readouterr().err

    ts = load_trace_set(out)
    tok = build_toy_tokenizer()
    assert ts.name == "traces" and ts.tokenizer == tokenizer_identity(tok)
    assert ts.ids == ["p-add", "7"]
    for trace, prob in zip(ts.traces, PROBLEMS, strict=False):
        prompt = generate.build_prompt_ids(tok, prob["problem"])
        assert trace.token_ids[: len(prompt)] == tuple(prompt)  # prompt + continuation
        new = len(trace.token_ids) - len(prompt)
        assert 1 <= new <= 8
        assert trace.token_ids[0] == tok.bos_token_id
        assert max(trace.token_ids) < len(tok)  # never an id the tokenizer cannot decode
        assert trace.text.startswith(tok.decode(prompt, skip_special_tokens=False))

    again = tmp_path / "again.jsonl"
    assert generate.main([*argv[:-1], str(again), "--quiet"]) == 0
    assert again.read_text().splitlines()[1:] == out.read_text().splitlines()[1:]  # greedy


def test_generate_trace_reports_each_new_token(toy_base: Path) -> None:
    model, tok = generate.load_generator(
        str(toy_base), device="cpu", dtype=generate.resolve_dtype("auto", "cpu")
    )
    seen: list[int] = []
    trace = generate.generate_trace(
        model, tok, generate.Problem("x", "What is 3 + 4?"), max_new_tokens=5, on_token=seen.append
    )
    prompt = generate.build_prompt_ids(tok, "What is 3 + 4?")
    assert sum(seen) == len(trace.token_ids) - len(prompt) > 0


def test_missing_model_is_a_named_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    problems = _problems_file(tmp_path / "p.jsonl", PROBLEMS)
    missing = tmp_path / "no-such-model"
    rc = generate.main(
        ["--model", str(missing), "--problems", str(problems), "--out", str(tmp_path / "o.jsonl")]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert f"cannot load model {str(missing)!r}" in err and "neither an existing directory" in err
