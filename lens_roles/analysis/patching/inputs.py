"""Clean and corrupt inputs: text, prompts or token ids, and aligning two prompts to one length."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence, Union

from torch import Tensor

from lens_roles.analysis.patching.metrics import token_ids
from lens_roles.errors import PatchingError
from lens_roles.inputs.positions import default_prepend_bos, encode
from lens_roles.inputs.prompts import Prompt, template_name

#: What a clean or corrupt input may be: user text, a Prompt, or token ids.
PromptLike = Union[str, Prompt, Sequence[int], Tensor]


def as_prompt(x) -> Prompt | None:
    """``x`` as a :class:`Prompt` when it is text or a Prompt; None when it is token ids."""
    if isinstance(x, str):
        return Prompt(x)
    if isinstance(x, Prompt):
        return x
    return None


def input_ids(model, x: PromptLike, which: str, template, prepend_bos) -> list[int]:
    """Token ids of a clean or corrupt input (rendered with ``template`` when it is text or a Prompt)."""
    prompt = as_prompt(x)
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
    return token_ids(model, ids, which)


def str_tokens(model, ids: Sequence[int]) -> tuple[str, ...]:
    """Each token as text (its id as text when the model has no tokenizer), for labels and messages."""
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
    prompts = [as_prompt(clean), as_prompt(corrupt)]
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


@dataclass(frozen=True)
class PatchInputs:
    """A clean and a corrupt input, tokenised to the same length.

    Attributes:
        clean_ids, corrupt_ids: token ids ``[pos]`` (equal lengths).
        tokens, corrupt_tokens: the same as text, one entry per token.
        template, prepend_bos: how text inputs were rendered.
        aligned_with: the filler appended to make the lengths match, or None.
        described: ``{"clean": ..., "corrupt": ...}`` for provenance (the prompt's fields, or ``"token ids"``).
    """

    clean_ids: tuple[int, ...]
    corrupt_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    corrupt_tokens: tuple[str, ...]
    template: str | None
    prepend_bos: bool | None
    aligned_with: str | None
    described: dict

    def __len__(self) -> int:
        return len(self.clean_ids)


def _describe(x) -> dict | str:
    p = as_prompt(x)
    return {"system": p.system, "user": p.user, "reply": p.reply} if p is not None else "token ids"


def _length_error(clean_ids, corrupt_ids, tokens, corrupt_tokens, filler: str, text: bool) -> PatchingError:
    first = next((i for i, (a, b) in enumerate(zip(clean_ids, corrupt_ids)) if a != b),
                 min(len(clean_ids), len(corrupt_ids)))
    fix = (f"pass align=True (CLI: --align), which appends {filler!r} to the shorter prompt's differing text "
           "until the lengths match (lens_roles.analysis.patching.align_prompts), or reword one prompt" if text else
           "pad or cut the token ids to one length (align=True only works on text and Prompt inputs)")
    return PatchingError(
        f"clean and corrupt prompts have different token lengths: clean {len(clean_ids)} tokens "
        f"{list(tokens)}, corrupt {len(corrupt_ids)} tokens {list(corrupt_tokens)} (they first differ "
        f"at position {first}). Patching swaps activations position by position, so the two runs must line up "
        f"token for token. Fix: {fix}"
    )


def encode_inputs(model, clean: PromptLike, corrupt: PromptLike, *, align: bool = False, filler: str = " .",
                  template: str | None = None, prepend_bos: bool | None = None) -> PatchInputs:
    """Tokenise a clean and a corrupt input to one length.

    Text and :class:`Prompt` inputs are rendered with the chat template (default:
    the model's); with ``align`` the shorter one is padded with ``filler``
    (:func:`align_prompts`).

    Raises:
        PatchingError: different token lengths (naming both token lists and how to
            align them), or an input that is neither text, a Prompt nor token ids.
    """
    if model.tokenizer is not None:
        template = template or template_name(model.tokenizer)
        if prepend_bos is None:
            prepend_bos = default_prepend_bos(model, template)
    aligned = False
    if align and as_prompt(clean) is not None and as_prompt(corrupt) is not None:
        new = align_prompts(model, clean, corrupt, filler=filler, template=template, prepend_bos=prepend_bos)
        aligned = new != (as_prompt(clean), as_prompt(corrupt))
        clean, corrupt = new
    clean_ids = input_ids(model, clean, "clean", template, prepend_bos)
    corrupt_ids = input_ids(model, corrupt, "corrupt", template, prepend_bos)
    tokens, corrupt_tokens = str_tokens(model, clean_ids), str_tokens(model, corrupt_ids)
    if len(clean_ids) != len(corrupt_ids):
        text = as_prompt(clean) is not None and as_prompt(corrupt) is not None
        raise _length_error(clean_ids, corrupt_ids, tokens, corrupt_tokens, filler, text)
    return PatchInputs(tuple(clean_ids), tuple(corrupt_ids), tokens, corrupt_tokens, template, prepend_bos,
                       filler if aligned else None, {"clean": _describe(clean), "corrupt": _describe(corrupt)})
