"""Multi-turn conversations: the value, the loader, chat templating and token spans per message.

File format (``lens_roles/data/conversations/<category>.jsonl``, one conversation per line)::

    {"id": "meta-01", "category": "meta",
     "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}

A conversation may open with one ``system`` message; after it, messages alternate
``user`` / ``assistant``, starting with ``user``; no content is empty. Assistant
messages are the replies to measure (given ones, or the model's own written in by
:func:`lens_roles.measures.drift.self_play`).

Screening records (``{"prompt": str, "response": str}`` per line) are read here too
(:func:`load_screen_records`).

:func:`encode_conversation` renders a conversation with the tokenizer's chat template
(the same rendering the single-turn prompts get in :mod:`lens_roles.inputs.prompts`, or
the plain ``User: … / Assistant: …`` template for a tokenizer without one) and records
which tokens hold each message's content, so that a per-turn mean reads exactly the
tokens of one message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from lens_roles.errors import DataError
from lens_roles.inputs.positions import default_prepend_bos
from lens_roles.inputs.prompts import data_dir, read_records, template_name

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One message of a conversation: ``role`` in :data:`ROLES` and non-empty ``content``."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A validated multi-turn conversation (see the module docs for the rules).

    Attributes:
        id: a name for tables and figures.
        category: e.g. ``ordinary``, ``meta``, ``vulnerable``, ``roleplay``.
        messages: the messages in order.
        source: where it was read (``file:line``), for error messages.
    """

    id: str
    category: str
    messages: tuple[Message, ...]
    source: str = ""

    def __post_init__(self):
        check_messages(self.messages, self.source or f"conversation {self.id!r}")

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages[0].role == "system" else None

    def turns(self) -> list[int]:
        """Indices (into ``messages``) of the assistant messages, in order."""
        return [i for i, m in enumerate(self.messages) if m.role == "assistant"]

    def user_turns(self) -> list[int]:
        """Indices of the user messages, in order."""
        return [i for i, m in enumerate(self.messages) if m.role == "user"]

    def upto(self, index: int) -> "Conversation":
        """The conversation up to and including message ``index``."""
        return replace(self, messages=self.messages[: index + 1])

    def as_dicts(self) -> list[dict]:
        """``[{"role": ..., "content": ...}, ...]``, as chat templates take them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]

    def to_record(self) -> dict:
        """The JSONL record this conversation is written as."""
        return {"id": self.id, "category": self.category, "messages": self.as_dicts()}


def check_messages(messages: Sequence, where: str) -> None:
    """Refuse messages that are not one optional system message then alternating user/assistant turns.

    Raises:
        DataError: naming ``where`` (file and line, or the conversation) and the index
            of the first bad message: an unknown role, empty content, a system message
            after the first, two turns of the same role in a row, or no user turn.
    """
    if not messages:
        raise DataError(f"{where}: the conversation has no messages")
    expected = "user"
    for i, m in enumerate(messages):
        if not isinstance(m, Message):
            raise DataError(f"{where} message {i}: expected a Message, got {type(m).__name__}")
        if m.role not in ROLES:
            raise DataError(f"{where} message {i}: unknown role {m.role!r}; use one of {ROLES}")
        if not isinstance(m.content, str) or not m.content.strip():
            raise DataError(f"{where} message {i} ({m.role}): content must be a non-empty string, "
                            f"got {m.content!r:.40}")
        if m.role == "system":
            if i != 0:
                raise DataError(f"{where} message {i}: a system message may only come first")
            continue
        if m.role != expected:
            raise DataError(f"{where} message {i}: expected a {expected} message (turns alternate user, "
                            f"assistant, ... after an optional system message), got {m.role}")
        expected = "assistant" if m.role == "user" else "user"
    if not any(m.role == "user" for m in messages):
        raise DataError(f"{where}: the conversation has no user message")


def conversation_from_record(rec: dict, where: str, default_id: str = "") -> Conversation:
    """A :class:`Conversation` from one JSON record (``id``, ``category``, ``messages``)."""
    raw = rec.get("messages")
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects, got {raw!r:.40}")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise DataError(f"{where} message {i}: expected an object with exactly 'role' and 'content', "
                            f"got {m!r:.60}")
        messages.append(Message(m["role"], m["content"]))
    category = rec.get("category", "")
    if not isinstance(category, str):
        raise DataError(f"{where}: field 'category' must be a string, got {category!r}")
    cid = rec.get("id", default_id)
    return Conversation(str(cid), category, tuple(messages), where)


def available_categories(directory: str | Path | None = None) -> list[str]:
    """The shipped conversation categories (file stems in ``conversations/``)."""
    directory = Path(directory) if directory else data_dir() / "conversations"
    if not directory.is_dir():
        raise DataError(f"{directory}: no such folder of conversations (<category>.jsonl files)")
    return sorted(p.stem for p in directory.glob("*.jsonl"))


def load_conversations(spec: str | Path | Iterable[str | Path] | None = None) -> list[Conversation]:
    """Conversations from JSONL files (one per line; see the module docs).

    ``spec`` is a file, a folder (every ``*.jsonl`` in it), a shipped category name
    (``"meta"``), a list of those, or None for every shipped category.

    Raises:
        DataError: naming the file, line and message index of the first malformed conversation.
    """
    if spec is None:
        spec = data_dir() / "conversations"
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[Conversation] = []
    for s in specs:
        path = Path(s)
        if len(path.parts) == 1 and not path.suffix and not path.exists():
            shipped = data_dir() / "conversations" / f"{path.name}.jsonl"
            if not shipped.is_file():
                raise DataError(f"unknown conversation set {s!r}: no such file, and no shipped category of that "
                                f"name (shipped: {', '.join(available_categories())})")
            path = shipped
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: holds no *.jsonl conversation files")
        for file in files:
            for loc, rec in read_records(file):
                out.append(conversation_from_record(rec, f"{file} line {loc}", f"{file.stem}-{loc}"))
    return out


def load_screen_records(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, response)`` pairs from JSONL/JSON records ``{"prompt": str, "response": str}``.

    Raises:
        DataError: naming the file and line of a record without a non-empty prompt or response.
    """
    out = []
    for loc, rec in read_records(path):
        pair = []
        for key in ("prompt", "response"):
            value = rec.get(key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path} line/item {loc}: field {key!r} must be a non-empty string, got {value!r:.40}")
            pair.append(value)
        out.append((pair[0], pair[1]))
    return out


# ------------------------------------------------------------------ encoding


@dataclass(frozen=True)
class EncodedConversation:
    """A conversation tokenised with its chat template.

    Attributes:
        tokens: token ids of the whole rendered conversation.
        spans: per message, the token span ``[start, end)`` of its content.
        roles: per message, its role.
        generation_prompt: whether the assistant header for a next reply was appended.
    """

    tokens: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    roles: tuple[str, ...]
    generation_prompt: bool

    def __len__(self) -> int:
        return len(self.tokens)

    def message_of_token(self) -> list[int]:
        """Per token, the index of the message whose content holds it (-1: template tokens)."""
        owner = [-1] * len(self.tokens)
        for k, (a, b) in enumerate(self.spans):
            for p in range(a, b):
                owner[p] = k
        return owner


_SENTINEL = "\ue000LENSROLESMSG{}\ue001"


def render_conversation(tokenizer, conversation: Conversation, *, template: str | None = None,
                        generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text and each message's character span ``[start, end)``.

    With the chat template each content is rendered as a unique sentinel first and
    put back afterwards, so a content's span is found exactly even when its text
    also occurs in the template. The plain template is
    ``[System: s\\n\\n]User: u\\n\\nAssistant: a\\n\\nUser: …`` (``Assistant:`` last
    with ``generation_prompt``).
    """
    template = template or template_name(tokenizer)
    msgs = conversation.messages
    if template == "chat":
        sentinels = [_SENTINEL.format(i) for i in range(len(msgs))]
        head = tokenizer.apply_chat_template([{"role": m.role, "content": s} for m, s in zip(msgs, sentinels)],
                                             tokenize=False, add_generation_prompt=generation_prompt)
        for s in sentinels:
            if head.count(s) != 1:
                raise DataError("the chat template does not contain each message's text verbatim exactly once")
        text, spans, rest = "", [], head
        for m, s in zip(msgs, sentinels):
            before, rest = rest.split(s, 1)
            text += before
            spans.append((len(text), len(text) + len(m.content)))
            text += m.content
        return text + rest, spans
    if template != "plain":
        raise DataError(f"unknown template {template!r} (use 'chat' or 'plain')")
    label = {"system": "System", "user": "User", "assistant": "Assistant"}
    text, spans = "", []
    for i, m in enumerate(msgs):
        text += ("\n\n" if i else "") + f"{label[m.role]}: "
        spans.append((len(text), len(text) + len(m.content)))
        text += m.content
    if generation_prompt:
        text += "\n\nAssistant:"
    return text, spans


def encode_conversation(model, conversation: Conversation, *, template: str | None = None,
                        prepend_bos: bool | None = None, generation_prompt: bool = False) -> EncodedConversation:
    """Render (:func:`render_conversation`) and tokenise a conversation with ``model.tokenizer``.

    A token belongs to a message when its first non-space character lies in the
    message's character span (BPE glues a leading space to the next word).

    Raises:
        DataError: no tokenizer, a message whose content gets no token of its own, or a
            conversation longer than the model's context.
    """
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise DataError("the model has no tokenizer, so a conversation cannot be encoded")
    template = template or template_name(tokenizer)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model, template)
    text, char_spans = render_conversation(tokenizer, conversation, template=template,
                                           generation_prompt=generation_prompt)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    starts = []
    for s, e in offsets:
        piece = text[s:e]
        stripped = len(piece) - len(piece.lstrip())
        starts.append(None if e <= s else s + stripped if stripped < len(piece) else s)
    shift = 0
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is not None and (not ids or ids[0] != bos):
        ids, shift = [bos] + ids, 1
    spans = []
    for k, (a, b) in enumerate(char_spans):
        idx = [i for i, s in enumerate(starts) if s is not None and a <= s < b]
        if not idx:
            raise DataError(f"{conversation.source or conversation.id} message {k}: its content gets no token "
                            "of its own under this template")
        spans.append((idx[0] + shift, idx[-1] + 1 + shift))
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and len(ids) > n_ctx:
        raise DataError(f"conversation {conversation.id!r} is {len(ids)} tokens, more than {model.cfg.model_name}'s "
                        f"context of {n_ctx}; shorten it")
    return EncodedConversation(tuple(ids), tuple(spans), tuple(m.role for m in conversation.messages),
                               generation_prompt)


__all__ = [
    "ROLES", "Message", "Conversation", "EncodedConversation", "check_messages", "conversation_from_record",
    "available_categories", "load_conversations", "load_screen_records", "render_conversation",
    "encode_conversation",
]
