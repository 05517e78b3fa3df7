"""Personas a model answers *in*: the shipped character archetypes, the persona-space questions,
and the model's own default system prompt.

File formats (shipped in ``lens_roles/data/persona_space/``, found through :func:`data_dir`):

* ``archetypes.jsonl``: one persona per line, ``{"name": str, "system": str}`` and optionally
  ``"group": str`` (``creative``, ``theatrical``, ``mystical``, ``non-human``, ``everyday``). The
  system prompt is what the model is told before it answers ("You are a bard, …").
* ``questions.jsonl``: ordinary questions, ``{"instruction": str}`` (the prompt-set format of
  :func:`~lens_roles.inputs.prompts.load_prompt_set`), asked of every persona.

A bare name (``archetypes``, ``questions``) stands for the shipped file of that name
(:func:`~lens_roles.inputs.prompts.shipped_or_path`), so the CLI takes either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lens_roles.errors import DataError
from lens_roles.inputs.prompts import PromptSet, load_prompt_set, read_records, shipped_or_path

#: the folder of ``data_dir()`` that holds the shipped persona-space files
FOLDER = "persona_space"


@dataclass(frozen=True)
class Persona:
    """One point of persona space: a name, the system prompt it answers under, and a group label.

    ``system`` None means no system prompt is given (the chat template does what it does by
    default); ``""`` is an explicitly empty system turn (see :func:`lens_roles.inputs.prompts.render`).
    ``kind`` is ``"role"`` (a shipped role), ``"archetype"`` or ``"default"`` (the default assistant).
    """

    name: str
    system: str | None
    group: str = ""
    kind: str = "archetype"


def load_archetypes(path: str | Path | None = None) -> list[Persona]:
    """The character archetypes of ``path`` (default: the shipped ``archetypes.jsonl``).

    Raises:
        DataError: naming the file and line, for a missing or empty file, a record without a
            non-empty ``name`` or ``system`` string, or a name given twice.
    """
    path = shipped_or_path(path or "archetypes", FOLDER)
    out, seen = [], {}
    for loc, rec in read_records(path):
        fields = {}
        for key in ("name", "system", "group"):
            value = rec.get(key, "" if key == "group" else None)
            if not isinstance(value, str) or (key != "group" and not value.strip()):
                raise DataError(f"{path} line {loc}: field {key!r} must be a non-empty string, got {value!r:.60}")
            fields[key] = value.strip() if key == "name" else value
        if fields["name"] in seen:
            raise DataError(f"{path} line {loc}: archetype {fields['name']!r} is already defined on line "
                            f"{seen[fields['name']]}")
        seen[fields["name"]] = loc
        out.append(Persona(fields["name"], fields["system"], fields["group"], "archetype"))
    return out


def load_persona_questions(path: str | Path | None = None) -> PromptSet:
    """The questions every persona answers (default: the shipped ``questions.jsonl``)."""
    return load_prompt_set(shipped_or_path(path or "questions", FOLDER), "persona_questions")


def default_system_prompt(tokenizer) -> str | None:
    """The system prompt the tokenizer's chat template inserts when none is given, or None.

    Found by rendering one user turn with and without a (sentinel) system prompt: when the
    rendering without one is the rendering with one, the sentinel replaced by some text, that
    text is the default. SmolLM2-135M-Instruct's template gives
    ``"You are a helpful AI assistant named SmolLM, trained by Hugging Face"``; a template that
    adds nothing (or a tokenizer without a chat template) gives None.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel, user = "\ue000LENSROLESSYSTEM\ue001", "\ue000LENSROLESUSER\ue001"
    bare = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "system", "content": sentinel}, {"role": "user", "content": user}],
                                         tokenize=False, add_generation_prompt=True)
    if full.count(sentinel) != 1:
        return None
    prefix, suffix = full.split(sentinel)
    if len(bare) <= len(prefix) + len(suffix) or not (bare.startswith(prefix) and bare.endswith(suffix)):
        return None
    text = bare[len(prefix):len(bare) - len(suffix)]
    return text if text.strip() and user not in text else None


def default_personas(tokenizer, template: str) -> list[Persona]:
    """The default assistant's points of persona space under ``template`` (``"chat"`` or ``"plain"``).

    * ``assistant``: no system prompt given (``system=None``) — what a user gets by default.
      With a template that inserts a default system prompt this *is* that prompt.
    * ``assistant_no_system``: only when the chat template inserts a default system prompt —
      an explicitly empty system turn, the closest the template allows to "no system prompt".

    For the plain template, or a chat template with no default, there is one point.
    """
    default = default_system_prompt(tokenizer) if template == "chat" else None
    label = f"default system prompt: {default}" if default else "no system prompt"
    out = [Persona("assistant", None, label, "default")]
    if default:
        out.append(Persona("assistant_no_system", "", "empty system turn", "default"))
    return out


def check_unique(personas: Sequence[Persona]) -> None:
    """Raise :class:`DataError` naming every persona name used twice (a role and an archetype, say)."""
    seen: dict[str, str] = {}
    clash = []
    for p in personas:
        if p.name in seen:
            clash.append(f"{p.name!r} ({seen[p.name]} and {p.kind})")
        seen[p.name] = p.kind
    if clash:
        raise DataError(f"persona name(s) used twice: {', '.join(clash)}; rename the archetype(s)")
