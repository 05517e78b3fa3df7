"""Sharded collection without Ray: any cut of the schedule, merged, equals the one-process result."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lens_roles.directions.builders import persona_vector
from lens_roles.errors import DataError, UsageError
from lens_roles.inputs.prompts import PairSet, load_pairs
from lens_roles.runtime.activations import collect_sets
from lens_roles.runtime.shards import split_units

DATA = Path(__file__).resolve().parent.parent / "lens_roles" / "data"


class InProcess:
    """An executor that runs every shard here, in reverse order, optionally returning one shard twice."""

    def __init__(self, n_shards: int, duplicate: bool = False):
        self.n_shards, self.duplicate, self.payloads = n_shards, duplicate, []

    def check(self, model) -> None:
        pass

    def shards(self, n_units: int) -> int:
        return min(self.n_shards, n_units)

    def map(self, fn, shared, payloads, *, desc, progress):
        self.payloads = list(payloads)
        out = [fn(self.model, shared, p) for p in reversed(payloads)][::-1]
        return out + out[:1] if self.duplicate else out


@pytest.fixture(scope="module")
def pairs():
    p = load_pairs(DATA / "personas" / "librarian.jsonl")
    return PairSet("librarian", p.pairs[:6], p.source)


def test_split_units_covers_every_unit_once_in_order():
    for sizes, n in [([5, 1, 1, 1, 1, 1], 3), ([1] * 5, 5), ([3, 3], 1), ([1, 1, 1, 1, 10], 2), ([2] * 7, 4)]:
        shards = split_units(sizes, n)
        assert len(shards) == n and all(shards)
        assert [u for s in shards for u in s] == list(range(len(sizes)))
    with pytest.raises(UsageError, match="cannot cut 2 unit"):
        split_units([1, 1], 3)


@pytest.mark.parametrize("n_shards", [2, 3, 100])
def test_sharded_collection_equals_one_process(tiny_model, pairs, n_shards, one_thread):
    ex = InProcess(n_shards)
    ex.model = tiny_model
    sets = [pairs.positives(), pairs.negatives()]
    kw = dict(positions="reply", batch_size=2, keep_per_prompt=True)
    one = collect_sets(tiny_model, sets, **kw)
    many = collect_sets(tiny_model, sets, executor=ex, **kw)
    assert 1 < len(ex.payloads) <= n_shards  # really cut, and never more shards than chunks
    for a, b in zip(one, many):
        assert torch.equal(a.per_prompt, b.per_prompt)
        rel = (b.mean - a.mean).norm(dim=-1) / a.mean.norm(dim=-1)
        assert rel.max() <= 1e-12
    for method in ("mean_diff", "pca"):
        d1 = persona_vector(tiny_model, pairs, batch_size=2, method=method)
        d2 = persona_vector(tiny_model, pairs, batch_size=2, method=method, executor=ex)
        rel = (d2.vectors.double() - d1.vectors.double()).norm(dim=-1) / d1.vectors.double().norm(dim=-1)
        assert rel.max() <= 1e-12, method


def test_a_shard_merged_twice_is_an_error(tiny_model, pairs, one_thread):
    ex = InProcess(3, duplicate=True)
    ex.model = tiny_model
    with pytest.raises(DataError, match=r"not each of 0\.\.\d+ once"):
        collect_sets(tiny_model, [pairs.positives()], positions="reply", batch_size=2, executor=ex)
