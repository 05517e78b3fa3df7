"""Measures of behaviour under an intervention: the behaviour metrics, sweeps over layer × α,
multiple-choice scoring, and the statistics (bootstrap intervals, Pearson's r) studies report them with."""

from lens_roles.measures.behaviour import (
    direction_projection,
    generation_coherence,
    generation_perplexity,
    logprob_margin,
    repetition_rate,
    reply_logprob,
    reply_logprobs,
)
from lens_roles.measures.multiple_choice import (
    Condition,
    evaluate_condition,
    evaluate_conditions,
    persona_prompt,
    score_questions,
)
from lens_roles.measures.statistics import bootstrap_indices, bootstrap_mean, pearson, percentile_interval
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep, generation_sweep

__all__ = [
    "direction_projection",
    "generation_coherence",
    "generation_perplexity",
    "logprob_margin",
    "repetition_rate",
    "reply_logprob",
    "reply_logprobs",
    "bootstrap_indices",
    "bootstrap_mean",
    "pearson",
    "percentile_interval",
    "cosine_sweep",
    "adherence_sweep",
    "generation_sweep",
    "Condition",
    "score_questions",
    "evaluate_condition",
    "evaluate_conditions",
    "persona_prompt",
]
