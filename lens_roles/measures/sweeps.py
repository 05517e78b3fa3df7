"""Sweeps over steering layer × α, returned as tidy DataFrames.

Every sweep runs all α values of one steering layer in one batched forward: the
batch holds each prompt once per α (α = 0 included as the reference), and
:func:`lens_roles.interventions.steer` takes one α per row. Columns are always
``layer, alpha, alpha_mode, read_layer, metric, value``: ``layer`` is the
steering layer and ``read_layer`` the layer a metric was read at (downstream
layers for the cosine, the final output for the behaviour metrics).

* :func:`cosine_sweep` — cosine similarity between steered and unsteered residual
  streams at every layer from the steering layer down, averaged over the real
  tokens of each prompt, then over prompts (the librarian study's figure);
* :func:`adherence_sweep` — persona adherence: mean per-token log-probability of
  the positive reply minus that of the negative reply, on held-out pairs; and,
  from the same forward, coherence as the mean next-token KL divergence
  KL(unsteered ‖ steered) over the reply positions;
* :func:`generation_sweep` — coherence of steered generations: their perplexity
  under the unsteered model, and the fraction of repeated token 3-grams (averaged
  over the non-empty generations; NaN when every one is empty).

The behaviour metrics themselves (reply log-prob margin, perplexity, repetition)
are those of :mod:`lens_roles.measures.behaviour`, the KL that of the readout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import PairSet, Prompt, as_prompts
from lens_roles.interventions.steering import intervene, steering_hooks
from lens_roles.measures.behaviour import (
    generation_coherence,
    logprob_margin,
    reply_logprob,
    reply_logprobs,
)
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.generation import generate
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.readout import kl_divergence


def _alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if not values:
        raise DataError("no alpha values given")
    if any(a != a or a in (float("inf"), float("-inf")) for a in values):
        raise DataError(f"alpha values must be finite, got {values}")
    return sorted(set(values) | {0.0})


def _mode(relative) -> str:
    return "absolute" if relative is None else "relative"


@torch.no_grad()
def cosine_sweep(model, direction: Direction, prompts, *, steer_layers: Sequence[int], alphas: Sequence[float],
                 relative: Mapping[int, float] | None = None, batch_size: int = 8,
                 progress: bool = False) -> pd.DataFrame:
    """Cosine(steered, unsteered) per downstream layer, for each steering layer and α.

    Args:
        prompts: prompts (with or without replies); every real token is compared.
        batch_size: prompts per forward (each is repeated once per α).
        progress: show a bar counting prompts × steering layers.
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    items = encode(model, as_prompts(prompts))
    n_a, ref = len(alpha_list), alpha_list.index(0.0)
    rows = []
    bar = progress_bar(progress, len(steer_layers) * len(items), "cosine sweep")
    for layer in steer_layers:
        downstream = list(range(layer, model.cfg.n_layers))
        sums = torch.zeros(len(downstream), n_a, dtype=torch.float64)
        for batch in token_batches(model, [it.tokens for it in items], batch_size, sort=False):
            n_chunk = len(batch.index)
            valid = batch.mask.bool()
            alpha_rows = torch.tensor(alpha_list).repeat(n_chunk)

            def add_cosines(acts, weights, down, _valid=valid, _n=n_chunk, _sums=sums, _first=layer) -> None:
                x = acts.reshape(_n, n_a, *acts.shape[1:])  # [prompt, alpha, pos, d_model]
                cos = torch.nn.functional.cosine_similarity(x, x[:, ref : ref + 1], dim=-1)  # [prompt, alpha, pos]
                per_prompt = (cos * _valid[:, None]).sum(-1) / _valid.sum(-1, keepdim=True)
                _sums[down - _first] += per_prompt.double().sum(0).cpu()

            hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], relative=relative)
            # the capture sits inside the steering block, so it reads the steered stream
            with intervene(model, hooks), capture(model, downstream, add_cosines):
                batch.repeat_rows(n_a).forward(model, stop_at_layer=model.cfg.n_layers)  # [prompt * alpha, pos]
            bar.update(n_chunk)
        for k, down in enumerate(downstream):
            for a, alpha in enumerate(alpha_list):
                rows.append({"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": down,
                             "metric": "cosine", "value": float(sums[k, a] / len(items))})
    bar.close()
    return pd.DataFrame(rows)


@torch.no_grad()
def adherence_sweep(model, direction: Direction, pairs: PairSet, *, steer_layers: Sequence[int],
                    alphas: Sequence[float], relative: Mapping[int, float] | None = None,
                    positions: str = "all", batch_size: int = 4, progress: bool = False) -> pd.DataFrame:
    """Persona adherence (reply log-prob margin) and next-token KL, per steering layer and α.

    The margin is mean log p(token) over the positive reply minus the same over the
    negative reply (per pair, then averaged); KL(unsteered ‖ steered) is averaged
    over the positions that predict reply tokens, both sides. ``progress`` shows a
    bar counting prompts × steering layers.
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    prompts: list[Prompt] = [p for pair in pairs.pairs for p in pair.as_prompts()]
    items = encode(model, prompts)
    spans = select_positions(items, "reply")
    n_a, ref = len(alpha_list), alpha_list.index(0.0)
    rows = []
    bar = progress_bar(progress, len(steer_layers) * len(items), "adherence sweep")
    for layer in steer_layers:
        margin = torch.zeros(n_a, dtype=torch.float64)
        kl = torch.zeros(n_a, dtype=torch.float64)
        n_kl = 0
        # in order, an even number of prompts per batch: each holds whole (positive, negative) pairs
        for batch in token_batches(model, [it.tokens for it in items], 2 * batch_size, sort=False):
            chunk = batch.index
            alpha_rows = torch.tensor(alpha_list).repeat(len(chunk))
            hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], positions=positions,
                                   relative=relative)
            with intervene(model, hooks):
                resid = batch.repeat_rows(n_a).forward(model, stop_at_layer=model.cfg.n_layers)
            resid = resid.reshape(len(chunk), n_a, *resid.shape[1:])  # [prompt, alpha, pos, d_model]
            mean_lp = torch.zeros(len(chunk), n_a, dtype=torch.float64)
            for c, i in enumerate(chunk):
                a, b = spans[i][0], spans[i][-1] + 1
                logp = reply_logprobs(model, resid[c], (a, b)).cpu()  # [alpha, reply, vocab]
                mean_lp[c] = reply_logprob(logp, items[i].tokens[a:b]).double()
                # KL(unsteered || steered) per position, averaged over the reply
                kl += kl_divergence(logp[ref], logp).mean(-1).double()
            margin += logprob_margin(mean_lp[0::2], mean_lp[1::2]).sum(0)  # chunks hold (positive, negative) in turn
            n_kl += len(chunk)
            bar.update(len(chunk))
        for a, alpha in enumerate(alpha_list):
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "logprob_margin", "value": float(margin[a] / len(pairs))})
            rows.append({**base, "metric": "kl_from_unsteered", "value": float(kl[a] / n_kl)})
    bar.close()
    return pd.DataFrame(rows)


@torch.no_grad()
def generation_sweep(model, direction: Direction, prompts, *, steer_layers: Sequence[int], alphas: Sequence[float],
                     relative: Mapping[int, float] | None = None, max_new_tokens: int = 32,
                     seed: int = 0, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Steered greedy generations per steering layer and α, with their coherence.

    Returns ``(metrics, texts)``: tidy metrics ``perplexity`` (of the generated
    tokens under the unsteered model) and ``repetition`` (repeated 3-grams), and a
    frame of the generations (``layer, alpha, prompt, text``). ``progress`` shows a
    bar counting generated tokens (``max_new_tokens`` per steering layer).
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    plist = as_prompts(prompts)
    items = encode(model, plist)
    rows, texts = [], []
    bar = progress_bar(progress, len(steer_layers) * max_new_tokens, "generation sweep", unit="token")
    for layer in steer_layers:
        batch = [p for p in plist for _ in alpha_list]
        alpha_rows = torch.tensor(alpha_list).repeat(len(plist))
        hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], relative=relative)
        with intervene(model, hooks):
            outs = generate(model, batch, max_new_tokens=max_new_tokens, seed=seed)
        bar.update(max_new_tokens)
        # perplexity under the unsteered model and repetition, per generation; empty ones are left out
        coherence = generation_coherence(model, [items[r // len(alpha_list)].tokens for r in range(len(outs))],
                                         [o.tokens for o in outs])
        stats = coherence.reshape(len(plist), len(alpha_list), 2).nanmean(0)  # [alpha, (perplexity, repetition)]
        texts += [{"layer": layer, "alpha": alpha_list[r % len(alpha_list)], "prompt": o.prompt, "text": o.text}
                  for r, o in enumerate(outs)]
        for a, alpha in enumerate(alpha_list):
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "perplexity", "value": float(stats[a, 0])})
            rows.append({**base, "metric": "repetition", "value": float(stats[a, 1])})
    bar.close()
    return pd.DataFrame(rows), pd.DataFrame(texts)
