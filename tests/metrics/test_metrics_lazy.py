"""The metrics package loads lazily: replaying a bundle must not import torch."""

from __future__ import annotations

import subprocess
import sys

import reasondiff.metrics as metrics


def test_findings_and_aggregate_do_not_import_torch() -> None:
    code = (
        "import sys, reasondiff.metrics.findings, reasondiff.metrics.aggregate; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_public_name_resolves_to_its_module() -> None:
    assert metrics.__all__ == sorted(metrics._WHERE)
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        assert obj.__module__ == f"reasondiff.metrics.{metrics._WHERE[name]}", name
