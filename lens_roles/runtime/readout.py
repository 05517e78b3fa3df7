"""Reading the model's output from final-layer residual vectors at chosen positions only."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def final_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from final-layer residual vectors, through ``ln_final`` and the unembedding.

    Only the vectors passed are unembedded, which for a small model with a large
    vocabulary is much cheaper than the full forward's logits at every position.
    """
    from transformer_lens.utilities import apply_softcap

    flat = resid.reshape(1, -1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        flat = model.ln_final(flat)
    logits = apply_softcap(model.unembed(flat), getattr(model.cfg, "output_logits_soft_cap", None))
    return logits.reshape(*resid.shape[:-1], logits.shape[-1])


def logprobs_at(model, resid: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final residual vectors ``[..., d_model]`` → ``[..., vocab]``.

    Only the positions passed go through the final norm and the unembedding, which
    is most of the cost of a forward for a small model with a large vocabulary.
    """
    flat = resid.reshape(1, -1, resid.shape[-1])
    logits = model.unembed(model.ln_final(flat))[0].float()
    return torch.log_softmax(logits, dim=-1).reshape(*resid.shape[:-1], -1)
