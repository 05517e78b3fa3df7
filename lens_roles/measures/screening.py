"""Projection monitoring and data screening (after "Persona vectors", Chen et al. 2025).

* :func:`projection_behaviour` — does the projection at the *last prompt token*
  predict how strongly the reply that follows expresses the persona? Per prompt
  (a contrast pair's user turn, under any system prompt), the projection on
  ``v̂_layer`` at the last token before the reply and the persona margin
  (:func:`~lens_roles.measures.behaviour.logprob_margin` of the positive reply over
  the negative one), from one forward per reply; :func:`correlation` gives Pearson's
  r with a percentile-bootstrap interval over prompts.
* :func:`screen` — rank ``(prompt, response)`` records by how far the response's
  mean projection sits from that of the model's *own* response to the same prompt
  (``projection(response) − projection(own)``), largest first: the records that would
  push a model most along the direction if trained on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import PairSet, Prompt
from lens_roles.interventions.steering import check_direction
from lens_roles.measures.behaviour import direction_projection, logprob_margin, reply_logprob, reply_logprobs
from lens_roles.measures.statistics import bootstrap_indices, pearson, percentile_interval
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.generation import generate


@torch.no_grad()
def projection_behaviour(model, pairs: PairSet, direction: Direction, layer: int, *,
                         systems: Sequence[str | None] = (None,), batch_size: int = 8,
                         template: str | None = None) -> pd.DataFrame:
    """Per pair and system prompt: the last-prompt-token projection and the persona margin of the reply.

    Every pair is read once per entry of ``systems`` (None: no system prompt), so
    the prompts differ in how much they elicit the persona. Returns
    ``pair, system, projection, margin, positive, negative`` (mean log-probabilities
    per reply token).
    """
    check_direction(model, direction, [layer])
    last = model.cfg.n_layers - 1
    prompts = [Prompt(p.user, system, reply) for system in systems for p in pairs
               for reply in (p.positive, p.negative)]
    items = encode(model, prompts, template=template)
    proj = torch.empty(len(items), dtype=torch.float64)
    score = torch.empty(len(items), dtype=torch.float64)
    for batch in token_batches(model, [it.tokens for it in items], batch_size):
        with capture(model, sorted({layer, last})) as cap_:
            batch.forward(model, stop_at_layer=last + 1)
        for row, i in enumerate(batch.index):
            start, stop = items[i].reply
            proj[i] = float(direction_projection(cap_[layer][row, start - 1], direction, layer))
            logp = reply_logprobs(model, cap_[last][row], (start, stop))
            score[i] = float(reply_logprob(logp, items[i].tokens[start:stop]))
    rows = []
    n = len(pairs)
    for s, system in enumerate(systems):
        for j in range(n):
            i = 2 * (s * n + j)
            rows.append({"pair": j, "system": system or "", "projection": float(proj[i]),
                         "margin": float(logprob_margin(score[i], score[i + 1])),
                         "positive": float(score[i]), "negative": float(score[i + 1])})
    return pd.DataFrame(rows)


def correlation(x, y, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Pearson's r of ``x`` and ``y`` with a percentile-bootstrap interval over items (pairs resampled together).

    Returns ``{"r", "low", "high", "n"}``.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise DataError(f"a correlation needs two samples of the same size >= 3, got {x.shape} and {y.shape}")
    draws = [pearson(x[idx], y[idx]) for idx in bootstrap_indices(len(x), n_boot, seed)]
    draws = [d for d in draws if d == d]  # resamples of one repeated item have no correlation
    lo, hi = percentile_interval(draws, level)
    return {"r": pearson(x, y), "low": lo, "high": hi, "n": len(x)}


@torch.no_grad()
def mean_reply_projection(model, prompts: Sequence[Prompt], direction: Direction, layer: int, *,
                          batch_size: int = 8, template: str | None = None) -> np.ndarray:
    """Per prompt (each with a reply), the mean projection on ``v̂_layer`` over the reply's tokens ``[prompt]``."""
    items = encode(model, list(prompts), template=template)
    out = np.empty(len(items))
    for i, it in enumerate(items):
        if it.reply is None or it.reply[0] == it.reply[1]:
            raise DataError(f"prompt {i} ({prompts[i].user[:40]!r}) has no reply tokens to project")
    for batch in token_batches(model, [it.tokens for it in items], batch_size):
        with capture(model, [layer]) as cap_:
            batch.forward(model, stop_at_layer=layer + 1)
        for row, i in enumerate(batch.index):
            a, b = items[i].reply
            out[i] = float(direction_projection(cap_[layer][row, a:b], direction, layer).double().mean())
    return out


def screen(model, records: Sequence[tuple[str, str]], direction: Direction, layer: int, *,
           own: Sequence[str] | None = None, max_new_tokens: int = 48, batch_size: int = 8,
           template: str | None = None) -> pd.DataFrame:
    """Rank ``(prompt, response)`` records by ``projection(response) − projection(model's own response)``.

    The model's own response is its greedy reply to the prompt (or ``own``, one per
    record, when given); both are read as the reply after the chat-templated prompt,
    averaged over their tokens at ``layer``. Returns the records sorted by ``score``,
    largest first, with ``rank`` (1 = furthest along the direction),
    ``record, prompt, response, own_response, projection, own_projection, score``.

    Raises:
        DirectionError: a direction of another width or without ``layer`` (before anything runs).
        DataError: no records, or ``own`` of another length.
    """
    check_direction(model, direction, [layer])
    records = list(records)
    if not records:
        raise DataError("no records to screen")
    if own is None:
        gens = []
        for start in range(0, len(records), batch_size):
            gens += generate(model, [p for p, _ in records[start : start + batch_size]],
                             max_new_tokens=max_new_tokens, template=template)
        own = [g.text.strip() or "…" for g in gens]
    own = list(own)
    if len(own) != len(records):
        raise DataError(f"{len(own)} own responses for {len(records)} records")
    given = mean_reply_projection(model, [Prompt(p, reply=r) for p, r in records], direction, layer,
                                  batch_size=batch_size, template=template)
    mine = mean_reply_projection(model, [Prompt(p, reply=r) for (p, _), r in zip(records, own)], direction, layer,
                                 batch_size=batch_size, template=template)
    frame = pd.DataFrame({"record": range(len(records)), "prompt": [p for p, _ in records],
                          "response": [r for _, r in records], "own_response": own,
                          "projection": given, "own_projection": mine, "score": given - mine})
    frame = frame.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    frame.insert(0, "rank", range(1, len(frame) + 1))
    return frame


__all__ = ["projection_behaviour", "correlation", "mean_reply_projection", "screen"]
