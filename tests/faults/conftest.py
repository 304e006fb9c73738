"""Fixtures of the fault-injection suite: tiny checkpoints, the toy pair, pytest-in-pytest.

``pytest_plugins = ["pytester"]`` is not allowed in a non-root conftest (pytest refuses
it when the suite is collected from the repository root), so end-to-end runs use
``run_pytest``: a fresh ``python -m pytest`` in a scratch project holding a copy of
``diffs/``, returning pytest's own :class:`pytest.RunResult` (``ret``, ``stdout``,
``assert_outcomes``). A subprocess is what these tests need anyway: SIGKILL, injected
plugins and monkeypatched modules must not leak into the outer run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _faultkit import make_project, make_tiny_qwen2, run_pytest_in


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen2 (hidden 32, vocab 100); copy it before changing it."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny") / "qwen", seed=0)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy root holding the toy base and its byte copy (built once per session, offline)."""
    from reasondiff.fixtures.toy import ensure_toy_model

    root = tmp_path_factory.mktemp("toyroot")
    ensure_toy_model(root, "base")
    ensure_toy_model(root, "copy")
    return root


@pytest.fixture(scope="session")
def toy_base(toy_root: Path) -> Path:
    from reasondiff.fixtures.toy import ensure_toy_model

    return Path(ensure_toy_model(toy_root, "base"))


@pytest.fixture(scope="session")
def toy_copy(toy_root: Path) -> Path:
    from reasondiff.fixtures.toy import ensure_toy_model

    return Path(ensure_toy_model(toy_root, "copy"))


@pytest.fixture(scope="session")
def toy_traces(toy_root: Path) -> Path:
    """Toy trace set 'a' (JSONL with a tokenizer header), 16 traces."""
    from reasondiff.fixtures.toy_traces import ensure_toy_traces

    return Path(ensure_toy_traces(toy_root, "a"))


@pytest.fixture(autouse=True)
def _fresh_fingerprint_memo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test is a "new run": no file digests remembered from another test."""
    from reasondiff import fingerprint

    monkeypatch.setattr(fingerprint, "_MEMO", {})


RunPytest = Callable[..., pytest.RunResult]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A scratch pytest project with a copy of the repository's finding tests."""
    return make_project(tmp_path / "proj")


@pytest.fixture
def run_pytest(project: Path) -> RunPytest:
    """``run_pytest(*args, target="diffs", timeout=...)``: ``python -m pytest`` in ``project``."""

    def run(*args: str, **kwargs: Any) -> pytest.RunResult:
        return run_pytest_in(project, *args, **kwargs)

    return run
