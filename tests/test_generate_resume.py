"""reasondiff-traces output: provenance header, append + resume, refusal of mixed runs, SIGKILL."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any

import pytest

from reasondiff import __version__, generate
from reasondiff.fingerprint import fingerprint
from reasondiff.fixtures.toy import ensure_toy_model
from reasondiff.fixtures.toy_traces import build_toy_tokenizer
from reasondiff.traces import load_trace_set, tokenizer_identity, trace_set_generator

PROBLEMS = [
    {"id": f"q{i}", "problem": f"What is {i} + {i * 7}? Then add {i * i}."} for i in range(5)
]


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_toy_model(tmp_path_factory.mktemp("resume-toy"), "base")


@pytest.fixture
def problems(tmp_path: Path) -> Path:
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    return path


def _argv(model: Path, problems: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--problems", str(problems), "--max-new-tokens", "12",
        "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def test_header_records_the_provenance(toy_base: Path, problems: Path, tmp_path: Path) -> None:
    out = tmp_path / "set.jsonl"
    assert generate.main([*_argv(toy_base, problems, out, "--batch-size", "2"), "--quiet"]) == 0
    header = json.loads(out.read_text().splitlines()[0])
    tok = build_toy_tokenizer()
    assert header["tokenizer"] == tokenizer_identity(tok)
    assert header["generator"] == {
        "key": "base",  # key_from_source of the toy checkpoint directory
        "source": str(toy_base),
        "fingerprint": fingerprint(toy_base),
    }
    recipe = header["recipe"]
    assert recipe["instruction"] == generate.INSTRUCTION
    assert recipe["chat_template"].startswith("sha256:") and len(recipe["chat_template"]) == 23
    assert recipe["forced_think"] == "appended <think>\\n"
    assert recipe["problems"] == {
        "count": 5,
        "sha256": generate.problems_hash(generate.load_problems(problems)),
    }
    assert header["decoding"] == {"strategy": "greedy", "max_new_tokens": 12}
    assert (header["dtype"], header["batch_size"], header["backend"]) == (
        "float32",
        2,
        "transformers",
    )
    assert header["reasondiff_version"] == __version__
    assert header["problems_from"] == "file problems.jsonl"
    ts = load_trace_set(out)
    assert ts.ids == [p["id"] for p in PROBLEMS]  # problem order, whatever the batch order
    assert ts.provenance is not None and ts.provenance["generator"] == header["generator"]
    assert trace_set_generator(ts) == f"base ({toy_base}, fingerprint {fingerprint(toy_base)[:12]})"


def test_one_plain_line_per_finished_trace_off_a_terminal(
    toy_base: Path, problems: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set.jsonl"
    assert generate.main(_argv(toy_base, problems, out, "--limit", "3")) == 0
    err = capsys.readouterr().err.splitlines()
    done = [line for line in err if line.startswith("set q")]
    assert sorted(line.split(":")[0] for line in done) == ["set q0", "set q1", "set q2"]
    assert all(line.endswith(" generated)") for line in done)
    assert err[-1] == f"wrote 3 traces to {out}"


def test_rerun_with_other_settings_is_refused_and_leaves_the_file(
    toy_base: Path, problems: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set.jsonl"
    assert generate.main([*_argv(toy_base, problems, out), "--quiet"]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    tokens = [*_argv(toy_base, problems, out), "--max-new-tokens", "13", "--quiet"]
    assert generate.main(tokens) == 2
    err = capsys.readouterr().err
    assert "holds traces of another run" in err and "decoding:" in err and "13" in err
    other = ensure_toy_model(toy_base.parent.parent, "copy")  # same weights, another key
    assert generate.main([*_argv(other, problems, out), "--quiet"]) == 2
    assert "generator:" in capsys.readouterr().err
    assert generate.main([*_argv(toy_base, problems, out), "--batch-size", "3", "--quiet"]) == 2
    assert "batch_size: the file has 5, this run has 3" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_a_file_not_made_by_reasondiff_traces_is_refused(
    toy_base: Path, problems: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "set.jsonl"
    out.write_text('{"reasondiff_traces": 1, "name": "set"}\n')
    assert generate.main([*_argv(toy_base, problems, out), "--quiet"]) == 2
    assert "was not written by reasondiff-traces" in capsys.readouterr().err


def test_resume_drops_a_half_written_line_and_generates_only_the_rest(
    toy_base: Path, problems: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full" / "set.jsonl"
    assert generate.main([*_argv(toy_base, problems, full, "--batch-size", "1"), "--quiet"]) == 0
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part" / "set.jsonl"
    part.parent.mkdir()
    part.write_text(lines[0] + lines[3] + lines[1] + lines[2][:40])  # 2 traces + a cut line
    capsys.readouterr()
    assert generate.main(_argv(toy_base, problems, part, "--batch-size", "1")) == 0
    err = capsys.readouterr().err
    assert "dropped a half-written last line (40 bytes" in err
    assert "resuming: 2 of 5 traces present" in err
    generated = sorted(line.split(":")[0] for line in err.splitlines() if line.startswith("set q"))
    assert generated == ["set q1", "set q3", "set q4"]  # q0 and q2 were kept
    assert part.read_bytes() == full.read_bytes()
    capsys.readouterr()
    assert generate.main(_argv(toy_base, problems, part)) == 0  # complete: nothing to do
    assert "resuming: 5 of 5 traces present" in capsys.readouterr().err
    assert part.read_bytes() == full.read_bytes()


_SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    from reasondiff import decode, generate

    real = decode.TransformersBackend.generate
    calls = []

    def slow(self, prompts, on_tokens=None):
        calls.append(1)
        if len(calls) > 1:
            time.sleep(2.0)  # the parent kills the run here, after the first trace
        return real(self, prompts, on_tokens)

    decode.TransformersBackend.generate = slow
    sys.exit(generate.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_generation_resumes_after_sigkill(
    toy_base: Path, problems: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "killed" / "set.jsonl"
    argv = _argv(toy_base, problems, out, "--batch-size", "1")
    env = {**os.environ, "CI": "1"}
    log = tmp_path / "killed.log"
    with log.open("w") as err_file:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, *argv], env=env, stderr=err_file)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and len(out.read_bytes().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it was killed: {log.read_text()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    kept = out.read_bytes().splitlines()
    assert 2 <= len(kept) < 1 + len(PROBLEMS)  # the header and at least one whole trace
    capsys.readouterr()
    assert generate.main(argv) == 0
    err = capsys.readouterr().err
    assert f"resuming: {len(kept) - 1} of {len(PROBLEMS)} traces present" in err
    fresh = tmp_path / "fresh" / "set.jsonl"
    assert generate.main([*_argv(toy_base, problems, fresh, "--batch-size", "1"), "--quiet"]) == 0
    assert out.read_bytes() == fresh.read_bytes()


def test_live_bar_on_a_terminal_shows_tokens_per_second_and_eta(
    toy_base: Path,
    problems: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a terminal: one bar over the problems with tokens/s and an ETA, redrawn as each
    trace finishes, plus the per-trace lines. The bar draws on a recording rich Console;
    the clock moves 10 s per batch, so rate and ETA are known."""
    import rich.console

    from reasondiff import decode, progress

    monkeypatch.setattr(progress, "live_bar_wanted", lambda *a, **k: True)
    screen = rich.console.Console(
        file=io.StringIO(), force_terminal=True, record=True, width=120, markup=False
    )
    monkeypatch.setattr(rich.console, "Console", lambda *a, **k: screen)
    now = [0.0]
    monkeypatch.setattr(generate, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    real = decode.TransformersBackend.generate

    def ten_seconds(self: Any, prompts: Any, on_tokens: Any = None) -> Any:
        out = real(self, prompts, on_tokens)
        now[0] += 10.0
        return out

    monkeypatch.setattr(decode.TransformersBackend, "generate", ten_seconds)
    out = tmp_path / "set.jsonl"
    argv = _argv(toy_base, problems, out, "--limit", "3", "--batch-size", "1")
    assert generate.main(argv) == 0
    assert f"wrote 3 traces to {out}" in capsys.readouterr().err
    shown = screen.export_text()
    done = re.findall(r"set (q\d): \d+ tokens \((\d+) generated\)\n", shown)
    assert sorted(q for q, _ in done) == ["q0", "q1", "q2"]  # longest prompt first
    made = [int(n) for _, n in done]
    bars = set(re.findall(r"set \S+ (\d)/3 (-|\d+\.\d) tok/s  ETA (-|\d+:\d\d:\d\d)", shown))
    for k in (1, 2, 3):  # after the k-th trace: k x 10 s, tokens so far, 10 s per trace left
        rate = f"{sum(made[:k]) / (10 * k):.1f}"
        assert (str(k), rate, f"0:00:{10 * (3 - k):02d}") in bars, (k, bars)
    assert float(rate) > 0
