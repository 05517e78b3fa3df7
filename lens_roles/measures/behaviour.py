"""Behaviour metrics, one implementation each: every sweep, study and analysis reads them from here.

* **Reply log-prob margin** (persona adherence): :func:`reply_logprobs` reads the
  next-token log-probabilities at the positions that predict a reply's tokens
  (through the one readout, :func:`lens_roles.runtime.readout.logprobs_at`),
  :func:`reply_logprob` takes the reply tokens' mean (or total) log-probability,
  and :func:`logprob_margin` is that of the positive reply minus that of the
  negative one. Used by :func:`~lens_roles.measures.sweeps.adherence_sweep`, the PSR
  comparison and the patching metric ``LogprobMargin``.
* **Coherence of generations**: :func:`generation_perplexity` (of the generated
  tokens under the model as it is when called: the unsteered model) and
  :func:`repetition_rate` (repeated token n-grams), both per generation from
  :func:`generation_coherence` (NaN for an empty generation). Used by
  :func:`~lens_roles.measures.sweeps.generation_sweep` and the PSR comparison.
* **Direction projection**: :func:`direction_projection`, the residual stream's
  component along ``v̂_layer``, with its :func:`projection_label`. Used by the
  patching metric ``DirectionProjection`` and the SAE attribution's ``ProjectionMetric``.

The next-token KL divergence (coherence of a steered forward) lives with the
readout, :func:`lens_roles.runtime.readout.kl_divergence`, because PSR training
(below this layer) uses it too.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.runtime.batching import padded
from lens_roles.runtime.readout import logprobs_at

REDUCTIONS = ("mean", "sum")


def reply_logprobs(model, resid: Float[Tensor, "*batch pos d_model"], span: tuple[int, int]
                   ) -> Float[Tensor, "*batch reply d_vocab"]:
    """Next-token log-probabilities at the positions that predict the reply tokens ``span = (start, stop)``.

    ``resid`` is the final-layer residual stream of the sequences holding the reply
    at positions ``start .. stop-1``; a causal model predicts them from positions
    ``start-1 .. stop-2``, and only those are read out.

    Raises:
        DataError: the span is empty, starts at position 0 (nothing predicts it) or
            runs past the sequence.
    """
    start, stop = span
    if not 1 <= start < stop <= resid.shape[-2]:
        raise DataError(f"reply span {span} is not a non-empty span after position 0 of a sequence of "
                        f"{resid.shape[-2]} positions; pass (start, stop) with 1 <= start < stop <= length")
    return logprobs_at(model, resid[..., start - 1 : stop - 1, :])


def reply_logprob(logp: Float[Tensor, "*batch reply d_vocab"], reply: Sequence[int] | Int[Tensor, " reply"], *,
                  reduce: str = "mean") -> Float[Tensor, " *batch"]:
    """Log-probability of the reply tokens under ``logp`` (from :func:`reply_logprobs`): per-token mean or total.

    ``reduce="mean"`` (persona adherence: replies of different lengths compare per
    token) or ``"sum"`` (the continuation's log-probability).
    """
    if reduce not in REDUCTIONS:
        raise DataError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    target = torch.as_tensor(reply, device=logp.device)
    if target.shape != logp.shape[-2:-1]:
        raise DataError(f"{target.numel()} reply tokens for log-probabilities at {logp.shape[-2]} positions; "
                        "read the log-probabilities with reply_logprobs over the reply's own span")
    lp = logp.gather(-1, target.expand(logp.shape[:-1])[..., None])[..., 0]  # [*batch, reply]
    return lp.mean(-1) if reduce == "mean" else lp.sum(-1)


def logprob_margin(positive: Float[Tensor, " *batch"], negative: Float[Tensor, " *batch"]) -> Float[Tensor, " *batch"]:
    """Persona adherence of each pair: :func:`reply_logprob` of the positive reply minus that of the negative one.

    Averaged over pairs by the callers; positive values mean the model prefers the
    persona's reply.
    """
    return positive - negative


@torch.no_grad()
def generation_perplexity(model, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]]
                          ) -> Float[Tensor, " generation"]:
    """Perplexity of each generation's tokens after its prompt's tokens, under the model as it is now.

    Call it outside any intervention to score steered generations under the
    unsteered model. All sequences go through one right-padded forward, and only the
    positions that predict generated tokens are unembedded (:func:`reply_logprobs`);
    ``exp(−mean log p)`` over the generated tokens, float64 on the CPU; NaN for an
    empty generation (nothing to score).
    """
    if len(prompts) != len(generations):
        raise DataError(f"{len(prompts)} prompts for {len(generations)} generations; pass one prompt per generation")
    full = [list(p) + list(g) for p, g in zip(prompts, generations)]
    resid = padded(model, full).forward(model, stop_at_layer=model.cfg.n_layers)  # [generation, pos, d_model]
    out = torch.full((len(full),), float("nan"), dtype=torch.float64)
    for r, (p, g) in enumerate(zip(prompts, generations)):
        if len(g):  # only the positions that predict generated tokens are unembedded
            logp = reply_logprobs(model, resid[r], (len(p), len(p) + len(g))).cpu()
            out[r] = float((-reply_logprob(logp, list(g)).double()).exp())
    return out


def generation_coherence(model, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]]
                         ) -> Float[Tensor, "generation 2"]:
    """``(perplexity, repetition)`` of each generation: :func:`generation_perplexity` and :func:`repetition_rate`.

    Float64; an empty generation (the model stopped at once) has nothing to score
    and gets NaN in both columns, so that averages over generations
    (``nanmean``) leave it out rather than counting it as perfectly coherent.
    """
    ppl = generation_perplexity(model, prompts, generations)
    rep = torch.tensor([repetition_rate(g) if len(g) else float("nan") for g in generations], dtype=torch.float64)
    return torch.stack([ppl, rep], dim=-1)


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Fraction of token n-grams that already occurred earlier in the sequence (0 when there are none)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def direction_projection(resid: Float[Tensor, "*batch d_model"], direction: Direction, layer: int
                         ) -> Float[Tensor, " *batch"]:
    """``resid · v̂_layer``: the residual stream after block ``layer`` along the direction's unit vector there.

    In residual units, in ``resid``'s dtype and device, differentiable.
    """
    return resid @ direction.unit(layer).to(resid.device, resid.dtype)


def projection_label(direction: Direction, layer: int) -> str:
    """``"projection on <direction name> after layer <layer>"``: how tables and figures name the projection."""
    return f"projection on {direction.meta.get('name', 'direction')} after layer {layer}"
