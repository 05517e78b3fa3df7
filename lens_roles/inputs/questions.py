"""Multiple-choice question sets and their loaders (the role-vectors paper's evaluation data).

A :class:`Question` is a user turn that lists lettered options, plus the letter
of the right one. Three record shapes are read, from a JSON list or JSONL,
detected per record:

``role-vectors``
    ``{"instruction": "<question>\\n A. ..\\n B. ..\\n ... Answer:", "target_score": "B"}``
    (``../shared/data/role-vectors/splits/target_test_<domain>.json``). The
    instruction already lists the options; each line's leading whitespace is
    removed (the upstream files indent option lines with tabs).
``processed``
    ``{"question": str, "option1": str, ..., "optionK": str, "true_option": 1..K}``
    (``…/role-vectors/processed/*.json``).
``mmlu``
    ``{"question": str, "choices": [str, ...], "answer": 0-based int or letter}``
    (the Hugging Face MMLU layout).

The last two are formatted with :data:`QUESTION_TEMPLATE`, options lettered
from ``letters``. Every question is checked when loaded: its answer must be one
of its option letters, and every option letter must appear in the text as an
option line (``A.`` or ``A)`` at the start of a line), so that a question set
and a ``letters`` setting that do not fit each other fail at once, naming file
and item.

:func:`load_domains` reads a folder of domain files (``target_test_<domain>.json``,
else every ``*.json``/``*.jsonl``) into ``{domain: QuestionSet}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

from lens_roles.errors import DataError
from lens_roles.inputs.prompts import Prompt, read_records, source_label
from lens_roles.inputs.sets import ItemSet

DEFAULT_LETTERS = "ABCD"
#: how ``processed`` / ``mmlu`` records are written as a user turn
QUESTION_TEMPLATE = "{question}\n{options}\nAnswer with the letter of the correct answer.\nAnswer:"
FORMATS = ("role-vectors", "processed", "mmlu")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question.

    Attributes:
        text: the user turn, options included.
        letters: the option letters, in order (``("A", "B", "C", "D")``).
        answer: the right letter, one of ``letters``.
        id: where it came from (``"<file stem>:<item>"``), for error messages and tables.
        subject: the source dataset's subject, when the record names one.
    """

    text: str
    letters: tuple[str, ...]
    answer: str
    id: str
    subject: str | None = None

    @property
    def answer_index(self) -> int:
        return self.letters.index(self.answer)

    def prompt(self, system: str | None = None) -> Prompt:
        return Prompt(self.text, system)


@dataclass(frozen=True)
class QuestionSet(ItemSet):
    """A named, ordered set of questions (one domain); the one set API of :mod:`lens_roles.inputs.sets`
    (a part of it keeps ``source`` and ``skipped``)."""

    name: str
    questions: tuple[Question, ...]
    source: str = ""
    skipped: tuple[str, ...] = ()
    items_field: ClassVar[str] = "questions"

    def __post_init__(self):
        if not self.questions:
            raise DataError(f"question set {self.name!r} ({self.source or 'in memory'}) is empty")

    def item_key(self, item: Question) -> tuple:
        return (item.text, item.answer)

    def answer_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.questions[0].letters, 0)
        for q in self.questions:
            counts[q.answer] = counts.get(q.answer, 0) + 1
        return counts


# ---------------------------------------------------------------------- loading


def _option_letters_present(text: str, letters: Sequence[str]) -> list[str]:
    """Letters with no option line (``A.`` / ``A)`` at a line start) in ``text``."""
    return [x for x in letters if not re.search(rf"(?m)^\s*\(?{re.escape(x)}[.)]", text)]


def _format(question: str, options: Sequence[str], letters: Sequence[str]) -> str:
    lines = "\n".join(f"{x}. {o.strip()}" for x, o in zip(letters, options))
    return QUESTION_TEMPLATE.format(question=question.strip(), options=lines)


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _clean_options(where: str, options) -> list[str]:
    """Options as strings; trailing empty slots (``None``/``NaN``, as in upstream files) are dropped."""
    if not isinstance(options, list):
        raise DataError(f"{where}: the options must be a list, got {type(options).__name__}")
    while options and _is_blank(options[-1]):
        options = options[:-1]
    for i, o in enumerate(options):
        if _is_blank(o) or not isinstance(o, (str, int, float)) or isinstance(o, bool):
            raise DataError(f"{where}: option {i + 1} is {o!r}; options must be strings or numbers")
    if len(options) < 2:
        raise DataError(f"{where}: needs at least two options, got {len(options)}")
    return [str(o) for o in options]


def _record_format(rec: dict) -> str | None:
    if "instruction" in rec and "target_score" in rec:
        return "role-vectors"
    if "question" in rec and "option1" in rec and "true_option" in rec:
        return "processed"
    if "question" in rec and "choices" in rec and "answer" in rec:
        return "mmlu"
    return None


def _question(path: Path, loc, rec: dict, letters: tuple[str, ...]) -> Question:
    where = f"{path} item {loc}"
    kind = _record_format(rec)
    if kind is None:
        raise DataError(
            f"{where}: unknown question format (keys {sorted(rec)}); expected one of: "
            "role-vectors {instruction, target_score}, processed {question, option1.., true_option}, "
            "mmlu {question, choices, answer}"
        )
    if kind == "role-vectors":
        text = rec["instruction"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'instruction' must be a non-empty string")
        text = "\n".join(line.strip() for line in text.strip().splitlines())
        q_letters, answer = letters, rec["target_score"]
    else:
        if kind == "processed":
            options = []
            while f"option{len(options) + 1}" in rec:
                options.append(rec[f"option{len(options) + 1}"])
            raw = rec["true_option"]
            index = raw - 1 if isinstance(raw, int) and not isinstance(raw, bool) else None
        else:
            options, raw = rec["choices"], rec["answer"]
            if isinstance(raw, str) and raw.strip() in letters:
                index = letters.index(raw.strip())
            else:
                index = raw if isinstance(raw, int) and not isinstance(raw, bool) else None
        options = _clean_options(where, options)
        if len(options) > len(letters):
            raise DataError(f"{where}: {len(options)} options but only {len(letters)} letters ({''.join(letters)})")
        q_letters = letters[: len(options)]
        if not isinstance(rec["question"], str) or not rec["question"].strip():
            raise DataError(f"{where}: 'question' must be a non-empty string")
        text = _format(rec["question"], options, q_letters)
        answer = q_letters[index] if index is not None and 0 <= index < len(q_letters) else raw
    if not isinstance(answer, str) or answer.strip() not in q_letters:
        raise DataError(f"{where}: answer {answer!r} is not one of the option letters {', '.join(q_letters)}")
    missing = _option_letters_present(text, q_letters)
    if missing:
        raise DataError(f"{where}: the question text has no option line for letter(s) {', '.join(missing)} "
                        f"(expected lines like '{missing[0]}. ...'); check the letters setting ({''.join(letters)})")
    subject = rec.get("dataset") or rec.get("subject")
    return Question(text, tuple(q_letters), answer.strip(), f"{path.stem}:{loc}",
                    subject if isinstance(subject, str) else None)


def load_questions(path: str | Path, *, letters: str | Sequence[str] = DEFAULT_LETTERS,
                   name: str | None = None, skip_invalid: bool = False) -> QuestionSet:
    """Load one multiple-choice file (JSON list or JSONL; formats in the module docs).

    With ``skip_invalid``, records that fail the checks are left out and their
    errors kept in ``QuestionSet.skipped`` (upstream files have a few, e.g. an
    option ``None`` that a CSV reader turned into ``NaN``).

    Raises:
        DataError: naming the file and item, for an unknown record shape, an answer
            that is not an option letter, or options missing from the text.
    """
    path = Path(path)
    letters = tuple(letters)
    if len(set(letters)) != len(letters) or len(letters) < 2:
        raise DataError(f"letters must be at least two distinct labels, got {letters}")
    questions, skipped = [], []
    for loc, rec in read_records(path):
        try:
            questions.append(_question(path, loc, rec, letters))
        except DataError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
    if not questions:
        raise DataError(f"{path}: no valid questions ({len(skipped)} skipped; first: {skipped[0]})")
    return QuestionSet(name or domain_name(path), tuple(questions), source_label(path), tuple(skipped))


def domain_name(path: Path) -> str:
    """``target_test_natural_science.json`` → ``natural_science``."""
    stem = Path(path).stem
    return stem[len("target_test_"):] if stem.startswith("target_test_") else stem


def load_domains(path: str | Path, *, domains: Sequence[str] | None = None,
                 letters: str | Sequence[str] = DEFAULT_LETTERS, skip_invalid: bool = False
                 ) -> dict[str, QuestionSet]:
    """``{domain: QuestionSet}`` from a folder of domain files, or from one file.

    In a folder, ``target_test_<domain>.json`` files are taken when there are any
    (the Role-Vectors layout), else every ``*.json`` / ``*.jsonl``. ``domains``
    keeps only those names, in that order.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("target_test_*.json")) or sorted([*path.glob("*.json"), *path.glob("*.jsonl")])
        if not files:
            raise DataError(f"{path}: no question files (*.json, *.jsonl) in this folder")
    else:
        raise DataError(f"{path}: no such file or folder")
    found = {domain_name(f): f for f in files}
    if domains is not None:
        unknown = [d for d in domains if d not in found]
        if unknown:
            raise DataError(f"{path}: no question file for domain(s) {', '.join(unknown)}; "
                            f"found: {', '.join(found)}")
        found = {d: found[d] for d in domains}
    return {d: load_questions(f, letters=letters, name=d, skip_invalid=skip_invalid) for d, f in found.items()}
