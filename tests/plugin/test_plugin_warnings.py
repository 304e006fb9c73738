"""The project's ``filterwarnings = error`` and another plugin's warning (issue 11.3).

pytest-benchmark 4.0.0 warns at configure time under xdist; the project's blanket
``error`` filter turned that into an INTERNALERROR before any test ran. A stand-in
third-party plugin that warns in a ``trylast`` ``pytest_configure`` (as pytest-benchmark
does) must now only be shown, while a warning from the project's own tests still fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reasondiff.warning_policy import other_plugin_packages, relax_blanket_error

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[2]

THIRD_PARTY = """
import warnings

import pytest


class ThirdPartyWarning(UserWarning):
    pass


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    warnings.warn(ThirdPartyWarning("thirdparty: disabled because xdist is active"))


@pytest.fixture
def thirdparty_fixture():
    warnings.warn(ThirdPartyWarning("thirdparty: a warning from a fixture"))
    return 1
"""

TESTS = """
import warnings


def test_uses_the_plugin(thirdparty_fixture):
    assert thirdparty_fixture == 1


def test_own_warning_is_still_an_error():
    warnings.warn(UserWarning("the project's own warning"))
"""


@pytest.mark.slow
@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_third_party_configure_warning_does_not_stop_the_run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: list[str]
) -> None:
    shutil.copy(REPO / "pyproject.toml", pytester.path / "pyproject.toml")
    pytester.makepyfile(thirdparty=THIRD_PARTY, test_mix=TESTS)
    monkeypatch.setenv("PYTHONPATH", str(pytester.path))  # xdist workers import it too
    result = pytester.runpytest_subprocess(
        "-p", "thirdparty", "-p", "no:randomly", *xdist, "test_mix.py"
    )
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_own_warning_is_still_an_error*UserWarning*"])
    assert "thirdparty: disabled because xdist is active" in out  # shown, not raised


class _Config:
    """Just what ``relax_blanket_error`` reads: the ini list and the plugin manager."""

    def __init__(self, lines: list[str], plugins: list[tuple[str, object]]) -> None:
        self.lines = lines
        self.pluginmanager = self
        self._plugins = plugins

    def getini(self, name: str) -> list[str]:
        assert name == "filterwarnings"
        return self.lines

    def list_name_plugin(self) -> list[tuple[str, object]]:
        return self._plugins


def test_relaxation_sits_right_after_the_blanket_error_and_skips_our_own() -> None:
    import types

    import _pytest.warnings

    import reasondiff.pytest_plugin

    other = types.ModuleType("pytest_thing.plugin")
    conftest = types.ModuleType("conftest")
    conftest.__file__ = "/somewhere/conftest.py"
    plugins = [
        ("warnings", _pytest.warnings),
        ("reasondiff", reasondiff.pytest_plugin),
        ("thing", other),
        ("/x/conftest.py", conftest),
        ("blocked", None),
    ]
    assert other_plugin_packages(_Config([], plugins)) == ["pytest_thing"]
    lines = ["error", "ignore::DeprecationWarning:torch.*"]
    added = relax_blanket_error(_Config(lines, plugins))
    assert added == ["default:::pytest_thing(\\.|$)"]
    assert lines == ["error", "default:::pytest_thing(\\.|$)", "ignore::DeprecationWarning:torch.*"]
    assert relax_blanket_error(_Config(lines, plugins)) == []  # idempotent
    untouched = ["ignore::UserWarning"]
    assert relax_blanket_error(_Config(untouched, plugins)) == [] and untouched == [
        "ignore::UserWarning"
    ]
