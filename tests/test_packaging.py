"""Declared version floors match what the code calls (issue 11.6)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _deps() -> dict[str, str]:
    doc = tomllib.loads(PYPROJECT.read_text("utf-8"))
    out: dict[str, str] = {}
    for dep in doc["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep)
        assert name is not None, dep
        out[name.group(0).lower().replace("_", "-")] = dep
    return out


def _floor(spec: str) -> tuple[int, ...]:
    m = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert m is not None, f"{spec!r} declares no floor"
    return tuple(int(p) for p in m.group(1).split("."))


def test_transformers_floor_allows_the_dtype_keyword() -> None:
    """models.load_model passes from_pretrained(dtype=...): transformers 4.56 or later."""
    assert "dtype=dtype_obj" in (PYPROJECT.parent / "plugin" / "models.py").read_text("utf-8")
    assert _floor(_deps()["transformers"]) >= (4, 56)


def test_tomli_is_declared_where_tomllib_is_missing() -> None:
    """registry.py falls back to tomli on Python 3.10, which requires-python allows."""
    assert "import tomli as tomllib" in (PYPROJECT.parent / "plugin" / "registry.py").read_text()
    tomli = _deps().get("tomli")
    assert tomli is not None and "python_version < '3.11'" in tomli


def test_pytest_minversion_covers_the_ini_options_used() -> None:
    """strict_parametrization_ids is a pytest 9.0 option; with --strict-config, 8.x rejects it."""
    ini = tomllib.loads(PYPROJECT.read_text("utf-8"))["tool"]["pytest"]["ini_options"]
    assert "strict_parametrization_ids" in ini
    assert tuple(int(p) for p in ini["minversion"].split(".")) >= (9, 0)
