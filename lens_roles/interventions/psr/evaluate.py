"""Held-out measurements of a trained PSR: its mean strength, distance to the prompted run, λ per token."""

from __future__ import annotations

import pandas as pd
import torch

from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import as_prompts
from lens_roles.interventions.psr.align import token_text
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import TrainingData, forward_batch


def mean_strength(model, psr: PSR, data: TrainingData) -> float:
    """Mean of ``λ_t·α`` over the compared positions (shared prefix + aligned tail, and steered layers) of ``data``."""
    record: list = []
    vals = []
    with torch.no_grad():
        for batch in data.batches:
            record.clear()
            with psr.applied(model, record=record):
                model(batch.tokens.to(model.cfg.device), attention_mask=batch.mask.to(model.cfg.device),
                      stop_at_layer=max(psr.layers) + 1)
            for _, lam in record:
                for r, pos in enumerate(batch.positions):
                    vals.append(lam[r, pos].float().cpu())
    return float(torch.cat(vals).mean() * psr.alpha)


def activation_distance(model, psr: PSR, data: TrainingData) -> pd.DataFrame:
    """Held-out distance to the prompted activations: unsteered, constant steering and PSR.

    Constant steering uses the PSR's own mean strength (:func:`mean_strength`) at
    the same layers and on the same tokens (:meth:`PSR.constant_twin`: a PSR that
    skips the attention sink is compared with constant steering that skips it
    too); for such a PSR a row ``constant_all_tokens`` adds plain
    :func:`~lens_roles.interventions.steer` (the sink steered as well) at the same
    strength. Rows: ``method, alpha, read_layer, mse, relative_mse`` (MSE over the
    compared positions, summed over ``d_model``; relative = divided by the
    unsteered run's).
    """
    strength = mean_strength(model, psr, data)
    rows = []
    runs = [("none", psr, 0.0), ("constant", psr, strength), ("psr", psr, None)]
    if psr.has_sink:
        runs.insert(2, ("constant_all_tokens", PSR(psr.direction, psr.layers, float(psr.alpha)), strength))
    for method, model_psr, const in runs:
        sums = {layer: [] for layer in data.read_layers}
        with torch.no_grad():
            for batch in data.batches:
                store, _ = forward_batch(model, model_psr, batch, data, constant_alpha=const)
                for layer in data.read_layers:
                    for r, (i, pos) in enumerate(zip(batch.rows, batch.positions)):
                        sums[layer].append((store[layer][r, pos].float().cpu() - data.targets[layer][i]
                                            ).pow(2).sum(-1))
        for layer in data.read_layers:
            mse = float(torch.cat(sums[layer]).mean())
            rows.append({"method": method, "alpha": strength if method != "none" else 0.0, "read_layer": layer,
                         "mse": mse})
    frame = pd.DataFrame(rows)
    ref = frame[frame.method == "none"].set_index("read_layer").mse
    frame["relative_mse"] = frame.mse / frame.read_layer.map(ref)
    return frame


def token_coefficients(model, psr: PSR, prompts, *, template: str | None = None) -> pd.DataFrame:
    """λ per token of each prompt: ``prompt, position, token, part, layer, lam, strength`` (λ·α)."""
    plist = as_prompts(prompts)
    items = encode(model, plist, template=template)
    rows = []
    with torch.no_grad():
        for i, item in enumerate(items):
            record: list = []
            with psr.applied(model, record=record):
                model(torch.tensor([item.tokens], device=model.cfg.device), stop_at_layer=max(psr.layers) + 1)
            for layer, lam in record:
                for pos, tok in enumerate(item.tokens):
                    part = ("reply" if item.reply and pos >= item.reply[0] else
                            "user" if item.user[0] <= pos < item.user[1] else "template")
                    rows.append({"prompt": i, "position": pos, "token": token_text(model, tok), "part": part,
                                 "layer": layer, "lam": float(lam[0, pos]),
                                 "strength": float(lam[0, pos]) * float(psr.alpha)})
    return pd.DataFrame(rows)
