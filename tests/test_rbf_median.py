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
    from reasondiff.session import _score_layer

    x, y = _reps(0)
    names = ("base layer 1, trace t", "desc layer 1, trace t")
    scores = {
        conv: _score_layer(x, y, k=2, names=names, rbf_median=conv)["metrics"]
        for conv in ("offdiag", "all")
    }
    for conv, metrics in scores.items():
        assert metrics["rbf"] == pytest.approx(rbf_cka(x, y, median=conv), abs=1e-12)
    assert scores["all"]["rbf"] != pytest.approx(scores["offdiag"]["rbf"], abs=1e-6)
    assert scores["all"]["linear"] == scores["offdiag"]["linear"]  # only RBF depends on it
    default = _score_layer(x, y, k=2, names=names)["metrics"]["rbf"]
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


class _Stop(Exception):
    pass


def test_pair_metric_key_differs_by_convention(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reasondiff import session as sess

    keys: dict[str, str] = {}
    real_key = sess._key

    def spy(**parts: str) -> str:
        key = real_key(**parts)
        if parts.get("kind") == "pair":
            keys[parts.get("rbf_median", "offdiag")] = key
        return key

    monkeypatch.setattr(sess, "_key", spy)
    src = sess._TraceSource(
        "a", tmp_path / "a.jsonl", TraceSet("a", (Trace("t", "abcd", (1, 2, 3, 4)),))
    )
    for conv in ("offdiag", "all"):
        opts = DiffOptions(
            base="toy:base", candidate="toy:copy", diff_cache=str(tmp_path), rbf_median=conv
        )
        s = sess.DiffSession.create(opts)
        monkeypatch.setattr(s, "_fingerprint", lambda path: "fingerprint")

        def stop(*args: object) -> None:
            raise _Stop

        monkeypatch.setattr(s, "_cached_entries", stop)
        with pytest.raises(_Stop):
            s._pair_traces(s.pairs[0], src, tmp_path, tmp_path, [0, 1], 1, None)  # type: ignore[arg-type]
    assert set(keys) == {"offdiag", "all"} and keys["offdiag"] != keys["all"]
