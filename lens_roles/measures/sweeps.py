"""Sweeps over steering layer × α, returned as tidy DataFrames.

The cosine, adherence and KL sweeps branch at the steering layer
(:mod:`lens_roles.runtime.branching`): each batch of prompts runs once
unsteered — the α = 0 reference of every steering layer, and the shared part of
every steered run — and each steering layer and α then runs only the blocks
after its layer (the adherence sweep also through the shared-prefix KV cache).
Columns are always
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
  over the non-empty generations; NaN when every one is empty). The prompts are
  prefilled once below each steering layer and all settings decode in one batch.

The behaviour metrics themselves (reply log-prob margin, perplexity, repetition)
are those of :mod:`lens_roles.measures.behaviour`, the KL that of the readout.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import PairSet, Prompt, as_prompts
from lens_roles.interventions.steering import steering_hooks
from lens_roles.measures.behaviour import (
    generation_coherence,
    logprob_margin,
    reply_logprob,
)
from lens_roles.runtime.batching import run_branched, token_batches
from lens_roles.runtime.branching import Branch, branched_batches, unsteered
from lens_roles.runtime.capture import Capture
from lens_roles.runtime.generation import generate_branched
from lens_roles.runtime.models import validate_layers
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.readout import kl_divergence, logprobs_at


def _alphas(alphas: Sequence[float]) -> list[float]:
    values = [float(a) for a in alphas]
    if not values:
        raise DataError("no alpha values given")
    if any(a != a or a in (float("inf"), float("-inf")) for a in values):
        raise DataError(f"alpha values must be finite, got {values}")
    return sorted(set(values) | {0.0})


def _mode(relative) -> str:
    return "absolute" if relative is None else "relative"


def _branches(model, direction: Direction, steer_layers: Sequence[int], alpha_list: Sequence[float],
              relative: Mapping[int, float] | None, positions="all") -> tuple[list[Branch], dict]:
    """The unsteered reference branch (index 0) and one branch per steering layer and α ≠ 0.

    Returns ``(branches, index)`` with ``index[(layer, alpha)]`` the branch of that
    setting; α = 0 maps to the reference (adding ``0·v`` leaves the stream unchanged,
    bit for bit).
    """
    branches, index = [unsteered(model)], {}
    for layer in steer_layers:
        for alpha in alpha_list:
            if alpha == 0.0:
                index[(layer, alpha)] = 0
                continue
            index[(layer, alpha)] = len(branches)
            branches.append(Branch(layer, tuple(steering_hooks(model, direction, alpha, layers=[layer],
                                                               positions=positions, relative=relative))))
    return branches, index


def token_cosine_sum(acts: Float[Tensor, "batch pos d_model"], ref: Float[Tensor, "batch pos d_model"],
                valid: Bool[Tensor, "batch pos"]) -> Float[Tensor, ""]:
    """Σ over prompts of the mean cosine(acts, ref) over each prompt's real tokens (float64, on the CPU)."""
    cos = torch.nn.functional.cosine_similarity(acts, ref, dim=-1)  # [prompt, pos]
    return ((cos * valid).sum(-1) / valid.sum(-1)).double().sum(0).cpu()


@torch.no_grad()
def cosine_sweep(model, direction: Direction, prompts, *, steer_layers: Sequence[int], alphas: Sequence[float],
                 relative: Mapping[int, float] | None = None, batch_size: int = 8,
                 progress: bool = False) -> pd.DataFrame:
    """Cosine(steered, unsteered) per downstream layer, for each steering layer and α.

    Each batch of prompts runs once unsteered (the reference, read at every
    downstream layer); each steering layer and α then runs only the blocks after
    its layer (:mod:`lens_roles.runtime.branching`).

    Args:
        prompts: prompts (with or without replies); every real token is compared.
        batch_size: prompts per forward.
        progress: show a bar counting prompts × steering layers.
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    items = encode(model, as_prompts(prompts))
    branches, index = _branches(model, direction, steer_layers, alpha_list, relative)
    first = min(steer_layers)
    read = list(range(first, model.cfg.n_layers))
    # per steering layer: Σ over prompts of the mean cosine over real tokens, [downstream layer, alpha]
    sums = {layer: torch.zeros(model.cfg.n_layers - layer, len(alpha_list), dtype=torch.float64)
            for layer in steer_layers}
    bar = progress_bar(progress, len(steer_layers) * len(items), "cosine sweep")
    batches = token_batches(model, [it.tokens for it in items], batch_size, sort=False)
    # the shared run is the unsteered stream: it is kept at every layer read, as the reference
    for batch, run, reference in branched_batches(model, batches, branches, keep=read):
        valid = batch.mask.bool()
        for layer in steer_layers:
            for a, alpha in enumerate(alpha_list):
                b = index[(layer, alpha)]
                if b == 0:
                    for down in range(layer, model.cfg.n_layers):
                        sums[layer][down - layer, a] += token_cosine_sum(reference[down], reference[down], valid)
                    continue

                def add(acts, weights, down, _layer=layer, _a=a, _ref=reference, _valid=valid) -> None:
                    sums[_layer][down - _layer, _a] += token_cosine_sum(acts, _ref[down], _valid)

                run(b, stop_at_layer=model.cfg.n_layers,
                    extra_hooks=Capture(range(layer, model.cfg.n_layers), add).fwd_hooks())
            bar.update(len(batch.index))
    bar.close()
    rows = []
    for layer in steer_layers:
        for k, down in enumerate(range(layer, model.cfg.n_layers)):
            for a, alpha in enumerate(alpha_list):
                rows.append({"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": down,
                             "metric": "cosine", "value": float(sums[layer][k, a] / len(items))})
    return pd.DataFrame(rows)


@torch.no_grad()
def adherence_sweep(model, direction: Direction, pairs: PairSet, *, steer_layers: Sequence[int],
                    alphas: Sequence[float], relative: Mapping[int, float] | None = None,
                    positions: str = "all", batch_size: int = 4, progress: bool = False) -> pd.DataFrame:
    """Persona adherence (reply log-prob margin) and next-token KL, per steering layer and α.

    The margin is mean log p(token) over the positive reply minus the same over the
    negative reply (per pair, then averaged); KL(unsteered ‖ steered) is averaged
    over the positions that predict reply tokens, both sides. The prompts run
    through the shared-prefix KV cache (the chat template's trunk once, each pair's
    user turn once for both replies) and branch at the steering layer
    (:func:`lens_roles.runtime.batching.run_branched`): each prompt runs once
    unsteered (the α = 0 reference) and each steering layer and α only the blocks
    after its layer. ``batch_size`` is in pairs. ``progress`` shows a bar counting
    prompts × runs (the unsteered one, and one per steering layer and α ≠ 0).
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    prompts: list[Prompt] = [p for pair in pairs.pairs for p in pair.as_prompts()]
    items = encode(model, prompts)
    spans = select_positions(items, "reply")
    # the positions that predict the reply tokens
    reads = [list(range(span[0] - 1, span[-1])) for span in spans]
    branches, index = _branches(model, direction, steer_layers, alpha_list, relative, positions)
    mean_lp = torch.zeros(len(branches), len(items), dtype=torch.float64)
    kl = torch.zeros(len(branches), dtype=torch.float64)
    last = model.cfg.n_layers - 1
    cap = Capture([last], _read_rows)
    reference: dict[int, Tensor] = {}

    def on_batch(b: int, members: list[int]) -> None:
        for row, i in enumerate(members):
            a, stop = spans[i][0], spans[i][-1] + 1
            logp = logprobs_at(model, cap[last][row]).cpu()  # [reply, vocab]
            mean_lp[b, i] = reply_logprob(logp, items[i].tokens[a:stop]).double()
            if b == 0:  # the unsteered run comes first in every batch: the reference of the others
                reference[i] = logp
            else:  # KL(unsteered || steered) per position, averaged over the reply
                kl[b] += kl_divergence(reference[i], logp).mean(-1).double()
            if b == len(branches) - 1:
                del reference[i]

    with progress_bar(progress, len(branches) * len(items), "adherence sweep") as bar:
        run_branched(model, items, reads, branches, batch_size=2 * batch_size, stop_at_layer=cap.stop_at_layer,
                     capture=cap, on_batch=on_batch, progress=bar.update)
    margin = logprob_margin(mean_lp[:, 0::2], mean_lp[:, 1::2]).sum(-1)  # [branch]: prompts hold (positive, negative)
    rows = []
    for layer in steer_layers:
        for alpha in alpha_list:
            b = index[(layer, alpha)]
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "logprob_margin", "value": float(margin[b] / len(pairs))})
            rows.append({**base, "metric": "kl_from_unsteered", "value": float(kl[b] / len(items))})
    return pd.DataFrame(rows)


def _read_rows(acts: Float[Tensor, "batch pos d_model"], weights: Float[Tensor, "batch pos"], layer: int
               ) -> list[Float[Tensor, "read d_model"]]:
    """Per row, the activations at its read positions (those of non-zero weight), in position order."""
    return [acts[r, weights[r] > 0] for r in range(acts.shape[0])]


@torch.no_grad()
def generation_sweep(model, direction: Direction, prompts, *, steer_layers: Sequence[int], alphas: Sequence[float],
                     relative: Mapping[int, float] | None = None, max_new_tokens: int = 32,
                     seed: int = 0, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Steered greedy generations per steering layer and α, with their coherence.

    Returns ``(metrics, texts)``: tidy metrics ``perplexity`` (of the generated
    tokens under the unsteered model) and ``repetition`` (repeated 3-grams), and a
    frame of the generations (``layer, alpha, prompt, text``). The generations branch
    at the steering layer (:func:`~lens_roles.runtime.generation.generate_branched`):
    the prompts are prefilled once below each steering layer, the unsteered
    generation (α = 0 at every layer) is made once, and every steering layer and α
    decode together in one batch. ``progress`` shows a bar counting the decoding steps
    (``max_new_tokens``).
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    plist = as_prompts(prompts)
    items = encode(model, plist)
    branches, index = _branches(model, direction, steer_layers, alpha_list, relative)
    outs = generate_branched(model, [it.tokens for it in items], branches, labels=[p.user for p in plist],
                             max_new_tokens=max_new_tokens, seed=seed, progress=progress)
    # perplexity under the unsteered model and repetition, per generation (empty ones are left out), per branch:
    # every branch's generations scored in one forward
    coherence = generation_coherence(model, [it.tokens for _ in outs for it in items],
                                     [o.tokens for gens in outs for o in gens])
    stats = coherence.reshape(len(outs), len(items), 2).nanmean(1)  # [branch, (perplexity, repetition)]
    rows, texts = [], []
    for layer in steer_layers:
        texts += [{"layer": layer, "alpha": alpha, "prompt": outs[index[(layer, alpha)]][i].prompt,
                   "text": outs[index[(layer, alpha)]][i].text} for i in range(len(plist)) for alpha in alpha_list]
        for alpha in alpha_list:
            ppl, rep = stats[index[(layer, alpha)]]
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "perplexity", "value": float(ppl)})
            rows.append({**base, "metric": "repetition", "value": float(rep)})
    return pd.DataFrame(rows), pd.DataFrame(texts)
