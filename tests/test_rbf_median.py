"""``--rbf-median``: the RBF bandwidth convention reaches the scores, the metric cache key,
the bundle config and the report (METHODS §3; the reference includes the diagonal zeros)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasondiff.metric_store import rbf_median_key
from reasondiff.metrics import rbf_cka
from reasondiff.options import DiffOptions, rbf_median_note
from reasondiff.traces import Trace, TraceSet


def _reps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 6, generator=g, dtype=torch.float64)
    y = x + 0.8 * torch.randn(12, 6, generator=g, dtype=torch.float64)
    return x, y


def test_score_layer_uses_the_convention() -> None:
    from reasondiff.metrics.layer import score_pair_layer

    x, y = _reps(0)
    names = ("base layer 1, trace t", "desc layer 1, trace t")
    scores = {
        conv: score_pair_layer(x, y, k=2, names=names, rbf_median=conv)["metrics"]  # type: ignore[arg-type]
        for conv in ("offdiag", "all")
    }
    for conv, metrics in scores.items():
        assert metrics["rbf"] == pytest.approx(rbf_cka(x, y, median=conv), abs=1e-12)
    assert scores["all"]["rbf"] != pytest.approx(scores["offdiag"]["rbf"], abs=1e-6)
    assert scores["all"]["linear"] == scores["offdiag"]["linear"]  # only RBF depends on it
    default = score_pair_layer(x, y, k=2, names=names)["metrics"]["rbf"]
    assert default == scores["offdiag"]["rbf"]


def test_cache_key_part_and_report_note() -> None:
    assert rbf_median_key("offdiag") == {}  # caches made before the option stay valid
    assert rbf_median_key("all") == {"rbf_median": "all"}
    assert rbf_median_note(DiffOptions(), None) is None
    note = rbf_median_note(DiffOptions(rbf_median="all"), None)
    assert note is not None and "--rbf-median all" in note and "diagonal" in note
    # a replayed bundle says how its numbers were computed, whatever this run's option
    assert rbf_median_note(DiffOptions(), {"rbf_median": "all"}) == note
    assert rbf_median_note(DiffOptions(rbf_median="all"), {"rbf_median": "offdiag"}) is None
    assert rbf_median_note(DiffOptions(rbf_median="all"), {}) is None  # older bundles
    assert DiffOptions(rbf_median="all").to_dict()["rbf_median"] == "all"


def test_pair_metric_key_differs_by_convention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reasondiff.engine import Engine, EngineConfig, TraceSource

    src = TraceSource("a", tmp_path / "a.jsonl", TraceSet("a", (Trace("t", "abcd", (1, 2, 3, 4)),)))
    opts = DiffOptions(base="toy:base", candidate="toy:copy", diff_cache=str(tmp_path))
    from reasondiff.registry import adhoc_pair

    pair = adhoc_pair("toy:base", "toy:copy")
    keys = {}
    for conv in ("offdiag", "all"):
        config = EngineConfig.from_options(opts)
        engine = Engine(EngineConfig(**{**config.__dict__, "rbf_median": conv}), trace_paths=[])
        monkeypatch.setattr(engine, "fingerprint", lambda path: "fingerprint")
        monkeypatch.setattr(engine, "_resolve", lambda spec: tmp_path)
        monkeypatch.setattr(engine, "dtype_for", lambda path: "float32")
        keys[conv] = engine.pair_key(pair, src)
    assert keys["offdiag"] != keys["all"]
