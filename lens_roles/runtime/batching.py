"""Running many prompts that share prefixes, computing each shared prefix once.

Chat-formatted prompts share a long *trunk* (the template's system prompt and
user header), and the two sides of a contrast pair share their whole user turn.
A causal model's activations on a shared prefix do not depend on what follows,
so :func:`run_batches` computes

1. the trunk common to all prompts once (batch of one),
2. each *group* prefix (tokens shared by several prompts after the trunk, e.g. a
   pair's user turn) once per group, left-padded, continuing from the trunk's
   keys and values,
3. each prompt's own suffix, right-padded, continuing from its group's keys and
   values,

through TransformerLens's ``TransformerLensKeyValueCache`` with explicit attention
masks (pads are masked; rotary positions count real tokens only). A prefix never
covers a position that is read, nor a prompt's last token, so the read positions
always lie in stage 3, where the hooks are. With no shared prefix this is a
plain right-padded forward with its attention mask.

Groups are taken in chunks (up to ``batch_size`` groups, ``2 * batch_size``
prompts) whose prefixes run in one pass; the chunk's prompts are then sorted by
suffix length into suffix batches of up to ``batch_size``, to keep padding small.

Every other batched forward goes through :func:`token_batches`: right-padded
:class:`Batch` es (length-sorted unless the caller's order matters) whose
:meth:`Batch.forward` always passes the attention mask. For a causal model right
padding with a mask gives the same values at the real positions as without one
(the pads come after every real token; tested bit for bit), and the mask keeps
that true for any model, KV cache or positional scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from lens_roles.errors import DataError
from lens_roles.inputs.positions import Encoded
from lens_roles.inputs.prompts import common_prefix_len
from lens_roles.runtime.branching import Branch
from lens_roles.runtime.capture import Capture
from lens_roles.runtime.progress import progress_bar

#: shortest shared run (tokens) worth a group prefix of its own
MIN_GROUP_PREFIX = 4


@dataclass(frozen=True)
class Plan:
    """How prompts are split into trunk, group prefixes and suffixes.

    Attributes:
        trunk: tokens shared by every prompt (may be empty).
        groups: per group, ``(prefix tokens after the trunk, member indices)``.
    """

    trunk: tuple[int, ...]
    groups: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]


def plan(items: Sequence[Encoded], positions: Sequence[Sequence[int]], share: bool = True) -> Plan:
    """Split ``items`` into a trunk and groups sharing prefixes (see the module docs)."""
    # a prefix may cover neither a read position nor a prompt's last token
    limit = [min(min(p), len(it) - 1) for it, p in zip(items, positions)]
    if not share:
        return Plan((), tuple(((), (i,)) for i in range(len(items))))
    trunk_len = min(limit)
    first = items[0].tokens
    for it in items[1:]:
        trunk_len = min(trunk_len, common_prefix_len(first, it.tokens))
    trunk = tuple(first[:trunk_len])
    order = sorted(range(len(items)), key=lambda i: items[i].tokens[trunk_len:])
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    current: list[int] = []
    shared = 0  # absolute end of the current group's shared prefix

    def close():
        if current:
            head = items[current[0]].tokens
            prefix = tuple(head[trunk_len:shared]) if len(current) > 1 else ()
            groups.append((prefix, tuple(current)))

    for i in order:
        if current:
            first_member = current[0]
            end = min(common_prefix_len(items[first_member].tokens, items[i].tokens), limit[i])
            if len(current) == 1:
                end = min(end, limit[first_member])
                if end - trunk_len >= MIN_GROUP_PREFIX:
                    current.append(i)
                    shared = end
                    continue
            elif end == shared:  # joins only if it shares the group's whole prefix
                current.append(i)
                continue
            close()
        current, shared = [i], 0
    close()
    return Plan(trunk, tuple(groups))


def pad_id(model) -> int:
    """The token id used for padding (the tokenizer's pad token, else 0)."""
    pad = model.tokenizer.pad_token_id
    return 0 if pad is None else int(pad)


def pad_batch(rows: Sequence[Sequence[int]], pad: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Pad token rows to one width: ``(tokens [batch, pos], attention mask [batch, pos])`` (long)."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        cols = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        tokens[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return tokens, mask


@dataclass(frozen=True)
class Batch:
    """One right-padded batch of token rows, on the model's device.

    Attributes:
        index: each row's index in the caller's list of rows.
        tokens: ``[batch, pos]`` token ids (long), padded with the pad token.
        mask: ``[batch, pos]`` attention mask (1 at real tokens).
        lengths: each row's number of real tokens.
    """

    index: list[int]
    tokens: Tensor
    mask: Tensor
    lengths: list[int]

    def forward(self, model, **kwargs):
        """``model(tokens, attention_mask=mask, **kwargs)``: the one batched forward."""
        return model(self.tokens, attention_mask=self.mask, **kwargs)

    def repeat_rows(self, n: int) -> "Batch":
        """Each row ``n`` times in a row (``[batch * n, pos]``), e.g. once per α of a sweep."""
        return Batch([i for i in self.index for _ in range(n)], self.tokens.repeat_interleave(n, dim=0),
                     self.mask.repeat_interleave(n, dim=0), [k for k in self.lengths for _ in range(n)])


def padded(model, rows: Sequence[Sequence[int]], index: Sequence[int] | None = None) -> Batch:
    """``rows`` right-padded into one :class:`Batch` on the model's device."""
    tokens, mask = pad_batch(rows, pad_id(model))
    device = model.cfg.device
    return Batch(list(range(len(rows)) if index is None else index), tokens.to(device), mask.to(device),
                 [len(r) for r in rows])


def token_batches(model, rows: Sequence[Sequence[int]], batch_size: int, *, sort: bool = True,
                  progress: bool = False, desc: str = "forward") -> Iterator[Batch]:
    """Right-padded batches of up to ``batch_size`` rows (see :class:`Batch`).

    With ``sort`` the rows are taken shortest first, so each batch pads little (use
    it wherever the order of the batches does not matter: ``Batch.index`` says
    which rows a batch holds); without it, in the given order. ``progress`` shows a
    bar counting rows.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i])) if sort else list(range(len(rows)))
    with progress_bar(progress, len(rows), desc) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield padded(model, [rows[i] for i in index], index)
            bar.update(len(index))


def _new_cache(keys: list[Tensor], values: list[Tensor], mask: Tensor):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(past_keys=k, past_values=v) for k, v in zip(keys, values)]
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)


def _cache_rows(cache, rows: Tensor):
    """A new cache holding the given batch rows of ``cache`` (rows may repeat)."""
    return _new_cache(
        [e.past_keys[rows] for e in cache.entries],
        [e.past_values[rows] for e in cache.entries],
        cache.previous_attention_mask[rows],
    )


def _empty_cache(model, batch: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _chunks(p: Plan, batch_size: int, suffix_len: Callable[[int], int]):
    """Lists of ``(group prefix, members)`` whose prefixes run together in one pass.

    A chunk holds at most ``batch_size`` groups and ``2 * batch_size`` prompts;
    its prompts are then re-sorted by suffix length into suffix batches of at most
    ``batch_size``, so the two sides of a pair need not share a suffix batch.
    ``suffix_len(i)`` is the number of tokens prompt ``i`` needs after the trunk.
    """
    pieces = []
    for prefix, members in p.groups:
        for start in range(0, len(members), batch_size):
            pieces.append((prefix, members[start : start + batch_size]))
    # the suffix passes dominate the cost: keep groups of similar suffix length together
    pieces.sort(key=lambda g: (-max(suffix_len(i) - len(g[0]) for i in g[1]), -len(g[0])))
    chunk, count = [], 0
    for piece in pieces:
        if chunk and (len(chunk) == batch_size or count + len(piece[1]) > 2 * batch_size):
            yield chunk
            chunk, count = [], 0
        chunk.append(piece)
        count += len(piece[1])
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Schedule:
    """Every forward pass :func:`run_batches` makes: the trunk, then independent chunks.

    Attributes:
        trunk: tokens shared by every prompt, computed once (may be empty).
        chunks: per chunk, ``(group prefix, member item indices)`` pairs whose
            prefixes run together and whose members then run in suffix batches.

    Chunks depend on nothing but the trunk, so any subset of them (a *shard*,
    :meth:`subset`) run on another process with the same trunk gives bit for
    bit the activations that the whole schedule gives those prompts.
    """

    trunk: tuple[int, ...]
    chunks: tuple[tuple[tuple[tuple[int, ...], tuple[int, ...]], ...], ...]

    def members(self, chunk: int) -> list[int]:
        """The item indices chunk ``chunk`` runs."""
        return [i for _, ms in self.chunks[chunk] for i in ms]

    def subset(self, chunks: Sequence[int]) -> "Schedule":
        """The same trunk with only the given chunks (in the given order)."""
        return Schedule(self.trunk, tuple(self.chunks[c] for c in chunks))


def schedule(items: Sequence[Encoded], positions: Sequence[Sequence[int]], *, batch_size: int,
             share_prefixes: bool = True) -> Schedule:
    """The :class:`Schedule` :func:`run_batches` follows for these items (see the module docs)."""
    p = plan(items, positions, share=share_prefixes)
    t = len(p.trunk)
    needed = [max(pos) + 1 for pos in positions]
    return Schedule(p.trunk, tuple(tuple(c) for c in _chunks(p, batch_size, lambda i: needed[i] - t)))


def run_batches(
    model,
    items: Sequence[Encoded],
    positions: Sequence[Sequence[int]],
    *,
    batch_size: int,
    stop_at_layer: int,
    capture: Capture,
    on_batch: Callable[[list[int]], None],
    share_prefixes: bool = True,
    progress: Callable[[int], None] | None = None,
    only: Schedule | None = None,
) -> None:
    """Run every item once, with ``capture`` attached only on the stage that holds the read positions.

    Args:
        capture: recording hooks (:mod:`lens_roles.runtime.capture`); before each
            suffix batch its ``weights`` ``[batch, pos]`` are set to ``1/len(positions)``
            at the positions read for row ``b`` (in the batch's own columns), else 0.
        on_batch: called after each suffix batch with the batch's item indices
            (``capture.values`` then hold that batch's reductions).
        progress: an optional callable ``(n_prompts_done) -> None``.
        only: run just this part of the items' :func:`schedule` (a shard: its
            :meth:`Schedule.subset`); None runs all of it.
    """
    device = model.cfg.device
    pad = pad_id(model)
    sched = only if only is not None else schedule(items, positions, batch_size=batch_size,
                                                   share_prefixes=share_prefixes)
    t = len(sched.trunk)
    # the furthest token any prompt needs: its last read position
    needed = [max(pos) + 1 for pos in positions]

    trunk_cache = None
    if t:
        trunk_cache = _empty_cache(model, 1)
        tokens = torch.tensor([sched.trunk], dtype=torch.long, device=device)
        model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=trunk_cache, stop_at_layer=stop_at_layer)

    for chunk in sched.chunks:
        prefixes = [prefix for prefix, _ in chunk]
        chunk_cache = None
        if trunk_cache is not None:
            chunk_cache = _cache_rows(trunk_cache, torch.zeros(len(chunk), dtype=torch.long))
        elif any(prefixes):
            chunk_cache = _empty_cache(model, len(chunk))
        if any(prefixes):
            tokens, mask = pad_batch(prefixes, pad, side="left")
            model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=chunk_cache,
                  stop_at_layer=stop_at_layer)
        # (prompt, its group's row in the chunk cache, where its suffix starts), longest suffix first
        members = [(i, g, t + len(prefix)) for g, (prefix, ms) in enumerate(chunk) for i in ms]
        members.sort(key=lambda m: -(needed[m[0]] - m[2]))
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            suffixes = [items[i].tokens[s : needed[i]] for i, _, s in batch]
            tokens, mask = pad_batch(suffixes, pad)
            weights = torch.zeros(tokens.shape, dtype=model.cfg.dtype)
            for row, (i, _, s) in enumerate(batch):
                weights[row, [q - s for q in positions[i]]] = 1.0 / len(positions[i])
            capture.weights = weights.to(device)
            with model.hooks(fwd_hooks=capture.fwd_hooks()):
                if chunk_cache is None:
                    model(tokens.to(device), attention_mask=mask.to(device), stop_at_layer=stop_at_layer)
                else:
                    cache = _cache_rows(chunk_cache, torch.tensor([g for _, g, _ in batch], dtype=torch.long))
                    model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache,
                          stop_at_layer=stop_at_layer)
            on_batch([i for i, _, _ in batch])
            if progress is not None:
                progress(len(batch))


def _branch_cache(shared, branch_cache, layer: int, rows: Tensor | None = None):
    """A cache whose entries up to ``layer`` are ``shared``'s and after it ``branch_cache``'s
    (its batch ``rows`` when given), or empty ones when ``branch_cache`` is None.

    Blocks up to ``layer`` never run in a branch, so their entries only keep the
    per-block indexing; the attention mask is the shared one (pads do not depend on
    the branch).
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = list(shared.entries[: layer + 1])
    for k, entry in enumerate(shared.entries[layer + 1 :], start=layer + 1):
        if branch_cache is None:
            ref = entry.past_keys
            empty = ref.new_empty((shared.previous_attention_mask.shape[0], 0, *ref.shape[2:]))
            entries.append(TransformerLensKeyValueCacheEntry(past_keys=empty, past_values=empty))
        else:
            own = branch_cache.entries[k]
            keys, values = (own.past_keys, own.past_values) if rows is None else (own.past_keys[rows],
                                                                                  own.past_values[rows])
            entries.append(TransformerLensKeyValueCacheEntry(past_keys=keys, past_values=values))
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=shared.previous_attention_mask)


def run_branched(
    model,
    items: Sequence[Encoded],
    positions: Sequence[Sequence[int]],
    branches: Sequence[Branch],
    *,
    batch_size: int,
    stop_at_layer: int,
    capture: Capture,
    on_batch: Callable[[int, list[int]], None],
    share_prefixes: bool = True,
    progress: Callable[[int], None] | None = None,
    only: Schedule | None = None,
) -> None:
    """:func:`run_batches` for several branches (:mod:`lens_roles.runtime.branching`) at once.

    Every stage (trunk, group prefixes, suffix batch) runs once, unhooked, to the
    deepest branch layer, keeping ``resid_post`` at each branch layer; then each
    branch continues every stage from its own layer with its hooks attached
    (the trunk's and prefixes' keys and values above that layer are the branch's
    own, as in a full run under its hooks). ``capture`` is attached in the suffix
    stage of each branch, its ``weights`` set as in :func:`run_batches`, and
    ``on_batch(branch index, item indices)`` is called after each branch of each
    suffix batch. ``progress(n)`` is called after each branch of each suffix batch with its number of
    prompts (it counts prompts × branches). ``only``: run just this part of the items'
    :func:`schedule` (a shard), as in :func:`run_batches`; every branch runs the same batches.
    """
    from lens_roles.runtime.branching import can_branch, check_branch, forward_from

    branches = [check_branch(model, b) for b in branches]
    if not branches:
        raise DataError("no branches to run")
    if not can_branch(model):  # nothing to resume from: each branch is a full run under its hooks
        for b, branch in enumerate(branches):
            with model.hooks(fwd_hooks=list(branch.hooks)):
                run_batches(model, items, positions, batch_size=batch_size, stop_at_layer=stop_at_layer,
                            capture=capture, on_batch=lambda members, _b=b: on_batch(_b, members),
                            share_prefixes=share_prefixes, progress=progress, only=only)
        return
    device = model.cfg.device
    pad = pad_id(model)
    layers = sorted({b.layer for b in branches})
    shared_stop = max(layers) + 1
    keep = Capture(layers)  # resid_post at every branch layer, of the unhooked shared run
    sched = only if only is not None else schedule(items, positions, batch_size=batch_size,
                                                   share_prefixes=share_prefixes)
    t = len(sched.trunk)
    needed = [max(pos) + 1 for pos in positions]

    def shared_forward(tokens: Tensor, mask: Tensor, cache) -> dict[int, Tensor]:
        with model.hooks(fwd_hooks=keep.fwd_hooks()):
            model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=shared_stop)
        return dict(keep.values)

    def branch_forward(branch: Branch, resid: dict[int, Tensor], mask: Tensor, cache, hooks=()) -> None:
        with model.hooks(fwd_hooks=list(branch.hooks) + list(hooks)):
            forward_from(model, resid[branch.layer], branch.layer, attention_mask=mask, past_kv_cache=cache,
                         stop_at_layer=stop_at_layer)

    # the trunk: once unhooked, then once per branch above its layer (those keys and values are the branch's)
    trunk_cache, trunk_branch = None, [None] * len(branches)
    if t:
        trunk_cache = _empty_cache(model, 1)
        tokens = torch.tensor([sched.trunk], dtype=torch.long, device=device)
        resid = shared_forward(tokens, torch.ones_like(tokens), trunk_cache)
        for b, branch in enumerate(branches):
            trunk_branch[b] = _branch_cache(trunk_cache, None, branch.layer)
            branch_forward(branch, resid, trunk_cache.previous_attention_mask, trunk_branch[b])

    for chunk in sched.chunks:
        prefixes = [prefix for prefix, _ in chunk]
        # each branch's keys and values above its layer: those of the trunk (one row, shared by every group)
        # until the chunk has prefixes of its own; ``branch_row`` maps a group to its row there
        chunk_cache, chunk_branch = None, [None] * len(branches)
        branch_row = torch.zeros(len(chunk), dtype=torch.long)
        if trunk_cache is not None:
            chunk_cache = _cache_rows(trunk_cache, branch_row)
            chunk_branch = list(trunk_branch)
        elif any(prefixes):
            chunk_cache = _empty_cache(model, len(chunk))
        if any(prefixes):
            tokens, mask = pad_batch(prefixes, pad, side="left")
            resid = shared_forward(tokens.to(device), mask.to(device), chunk_cache)
            for b, branch in enumerate(branches):
                rows = branch_row if chunk_branch[b] is not None else None
                chunk_branch[b] = _branch_cache(chunk_cache, chunk_branch[b], branch.layer, rows)
                branch_forward(branch, resid, chunk_cache.previous_attention_mask, chunk_branch[b])
            branch_row = torch.arange(len(chunk))
        members = [(i, g, t + len(prefix)) for g, (prefix, ms) in enumerate(chunk) for i in ms]
        members.sort(key=lambda m: -(needed[m[0]] - m[2]))
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            suffixes = [items[i].tokens[s : needed[i]] for i, _, s in batch]
            tokens, mask = pad_batch(suffixes, pad)
            tokens, mask = tokens.to(device), mask.to(device)
            weights = torch.zeros(tokens.shape, dtype=model.cfg.dtype)
            for row, (i, _, s) in enumerate(batch):
                weights[row, [q - s for q in positions[i]]] = 1.0 / len(positions[i])
            rows = torch.tensor([g for _, g, _ in batch], dtype=torch.long)
            cache = None if chunk_cache is None else _cache_rows(chunk_cache, rows)
            resid = shared_forward(tokens, mask, cache)
            full_mask = mask if cache is None else cache.previous_attention_mask
            capture.weights = weights.to(device)
            for b, branch in enumerate(branches):
                own = None if cache is None else _branch_cache(cache, chunk_branch[b], branch.layer, branch_row[rows])
                branch_forward(branch, resid, full_mask, own, capture.fwd_hooks())
                on_batch(b, [i for i, _, _ in batch])
                if progress is not None:
                    progress(len(batch))
