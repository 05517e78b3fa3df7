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
plain right-padded forward with no attention mask.

Groups are taken in chunks (up to ``batch_size`` groups, ``2 * batch_size``
prompts) whose prefixes run in one pass; the chunk's prompts are then sorted by
suffix length into suffix batches of up to ``batch_size``, to keep padding small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from lens_roles.inputs.positions import Encoded
from lens_roles.inputs.prompts import common_prefix_len

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


def run_batches(
    model,
    items: Sequence[Encoded],
    positions: Sequence[Sequence[int]],
    *,
    batch_size: int,
    stop_at_layer: int,
    fwd_hooks_for: Callable[[Tensor, list[int]], list],
    share_prefixes: bool = True,
    progress=None,
) -> None:
    """Run every item once, calling hooks only on the stage that holds the read positions.

    Args:
        fwd_hooks_for: ``(weights [batch, pos], item indices) -> fwd_hooks`` for one
            suffix batch; ``weights[b, p]`` is ``1/len(positions)`` at the positions
            read for row ``b`` (in the batch's own columns), else 0.
        progress: an optional callable ``(n_prompts_done) -> None``.
    """
    device = model.cfg.device
    pad = pad_id(model)
    p = plan(items, positions, share=share_prefixes)
    t = len(p.trunk)
    # the furthest token any prompt needs: its last read position
    needed = [max(pos) + 1 for pos in positions]

    trunk_cache = None
    if t:
        trunk_cache = _empty_cache(model, 1)
        tokens = torch.tensor([p.trunk], dtype=torch.long, device=device)
        model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=trunk_cache, stop_at_layer=stop_at_layer)

    for chunk in _chunks(p, batch_size, lambda i: needed[i] - t):
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
            hooks = fwd_hooks_for(weights.to(device), [i for i, _, _ in batch])
            with model.hooks(fwd_hooks=hooks):
                if chunk_cache is None:
                    model(tokens.to(device), stop_at_layer=stop_at_layer)
                else:
                    cache = _cache_rows(chunk_cache, torch.tensor([g for _, g, _ in batch], dtype=torch.long))
                    model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache,
                          stop_at_layer=stop_at_layer)
            if progress is not None:
                progress(len(batch))
