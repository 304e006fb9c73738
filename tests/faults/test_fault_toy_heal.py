"""Issue 15.8: the toy family heals itself; a user's checkpoint keeps "re-download it".

Before the fix, a truncated ``model.safetensors`` of a toy checkpoint under the diff
cache failed every later run with "it is truncated or corrupt, re-download it", although
the project built the file and can build it again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _faultkit import truncate_file

from reasondiff.fixtures import toy


def _shard(path: Path) -> Path:
    return sorted(path.glob("*.safetensors"))[0]


@pytest.fixture
def fresh_root(tmp_path: Path, toy_root: Path) -> Path:
    """A private copy of the session's toy root (base and copy), safe to damage."""
    root = tmp_path / "toyroot"
    shutil.copytree(toy_root, root)
    toy._VERIFIED.clear()
    toy.drain_notes()
    return root


def test_the_build_writes_a_manifest_of_sizes_and_hashes_last(fresh_root: Path) -> None:
    path = toy.ensure_toy_model(fresh_root, "copy")
    files = json.loads((path / toy.MARKER).read_text())["files"]
    on_disk = {f.name for f in path.iterdir() if f.is_file() and f.name != toy.MARKER}
    assert set(files) == on_disk and _shard(path).name in files
    rec = files[_shard(path).name]
    assert rec["size"] == _shard(path).stat().st_size and len(rec["sha256"]) == 64
    assert toy.manifest_problem(path) is None


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_toy_checkpoint_is_rebuilt_with_a_note(fresh_root: Path, damage: str) -> None:
    path = toy.ensure_toy_model(fresh_root, "copy")
    shard = _shard(path)
    good = shard.read_bytes()
    if damage == "truncate":
        truncate_file(shard, keep=0.5)
    else:
        shard.unlink()
    toy._VERIFIED.clear()  # a new run
    again = toy.ensure_toy_model(fresh_root, "copy")
    assert again == path and shard.read_bytes() == good
    (note,) = toy.drain_notes()
    assert "failed its manifest" in note and shard.name in note and "rebuilt" in note


def test_a_rebuilt_toy_model_loads(fresh_root: Path) -> None:
    from reasondiff.models import load_model, resolve_source
    from reasondiff.registry import ModelSpec

    path = toy.ensure_toy_model(fresh_root, "copy")
    truncate_file(_shard(path), keep=0.3)
    toy._VERIFIED.clear()

    resolved = resolve_source(ModelSpec(key="toy-copy", source="toy:copy"), toy_root=fresh_root)
    assert load_model(resolved) is not None


def test_a_users_truncated_checkpoint_still_says_re_download(
    tmp_path: Path, toy_base: Path
) -> None:
    from reasondiff.errors import ModelLoadError
    from reasondiff.models import load_model

    mine = tmp_path / "mine"
    shutil.copytree(toy_base, mine)
    (mine / toy.MARKER).unlink()  # a user's checkpoint: no toy marker
    shard = sorted(mine.glob("*.safetensors"))[0]
    truncate_file(shard, keep=0.5)
    with pytest.raises(ModelLoadError, match="re-download it"):
        load_model(mine)


def test_a_pre_manifest_marker_counts_as_unverified_and_is_rebuilt(fresh_root: Path) -> None:
    """A toy cache built before manifests existed: its truncated shard is not "re-download"."""
    path = toy.ensure_toy_model(fresh_root, "copy")
    shard = _shard(path)
    good = shard.read_bytes()
    marker = path / toy.MARKER
    info = json.loads(marker.read_text())
    del info["files"]  # as the build wrote it before the manifest existed
    marker.write_text(json.dumps(info, indent=2) + "\n")
    truncate_file(shard, keep=0.5)
    toy._VERIFIED.clear()  # a new run

    again = toy.ensure_toy_model(fresh_root, "copy")
    assert again == path and shard.read_bytes() == good
    assert shard.name in json.loads(marker.read_text())["files"]  # verified from now on
    (note,) = toy.drain_notes()
    assert note == (
        f"toy checkpoint {path} was unverified: its {toy.MARKER} predates the build manifest "
        "(no file sizes or hashes to check its files against); rebuilt it"
    )


def test_compare_surfaces_the_toy_rebuild_notes(
    fresh_root: Path, tmp_path: Path, toy_traces: Path
) -> None:
    from _faultkit import small_trace_file

    from reasondiff import compare
    from reasondiff.fixtures.toy_traces import TOY_VERSION

    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.move(fresh_root, cache / "toy")  # compare()'s toy root: <cache_dir>/toy
    shard = _shard(cache / "toy" / TOY_VERSION / "copy")
    truncate_file(shard, keep=0.5)
    toy._VERIFIED.clear()
    traces = small_trace_file(toy_traces, tmp_path / "t.jsonl", count=2)

    got = compare(
        "toy:base", ["toy:copy"], traces=traces, cache_dir=cache, max_tokens=32,
        bootstrap=20, torch_threads=1,
    )  # fmt: skip
    assert got[0].error is None, got[0].error
    rebuilt = [n for n in got.notes if "failed its manifest" in n]
    assert len(rebuilt) == 1 and shard.name in rebuilt[0] and "rebuilt it" in rebuilt[0]
    assert toy.drain_notes() == []  # handed over, not left for another run
