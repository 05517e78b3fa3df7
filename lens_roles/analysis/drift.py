"""Explaining persona drift with activation patching: which earlier turns, tokens and layers carry it.

A conversation's projection at assistant turn ``t`` (mean over the reply's tokens of
``resid_post · v̂`` after the read layer) differs from what the same turn would give
without the conversation before it. To see where that difference comes from:

* **clean** = the conversation up to the end of turn ``t``;
* **corrupt** = the same tokens with the *content* of every earlier user and
  assistant message replaced by a filler token (``"."``), so that template tokens,
  turn ``t``'s own user message and reply, and every position line up token for token;
* the metric is :class:`SpanProjection`, the mean projection over turn ``t``'s reply.

Reusing :class:`~lens_roles.analysis.patching.PatchSetup` (normalised 0 = corrupt,
1 = clean), :func:`explain_drift` patches the clean residual stream entering
layer ``l`` (``blocks.{l}.hook_resid_pre``) at all tokens of one earlier message into
the corrupt run: a **turns × layers** grid. A message whose cells stay near 1 up
to some layer and fall after it carries the drift by its own tokens until then
(the later layers have moved it on into later positions); the layer where a row
fades is where attention reads it out. Optionally attribution patching over the
``resid`` grid gives the token-level picture (layers × positions) from one
backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from lens_roles.analysis.patching.grids import get_grid
from lens_roles.analysis.patching.metrics import Metric, token_ids
from lens_roles.analysis.patching.result import PatchResult
from lens_roles.analysis.patching.runs import PatchSetup
from lens_roles.directions.direction import Direction
from lens_roles.errors import PatchingError
from lens_roles.inputs.conversations import Conversation, encode_conversation
from lens_roles.interventions.steering import check_direction
from lens_roles.measures.behaviour import direction_projection, projection_label
from lens_roles.runtime.models import validate_layers


@dataclass(frozen=True, eq=False)
class SpanProjection(Metric):
    """Mean projection on ``v̂_layer`` after block ``layer`` over the prompt positions ``span = (start, stop)``."""

    direction: Direction
    layer: int
    span: tuple[int, int]
    kind: ClassVar[str] = "span_projection"

    def read_layer(self, model) -> int:
        check_direction(model, self.direction, [self.layer])
        return validate_layers(model, self.layer)[0]

    def read_position(self, n_prompt: int) -> int:
        start, stop = self.span
        if not 0 <= start < stop <= n_prompt:
            raise PatchingError(f"span {self.span} is not a non-empty span of the prompt's {n_prompt} tokens")
        return stop - 1

    @property
    def label(self) -> str:
        return f"mean {projection_label(self.direction, self.layer)} over tokens {self.span[0]}..{self.span[1] - 1}"

    def describe(self) -> dict:
        return {"kind": self.kind, "label": self.label, "direction": self.direction.meta.get("name"),
                "layer": self.layer, "span": list(self.span)}

    def __call__(self, model, resid, n_prompt):
        start, stop = self.span
        return direction_projection(resid[:, start:stop], self.direction, self.layer).mean(-1)


@dataclass(frozen=True, eq=False)
class DriftExplanation:
    """Where the projection of one assistant turn comes from.

    Attributes:
        grid: tidy ``message, role, turn, label, layer, value, n_tokens`` rows: the
            normalised effect (0 = earlier turns blanked, 1 = full conversation) of
            patching one earlier message's tokens (``label == "all earlier"``: all of
            them) at the residual stream entering ``layer``.
        tokens: attribution patching over ``resid`` (layers × positions), or None.
        clean_value, corrupt_value: the turn's mean projection with the full
            conversation and with the earlier turns blanked.
        turn: the assistant turn explained (index into the assistant turns).
        message_spans: token span of every message of the clean run.
        meta: the patch setup's provenance, plus the filler.
    """

    grid: pd.DataFrame
    tokens: PatchResult | None
    clean_value: float
    corrupt_value: float
    turn: int
    message_spans: tuple[tuple[int, int], ...]
    meta: dict

    def by_message(self) -> pd.DataFrame:
        """The grid as a ``label × layer`` table of values (rows in conversation order)."""
        order = list(dict.fromkeys(self.grid.label))
        table = self.grid.pivot(index="label", columns="layer", values="value")
        return table.loc[order]


def explain_drift(model, conversation: Conversation, direction: Direction, layer: int, *, turn: int = -1,
                  layers=None, filler: str = ".", attribution: bool = True,
                  template: str | None = None) -> DriftExplanation:
    """Patch earlier messages × layers into the blanked-context run of assistant turn ``turn`` (see the module docs).

    Args:
        layer: the layer whose projection is explained (the metric's read layer).
        turn: which assistant turn (index into the assistant turns; -1: the last); it
            needs at least one earlier message to blank.
        layers: layers of the grid (default: 0 .. ``layer``).
        filler: the single token that replaces earlier message content.
        attribution: also run attribution patching over layers × positions.

    Raises:
        DirectionError: a direction of another width or without ``layer``.
        PatchingError: a turn with nothing before it, a filler that is not one token,
            or a turn whose projection does not depend on the earlier turns at all.
    """
    check_direction(model, direction, [layer])
    enc = encode_conversation(model, conversation, template=template)
    turns = conversation.turns()
    if not -len(turns) <= turn < len(turns):
        raise PatchingError(f"turn {turn} is out of range: conversation {conversation.id!r} has {len(turns)} "
                            "assistant turns")
    turn %= len(turns)
    target = turns[turn]
    earlier = [k for k in range(target - 1) if conversation.messages[k].role != "system"]
    if not earlier:
        raise PatchingError(f"assistant turn {turn} of {conversation.id!r} has no earlier user or assistant "
                            "message to blank; explain a later turn")
    fill = token_ids(model, filler, "filler")
    if len(fill) != 1:
        raise PatchingError(f"filler {filler!r} is {len(fill)} tokens; pass a single token (e.g. '.')")
    span = enc.spans[target]
    clean = list(enc.tokens[: span[1]])
    corrupt = list(clean)
    for k in earlier:
        a, b = enc.spans[k]
        corrupt[a:b] = fill * (b - a)
    metric = SpanProjection(direction, layer, span)
    setup = PatchSetup(model, clean, corrupt, metric, meta={"conversation": conversation.id, "turn": turn,
                                                            "filler": filler, "blanked_messages": earlier})
    layers = tuple(range(layer + 1)) if layers is None else validate_layers(model, layers)
    late = [lay for lay in layers if lay > layer]
    if late:
        raise PatchingError(f"layers {late} come after the read layer {layer}; the projection cannot depend on them")
    hook = get_grid("resid").hook
    rows = []
    groups = [(k, conversation.messages[k].role, list(range(*enc.spans[k]))) for k in earlier]
    groups.append((-1, "all", [p for k in earlier for p in range(*enc.spans[k])]))
    user_turn = {k: sum(m.role == "assistant" for m in conversation.messages[:k]) for k in earlier}
    for k, role, positions in groups:
        label = "all earlier" if k < 0 else f"{user_turn[k]}:{role} (msg {k})"
        for lay in layers:
            value = setup.patch({hook.format(layer=lay): positions})
            rows.append({"message": k, "role": role, "turn": user_turn.get(k, -1), "label": label, "layer": lay,
                         "value": value, "n_tokens": len(positions)})
    tokens = setup.attribution_patch("resid", layers=list(layers)) if attribution else None
    return DriftExplanation(pd.DataFrame(rows), tokens, setup.clean_value, setup.corrupt_value, turn,
                            enc.spans[: target + 1], dict(setup.meta))


__all__ = ["SpanProjection", "DriftExplanation", "explain_drift"]
