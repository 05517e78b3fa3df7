"""The one readout of the model's output from final-layer residual vectors, at chosen positions only.

Every log-probability the package reads (sweeps, multiple-choice scoring, the PSR's
KL objective, patching metrics) goes through :func:`final_logits` /
:func:`logprobs_at`, which do exactly what the end of ``model(tokens)`` does —
the final norm when the model has one, the unembedding, then the output logit
soft-cap when the config enables one (``cfg.output_logits_soft_cap``, e.g. Gemma 2)
— but only at the positions passed. :func:`kl_divergence` compares two such
next-token distributions.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def final_logits(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Logits from final-layer residual vectors, as ``model(tokens)`` computes them at those positions.

    ``ln_final`` (when ``cfg.normalization_type`` is not None), the unembedding, and
    the output soft-cap (when enabled), in the model's dtype. Only the vectors
    passed are unembedded, which for a small model with a large vocabulary is much
    cheaper than the full forward's logits at every position.
    """
    # deferred: importing transformer_lens is slow, and importing lens_roles does not need it
    from transformer_lens.utilities import apply_softcap

    flat = resid.reshape(1, -1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        flat = model.ln_final(flat)
    # TransformerLens's Unembed.forward, with its transposed weight made once instead of at every call
    unembed = model.unembed
    logits = unembed.hook_out(torch.nn.functional.linear(unembed.hook_in(flat), unembed_weight(model), unembed.b_U))
    logits = apply_softcap(logits, getattr(model.cfg, "output_logits_soft_cap", None))
    return logits.reshape(*resid.shape[:-1], logits.shape[-1])


def unembed_weight(model) -> Float[Tensor, "d_vocab d_model"]:
    """``W_U.T`` made contiguous, as TransformerLens's ``Unembed`` multiplies by it, kept on the module.

    ``Unembed.forward`` copies the transposed weight (``d_vocab × d_model``: 113 MB
    for a 49k vocabulary) at every call, which costs more than the product when a
    sweep unembeds a few positions at a time. The copy is made again when the weight
    changes (in place, or moved to another device or dtype). It carries no autograd
    graph: gradients flow to the residual, not to the unembedding.
    """
    w = model.unembed.W_U
    key = (w._version, w.data_ptr(), w.device, w.dtype)
    kept = getattr(model.unembed, "_lens_roles_w_t", None)
    if kept is None or kept[0] != key:
        with torch.no_grad():
            kept = (key, w.T.contiguous())
        model.unembed._lens_roles_w_t = kept
    return kept[1]


def logprobs_at(model, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
    """Next-token log-probabilities (float32) from final-layer residual vectors: log-softmax of :func:`final_logits`.

    Equal to ``log_softmax(model(tokens).float(), -1)`` at the positions passed,
    soft-capped models included.
    """
    return torch.log_softmax(final_logits(model, resid).float(), dim=-1)


def kl_divergence(logp: Float[Tensor, "... d_vocab"], logq: Float[Tensor, "... d_vocab"]) -> Float[Tensor, "..."]:
    """``KL(p ‖ q) = Σ p (log p − log q)`` per position, from two next-token log-probability tensors.

    ``p`` is the reference (the unsteered or prompted run), ``q`` the run compared
    with it; the shapes broadcast.
    """
    return (logp.exp() * (logp - logq)).sum(-1)
