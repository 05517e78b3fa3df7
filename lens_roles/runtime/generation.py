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
reference the cached path is tested against).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch

from lens_roles.errors import DataError
from lens_roles.inputs.positions import check_context, encode
from lens_roles.inputs.prompts import as_prompts
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.progress import progress_bar


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
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

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
    device = model.cfg.device
    tok = model.tokenizer
    pad = pad_id(model)
    eos = tok.eos_token_id if stop_at_eos else None
    tokens, mask = pad_batch(rows, pad, side="left")
    tokens, mask = tokens.to(device), mask.to(device)
    batch, prompt_len = tokens.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = torch.full((batch, 0), pad, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch) if use_kv_cache else None

    with progress_bar(progress, max_new_tokens, "generate", unit="token") as bar:
        for step in range(max_new_tokens):
            if use_kv_cache:
                if step == 0:
                    inputs, attn, offset = tokens, mask, 0
                else:
                    inputs, attn, offset = new[:, -1:], torch.ones((batch, 1), dtype=torch.long, device=device), \
                        prompt_len + step - 1
                with position_state(PositionState(offset=offset, prompt_len=prompt_len)):
                    logits = model(inputs, attention_mask=attn, past_kv_cache=cache)[:, -1]
            else:
                full = torch.cat([tokens, new], dim=1)
                attn = torch.cat([mask, torch.ones_like(new)], dim=1)
                with position_state(PositionState(offset=0, prompt_len=prompt_len)):
                    logits = model(full, attention_mask=attn)[:, -1]
            logits = logits.float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            new = torch.cat([new, nxt[:, None]], dim=1)
            bar.update(1)
            if eos is not None:
                done |= nxt == eos
                if bool(done.all()):
                    break
    out = []
    for row in range(batch):
        ids = new[row].tolist()
        if eos is not None and eos in ids:
            ids = ids[: ids.index(eos)]
        out.append(Generation(prompt=labels[row], text=tok.decode(ids), tokens=tuple(ids)))
    return out
