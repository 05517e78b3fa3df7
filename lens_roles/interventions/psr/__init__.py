"""Prompt Steering Replacement (PSR): token-specific steering trained to mimic prompting.

Heyman & Vandeputte ("Steer Like the LLM") observe that a system prompt acts on
the residual stream like steering whose strength differs per token, while
constant-strength steering pushes every token equally and loses coherence before
it matches the prompt's behaviour. This module measures that and replaces it:

* **Alignment.** The *prompted* run holds the system prompt, the *unprompted* run
  the same user turn and reply without it (the chat template may then insert its
  default system prompt). Both share the tokens from the start of the user turn
  onward; those are the *aligned positions* (:func:`align`). The prompted run's
  extra leading tokens have no counterpart and are never compared.
* **Prompt steering** (:func:`prompt_steering`): ``Δ = x_prompted − x_unprompted``
  at aligned positions, per layer: its projection on ``v̂`` and its norm, one row
  per token.
* **PSR** (:class:`PSR`): at each steered layer ``l``, ``x ← x + λ_t·α·v_l`` with
  ``λ_t = ReLU(w_l·â_t + b_l)``, ``â_t`` the activation arriving at the hook
  (before this layer's addition), divided by its norm. The normalisation is a
  choice of this implementation: the first token's residual norm is tens of times
  the others' (an attention sink), and on raw activations one ``w`` would give it
  a huge λ. With ``w = 0, b = 1`` (or ``constant=True``) PSR is exactly
  :func:`lens_roles.interventions.steer` with ``α``. The one-layer variant
  (S-PSR) steers one layer, the all-layer variant (A-PSR) every layer with its
  own ``w_l, b_l``; both steer every position, like ``steer``, except the
  attention sink when built by :func:`make_psr` (next point).
* **The attention sink.** No system prompt can change a sequence's first token
  (causal attention), yet a trained λ landed there (its normalised activation is
  unlike every other token's, so ``w`` could give it a λ for free). A PSR made by
  :func:`make_psr` therefore sets ``λ := 0`` on that token, recognised by its
  residual (:func:`sink_residuals`, the same in every sequence), which works
  under padding and KV caches alike; its constant baseline
  (:meth:`PSR.constant_twin`) skips it too, so the comparison isolates the
  per-token λ. ``PSR(...)`` without ``sink`` steers every token.
* **Compared positions.** The objectives cover every position that has a
  counterpart in the prompted run: the aligned tail, and the *shared prefix* (the
  leading template tokens both runs have before their system prompts differ,
  position 0 among them). A causal model computes the same activations there
  with and without the system prompt, so there the target is "no change". The
  unprompted run's own default system prompt (between the prefix and the user
  turn) has no counterpart and is still steered but not compared.
* **Training** (:func:`train_psr`): the model is frozen (``requires_grad`` off
  for the duration; only ``w, b`` are optimised). Objective ``"mse"``: squared
  distance to the prompted residuals at the read layers over the compared
  positions, each layer divided by the unprompted run's distance there (so 1.0 =
  no steering at all). Objective ``"kl"``: ``KL(prompted ‖ steered)`` of the
  next-token distributions at the shared-prefix positions and the aligned
  positions that predict reply tokens.
  The prompted targets and the unprompted residual at the first steered layer are
  computed once; each step runs the model from that layer on.
* **Comparison** (:func:`compare_at_matched_coherence`): constant steering, PSR
  and prompting; coherence = perplexity of greedy generations under the
  unsteered model, behaviour = persona adherence margin on held-out pairs (and,
  given questions, the multiple-choice effect); α of the two steering methods
  found by bisection so that their perplexity reaches a target (by default
  prompting's own).
"""

from lens_roles.interventions.psr.align import Aligned, align, prompt_pairs, prompt_steering
from lens_roles.interventions.psr.evaluate import activation_distance, mean_strength, token_coefficients
from lens_roles.interventions.psr.model import PSR, SINK_COS, apply_psr
from lens_roles.interventions.psr.train import (
    TrainConfig,
    TrainingData,
    make_psr,
    matched_alpha,
    prepare,
    psr_loss,
    sink_residuals,
    train_psr,
)

__all__ = [
    "Aligned",
    "align",
    "prompt_pairs",
    "prompt_steering",
    "PSR",
    "SINK_COS",
    "apply_psr",
    "TrainConfig",
    "TrainingData",
    "prepare",
    "train_psr",
    "psr_loss",
    "make_psr",
    "matched_alpha",
    "sink_residuals",
    "mean_strength",
    "activation_distance",
    "token_coefficients",
]
