"""Prompt sets, contrast pairs, their loaders, and chat formatting.

File formats read here:

* Project JSONL, shipped inside the package (``lens_roles/data/``, see :func:`data_dir`), one JSON
  object per line:
    - prompt sets (``roles/<role>.jsonl``, ``roles/baseline.jsonl``):
      ``{"instruction": str}``, optionally ``"system": str``;
    - contrast pairs (``personas/*.jsonl``):
      ``{"user": str, "positive": str, "negative": str}``, optionally ``"system": str``.
      The positive and negative strings are assistant replies to the same user turn.
* Role-Vectors JSON (``../shared/data/role-vectors/splits/*.json``): a list of
  ``{"instruction": str, "category": str | null, ...}``.
* CAA JSON (``../shared/data/caa/*.json``): a list of ``{"positive": str, "negative": str}``
  whose two strings share a question and differ in the final answer; the shared
  part becomes the user turn and the differing tail the reply.

Chat formatting (:func:`render`) uses the tokenizer's own chat template when it has
one (a system prompt of ``""`` is an explicitly empty system turn there, which differs from
``None`` for templates that insert a default system prompt when none is given).
Otherwise it uses the plain template ``PLAIN_TEMPLATE``::

    [System: {system}\\n\\n]User: {user}\\n\\nAssistant:[ {reply}]

Either way the rendered text records three character spans: the user's
instruction, the end-of-instruction span (template text between the end of the
instruction and the start of the reply, the positions the role-vectors paper
reads), and the reply.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from lens_roles.errors import DataError
from lens_roles.inputs.sets import ItemSet
from lens_roles.io import parse_json, parse_jsonl, read_text

PLAIN_TEMPLATE = "[System: {system}\\n\\n]User: {user}\\n\\nAssistant:[ {reply}]"


# ----------------------------------------------------------------------- values


@dataclass(frozen=True)
class Prompt:
    """One user turn, with an optional system prompt and an optional assistant reply."""

    user: str
    system: str | None = None
    reply: str | None = None


@dataclass(frozen=True)
class PromptSet(ItemSet):
    """A named, ordered set of prompts (e.g. one role's instructions, or the baseline).

    ``len``, iteration, ``head``, ``subset``, ``split``, ``halves`` and ``fingerprint`` are the
    one set API of :mod:`lens_roles.inputs.sets`.
    """

    name: str
    prompts: tuple[Prompt, ...]
    source: str = ""
    items_field: ClassVar[str] = "prompts"

    def __post_init__(self):
        if not self.prompts:
            raise DataError(f"prompt set {self.name!r} ({self.source or 'in memory'}) is empty")

    def item_key(self, item: Prompt) -> tuple:
        return (item.system, item.user, item.reply)


def as_prompts(prompts) -> list[Prompt]:
    """Any way of giving prompts as a list of :class:`Prompt`: a :class:`PromptSet`, one
    :class:`Prompt` or user string, or a sequence of them (strings become user turns).

    Raises:
        DataError: when no prompt is given.
    """
    if isinstance(prompts, PromptSet):
        return list(prompts.prompts)
    if isinstance(prompts, (str, Prompt)):
        prompts = [prompts]
    out = [Prompt(p) if isinstance(p, str) else p for p in prompts]
    if not out:
        raise DataError("no prompts given: pass a PromptSet, a Prompt, a string or a non-empty list of them")
    return out


@dataclass(frozen=True)
class ContrastPair:
    """One user turn with a positive and a negative assistant reply."""

    user: str
    positive: str
    negative: str
    system: str | None = None

    def as_prompts(self) -> tuple[Prompt, Prompt]:
        return (
            Prompt(self.user, self.system, self.positive),
            Prompt(self.user, self.system, self.negative),
        )


@dataclass(frozen=True)
class PairSet(ItemSet):
    """A named, ordered set of contrast pairs (the one set API of :mod:`lens_roles.inputs.sets`)."""

    name: str
    pairs: tuple[ContrastPair, ...]
    source: str = ""
    items_field: ClassVar[str] = "pairs"

    def __post_init__(self):
        if not self.pairs:
            raise DataError(f"pair set {self.name!r} ({self.source or 'in memory'}) is empty")

    def item_key(self, item: ContrastPair) -> tuple:
        return (item.system, item.user, item.positive, item.negative)

    def positives(self) -> PromptSet:
        return PromptSet(f"{self.name}+", tuple(p.as_prompts()[0] for p in self.pairs), self.source)

    def negatives(self) -> PromptSet:
        return PromptSet(f"{self.name}-", tuple(p.as_prompts()[1] for p in self.pairs), self.source)



# ---------------------------------------------------------------------- loaders


def data_dir() -> Path:
    """The shipped data (``personas/``, ``roles/``, ``saes/``): ``$LENS_ROLES_DATA`` when set, else the
    package's own ``lens_roles/data``, found through ``importlib.resources`` so that an installed
    wheel finds it as well as a source checkout."""
    env = os.environ.get("LENS_ROLES_DATA")
    if env:
        return Path(env)
    root = importlib.resources.files("lens_roles") / "data"
    if not isinstance(root, Path):
        raise DataError(f"lens_roles is installed where its data are no plain files ({root}); "
                        "install it unpacked, or point $LENS_ROLES_DATA at a copy of lens_roles/data")
    return root


def source_label(path: str | Path) -> str:
    """How a loaded set names its file in records and figure metadata: a shipped file as
    ``lens_roles/data/<folder>/<file>`` — the same in every checkout, so that a job rerun in
    another folder or on another machine leaves its figures unchanged — any other file as given."""
    try:
        rel = Path(path).resolve().relative_to(data_dir().resolve())
    except (ValueError, OSError, DataError):
        return str(path)
    return f"lens_roles/data/{rel.as_posix()}"


def shipped_or_path(spec: str | Path, folder: str) -> Path:
    """``spec`` as a path, or, when it is a bare name that is no file (no folder, no suffix), the
    shipped set of that name: ``shipped_or_path("librarian", "personas")`` is
    ``data_dir() / "personas" / "librarian.jsonl"``. Lets the loaders and the CLI take
    ``librarian`` or ``chemist`` as well as a path."""
    path = Path(spec)
    if len(path.parts) == 1 and not path.suffix and not path.exists():
        shipped = data_dir() / folder / f"{path.name}.jsonl"
        if shipped.is_file():
            return shipped
    return path


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """The one reader of the project's record files: a JSONL file, or a ``.json`` list, as
    ``(location, record)`` pairs.

    ``location`` is the 1-based line number in JSONL (blank lines skipped) or the 0-based item
    index in a JSON list, so that every loader's errors can name the file and the record.

    The text is read by :func:`lens_roles.io.read_text` and parsed by
    :func:`~lens_roles.io.parse_json` / :func:`~lens_roles.io.parse_jsonl` (lines split on
    ``\\n`` only), so hostile files fail the same way everywhere.

    Raises:
        DataError: naming the file (and line or item), for a missing or unreadable file, text
            that is not UTF-8, malformed or too deeply nested JSON, a JSON file that is not a
            list, a record that is not a JSON object, or no records at all.
    """
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".json":
        data = parse_json(text, str(path))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        records = list(enumerate(data))
        where = "item"
    else:
        records = parse_jsonl(text, str(path))
        where = "line"
    for loc, rec in records:
        if not isinstance(rec, dict):
            raise DataError(f"{path} {where} {loc}: expected a JSON object, got {type(rec).__name__}")
    if not records:
        raise DataError(f"{path}: holds no records")
    return records


def _field(path, loc, rec: dict, key: str, required: bool = True) -> str | None:
    value = rec.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path} line/item {loc}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def load_prompt_set(path: str | Path, name: str | None = None) -> PromptSet:
    """Load prompts from project JSONL or Role-Vectors JSON (``instruction`` field); a bare name
    (``"chemist"``, ``"baseline"``) is the shipped set in ``roles/``."""
    path = shipped_or_path(path, "roles")
    prompts = []
    for loc, rec in read_records(path):
        key = "instruction" if "instruction" in rec else "user" if "user" in rec else "instruction"
        prompts.append(Prompt(_field(path, loc, rec, key), _field(path, loc, rec, "system", False)))
    return PromptSet(name or path.stem, tuple(prompts), source_label(path))


def _split_caa(path, loc, positive: str, negative: str) -> ContrastPair:
    """Split two CAA strings into their shared question and differing answers."""
    n = 0
    while n < min(len(positive), len(negative)) and positive[n] == negative[n]:
        n += 1
    if n == len(positive) == len(negative):
        raise DataError(f"{path} item {loc}: positive and negative are identical")
    cut = max(positive.rfind("\n", 0, n), positive.rfind(" ", 0, n)) + 1
    user = positive[:cut].rstrip()
    if not user:
        raise DataError(f"{path} item {loc}: positive and negative share no question text")
    return ContrastPair(user, positive[cut:], negative[cut:])


def load_pairs(path: str | Path, name: str | None = None) -> PairSet:
    """Load contrast pairs from project JSONL (user/positive/negative) or CAA JSON; a bare name
    (``"librarian"``) is the shipped set in ``personas/``."""
    path = shipped_or_path(path, "personas")
    pairs = []
    for loc, rec in read_records(path):
        pos = _field(path, loc, rec, "positive")
        neg = _field(path, loc, rec, "negative")
        if "user" in rec:
            pair = ContrastPair(_field(path, loc, rec, "user"), pos, neg, _field(path, loc, rec, "system", False))
        else:
            pair = _split_caa(path, loc, pos, neg)
        if pair.positive == pair.negative:
            raise DataError(f"{path} line/item {loc}: positive and negative replies are identical")
        pairs.append(pair)
    return PairSet(name or path.stem, tuple(pairs), source_label(path))


def available_roles(directory: str | Path | None = None) -> list[str]:
    """Names of the shipped role prompt sets in ``roles/`` (every JSONL but the baseline)."""
    directory = Path(directory) if directory else data_dir() / "roles"
    if not directory.is_dir():
        raise DataError(f"{directory}: no such folder of role prompt sets (<role>.jsonl files)")
    return sorted(p.stem for p in directory.glob("*.jsonl") if p.stem != "baseline")


def load_role(role: str, directory: str | Path | None = None) -> PromptSet:
    """Load one role's instructions by name (``"chemist"``) from the shipped ``roles/``."""
    directory = Path(directory) if directory else data_dir() / "roles"
    path = directory / f"{role.replace(' ', '_')}.jsonl"
    if not path.is_file():
        raise DataError(
            f"unknown role {role!r}: no {path}. Known roles: {', '.join(available_roles(directory)) or 'none'}"
        )
    return load_prompt_set(path, role)


def load_baseline(path: str | Path | None = None) -> PromptSet:
    return load_prompt_set(path or data_dir() / "roles" / "baseline.jsonl", "baseline")


def resolve_roles(spec: str | Iterable[str], directory: str | Path | None = None) -> list[str]:
    """``"all"``, ``"chemist,lawyer"`` or a list of names → validated role names."""
    known = available_roles(directory)
    names = known if spec == "all" else [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    unknown = [n for n in names if n.replace(" ", "_") not in known]
    if unknown:
        raise DataError(f"unknown role(s) {', '.join(map(repr, unknown))}. Known roles: {', '.join(known)}")
    if not names:
        raise DataError("no roles given")
    return names


# ------------------------------------------------------------------ formatting


@dataclass(frozen=True)
class Rendered:
    """A prompt rendered to text, with character spans ``[start, end)`` of its parts."""

    text: str
    user_span: tuple[int, int]
    eoi_span: tuple[int, int]
    reply_span: tuple[int, int] | None
    template: str = field(compare=False)


def template_name(tokenizer) -> str:
    """``"chat"`` when the tokenizer carries a chat template, else ``"plain"``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def render(tokenizer, prompt: Prompt, template: str | None = None) -> Rendered:
    """Render ``prompt`` with the model's chat template (or the plain one).

    The reply, when present, is appended right after the generation prompt with no
    end-of-turn marker, so that the reply's tokens are the last ones and a
    ``"last"`` position reads the final reply token.
    """
    template = template or template_name(tokenizer)
    if template == "chat":
        # system "" is an explicitly empty system turn: with a template that inserts a default
        # system prompt when none is given (SmolLM2's), it is how "no system prompt" is rendered
        messages = ([{"role": "system", "content": prompt.system}] if prompt.system is not None else []) + [
            {"role": "user", "content": prompt.user}
        ]
        # Render with a sentinel in place of the user text, so that the user's span is
        # found exactly even when the text also occurs in the template.
        sentinel = "\ue000LENSROLESUSER\ue001"
        messages[-1]["content"] = sentinel
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if head.count(sentinel) != 1:
            raise DataError("the chat template does not contain the user's text verbatim exactly once")
        start = head.index(sentinel)
        head = head[:start] + prompt.user + head[start + len(sentinel):]
        user_end = start + len(prompt.user)
    elif template == "plain":
        head = f"System: {prompt.system}\n\n" if prompt.system else ""
        head += f"User: {prompt.user}"
        user_end = len(head)
        head += "\n\nAssistant:"
    else:
        raise DataError(f"unknown template {template!r} (use 'chat' or 'plain')")
    user_span = (user_end - len(prompt.user), user_end)
    eoi_span = (user_end, len(head))
    if prompt.reply is None:
        return Rendered(head, user_span, eoi_span, None, template)
    sep = " " if template == "plain" else ""
    text = head + sep + prompt.reply
    return Rendered(text, user_span, eoi_span, (len(head) + len(sep), len(text)), template)


def common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
