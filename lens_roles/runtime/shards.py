"""Jobs as identified shards whose statistics merge exactly: the contract with an executor.

A *job* that reduces many prompts to sums and counts (activation means, second
moments, multiple-choice tallies) is split into shards. Each shard is a payload
given, with the job's shared data, to a function ``fn(model, shared, payload)``
that returns that shard's statistics; the caller merges them in shard order.
On one process the whole job is one shard; an executor runs many, on workers
that each hold their own copy of the model (:mod:`lens_roles.distributed`).

An executor is any object with

* ``check(model)`` — raise :class:`~lens_roles.errors.UsageError` when the
  workers' model is not ``model`` (name, depth, width);
* ``shards(n_units)`` — how many shards a job of ``n_units`` indivisible units
  should be cut into (capped at ``n_units``);
* ``map(fn, shared, payloads, *, desc, progress)`` — ``[fn(model, shared, p) for p in payloads]``
  computed on the workers, in payload order, each shard counted exactly once
  even when a worker died and the shard was re-run.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from lens_roles.errors import DataError, UsageError


class Executor(Protocol):
    def check(self, model) -> None: ...

    def shards(self, n_units: int) -> int: ...

    def map(self, fn: Callable[[Any, Any, Any], Any], shared: Any, payloads: Sequence[Any], *, desc: str,
            progress: bool) -> list: ...


def split_units(sizes: Sequence[int], n_shards: int) -> list[list[int]]:
    """Cut units ``0..len(sizes)-1`` into ``n_shards`` contiguous runs of about equal total size.

    ``sizes`` are the units' costs (e.g. prompts per chunk). Every unit lands in
    exactly one shard, in order, and no shard is empty.

    Raises:
        UsageError: ``n_shards`` is not between 1 and the number of units.
    """
    if not 1 <= n_shards <= max(len(sizes), 1):
        raise UsageError(f"cannot cut {len(sizes)} unit(s) into {n_shards} shard(s)")
    total = sum(sizes)
    out: list[list[int]] = []
    current: list[int] = []
    done = 0
    for u, size in enumerate(sizes):
        current.append(u)
        done += size
        left_units, left_shards = len(sizes) - u - 1, n_shards - len(out) - 1
        # close the shard at its share of the total, or when the rest need one unit each
        if left_shards and (done >= total * (len(out) + 1) / n_shards or left_units == left_shards):
            out.append(current)
            current = []
    if current:
        out.append(current)
    return out


def check_cover(shard_chunks: Sequence[Sequence[int]], n_chunks: int) -> None:
    """Check that the shards' chunks are each of ``0..n_chunks-1`` exactly once (none lost or merged twice).

    Raises:
        DataError: a chunk is missing from the shards or in two of them.
    """
    seen = sorted(c for chunks in shard_chunks for c in chunks)
    if seen != list(range(n_chunks)):
        raise DataError(f"the shards cover chunks {seen}, not each of 0..{n_chunks - 1} once")
