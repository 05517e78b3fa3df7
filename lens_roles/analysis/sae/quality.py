"""How well an SAE reconstructs the stream: explained variance, L0, dead features, loss recovered."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lens_roles.analysis.sae.core import check_sae, harvest, spliced
from lens_roles.analysis.sae.features import DENSE_FREQUENCY
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.models import resid_hook


def _next_token_loss(logits: Tensor, tokens: Tensor, mask: Tensor) -> tuple[float, int]:
    """Sum of next-token cross-entropy over the real tokens from position 2 on, and their count.

    Token 1 is not scored: it is predicted from the untouched BOS alone, so no splice can change it.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = tokens[:, 1:]
    nll = -logp.gather(-1, target[..., None])[..., 0]
    keep = mask[:, 1:].bool().clone()
    keep[:, 0] = False
    return float(nll[keep].sum()), int(keep.sum())


@torch.no_grad()
def feature_frequencies(sae, acts: Tensor) -> Tensor:
    """Fraction of the rows of ``acts`` ``[token, d_model]`` on which each feature fires, ``[d_sae]``."""
    counts = torch.zeros(sae.cfg.d_sae)
    for chunk in acts.split(4096):
        counts += (sae.encode(chunk.to(sae.device)) > 0).sum(0).float().cpu()
    return counts / max(len(acts), 1)


@torch.no_grad()
def sae_quality(model, sae, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                acts: Tensor | None = None, ce_clean: float | None = None, losses: bool = True,
                progress: bool = False) -> dict:
    """Reconstruction and downstream quality of ``sae`` on held-out ``sequences``.

    Returns ``explained_variance`` (``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``), ``l0`` (mean
    active features per token), ``dead_fraction`` (features that never fire on these
    tokens), ``dense_fraction`` (features firing on more than :data:`DENSE_FREQUENCY` of
    them), ``ce_clean``, ``ce_sae`` (reconstruction spliced in, no error term),
    ``ce_zero`` (the residual stream zeroed at that layer) — mean next-token
    cross-entropy in nats — and ``loss_recovered`` ``(ce_zero − ce_sae)/(ce_zero − ce_clean)``.
    ``acts`` (from :func:`harvest`) saves recomputing the activations, ``ce_clean`` (from
    an earlier call on the same sequences) the clean run; ``losses=False`` skips the model
    runs (the loss fields are then NaN). ``progress``
    shows bars (harvest, then the three scored runs).
    """
    layer = check_sae(sae, model)
    if acts is None:
        acts = harvest(model, sequences, [layer], batch_size=batch_size, progress=progress)[layer]
    counts = torch.zeros(sae.cfg.d_sae)
    sse = l0 = 0.0
    for chunk in acts.split(4096):
        feats = sae.encode(chunk.to(sae.device))
        recon = sae.decode(feats).cpu()
        sse += float(((chunk - recon) ** 2).sum())
        l0 += float((feats > 0).sum())
        counts += (feats > 0).sum(0).float().cpu()
    total_var = float(((acts - acts.mean(0)) ** 2).sum())
    runs = {"clean": [0.0, 0], "sae": [0.0, 0], "zero": [0.0, 0]}
    if ce_clean is not None:
        del runs["clean"]
    zero_hook = [(resid_hook(layer), lambda x, hook: torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1))]
    batches = token_batches(model, sequences, batch_size, progress=progress, desc="SAE loss recovered") \
        if losses else []
    for batch in batches:
        for name in runs:
            if name == "clean":
                logits = batch.forward(model)
            elif name == "sae":
                with spliced(model, sae):
                    logits = batch.forward(model)
            else:
                with model.hooks(fwd_hooks=zero_hook):
                    logits = batch.forward(model)
            s, n = _next_token_loss(logits, batch.tokens, batch.mask)
            runs[name][0] += s
            runs[name][1] += n
    ce = {name: s / max(n, 1) if losses else math.nan for name, (s, n) in runs.items()}
    if ce_clean is not None:
        ce["clean"] = ce_clean
    gap = ce["zero"] - ce["clean"]
    return {"layer": layer, "hook": resid_hook(layer), "d_sae": sae.cfg.d_sae,
            "explained_variance": 1 - sse / total_var, "l0": l0 / len(acts),
            "dead_fraction": float((counts == 0).float().mean()),
            "dense_fraction": float((counts > DENSE_FREQUENCY * len(acts)).float().mean()),
            "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero": ce["zero"], "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap else math.nan,
            "eval_tokens": len(acts), "eval_sequences": len(sequences)}


def quality_table(model, saes: dict, eval_sets: dict[str, Sequence[Sequence[int]]], *, batch_size: int = 16,
                  progress: bool = False):
    """:func:`sae_quality` of every SAE on every evaluation set, as one tidy frame.

    ``saes`` maps a label to an SAE; ``eval_sets`` a set name (``"code"``, ``"ood"``...)
    to token sequences. Per set the activations of all the SAEs' layers are read in
    one pass and the clean loss once. Rows: ``sae``, ``eval_set`` and the
    :func:`sae_quality` fields.
    """
    import pandas as pd

    layers = sorted({check_sae(sae, model) for sae in saes.values()})
    rows = []
    for name, sequences in eval_sets.items():
        acts = harvest(model, sequences, layers, batch_size=batch_size, progress=progress)
        clean = None
        for label, sae in saes.items():
            q = sae_quality(model, sae, sequences, batch_size=batch_size, acts=acts[check_sae(sae, model)],
                            ce_clean=clean)
            clean = q["ce_clean"]
            rows.append({"sae": label, "eval_set": name, **q})
    return pd.DataFrame(rows)
