"""Persona drift: a conversation's projection on a direction, per token and per assistant turn.

For a multi-turn conversation (:mod:`lens_roles.inputs.conversations`), rendered with
the chat template, one forward records ``blocks.{l}.hook_resid_post`` at the chosen
layers (:mod:`lens_roles.runtime.capture`) and projects every token on ``v̂_l``
(:func:`~lens_roles.measures.behaviour.direction_projection`): a
:class:`DriftTrace`. Its per-turn table averages the projection over each assistant
message's content tokens; *drift* is the change from the first to the last
assistant turn (:func:`drift_summary`), summarised per category with bootstrap
intervals (:func:`drift_table`). With the assistant axis (default assistant minus
role-play), negative drift means moving away from the assistant.

:func:`self_play` lets the model write the assistant side itself, turn by turn
against the scripted user turns (greedy or seeded sampling), so drift is measured
on its own replies. :func:`cap_cost` measures what activation capping
(:func:`~lens_roles.interventions.steering.cap`) costs on ordinary replies:
next-token KL to the uncapped model and the replies' perplexity, both with and
without the cap.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.conversations import Conversation, Message, encode_conversation
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import as_prompts
from lens_roles.interventions.steering import cap, check_direction
from lens_roles.measures.behaviour import direction_projection, reply_logprobs
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.generation import generate_from_tokens
from lens_roles.runtime.models import model_id
from lens_roles.runtime.readout import kl_divergence


@dataclass(frozen=True, eq=False)
class DriftTrace:
    """One conversation's projection on a direction at every token.

    Attributes:
        conversation: the conversation read.
        token_ids: the rendered conversation's tokens.
        tokens: each token as text.
        message: per token, the index of the message holding it (-1: template tokens).
        layers: the layers read, in the order of ``projections``' first axis.
        projections: ``[layer, pos]`` float32: ``resid_post · v̂_layer`` at each token.
        meta: model, direction, template.
    """

    conversation: Conversation
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    message: tuple[int, ...]
    layers: tuple[int, ...]
    projections: Float[Tensor, "layer pos"]
    meta: dict = field(default_factory=dict)

    def turns(self) -> pd.DataFrame:
        """Per layer and message, the mean projection over the message's tokens.

        Columns ``conversation, category, layer, message, role, turn, projection, n_tokens``;
        ``turn`` numbers the exchanges 0, 1, …: an assistant reply and the user (and
        system) messages before it share its turn.
        """
        owner = torch.tensor(self.message)
        rows = []
        turn = 0
        for k, m in enumerate(self.conversation.messages):
            sel = owner == k
            n = int(sel.sum())
            for li, layer in enumerate(self.layers):
                rows.append({"conversation": self.conversation.id, "category": self.conversation.category,
                             "layer": layer, "message": k, "role": m.role, "turn": turn,
                             "projection": float(self.projections[li, sel].double().mean()) if n else float("nan"),
                             "n_tokens": n})
            turn += m.role == "assistant"
        return pd.DataFrame(rows)

    def assistant_turns(self, layer: int | None = None) -> pd.DataFrame:
        """:meth:`turns` restricted to the assistant messages (and to ``layer`` when given)."""
        frame = self.turns()
        frame = frame[frame.role == "assistant"]
        if layer is not None:
            frame = frame[frame.layer == layer]
        return frame.reset_index(drop=True)

    def token_frame(self, layer: int) -> pd.DataFrame:
        """Per token at ``layer``: ``pos, token, message, role, projection``."""
        li = self._layer_index(layer)
        roles = [self.conversation.messages[k].role if k >= 0 else "template" for k in self.message]
        return pd.DataFrame({"pos": range(len(self.tokens)), "token": self.tokens, "message": self.message,
                             "role": roles, "projection": self.projections[li].double().numpy()})

    def _layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise DataError(f"layer {layer} was not read (read: {list(self.layers)})")
        return self.layers.index(layer)


@torch.no_grad()
def drift_traces(model, conversations: Sequence[Conversation], direction: Direction, *, layers=None,
                 template: str | None = None, batch_size: int = 4) -> list[DriftTrace]:
    """:class:`DriftTrace` of each conversation: one right-padded forward per batch, up to the deepest layer.

    Raises:
        DirectionError: a direction of another model width or without a chosen layer
            — before anything runs.
        DataError: no conversations, or one longer than the model's context.
    """
    layers = check_direction(model, direction, layers)
    conversations = list(conversations)
    if not conversations:
        raise DataError("no conversations given")
    encoded = [encode_conversation(model, c, template=template) for c in conversations]
    out: list[DriftTrace | None] = [None] * len(encoded)

    def project(acts, weights, layer):
        return direction_projection(acts, direction, layer).float().cpu()  # [batch, pos]

    for batch in token_batches(model, [e.tokens for e in encoded], batch_size):
        with capture(model, layers, project) as cap_:
            batch.forward(model, stop_at_layer=cap_.stop_at_layer)
        stacked = cap_.stacked()  # [layer, batch, pos]
        for row, i in enumerate(batch.index):
            e = encoded[i]
            n = batch.lengths[row]
            out[i] = DriftTrace(conversations[i], e.tokens, tuple(model.tokenizer.decode([t]) for t in e.tokens),
                                tuple(e.message_of_token()), tuple(layers), stacked[:, row, :n].clone(),
                                {"model": model_id(model), "direction": direction.meta.get("name"),
                                 "direction_method": direction.meta.get("method"), "template": template})
    return out


def drift_summary(traces: Sequence[DriftTrace], layer: int) -> pd.DataFrame:
    """Per conversation at ``layer``: ``conversation, category, first, last, change, n_turns``.

    ``first``/``last`` are the mean projections of the first and last assistant turns;
    ``change = last − first`` (negative along the assistant axis: drifting away from it).
    """
    rows = []
    for t in traces:
        turns = t.assistant_turns(layer)
        if len(turns) < 2:
            raise DataError(f"conversation {t.conversation.id!r} has {len(turns)} assistant turn(s); drift needs two")
        first, last = float(turns.projection.iloc[0]), float(turns.projection.iloc[-1])
        rows.append({"conversation": t.conversation.id, "category": t.conversation.category, "layer": layer,
                     "first": first, "last": last, "change": last - first, "n_turns": len(turns)})
    return pd.DataFrame(rows)


def drift_table(summary: pd.DataFrame, *, value: str = "change", n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> pd.DataFrame:
    """Per category (and ``condition`` when the frame has one): mean of ``value`` with a percentile-bootstrap
    interval over conversations. Columns ``[condition,] category, n, mean, low, high``."""
    keys = [k for k in ("condition", "category") if k in summary.columns]
    rng = np.random.default_rng(seed)
    rows = []
    for key, group in summary.groupby(keys, sort=False):
        vals = group[value].to_numpy(float)
        mean, lo, hi = bootstrap_mean(vals, bootstrap_indices(len(vals), n_boot, rng), level)
        rec = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        rows.append({**rec, "n": len(vals), "mean": mean, "low": lo, "high": hi})
    return pd.DataFrame(rows)


@torch.no_grad()
def self_play(model, conversations: Sequence[Conversation], *, max_new_tokens: int = 48,
              temperature: float = 0.0, seed: int = 0, template: str | None = None,
              batch_size: int = 8) -> list[Conversation]:
    """The conversations with every assistant message written by the model itself.

    Turn by turn: the context so far (system, scripted user turns, the model's own
    earlier replies) ends in the assistant header and is continued by
    :func:`~lens_roles.runtime.generation.generate_from_tokens` (greedy, or sampled
    with ``seed``; turn ``k`` of a batch uses ``seed + k``). Conversations are
    batched per turn. Interventions around the call (e.g. :func:`cap`) act on the
    generation. A reply that comes out empty is written as ``"…"`` (so the
    conversation stays valid) and ``meta`` of nothing else changes.
    """
    convs = list(conversations)
    if not convs:
        raise DataError("no conversations given")
    users = [[i for i, m in enumerate(c.messages) if m.role == "user"] for c in convs]
    done: list[list[Message]] = [[c.messages[0]] if c.system is not None else [] for c in convs]
    for k in range(max(len(u) for u in users)):
        active = [i for i, u in enumerate(users) if k < len(u)]
        for start in range(0, len(active), batch_size):
            chunk = active[start : start + batch_size]
            rows = []
            for i in chunk:
                done[i].append(convs[i].messages[users[i][k]])
                partial = replace(convs[i], messages=tuple(done[i]))
                rows.append(encode_conversation(model, partial, template=template, generation_prompt=True).tokens)
            outs = generate_from_tokens(model, rows, labels=[convs[i].id for i in chunk],
                                        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + k)
            for i, g in zip(chunk, outs):
                done[i].append(Message("assistant", g.text.strip() or "…"))
    return [replace(c, messages=tuple(m), source=f"{c.source or c.id} (self-play)") for c, m in zip(convs, done)]


@torch.no_grad()
def cap_cost(model, prompts, direction: Direction, bounds, *, layers=None, batch_size: int = 8,
             template: str | None = None) -> dict:
    """What capping costs on ordinary replies: KL to the uncapped model, perplexity, share of tokens capped.

    ``prompts`` carry replies (e.g. the model's own answers to ordinary prompts). At
    every position that predicts a reply token: ``kl`` = mean ``KL(uncapped ‖ capped)``
    of the next-token distribution; ``ppl_uncapped`` / ``ppl_capped`` = the replies'
    perplexity without / with the cap; ``capped_share`` = fraction of reply tokens
    whose projection lay outside the range at the first capped layer.
    """
    layers = check_direction(model, direction, layers)
    plist = as_prompts(prompts)
    items = encode(model, plist, template=template)
    pos = select_positions(items, "reply")
    last = model.cfg.n_layers - 1
    kls, lp_base, lp_cap, outside, count = [], [], [], 0, 0
    first = layers[0]
    bounds_first = bounds[first] if isinstance(bounds, dict) else bounds
    lo = -float("inf") if bounds_first[0] is None else bounds_first[0]
    hi = float("inf") if bounds_first[1] is None else bounds_first[1]
    for batch in token_batches(model, [it.tokens for it in items], batch_size):
        runs = {}
        for kind in ("base", "capped"):
            with contextlib.ExitStack() as stack:
                if kind == "capped":  # the cap outside the capture: the capture sees the capped stream
                    stack.enter_context(cap(model, direction, bounds, layers=layers))
                cap_ = stack.enter_context(capture(model, sorted({last, first})))
                batch.forward(model, stop_at_layer=last + 1)
            runs[kind] = (cap_[last], cap_[first])
        for row, i in enumerate(batch.index):
            span = (pos[i][0], pos[i][-1] + 1)
            target = torch.tensor(items[i].tokens[span[0]:span[1]], device=model.cfg.device)
            lb = reply_logprobs(model, runs["base"][0][row], span)
            lc = reply_logprobs(model, runs["capped"][0][row], span)
            kls.append(kl_divergence(lb, lc).double().cpu())
            lp_base.append(lb.gather(-1, target[:, None])[:, 0].double().cpu())
            lp_cap.append(lc.gather(-1, target[:, None])[:, 0].double().cpu())
            proj = direction_projection(runs["base"][1][row, span[0]:span[1]], direction, first)
            outside += int(((proj < lo) | (proj > hi)).sum())
            count += span[1] - span[0]
    kl, base, capped = torch.cat(kls), torch.cat(lp_base), torch.cat(lp_cap)
    return {"kl": float(kl.mean()), "ppl_uncapped": float((-base.mean()).exp()),
            "ppl_capped": float((-capped.mean()).exp()), "capped_share": outside / max(count, 1),
            "n_tokens": count}


__all__ = ["DriftTrace", "drift_traces", "drift_summary", "drift_table", "self_play", "cap_cost"]
