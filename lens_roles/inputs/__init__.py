"""Inputs: prompt sets, contrast pairs, question sets, chat rendering and token positions. No model runs here."""

from lens_roles.inputs.prompts import (
    Prompt,
    PromptSet,
    ContrastPair,
    PairSet,
    load_prompt_set,
    load_pairs,
    load_role,
    load_baseline,
    available_roles,
    render,
)
from lens_roles.inputs.sets import ItemSet, fingerprint, split_indices, split_point
from lens_roles.inputs.questions import Question, QuestionSet, load_questions, load_domains
from lens_roles.inputs.positions import Encoded, encode, select_positions

__all__ = [
    "Prompt",
    "PromptSet",
    "ContrastPair",
    "PairSet",
    "load_prompt_set",
    "load_pairs",
    "load_role",
    "load_baseline",
    "available_roles",
    "render",
    "ItemSet",
    "fingerprint",
    "split_indices",
    "split_point",
    "Question",
    "QuestionSet",
    "load_questions",
    "load_domains",
    "Encoded",
    "encode",
    "select_positions",
]
