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
  under the unsteered model, and the fraction of repeated token 3-grams.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd
import torch

from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.inputs.prompts import PairSet, Prompt
from lens_roles.interventions.steering import steering_hooks
from lens_roles.runtime.activations import _as_prompts
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.generation import generate
from lens_roles.runtime.models import resid_hook, validate_layers
from lens_roles.runtime.readout import logprobs_at


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
                 relative: Mapping[int, float] | None = None, batch_size: int = 8) -> pd.DataFrame:
    """Cosine(steered, unsteered) per downstream layer, for each steering layer and α.

    Args:
        prompts: prompts (with or without replies); every real token is compared.
        batch_size: prompts per forward (each is repeated once per α).
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    items = encode(model, _as_prompts(prompts))
    pad = pad_id(model)
    n_a, ref = len(alpha_list), alpha_list.index(0.0)
    rows = []
    for layer in steer_layers:
        downstream = list(range(layer, model.cfg.n_layers))
        sums = torch.zeros(len(downstream), n_a, dtype=torch.float64)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            tokens, mask = pad_batch([it.tokens for it in chunk], pad)
            tokens = tokens.repeat_interleave(n_a, dim=0)  # [prompt * alpha, pos]
            alpha_rows = torch.tensor(alpha_list).repeat(len(chunk))
            valid, n_chunk = mask.bool().to(model.cfg.device), len(chunk)

            def capture(acts, hook, _valid=valid, _n=n_chunk, _sums=sums, _first=layer):
                k = int(hook.name.split(".")[1]) - _first
                x = acts.reshape(_n, n_a, *acts.shape[1:])  # [prompt, alpha, pos, d_model]
                cos = torch.nn.functional.cosine_similarity(x, x[:, ref : ref + 1], dim=-1)  # [prompt, alpha, pos]
                per_prompt = (cos * _valid[:, None]).sum(-1) / _valid.sum(-1, keepdim=True)
                _sums[k] += per_prompt.double().sum(0).cpu()

            hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], relative=relative)
            hooks += [(resid_hook(k), capture) for k in downstream]
            with model.hooks(fwd_hooks=hooks):
                model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
        for k, down in enumerate(downstream):
            for a, alpha in enumerate(alpha_list):
                rows.append({"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": down,
                             "metric": "cosine", "value": float(sums[k, a] / len(items))})
    return pd.DataFrame(rows)


@torch.no_grad()
def adherence_sweep(model, direction: Direction, pairs: PairSet, *, steer_layers: Sequence[int],
                    alphas: Sequence[float], relative: Mapping[int, float] | None = None,
                    positions: str = "all", batch_size: int = 4) -> pd.DataFrame:
    """Persona adherence (reply log-prob margin) and next-token KL, per steering layer and α.

    The margin is mean log p(token) over the positive reply minus the same over the
    negative reply (per pair, then averaged); KL(unsteered ‖ steered) is averaged
    over the positions that predict reply tokens, both sides.
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    prompts: list[Prompt] = [p for pair in pairs.pairs for p in pair.as_prompts()]
    items = encode(model, prompts)
    spans = select_positions(items, "reply")
    pad = pad_id(model)
    n_a, ref = len(alpha_list), alpha_list.index(0.0)
    rows = []
    for layer in steer_layers:
        margin = torch.zeros(n_a, dtype=torch.float64)
        kl = torch.zeros(n_a, dtype=torch.float64)
        n_kl = 0
        for start in range(0, len(items), 2 * batch_size):
            chunk = list(range(start, min(start + 2 * batch_size, len(items))))
            tokens, _ = pad_batch([items[i].tokens for i in chunk], pad)
            tokens = tokens.repeat_interleave(n_a, dim=0)
            alpha_rows = torch.tensor(alpha_list).repeat(len(chunk))
            hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], positions=positions,
                                   relative=relative)
            with model.hooks(fwd_hooks=hooks):
                resid = model(tokens.to(model.cfg.device), stop_at_layer=model.cfg.n_layers)
            resid = resid.reshape(len(chunk), n_a, *resid.shape[1:])  # [prompt, alpha, pos, d_model]
            mean_lp = torch.zeros(len(chunk), n_a, dtype=torch.float64)
            for c, i in enumerate(chunk):
                a, b = spans[i][0], spans[i][-1] + 1
                # positions a-1 .. b-2 predict the reply tokens a .. b-1
                logp = logprobs_at(model, resid[c, :, a - 1 : b - 1]).cpu()  # [alpha, reply, vocab]
                target = torch.tensor(items[i].tokens[a:b])
                mean_lp[c] = logp[:, torch.arange(b - a), target].mean(-1).double()
                p_ref = logp[ref]  # KL(unsteered || steered) per position, averaged over the reply
                kl += (p_ref.exp() * (p_ref - logp)).sum(-1).mean(-1).double()
            margin += (mean_lp[0::2] - mean_lp[1::2]).sum(0)  # chunks hold (positive, negative) in turn
            n_kl += len(chunk)
        for a, alpha in enumerate(alpha_list):
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "logprob_margin", "value": float(margin[a] / len(pairs))})
            rows.append({**base, "metric": "kl_from_unsteered", "value": float(kl[a] / n_kl)})
    return pd.DataFrame(rows)


def repetition_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Fraction of token n-grams that already occurred earlier in the sequence."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


@torch.no_grad()
def generation_sweep(model, direction: Direction, prompts, *, steer_layers: Sequence[int], alphas: Sequence[float],
                     relative: Mapping[int, float] | None = None, max_new_tokens: int = 32,
                     seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Steered greedy generations per steering layer and α, with their coherence.

    Returns ``(metrics, texts)``: tidy metrics ``perplexity`` (of the generated
    tokens under the unsteered model) and ``repetition`` (repeated 3-grams), and a
    frame of the generations (``layer, alpha, prompt, text``).
    """
    alpha_list = _alphas(alphas)
    steer_layers = validate_layers(model, steer_layers)
    plist = _as_prompts(prompts)
    items = encode(model, plist)
    rows, texts = [], []
    pad = pad_id(model)
    for layer in steer_layers:
        batch = [p for p in plist for _ in alpha_list]
        alpha_rows = torch.tensor(alpha_list).repeat(len(plist))
        hooks = steering_hooks(model, direction, alpha_rows, layers=[layer], relative=relative)
        with model.hooks(fwd_hooks=hooks):
            outs = generate(model, batch, max_new_tokens=max_new_tokens, seed=seed)
        # perplexity of each generation under the unsteered model
        full = [list(items[r // len(alpha_list)].tokens) + list(o.tokens) for r, o in enumerate(outs)]
        tokens, _ = pad_batch(full, pad)
        logp = torch.log_softmax(model(tokens.to(model.cfg.device)).float(), dim=-1)
        stats = torch.zeros(len(alpha_list), 2, dtype=torch.float64)
        for r, o in enumerate(outs):
            start = len(items[r // len(alpha_list)].tokens)
            idx = torch.arange(start, start + len(o.tokens))
            nll = -logp[r, idx - 1, tokens[r, idx]].mean() if len(o.tokens) else torch.tensor(0.0)
            stats[r % len(alpha_list)] += torch.tensor([float(nll.exp()), repetition_rate(o.tokens)])
            texts.append({"layer": layer, "alpha": alpha_list[r % len(alpha_list)],
                          "prompt": o.prompt, "text": o.text})
        for a, alpha in enumerate(alpha_list):
            base = {"layer": layer, "alpha": alpha, "alpha_mode": _mode(relative), "read_layer": model.cfg.n_layers - 1}
            rows.append({**base, "metric": "perplexity", "value": float(stats[a, 0] / len(plist))})
            rows.append({**base, "metric": "repetition", "value": float(stats[a, 1] / len(plist))})
    return pd.DataFrame(rows), pd.DataFrame(texts)
