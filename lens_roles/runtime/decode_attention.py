"""Decoding one token a step without copying the whole KV cache at every step.

At each decoding step TransformerLens's attention, given a KV cache,

1. concatenates the new keys and values to the cached ones (``past_kv_cache_entry.append``),
2. rotates *all* keys again (the cache keeps them unrotated),
3. for grouped-query attention repeats every key and value once per query head of
   its group (``repeat_interleave``), and
4. hands permuted views to ``matmul``, which copies them into contiguous
   ``[batch × head, d_head, key_pos]`` and ``[batch × head, key_pos, d_head]`` operands.

Each step copies the whole cache, steps 3–4 three times its size for a model with
three query heads per key head (SmolLM2-135M), in every block: at 64 rows the copies
took a quarter of a decoding step (a profile of the SAE corpus's generation).

:func:`decoding_attention` keeps, per attention module and for the length of one
decoding loop, the cache entry's keys and values in buffers that grow in place (its
``append`` writes the new position after the cached ones), the rotated keys (each
position rotated once, with its own position ids: rotation is elementwise per
position) and two buffers laid out as ``matmul``
reads its operands — the keys of every query head ``[batch, head, d_head, capacity]``
and the values ``[batch, head, capacity, d_head]`` — to which each step writes its
new position only. The scores and ``z`` are then the same ``matmul`` (TransformerLens's
own :meth:`calculate_attention_scores` / :meth:`calculate_z_scores` of
``AbstractAttention``) on views of those buffers: the same operand values and shapes,
so the logits are bit for bit those of the plain computation (tested on tiny
multi-head and grouped-query models; ``benchmarks/sae.py`` checks that the default
model samples the same sequences).

Each shortcut is taken only when it is provably the plain computation: the keys
(values) handed in are the cache of the previous step — the same tensor object —
extended by the new positions; otherwise (a frozen cache, a hook at ``hook_rot_k``
returning other keys, a first step after a prefill run outside the block) the
module computes in full and the buffers are rebuilt from what it computed. Hooks see
what they saw before: ``hook_rot_k`` every rotated key, ``hook_attn_scores``,
``hook_pattern`` and ``hook_z`` their usual tensors.

The buffers cost ``2 × batch × n_heads × d_head × capacity`` numbers per block (the
cache repeated for every query head); when that would exceed
:data:`BUFFER_BUDGET_BYTES` over the model, those two are not kept and steps 3–4 run as
in TransformerLens (a large model with a long context on a GPU keeps its transient
copies instead); the cache and the rotated keys, the cache's own size, are kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

#: Largest memory (bytes, all blocks together) the expanded key and value buffers may take.
BUFFER_BUDGET_BYTES = 4 * 2**30

#: Positions added to a buffer's capacity beyond what the current step needs, when it grows.
_HEADROOM = 64


@contextmanager
def decoding_attention(model):
    """Inside this block, decoding steps through the KV cache skip the whole-cache copies (module docstring).

    Models without rotary embeddings, or whose rotary tables change with the length
    (dynamic NTK), are left as they are; attention modules that compute their scores
    or ``z`` in their own way keep them (only the cache and key-rotation shortcuts apply).
    """
    if model.cfg.positional_embedding_type != "rotary" or getattr(model.cfg, "use_dynamic_ntk_rope", False):
        yield
        return
    patched = []
    try:
        for block in model.blocks:
            _patch(block.attn, buffers=_plain_scores(block.attn), model=model)
            patched.append(block.attn)
        yield
    finally:
        for attn in patched:
            for name in ("forward", "apply_rotary", "calculate_attention_scores", "calculate_z_scores"):
                vars(attn).pop(name, None)


def _plain_scores(attn) -> bool:
    """Whether ``attn`` computes scores and ``z`` as ``AbstractAttention`` does, after at most a
    grouped-query ``repeat_interleave`` of the keys and values (which the buffers hold already)."""
    from transformer_lens.components import AbstractAttention
    from transformer_lens.components.grouped_query_attention import GroupedQueryAttention

    kinds = (AbstractAttention, GroupedQueryAttention)
    cls = type(attn)
    return (any(cls.calculate_attention_scores is k.calculate_attention_scores for k in kinds)
            and any(cls.calculate_z_scores is k.calculate_z_scores for k in kinds)
            and not getattr(attn.cfg, "ungroup_grouped_query_attention", False))


class _Buffer:
    """A tensor that grows along ``dim`` (with headroom) and is written in place: ``view`` is
    positions ``0..length`` of it. ``budget`` (bytes, or None) caps the allocation: past it the
    buffer drops its data, ``write`` returns False and ``refused`` stays set (the batch is fixed and
    the length only grows in one decoding loop, so no later write would fit)."""

    def __init__(self, dim: int, budget: int | None = None):
        self.dim, self.budget = dim, budget
        self.data: Tensor | None = None
        self.length = 0
        self.last: Tensor | None = None  # the last view handed out: the next step extends it
        self.source: Tensor | None = None  # the tensor it was last filled from (set by the caller)
        self.refused = False

    def write(self, part: Tensor, start: int) -> bool:
        """Put ``part`` (the buffer's layout) at positions ``start..``; ``start`` 0 or the current length."""
        if start and (self.data is None or start != self.length):
            self.drop()
            return False
        total = start + part.shape[self.dim]
        fits = self.data is not None and start and self.data.shape[self.dim] >= total \
            and self.data.shape[0] == part.shape[0]
        if not fits:
            shape = list(part.shape)
            shape[self.dim] = total + _HEADROOM
            if self.budget is not None and part.element_size() * torch.Size(shape).numel() > self.budget:
                self.drop()
                self.refused = True
                return False
            grown = torch.empty(shape, dtype=part.dtype, device=part.device)
            if start:
                grown.narrow(self.dim, 0, start).copy_(self.data.narrow(self.dim, 0, start))
            self.data = grown
        self.data.narrow(self.dim, start, total - start).copy_(part)
        self.length = total
        self.last = self.data.narrow(self.dim, 0, total)
        return True

    def drop(self) -> None:
        self.data, self.length, self.last = None, 0, None


def _patch(attn, *, buffers: bool, model) -> None:
    """Shadow four methods of one attention module with their decoding shortcuts (instance attributes)."""
    from transformer_lens.components import AbstractAttention

    forward, rotate = attn.forward, attn.apply_rotary
    repeat = attn.cfg.n_heads // (attn.cfg.n_key_value_heads or attn.cfg.n_heads)
    # the expanded buffers' share of the budget: one key and one value buffer per block
    budget = BUFFER_BUDGET_BYTES // (2 * len(model.blocks))
    cached_keys, cached_values, rotated = _Buffer(1), _Buffer(1), _Buffer(1)  # [batch, pos, kv_head, d_head]
    keys = _Buffer(3, budget)     # [batch, head, d_head, pos]: the scores' operand
    values = _Buffer(2, budget)   # [batch, head, pos, d_head]: z's operand
    seen: dict = {}               # this step's cached tensors, as the cache entry held them

    def append(entry, new_keys: Tensor, new_values: Tensor):
        """The cache entry's ``append`` without the concatenation: the new positions are written
        after the cached ones when those are this module's last views, else both are copied in."""
        n = entry.past_keys.shape[1]
        extends = entry.past_keys is cached_keys.last and entry.past_values is cached_values.last
        for buf, past, new in ((cached_keys, entry.past_keys, new_keys), (cached_values, entry.past_values,
                                                                          new_values)):
            if not (extends and buf.write(new, n)):
                buf.write(torch.cat([past, new], dim=1), 0)
        entry.past_keys, entry.past_values = cached_keys.last, cached_values.last
        return cached_keys.last, cached_values.last

    def patched_forward(*args, **kwargs):
        entry = kwargs["past_kv_cache_entry"] if "past_kv_cache_entry" in kwargs else (
            args[3] if len(args) > 3 else None)
        seen["keys"] = None if entry is None else entry.past_keys
        seen["values"] = None if entry is None else entry.past_values
        if entry is None or entry.frozen:
            return forward(*args, **kwargs)
        entry.append = lambda k, v: append(entry, k, v)
        try:
            return forward(*args, **kwargs)
        finally:
            del entry.append

    def apply_rotary(x: Tensor, past_kv_pos_offset: int = 0, attention_mask: Tensor | None = None) -> Tensor:
        whole = past_kv_pos_offset == 0 and attention_mask is not None and x.shape[1] == attention_mask.shape[1]
        if not whole:  # the queries of a step
            return rotate(x, past_kv_pos_offset, attention_mask)
        source = rotated.source
        n = None if source is None else source.shape[1]
        if source is not None and seen.get("keys") is source and x.shape[1] > n and rotated.length == n:
            new = rotate(x[:, n:], n, attention_mask)
            rotated.write(new, n)
            if buffers and not keys.refused:
                keys.write(_expand(new, repeat).permute(0, 2, 3, 1), n)
        else:
            rotated.write(rotate(x, past_kv_pos_offset, attention_mask), 0)
            keys.drop()
        # the keys (in a prefill the queries come first and are replaced by the keys right after)
        rotated.source = x
        return rotated.last

    def calculate_attention_scores(q: Tensor, k: Tensor) -> Tensor:
        if buffers and not keys.refused and k is rotated.last:
            if keys.length != k.shape[1]:
                keys.write(_expand(k, repeat).permute(0, 2, 3, 1), 0)
            if keys.length == k.shape[1]:
                return AbstractAttention.calculate_attention_scores(attn, q, keys.last.permute(0, 3, 1, 2))
        return type(attn).calculate_attention_scores(attn, q, k)

    def calculate_z_scores(v: Tensor, pattern: Tensor) -> Tensor:
        if buffers and not values.refused:
            n = values.length
            if not (seen.get("values") is values.source and v.shape[1] > n
                    and values.write(_expand(v[:, n:], repeat).permute(0, 2, 1, 3), n)):
                values.write(_expand(v, repeat).permute(0, 2, 1, 3), 0)
            values.source = v
            if values.length == v.shape[1]:
                return AbstractAttention.calculate_z_scores(attn, values.last.permute(0, 2, 1, 3), pattern)
        return type(attn).calculate_z_scores(attn, v, pattern)

    attn.forward = patched_forward
    attn.apply_rotary = apply_rotary
    attn.calculate_attention_scores = calculate_attention_scores
    attn.calculate_z_scores = calculate_z_scores


def _expand(part: Tensor, repeat: int) -> Tensor:
    """``[batch, pos, kv_head, d_head]`` with each key/value head repeated for its ``repeat`` query heads."""
    return torch.repeat_interleave(part, dim=2, repeats=repeat) if repeat > 1 else part
