"""Warnings as errors for the project's own warnings; another plugin's warning never stops a run.

The project's ``filterwarnings = ["error", ...]`` turns every warning into an exception,
also one that another pytest plugin issues about itself: pytest-benchmark warns at
configure time that xdist disables it, and under ``-n`` that warning became an
INTERNALERROR before any test ran (issue 11.3). :func:`relax_blanket_error` keeps the
blanket ``error`` for everything else (the project's code, torch, transformers, the
tests) and only shows, instead of raising, warnings attributed to the modules of other
installed pytest plugins (``default:::<package>``). The new lines are inserted right
after the last blanket ``error`` line, so a more specific line written after it (and
``-W`` on the command line) still wins.

This module knows nothing about models or metrics; it is called once per process from
``pytest_cmdline_main``, before any plugin's ``pytest_configure`` runs.
"""

from __future__ import annotations

import re
import types
from typing import Any

__all__ = ["other_plugin_packages", "relax_blanket_error"]

#: Top-level packages that are not "another plugin": pytest itself, this project, conftests.
_OWN = frozenset({"_pytest", "pytest", "pluggy", "reasondiff", "conftest", "builtins", "__main__"})


def _is_blanket_error(line: str) -> bool:
    """``error`` with no message, category, module or line: the catch-all."""
    action, *rest = line.split(":")
    return action.strip() == "error" and not any(p.strip() for p in rest)


def other_plugin_packages(pluginmanager: Any) -> list[str]:
    """Top-level packages of the registered plugins that are neither pytest's nor ours."""
    out: set[str] = set()
    for _name, plugin in pluginmanager.list_name_plugin():
        if plugin is None:  # blocked with -p no:NAME
            continue
        if isinstance(plugin, types.ModuleType):
            module = plugin.__name__
            if (getattr(plugin, "__file__", None) or "").endswith("conftest.py"):
                continue
        else:
            module = type(plugin).__module__
        top = module.split(".", 1)[0]
        if top and top not in _OWN:
            out.add(top)
    return sorted(out)


def relax_blanket_error(config: Any) -> list[str]:
    """Show, not raise, other plugins' warnings under a blanket ``error`` filter.

    Edits the ``filterwarnings`` ini list in place (pytest reads that cached list at
    configure, collection and every test) and returns the lines it added; does nothing
    when no blanket ``error`` line is configured.
    """
    lines = config.getini("filterwarnings")
    if not isinstance(lines, list):
        return []
    errors = [
        i for i, line in enumerate(lines) if isinstance(line, str) and _is_blanket_error(line)
    ]
    if not errors:
        return []
    added = [
        f"default:::{re.escape(pkg)}(\\.|$)"
        for pkg in other_plugin_packages(config.pluginmanager)
        if f"default:::{re.escape(pkg)}(\\.|$)" not in lines
    ]
    at = errors[-1] + 1
    lines[at:at] = added
    return added
