"""Inputs: prompt sets, contrast pairs, question sets, chat rendering and token positions. No model runs here."""

from lens_roles.inputs.personas import Persona, default_system_prompt, load_archetypes, load_persona_questions
from lens_roles.inputs.positions import Encoded, encode, select_positions
from lens_roles.inputs.prompts import (
    ContrastPair,
    PairSet,
    Prompt,
    PromptSet,
    available_roles,
    load_baseline,
    load_pairs,
    load_prompt_set,
    load_role,
    render,
)
from lens_roles.inputs.questions import Question, QuestionSet, load_domains, load_questions
from lens_roles.inputs.sets import ItemSet, fingerprint, split_indices, split_point

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
    "Persona",
    "load_archetypes",
    "load_persona_questions",
    "default_system_prompt",
]
