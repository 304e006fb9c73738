"""--shard i/n: disjoint, complete, deterministic; a base's descendants kept together."""

from __future__ import annotations

import itertools

import pytest

from reasondiff.sharding import Shard, ShardError, parse_shard, shard_pairs, split_into_shards


def _pairs(spec: dict[str, int]) -> tuple[list[str], list[str]]:
    items, bases = [], []
    for base, n in spec.items():
        for j in range(n):
            items.append(f"{base}/d{j}")
            bases.append(base)
    return items, bases


@pytest.mark.parametrize(
    "spec",
    [
        {"a": 5},
        {"a": 3, "b": 3},
        {"a": 10, "b": 1, "c": 2},
        {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1},
    ],
)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_are_disjoint_and_complete(spec: dict[str, int], count: int) -> None:
    items, bases = _pairs(spec)
    shards = split_into_shards(items, bases, count)
    assert len(shards) == count
    flat = [x for s in shards for x in s]
    assert sorted(flat) == sorted(items)  # complete
    assert len(flat) == len(set(flat))  # disjoint
    for s in shards:  # input order kept inside a shard
        assert s == [x for x in items if x in s]
    # the same split every time, and shard_pairs picks the i-th of them
    assert split_into_shards(items, bases, count) == shards
    for i in range(1, count + 1):
        assert shard_pairs(items, bases, Shard(i, count)) == shards[i - 1]


def test_bases_stay_together_when_there_are_enough_bases() -> None:
    items, bases = _pairs({"a": 4, "b": 3, "c": 2, "d": 1})
    shards = split_into_shards(items, bases, 2)
    for base in "abcd":
        owners = {i for i, s in enumerate(shards) for x in s if x.startswith(base + "/")}
        assert len(owners) == 1, (base, shards)
    assert sorted(len(s) for s in shards) == [5, 5]  # LPT balances 4+1 vs 3+2


def test_fewer_bases_than_shards_splits_a_base_evenly() -> None:
    items, bases = _pairs({"a": 7})
    sizes = [len(s) for s in split_into_shards(items, bases, 3)]
    assert sizes == [3, 2, 2]
    # each part of one base is contiguous in the base's order
    shards = split_into_shards(items, bases, 3)
    assert list(itertools.chain(*shards)) == items


def test_more_shards_than_pairs_leaves_empty_shards() -> None:
    items, bases = _pairs({"a": 2})
    assert [len(s) for s in split_into_shards(items, bases, 4)] == [1, 1, 0, 0]


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "a/b", "2", "1/2/3", "-1/2", ""])
def test_bad_shard_values_are_named(text: str) -> None:
    with pytest.raises(ShardError, match="--shard"):
        parse_shard(text)


def test_parse_shard() -> None:
    assert parse_shard(" 2 / 4 ") == Shard(2, 4)
    assert str(parse_shard("1/1")) == "1/1"
