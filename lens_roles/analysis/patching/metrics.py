"""Patching metrics: one scalar per run read from the residual stream after a read layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError, PatchingError
from lens_roles.io import to_plain
from lens_roles.measures.behaviour import (
    direction_projection,
    logprob_margin,
    projection_label,
    reply_logprob,
    reply_logprobs,
)
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.readout import final_logits


def _prompt_position(position: int, n_prompt: int, what: str) -> int:
    if not -n_prompt <= position < n_prompt:
        raise PatchingError(f"{what}: position {position} is outside the prompt ({n_prompt} tokens)")
    return position % n_prompt


def token_ids(model, text: str | Sequence[int], what: str) -> list[int]:
    """Token ids of a continuation or token given as text (no special tokens) or as ids, checked
    against the vocabulary."""
    if isinstance(text, str):
        if model.tokenizer is None:
            raise PatchingError(f"{what} is text, but the model has no tokenizer; pass token ids")
        ids = list(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = [int(t) for t in text]
    if not ids:
        raise PatchingError(f"{what} {text!r} has no tokens")
    bad = [t for t in ids if not 0 <= t < model.cfg.d_vocab]
    if bad:
        raise PatchingError(f"{what}: token ids {bad} are outside the vocabulary (d_vocab {model.cfg.d_vocab})")
    return ids


class Metric:
    """A scalar read from a run, one per batch of :meth:`continuations` rows.

    Subclasses say which rows a run has (:meth:`continuations`: token lists appended
    to the prompt, one row each; ``[[]]`` = the prompt alone), where they read
    (:meth:`read_layer`, :meth:`read_position`, the last prompt position that can
    matter), and compute the value from the residual stream after the read layer::

        metric(model, resid [batch·rows, pos, d_model], n_prompt) -> [batch]

    Rows of one run are consecutive in ``resid``.
    """

    kind: ClassVar[str] = "metric"

    def continuations(self, model) -> list[list[int]]:
        return [[]]

    def read_layer(self, model) -> int:
        return model.cfg.n_layers - 1

    def read_position(self, n_prompt: int) -> int:
        return n_prompt - 1

    @property
    def label(self) -> str:
        return self.kind

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label}

    def __call__(self, model, resid: Float[Tensor, "row pos d_model"], n_prompt: int) -> Float[Tensor, " batch"]:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class DirectionProjection(Metric):
    """Projection of the residual stream after block ``layer`` at ``position`` on ``v̂_layer``.

    ``position`` indexes the prompt (``-1``: its last token). In residual units.
    """

    direction: Direction
    layer: int
    position: int = -1
    kind: ClassVar[str] = "projection"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise DirectionError(f"projection layer must be a block index >= 0, got {self.layer!r}")
        self.direction.unit(self.layer)  # raises for a missing layer or a zero vector

    def read_layer(self, model) -> int:
        if self.direction.d_model != model.cfg.d_model:
            raise DirectionError(
                f"direction {self.name!r} has width {self.direction.d_model}, but {model.cfg.model_name} "
                f"has d_model {model.cfg.d_model}"
            )
        return validate_layers(model, self.layer)[0]

    def read_position(self, n_prompt: int) -> int:
        return _prompt_position(self.position, n_prompt, f"{self.label}")

    @property
    def name(self) -> str:
        return str(self.direction.meta.get("name", "direction"))

    @property
    def label(self) -> str:
        return projection_label(self.direction, self.layer)

    def describe(self) -> dict:
        meta = self.direction.meta
        return {"kind": self.kind, "label": self.label, "direction": self.name, "layer": self.layer,
                "position": self.position, "direction_model": meta.get("model"),
                "direction_method": meta.get("method"), "direction_dataset": to_plain(meta.get("dataset"))}

    def __call__(self, model, resid, n_prompt):
        return direction_projection(resid[:, self.read_position(n_prompt)], self.direction, self.layer)


@dataclass(frozen=True)
class LogitDiff(Metric):
    """``logit(token_a) − logit(token_b)`` predicted at ``position`` of the prompt (default: the last).

    Tokens are single tokens, given as text (e.g. ``" Paris"``) or as ids.
    """

    token_a: str | int
    token_b: str | int
    position: int = -1
    kind: ClassVar[str] = "logit_diff"

    def ids(self, model) -> tuple[int, int]:
        out = []
        for which, tok in (("token_a", self.token_a), ("token_b", self.token_b)):
            ids = token_ids(model, [tok] if isinstance(tok, int) else tok, f"LogitDiff {which}")
            if len(ids) != 1:
                pieces = [model.tokenizer.decode([t]) for t in ids]
                raise PatchingError(f"LogitDiff {which} {tok!r} is {len(ids)} tokens {pieces}, not one; "
                                    "pass a single token (or use LogprobMargin for multi-token continuations)")
            out.append(ids[0])
        if out[0] == out[1]:
            raise PatchingError(f"LogitDiff compares token {out[0]} with itself")
        return out[0], out[1]

    def read_position(self, n_prompt: int) -> int:
        return _prompt_position(self.position, n_prompt, self.label)

    @property
    def label(self) -> str:
        return f"logit({self.token_a!r}) − logit({self.token_b!r})"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "token_a": self.token_a, "token_b": self.token_b,
                "position": self.position}

    def __call__(self, model, resid, n_prompt):
        a, b = self.ids(model)
        logits = final_logits(model, resid[:, self.read_position(n_prompt)])  # [batch, vocab]
        return logits[:, a] - logits[:, b]


@dataclass(frozen=True)
class LogprobMargin(Metric):
    """Log-probability margin between two continuations of the prompt.

    ``mean log p(good tokens) − mean log p(bad tokens)`` (``reduce="sum"``: total
    log-probabilities), each continuation scored as its own row after the prompt.
    Continuations are text (tokenised on their own, without special tokens) or ids.
    """

    good: str | tuple[int, ...]
    bad: str | tuple[int, ...]
    reduce: str = "mean"
    kind: ClassVar[str] = "logprob_margin"

    def __post_init__(self):
        if self.reduce not in ("mean", "sum"):
            raise PatchingError(f"LogprobMargin reduce must be 'mean' or 'sum', got {self.reduce!r}")
        if self.good == self.bad:
            raise PatchingError("LogprobMargin: the good and bad continuations are identical")

    def continuations(self, model) -> list[list[int]]:
        return [token_ids(model, self.good, "LogprobMargin good continuation"),
                token_ids(model, self.bad, "LogprobMargin bad continuation")]

    @property
    def label(self) -> str:
        def short(x):
            s = x if isinstance(x, str) else f"<{len(x)} ids>"
            return s if len(s) <= 24 else s[:21] + "…"

        return f"{self.reduce} log p({short(self.good)!r}) − log p({short(self.bad)!r})"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "good": self.good if isinstance(self.good, str) else
                list(self.good), "bad": self.bad if isinstance(self.bad, str) else list(self.bad),
                "reduce": self.reduce}

    def __call__(self, model, resid, n_prompt):
        conts = self.continuations(model)
        scores = [reply_logprob(reply_logprobs(model, resid[r :: len(conts)], (n_prompt, n_prompt + len(ids))), ids,
                                reduce=self.reduce)  # [batch]
                  for r, ids in enumerate(conts)]
        return logprob_margin(scores[0], scores[1])
