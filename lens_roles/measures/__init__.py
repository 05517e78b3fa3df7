"""Measures of behaviour under an intervention: sweeps over layer × α, multiple-choice scoring."""

from lens_roles.measures.sweeps import cosine_sweep, adherence_sweep, generation_sweep, repetition_rate
from lens_roles.measures.multiple_choice import Condition, score_questions, evaluate_condition, persona_prompt

__all__ = [
    "cosine_sweep",
    "adherence_sweep",
    "generation_sweep",
    "repetition_rate",
    "Condition",
    "score_questions",
    "evaluate_condition",
    "persona_prompt",
]
