"""Progress: quiet under xdist workers and in non-TTY logs (one line per stage there),
a live bar only on an interactive terminal, and a line even when a stage fails."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest

from reasondiff import progress
from reasondiff.progress import (
    ProgressSettings,
    configure,
    current_settings,
    live_bar_wanted,
    progress_for,
    stage_line,
)

LINE = re.compile(r"^reasondiff: activations toy-base 16/16 traces in \d+\.\ds$")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_settings() -> Iterator[None]:
    previous = current_settings()
    yield
    configure(previous)


def _run_stage(*, stream: io.StringIO, environ: dict[str, str], lines: list[str]) -> None:
    with progress_for(
        "activations",
        16,
        subject="toy-base",
        unit="traces",
        sink=lines.append,
        stream=stream,
        environ=environ,
    ) as step:
        for _ in range(16):
            step()


def test_xdist_worker_is_quiet_even_on_a_tty() -> None:
    stream, lines = FakeTty(), []
    _run_stage(stream=stream, environ={"PYTEST_XDIST_WORKER": "gw0"}, lines=lines)
    assert stream.getvalue() == ""  # no bar drawn
    assert len(lines) == 1 and LINE.match(lines[0])
    assert live_bar_wanted(True, FakeTty(), {"PYTEST_XDIST_WORKER": "gw1"}) is False


def test_non_tty_emits_exactly_one_line_per_stage() -> None:
    stream, lines = io.StringIO(), []
    _run_stage(stream=stream, environ={}, lines=lines)
    with progress_for("weight diffs", 7, subject="toy-base__toy-sft-a", unit="tensors",
                      sink=lines.append, stream=stream, environ={}) as step:  # fmt: skip
        step.advance(7)
    assert stream.getvalue() == ""
    assert len(lines) == 2
    assert LINE.match(lines[0])
    assert lines[1].startswith("reasondiff: weight diffs toy-base__toy-sft-a 7/7 tensors in ")


def test_ci_env_disables_the_bar_on_a_tty() -> None:
    assert live_bar_wanted(None, FakeTty(), {"CI": "true"}) is False
    assert live_bar_wanted(None, FakeTty(), {}) is True
    assert live_bar_wanted(None, io.StringIO(), {}) is False
    assert live_bar_wanted(False, FakeTty(), {}) is False
    assert live_bar_wanted(True, io.StringIO(), {}) is True


def test_interactive_terminal_draws_a_bar_and_cleans_up() -> None:
    stream, lines = FakeTty(), []
    with progress_for("load", 2, subject="toy-base", unit="models", sink=lines.append,
                      stream=stream, environ={}) as outer:  # fmt: skip
        with progress_for("activations", 3, subject="toy-base", unit="traces",
                          sink=lines.append, stream=stream, environ={}) as inner:  # fmt: skip
            inner(3)  # nested stages share one live display (rich allows only one)
        outer(2)
    assert stream.getvalue() != ""  # the bar drew something
    assert progress._live._progress is None  # stopped once the last stage ended
    assert [ln.split(" in ")[0] for ln in lines] == [
        "reasondiff: activations toy-base 3/3 traces",
        "reasondiff: load toy-base 2/2 models",
    ]


def test_failed_stage_still_reports_and_reraises() -> None:
    lines: list[str] = []
    with pytest.raises(KeyError):  # noqa: SIM117
        with progress_for("load", 3, subject="toy-rl-a", unit="models", sink=lines.append,
                          stream=io.StringIO(), environ={}) as step:  # fmt: skip
            step()
            raise KeyError("model.safetensors")
    assert lines[0].startswith("reasondiff: load toy-rl-a 1/3 models in ")
    assert lines[0].endswith("(interrupted: KeyError)")


def test_configured_sink_and_unknown_total() -> None:
    lines: list[str] = []
    configure(replace(current_settings(), sink=lines.append, stream=io.StringIO()))
    with progress_for("load", None, subject="toy-base", unit="files", environ={}) as step:
        step(4)
    assert lines and lines[0].startswith("reasondiff: load toy-base 4 files in ")
    assert isinstance(current_settings(), ProgressSettings)


def test_default_sink_is_the_reasondiff_logger(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="reasondiff.progress")
    configure(ProgressSettings(stream=io.StringIO()))
    with progress_for("metrics", 1, environ={}) as step:
        step()
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == [
        "reasondiff: metrics 1/1 items"
    ]


def test_stage_line_and_bad_total() -> None:
    assert stage_line("activations", "toy-base", 16, 16, "traces", 1.234) == (
        "reasondiff: activations toy-base 16/16 traces in 1.2s"
    )
    with pytest.raises(ValueError, match="weight diffs toy-base__x must be >= 0"):  # noqa: SIM117
        with progress_for("weight diffs", -1, subject="toy-base__x", sink=print, environ={}):
            pass


def test_stage_accepts_the_loaders_string_callback() -> None:
    stream, lines = FakeTty(), []
    with progress_for("weight diffs", 2, subject="toy-base__toy-rl-a", unit="tensors",
                      sink=lines.append, stream=stream, environ={}) as step:  # fmt: skip
        step("model.layers.0.mlp.up_proj.weight")
        step("model.layers.0.mlp.down_proj.weight")
    assert step.done == 2 and step.current.endswith("down_proj.weight")
    assert lines[0].startswith("reasondiff: weight diffs toy-base__toy-rl-a 2/2 tensors in ")
