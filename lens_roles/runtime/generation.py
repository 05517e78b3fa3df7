"""Text generation, plain or under any intervention, with or without the KV cache.

Interventions are context managers around :func:`generate`::

    with steer(model, persona, 6.0, layers=[12], positions="all"):
        outs = generate(model, ["Where can I find old maps?"], max_new_tokens=40)

Prompts are chat-formatted like everywhere else, left-padded into one batch
(attention mask, rotary positions counted over real tokens), and decoded greedily
(``temperature=0``) or by seeded sampling. During generation the interventions'
``"prompt"`` / ``"generated"`` positions refer to the padded prompt columns and
to the new tokens. With ``use_kv_cache=True`` the prompt is run once and each
step feeds one token; with ``False`` the whole sequence is rerun each step (the
reference the cached path is tested against). Only the position that predicts
the next token is unembedded (:func:`~lens_roles.runtime.readout.final_logits`),
in the prefill as in every step: a small model's unembedding of every prompt
position cost about a quarter of a generation. Each step attends through the
cache without copying it (:func:`~lens_roles.runtime.decode_attention.decoding_attention`:
cached keys rotated once, keys and values kept as the attention's ``matmul`` reads
them), bit for bit the plain computation.

:func:`generate_branched` continues the same prompts under several branches (one
per steering layer and α of a sweep): the prompt's blocks below each branch's
layer are prefilled once for all of them (:mod:`lens_roles.runtime.branching`),
and the branches then decode together in one batch.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_roles.errors import DataError
from lens_roles.inputs.positions import check_context, encode
from lens_roles.inputs.prompts import as_prompts
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.branching import Branch, can_branch, check_branch, forward_from
from lens_roles.runtime.capture import capture
from lens_roles.runtime.decode_attention import decoding_attention
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.readout import final_logits


@dataclass
class PositionState:
    """Where the current forward's tokens sit: set by the generation loop.

    Attributes:
        offset: absolute column of the first token of this forward.
        prompt_len: number of (padded) prompt columns.
    """

    offset: int = 0
    prompt_len: int | None = None


_STATE: contextvars.ContextVar[PositionState | None] = contextvars.ContextVar("lens_roles_positions", default=None)


@contextmanager
def position_state(state: PositionState):
    """Make ``state`` visible to the hooks of interventions in this block."""
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation."""

    prompt: str
    text: str
    tokens: tuple[int, ...]


@torch.no_grad()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    use_kv_cache: bool = True,
    template: str | None = None,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> list[Generation]:
    """Continue each prompt (a :class:`~lens_roles.inputs.prompts.Prompt` or a user string).

    Args:
        temperature: 0 for greedy decoding, else softmax sampling at this temperature
            with a ``torch.Generator`` seeded by ``seed``.
        use_kv_cache: feed one token per step through the KV cache.
        stop_at_eos: stop a row at the tokenizer's EOS token (the row is padded after).
        progress: show a bar counting the decoding steps (new tokens).
    """
    check_sampling(max_new_tokens, temperature)
    plist = as_prompts(prompts)
    items = encode(model, plist, template=template)
    check_context(model, items, plist, extra=max_new_tokens)
    return generate_from_tokens(model, [it.tokens for it in items], labels=[p.user for p in plist],
                                max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                use_kv_cache=use_kv_cache, stop_at_eos=stop_at_eos, progress=progress)


def check_sampling(max_new_tokens, temperature) -> None:
    """Refuse a non-positive ``max_new_tokens`` or a negative / non-finite ``temperature`` (DataError)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (temperature >= 0 and temperature == temperature and temperature != float("inf")):
        raise DataError(f"temperature must be finite and >= 0, got {temperature}")


@torch.no_grad()
def generate_from_tokens(
    model,
    rows: Sequence[Sequence[int]],
    *,
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    use_kv_cache: bool = True,
    stop_at_eos: bool = True,
    progress: bool = False,
) -> list[Generation]:
    """Continue already-tokenised rows (e.g. a multi-turn conversation ending in the assistant header).

    The decoding loop of :func:`generate` (which renders and tokenises prompts and
    calls this), with the same arguments; ``labels`` fill ``Generation.prompt``
    (default: the decoded row).

    Raises:
        DataError: no rows, an empty row, bad sampling settings, or a row that with
            ``max_new_tokens`` exceeds the model's context.
    """
    rows, labels = _check_rows(model, rows, labels, max_new_tokens, temperature)
    tokens, mask = pad_batch(rows, pad_id(model), side="left")
    tokens, mask = tokens.to(model.cfg.device), mask.to(model.cfg.device)
    prompt_len = tokens.shape[1]
    if not use_kv_cache:
        new = _decode_uncached(model, tokens, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                               seed=seed, stop_at_eos=stop_at_eos, progress=progress)
        return _generations(model, new, labels, stop_at_eos)
    cache = _empty_cache(model, len(rows))
    with position_state(PositionState(offset=0, prompt_len=prompt_len)):
        resid = model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    new = decode(model, final_logits(model, resid[:, -1]), cache, prompt_len, max_new_tokens=max_new_tokens,
                 temperature=temperature, seed=seed, stop_at_eos=stop_at_eos, progress=progress)
    return _generations(model, new, labels, stop_at_eos)


def _check_rows(model, rows, labels, max_new_tokens, temperature) -> tuple[list[list[int]], list[str]]:
    """The rows as lists and their labels, after the checks of :func:`generate_from_tokens`."""
    check_sampling(max_new_tokens, temperature)
    rows = [list(r) for r in rows]
    if not rows or any(not r for r in rows):
        raise DataError("generate_from_tokens needs at least one row and no empty row of token ids")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    for i, r in enumerate(rows):
        if n_ctx and len(r) + max_new_tokens > n_ctx:
            raise DataError(f"row {i} is {len(r)} tokens plus {max_new_tokens} tokens to generate, more than "
                            f"{model.cfg.model_name}'s context of {n_ctx} tokens; shorten it")
    if labels is None:
        labels = [model.tokenizer.decode(r) for r in rows]
    if len(labels) != len(rows):
        raise DataError(f"{len(labels)} labels for {len(rows)} rows")
    return rows, list(labels)


def _empty_cache(model, batch: int):
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    return TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)


def _sample(logits: Float[Tensor, "batch d_vocab"], temperature: float, generator: torch.Generator
            ) -> Int[Tensor, " batch"]:
    """Greedy (``temperature == 0``) or seeded softmax sampling of one token per row."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def decode(model, first: Float[Tensor, "batch d_vocab"], cache, prompt_len: int, *, max_new_tokens: int,
           temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True, progress: bool = False,
           step_logits: list | None = None) -> Int[Tensor, "batch new"]:
    """The decoding loop after a prefill: ``max_new_tokens`` tokens per row, one forward per step.

    ``first`` are the next-token logits at each row's last prompt token and ``cache``
    the prefill's keys and values (``[batch, prompt_len, ...]`` per block, its
    attention mask the left-padded prompt's). Each step feeds the sampled tokens
    through the cache and unembeds only that one position
    (:func:`~lens_roles.runtime.readout.final_logits`). Rows that reached EOS get pad
    tokens; the loop ends when every row has. ``step_logits`` (a list) receives each
    step's logits ``[batch, d_vocab]``, the first included. Returns the new tokens
    ``[batch, new]`` (``new ≤ max_new_tokens``).
    """
    device = first.device
    batch = first.shape[0]
    pad = pad_id(model)
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    one = torch.ones((batch, 1), dtype=torch.long, device=device)
    logits = first
    n = 0
    with progress_bar(progress, max_new_tokens, "generate", unit="token") as bar, decoding_attention(model):
        for step in range(max_new_tokens):
            if step:
                with position_state(PositionState(offset=prompt_len + step - 1, prompt_len=prompt_len)):
                    resid = model(new[:, step - 1 : step], attention_mask=one, past_kv_cache=cache,
                                  stop_at_layer=model.cfg.n_layers)
                logits = final_logits(model, resid[:, -1])
            if step_logits is not None:
                step_logits.append(logits)
            nxt = torch.where(done, torch.full_like(done, pad, dtype=torch.long), _sample(logits, temperature,
                                                                                          generator))
            new[:, step] = nxt
            n = step + 1
            bar.update(1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    return new[:, :n]


def _decode_uncached(model, tokens: Tensor, mask: Tensor, *, max_new_tokens: int, temperature: float, seed: int,
                     stop_at_eos: bool, progress: bool) -> Int[Tensor, "batch new"]:
    """The reference loop the cached one is tested against: the whole sequence rerun at every step."""
    batch, prompt_len = tokens.shape
    pad = pad_id(model)
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = torch.full((batch, 0), pad, dtype=torch.long, device=tokens.device)
    done = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    with progress_bar(progress, max_new_tokens, "generate", unit="token") as bar:
        for _ in range(max_new_tokens):
            full = torch.cat([tokens, new], dim=1)
            attn = torch.cat([mask, torch.ones_like(new)], dim=1)
            with position_state(PositionState(offset=0, prompt_len=prompt_len)):
                resid = model(full, attention_mask=attn, stop_at_layer=model.cfg.n_layers)
            nxt = _sample(final_logits(model, resid[:, -1]), temperature, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            bar.update(1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    return new


def _generations(model, new: Tensor, labels: Sequence[str], stop_at_eos: bool) -> list[Generation]:
    """Each row's new tokens, cut at its first EOS, as a :class:`Generation`."""
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    out = []
    for row, ids in enumerate(new.tolist()):
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        out.append(Generation(prompt=labels[row], text=model.tokenizer.decode(ids), tokens=tuple(ids)))
    return out


def _row_hooks(branches: Sequence[Branch], rows: int) -> list:
    """The hooks of every branch for a batch that stacks the branches (``rows`` rows each, in order).

    One hook per hook point: each branch's functions act on its own rows (as they
    would on a batch of ``rows`` alone), the other rows pass unchanged.
    """
    by_point: dict[str, list[list]] = {}
    for b, branch in enumerate(branches):
        for name, fn in branch.hooks:
            by_point.setdefault(name, [[] for _ in branches])[b].append(fn)

    def make(per_branch: list[list]):
        def hook(acts, hook):
            parts = []
            for b, fns in enumerate(per_branch):
                part = acts[b * rows : (b + 1) * rows]
                for fn in fns:
                    out = fn(part, hook)
                    part = part if out is None else out
                parts.append(part)
            return torch.cat(parts)

        return hook

    return [(name, make(per_branch)) for name, per_branch in by_point.items()]


@dataclass(frozen=True)
class Prefill:
    """The unhooked prefill of left-padded rows up to some layers, for branches to resume from.

    Attributes:
        rows: the token rows, as given.
        tokens, mask: ``[row, prompt_len]`` left-padded tokens and attention mask.
        cache: the keys and values of the blocks run (``[row, prompt_len, ...]`` each).
        resid: per layer, the unhooked ``resid_post`` ``[row, prompt_len, d_model]`` there
            (empty for a model that cannot branch, :func:`~lens_roles.runtime.branching.can_branch`).
    """

    rows: tuple[tuple[int, ...], ...]
    tokens: Tensor
    mask: Tensor
    cache: object
    resid: dict


@torch.no_grad()
def prefill(model, rows: Sequence[Sequence[int]], layers: Sequence[int]) -> Prefill:
    """Run ``rows`` once, unhooked, up to the deepest of ``layers``, keeping ``resid_post`` at each of them.

    Any number of :func:`generate_branched` calls whose branches start at these
    layers can resume from it (a bisection over α calls one at a time): the blocks
    below a branch's layer are never run again for these rows.
    """
    rows = tuple(tuple(int(t) for t in r) for r in rows)
    if not rows or any(not r for r in rows):
        raise DataError("prefill needs at least one row and no empty row of token ids")
    tokens, mask = pad_batch(rows, pad_id(model), side="left")
    tokens, mask = tokens.to(model.cfg.device), mask.to(model.cfg.device)
    layers = sorted({int(layer) % model.cfg.n_layers for layer in layers})
    cache = _empty_cache(model, len(rows))
    if not can_branch(model) or not layers:
        return Prefill(rows, tokens, mask, cache, {})
    with position_state(PositionState(offset=0, prompt_len=tokens.shape[1])):
        with capture(model, layers) as cap:
            model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=cap.stop_at_layer)
    return Prefill(rows, tokens, mask, cache, {layer: cap[layer] for layer in layers})


@torch.no_grad()
def generate_branched(
    model,
    rows: Sequence[Sequence[int]],
    branches: Sequence[Branch],
    *,
    labels: Sequence[str] | None = None,
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    progress: bool = False,
    shared: Prefill | None = None,
) -> list[list[Generation]]:
    """Continue every row under every branch (e.g. one per steering layer and α): one list per branch.

    The prompt is prefilled once, unhooked, up to the deepest branch layer
    (through the KV cache, left-padded as in :func:`generate_from_tokens`; or
    ``shared``, a :func:`prefill` of the same rows made earlier); each
    branch (:class:`~lens_roles.runtime.branching.Branch`) resumes from the
    residual of its layer with its hooks attached and runs only the blocks above
    it, the keys and values of the blocks below being the shared run's
    (:mod:`lens_roles.runtime.branching`). Then all branches decode together, one
    batch of ``branches × rows`` rows, each branch's hooks acting on its own rows,
    one forward per step. Each branch's hooks see a batch of ``len(rows)`` rows
    (as in ``with intervene(model, branch.hooks): generate_from_tokens(model, rows)``)
    and the tokens decoded are those (greedy: the same tokens, the logits equal to
    float rounding); sampling draws from one generator over the stacked batch. No
    hooks may be attached around the call at a branch's first hook point.

    Raises:
        DataError: as :func:`generate_from_tokens`, or no branches, a branch whose
            hooks sit below its layer, or a ``shared`` prefill of other rows or
            without a branch's layer.
    """
    rows, labels = _check_rows(model, rows, labels, max_new_tokens, temperature)
    branches = [check_branch(model, b) for b in branches]
    if not branches:
        raise DataError("no branches to generate from")
    if shared is None:
        shared = prefill(model, rows, [b.layer for b in branches])
    elif shared.rows != tuple(tuple(r) for r in rows):
        raise DataError("the shared prefill was made from other rows than the ones to continue")
    missing = sorted({b.layer for b in branches} - set(shared.resid))
    if missing and can_branch(model):
        raise DataError(f"the shared prefill kept layers {sorted(shared.resid)}, not the branch layer(s) {missing}")
    n_rows = len(rows)
    tokens, mask = shared.tokens, shared.mask
    prompt_len = tokens.shape[1]
    firsts, caches = [], []
    with position_state(PositionState(offset=0, prompt_len=prompt_len)):
        for branch in branches:
            with model.hooks(fwd_hooks=list(branch.hooks)):
                if shared.resid:
                    own = _branch_cache(model, shared.cache, branch.layer)
                    resid = forward_from(model, shared.resid[branch.layer], branch.layer, attention_mask=mask,
                                         past_kv_cache=own, stop_at_layer=model.cfg.n_layers)
                else:  # no residual to resume from (see can_branch): the branch prefills in full
                    own = _empty_cache(model, n_rows)
                    resid = model(tokens, attention_mask=mask, past_kv_cache=own, stop_at_layer=model.cfg.n_layers)
            firsts.append(final_logits(model, resid[:, -1]))
            caches.append(own)
    cache = _stack_caches(caches)
    with model.hooks(fwd_hooks=_row_hooks(branches, n_rows)):
        new = decode(model, torch.cat(firsts), cache, prompt_len, max_new_tokens=max_new_tokens,
                     temperature=temperature, seed=seed, stop_at_eos=stop_at_eos, progress=progress)
    return [_generations(model, new[b * n_rows : (b + 1) * n_rows], labels, stop_at_eos)
            for b in range(len(branches))]


def _branch_cache(model, shared, layer: int):
    """A cache for a branch at ``layer``: the shared run's keys and values of blocks ``0..layer``, empty
    entries above (the branch fills them), the shared attention mask."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    fresh = _empty_cache(model, shared.previous_attention_mask.shape[0])
    entries = [TransformerLensKeyValueCacheEntry(past_keys=e.past_keys, past_values=e.past_values)
               for e in shared.entries[: layer + 1]] + list(fresh.entries[layer + 1 :])
    return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=shared.previous_attention_mask)


def _stack_caches(caches: Sequence):
    """One cache holding the rows of ``caches`` one after the other (the batch of every branch)."""
    if len(caches) == 1:
        return caches[0]
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    entries = [TransformerLensKeyValueCacheEntry(past_keys=torch.cat([c.entries[k].past_keys for c in caches]),
                                                 past_values=torch.cat([c.entries[k].past_values for c in caches]))
               for k in range(len(caches[0].entries))]
    return TransformerLensKeyValueCache(entries=entries,
                                        previous_attention_mask=torch.cat([c.previous_attention_mask for c in caches]))
