"""How well an SAE reconstructs the stream: explained variance, L0, dead features, loss recovered."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from lens_roles.analysis.sae.core import check_sae, harvest, spliced
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
def sae_quality(model, sae, sequences: Sequence[Sequence[int]], *, batch_size: int = 16,
                acts: Tensor | None = None, progress: bool = False) -> dict:
    """Reconstruction and downstream quality of ``sae`` on held-out ``sequences``.

    Returns ``explained_variance`` (``1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²``), ``l0`` (mean
    active features per token), ``dead_fraction`` (features that never fire on these
    tokens), ``ce_clean``, ``ce_sae`` (reconstruction spliced in, no error term),
    ``ce_zero`` (the residual stream zeroed at that layer) — mean next-token
    cross-entropy in nats — and ``loss_recovered`` ``(ce_zero − ce_sae)/(ce_zero − ce_clean)``.
    ``acts`` (from :func:`harvest`) saves recomputing the activations. ``progress``
    shows bars (harvest, then the three scored runs).
    """
    layer = check_sae(sae, model)
    if acts is None:
        acts = harvest(model, sequences, [layer], batch_size=batch_size, progress=progress)[layer]
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    sse = l0 = 0.0
    for chunk in acts.split(4096):
        feats = sae.encode(chunk.to(sae.device))
        recon = sae.decode(feats).cpu()
        sse += float(((chunk - recon) ** 2).sum())
        l0 += float((feats > 0).sum())
        fired |= (feats > 0).any(0).cpu()
    total_var = float(((acts - acts.mean(0)) ** 2).sum())
    losses = {"clean": [0.0, 0], "sae": [0.0, 0], "zero": [0.0, 0]}
    zero_hook = [(resid_hook(layer), lambda x, hook: torch.cat([x[:, :1], torch.zeros_like(x[:, 1:])], 1))]
    for batch in token_batches(model, sequences, batch_size, progress=progress, desc="SAE loss recovered"):
        for name in losses:
            if name == "clean":
                logits = batch.forward(model)
            elif name == "sae":
                with spliced(model, sae):
                    logits = batch.forward(model)
            else:
                with model.hooks(fwd_hooks=zero_hook):
                    logits = batch.forward(model)
            s, n = _next_token_loss(logits, batch.tokens, batch.mask)
            losses[name][0] += s
            losses[name][1] += n
    ce = {name: s / max(n, 1) for name, (s, n) in losses.items()}
    gap = ce["zero"] - ce["clean"]
    return {"layer": layer, "hook": resid_hook(layer), "d_sae": sae.cfg.d_sae,
            "explained_variance": 1 - sse / total_var, "l0": l0 / len(acts),
            "dead_fraction": 1 - float(fired.float().mean()), "ce_clean": ce["clean"], "ce_sae": ce["sae"],
            "ce_zero": ce["zero"], "loss_recovered": (ce["zero"] - ce["sae"]) / gap if gap else math.nan,
            "eval_tokens": len(acts), "eval_sequences": len(sequences)}

