"""Clean and corrupt inputs: text, prompts or token ids, and aligning two prompts to one length."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence, Union

from torch import Tensor

from lens_roles.analysis.patching.metrics import _token_ids
from lens_roles.errors import PatchingError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import Prompt

#: What a clean or corrupt input may be: user text, a Prompt, or token ids.
PromptLike = Union[str, Prompt, Sequence[int], Tensor]


def _as_prompt(x, which: str) -> Prompt | None:
    if isinstance(x, str):
        return Prompt(x)
    if isinstance(x, Prompt):
        return x
    return None


def _ids_of(model, x, which: str, template, prepend_bos) -> list[int]:
    prompt = _as_prompt(x, which)
    if prompt is not None:
        return list(encode(model, [prompt], template=template, prepend_bos=prepend_bos)[0].tokens)
    if isinstance(x, Tensor):
        if x.ndim == 2 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 1:
            raise PatchingError(f"{which} token ids must be one sequence [pos], got shape {tuple(x.shape)}")
        x = x.tolist()
    try:
        ids = [int(t) for t in x]
    except (TypeError, ValueError):
        raise PatchingError(f"{which} must be text, a Prompt or token ids, got {type(x).__name__}") from None
    if not ids:
        raise PatchingError(f"{which} has no tokens")
    return _token_ids(model, ids, which)


def _str_tokens(model, ids: Sequence[int]) -> tuple[str, ...]:
    if model.tokenizer is None:
        return tuple(str(t) for t in ids)
    return tuple(model.tokenizer.decode([t]) for t in ids)


def _differing_field(a: Prompt, b: Prompt, short: Prompt) -> str:
    """The prompt field to pad: the first one that differs and is set on the shorter prompt."""
    for name in ("system", "user", "reply"):
        if getattr(a, name) != getattr(b, name) and getattr(short, name) is not None:
            return name
    return "user"


def align_prompts(model, clean: str | Prompt, corrupt: str | Prompt, *, filler: str = " .",
                  template: str | None = None, prepend_bos: bool | None = None,
                  max_filler: int = 64) -> tuple[Prompt, Prompt]:
    """Make two prompts the same token length by appending ``filler`` to the shorter one.

    The filler goes at the end of the field in which the prompts differ (the system
    prompt if that is where they differ, else the user text), so the template tokens
    after it line up position by position. Returns ``(clean, corrupt)`` as Prompts.

    Raises:
        PatchingError: token-id inputs (nothing to pad), or a filler that jumps past
            the target length (try another, e.g. ``" -"``).
    """
    prompts = [_as_prompt(clean, "clean"), _as_prompt(corrupt, "corrupt")]
    if any(p is None for p in prompts):
        raise PatchingError("align_prompts needs text or Prompt inputs, not token ids")
    lengths = [len(encode(model, [p], template=template, prepend_bos=prepend_bos)[0]) for p in prompts]
    if lengths[0] == lengths[1]:
        return prompts[0], prompts[1]
    s = 0 if lengths[0] < lengths[1] else 1
    short, target = prompts[s], lengths[1 - s]
    name = _differing_field(prompts[0], prompts[1], short)
    for k in range(1, max_filler + 1):
        padded = replace(short, **{name: (getattr(short, name) or "") + filler * k})
        n = len(encode(model, [padded], template=template, prepend_bos=prepend_bos)[0])
        if n == target:
            prompts[s] = padded
            return prompts[0], prompts[1]
        if n > target:
            break
    which = ("clean", "corrupt")[s]
    raise PatchingError(
        f"could not align: appending {filler!r} to the {which} prompt's {name} text does not reach exactly "
        f"{target} tokens; pass another filler (e.g. ' -' or ' so') or reword one prompt"
    )
