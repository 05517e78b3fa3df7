"""Tokenising rendered prompts, and choosing which token positions are read.

A prompt is rendered (``prompts.render``) and tokenised once into an
:class:`Encoded` item that knows the token spans of the instruction, of the
end-of-instruction template tokens and of the reply. A *position rule* then picks
token indices from each item:

============  ==============================================================
``"last"``    the final token of the text (the last reply token if there is a
              reply, else the last token of the generation prompt)
``"eoi"``     the end-of-instruction span: template tokens after the user's
              text up to where the reply starts (role-vectors paper)
``"reply"``   every token of the assistant reply (persona vectors)
``"user"``    every token of the user's instruction
``"all"``     every token
explicit      a sequence with one entry per prompt: a list of token indices,
              or a boolean mask as long as that prompt's tokens
============  ==============================================================

Positions are indices into each prompt's own (unpadded) token list, so they are
unaffected by how prompts are later padded into batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from lens_roles.errors import DataError
from lens_roles.inputs.prompts import Prompt, Rendered, render, template_name

NAMED_RULES = ("last", "eoi", "reply", "user", "all")
PositionRule = Union[str, Sequence[Sequence[int]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Encoded:
    """One tokenised prompt with the token spans ``[start, end)`` of its parts."""

    tokens: tuple[int, ...]
    user: tuple[int, int]
    eoi: tuple[int, int]
    reply: tuple[int, int] | None

    def __len__(self) -> int:
        return len(self.tokens)


def _token_starts(text: str, offsets: list[tuple[int, int]]) -> list[int | None]:
    """Where each token's first non-whitespace character is (None for empty tokens).

    BPE tokenizers glue a separating space to the next word (``" to"``); such a
    token belongs to the span its word is in, not to the space before it.
    """
    starts = []
    for s, e in offsets:
        if e <= s:
            starts.append(None)
            continue
        piece = text[s:e]
        stripped = len(piece) - len(piece.lstrip())
        starts.append(s + stripped if stripped < len(piece) else s)
    return starts


def _char_span_to_tokens(starts: list[int | None], span: tuple[int, int]) -> tuple[int, int]:
    """Token range whose (non-whitespace) starts fall inside the character span ``[a, b)``."""
    a, b = span
    idx = [i for i, s in enumerate(starts) if s is not None and a <= s < b]
    if not idx:
        return (0, 0)
    return (idx[0], idx[-1] + 1)


def default_prepend_bos(model, template: str) -> bool:
    """Chat templates bring their own start token; the plain template follows the model."""
    return False if template == "chat" else bool(model.cfg.default_prepend_bos)


def encode(
    model,
    prompts: Sequence[Prompt],
    *,
    template: str | None = None,
    prepend_bos: bool | None = None,
) -> list[Encoded]:
    """Render and tokenise prompts with ``model.tokenizer``.

    Args:
        template: ``"chat"`` or ``"plain"``; default: chat when the tokenizer has one.
        prepend_bos: add the BOS token unless the text already starts with it;
            default: :func:`default_prepend_bos`.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise DataError("the model has no tokenizer, so text prompts cannot be encoded")
    template = template or template_name(tokenizer)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, template)
    for i, prompt in enumerate(prompts):
        check_prompt(prompt, i)
    rendered: list[Rendered] = [render(tokenizer, p, template) for p in prompts]
    batch = tokenizer(
        [r.text for r in rendered], add_special_tokens=False, return_offsets_mapping=True
    )
    bos = tokenizer.bos_token_id
    out = []
    for r, ids, offsets in zip(rendered, batch["input_ids"], batch["offset_mapping"]):
        starts = _token_starts(r.text, [tuple(o) for o in offsets])
        user = _char_span_to_tokens(starts, r.user_span)
        eoi = _char_span_to_tokens(starts, r.eoi_span)
        reply = _char_span_to_tokens(starts, r.reply_span) if r.reply_span else None
        shift = 0
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + list(ids)
            shift = 1
        user, eoi = (user[0] + shift, user[1] + shift), (eoi[0] + shift, eoi[1] + shift)
        reply = (reply[0] + shift, reply[1] + shift) if reply else None
        out.append(Encoded(tuple(ids), user, eoi, reply))
    check_context(model, out, prompts)
    return out


def check_prompt(prompt, index: int) -> None:
    """Refuse anything that is not a :class:`Prompt` of text before it reaches the tokenizer.

    Raises:
        DataError: naming the prompt's index: not a Prompt, a user turn that is not a
            non-empty string, a system prompt or reply that is not a string, or text with
            a lone surrogate (not encodable as UTF-8).
    """
    if not isinstance(prompt, Prompt):
        raise DataError(f"prompt {index} is {type(prompt).__name__} {prompt!r:.40}, not text or a Prompt")
    fields = {"user": prompt.user, "system": prompt.system, "reply": prompt.reply}
    for name, value in fields.items():
        if value is None and name != "user":
            continue
        if not isinstance(value, str) or (name == "user" and not value):
            raise DataError(f"prompt {index}: {name} must be a non-empty string, got {value!r:.40}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"prompt {index}: its {name} holds a lone surrogate, which is not text") from None


def check_context(model, items: Sequence[Encoded], prompts: Sequence[Prompt], extra: int = 0) -> None:
    """Refuse a prompt whose tokens (plus ``extra`` to be generated) exceed the model's context.

    Raises:
        DataError: naming the prompt (index and start of its user text), its length
            and the model's context size — before anything runs.
    """
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if not n_ctx:
        return
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        if len(item) + extra > n_ctx:
            more = f" plus {extra} tokens to generate" if extra else ""
            raise DataError(f"prompt {i} ({prompt.user[:40]!r}…) is {len(item)} tokens{more}, more than "
                            f"{model.cfg.model_name}'s context of {n_ctx} tokens; shorten it")


def select_positions(items: Sequence[Encoded], rule: PositionRule) -> list[list[int]]:
    """Token indices to read for each item under ``rule`` (see the module docs).

    Raises:
        DataError: an unknown rule, a prompt without a reply under ``"reply"``, an
            explicit rule of the wrong length, or a position outside a prompt.
    """
    if isinstance(rule, str):
        if rule not in NAMED_RULES:
            raise DataError(f"unknown position rule {rule!r}; use one of {NAMED_RULES} or explicit indices")
        out = []
        for i, item in enumerate(items):
            if rule == "last":
                idx = [len(item) - 1]
            elif rule == "all":
                idx = list(range(len(item)))
            else:
                span = getattr(item, rule)
                if span is None:
                    raise DataError(f"position rule 'reply' but prompt {i} has no reply")
                idx = list(range(*span))
            if not idx:
                raise DataError(f"position rule {rule!r} selects no token of prompt {i}")
            out.append(idx)
        return out
    if len(rule) != len(items):
        raise DataError(f"explicit positions: {len(rule)} entries for {len(items)} prompts")
    out = []
    for i, (item, entry) in enumerate(zip(items, rule)):
        if not isinstance(entry, torch.Tensor):
            entry = list(entry)
            is_mask = bool(entry) and all(isinstance(x, bool) or type(x).__name__ == "bool_" for x in entry)
            entry = torch.tensor(entry, dtype=torch.bool) if is_mask else entry
        if isinstance(entry, torch.Tensor) and entry.dtype == torch.bool:
            if entry.shape != (len(item),):
                raise DataError(
                    f"explicit mask of prompt {i} has shape {tuple(entry.shape)}, but the prompt has "
                    f"{len(item)} tokens"
                )
            idx = entry.nonzero().flatten().tolist()
        else:
            idx = [int(j) for j in entry]
        bad = [j for j in idx if not -len(item) <= j < len(item)]
        if bad:
            raise DataError(
                f"explicit positions {bad} are outside prompt {i}, which has {len(item)} tokens"
            )
        idx = sorted({j % len(item) for j in idx})
        if not idx:
            raise DataError(f"explicit positions select no token of prompt {i}")
        out.append(idx)
    return out


def rule_name(rule: PositionRule) -> str:
    """How a rule is recorded in provenance."""
    return rule if isinstance(rule, str) else "explicit"
