"""Multiple-choice scoring under an intervention (the role-vectors paper's measurement).

A question is scored by the model's next-token distribution where its answer
would start: the softmax restricted to the option letters' tokens (the paper's
"softmax over the answer-letter tokens"). The letter tokens are found, per
question, by rendering the prompt once with each letter as the assistant's
reply and taking the first token where the renderings differ, so that chat and
plain templates, a leading space (``" A"``) or a custom ``answer_format``
(``"({letter})"``) all work without a hand-made token table.

Scoring reads only the final residual at one position per question, through
the shared-prefix batching of :mod:`lens_roles.runtime.batching` (the chat template's
trunk is computed once), and unembeds only those positions. Whatever hooks are
attached to the model (an intervention's context manager) act on every
forward, prefixes included.

:class:`Condition` names the four conditions of the paper's comparison — no
intervention, activation addition of a role vector at one layer, directional
ablation of it at every layer, and persona prompting (the role as system
prompt) — and applies one as a context manager.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from lens_roles.config import Config
from lens_roles.directions.direction import Direction
from lens_roles.errors import ConfigError, DataError, DirectionError
from lens_roles.inputs.positions import Encoded, encode
from lens_roles.inputs.prompts import Prompt, common_prefix_len
from lens_roles.inputs.questions import Question, QuestionSet
from lens_roles.interventions.steering import ablate, ablation_hooks, steer, steering_hooks
from lens_roles.runtime.batching import Schedule, run_batches, run_branched, schedule
from lens_roles.runtime.branching import Branch, unsteered
from lens_roles.runtime.capture import Capture, position_mean
from lens_roles.runtime.progress import progress_bar
from lens_roles.runtime.readout import logprobs_at
from lens_roles.runtime.shards import Executor, check_cover, split_units

CONDITIONS = ("none", "addition", "ablation", "prompting")
#: the persona prompt of the prompting condition; ``{article}`` is "a" or "an"
SYSTEM_TEMPLATE = "You are {article} {role}."


@dataclass(frozen=True)
class ChoiceItem:
    """One question ready to score.

    Attributes:
        tokens: the prompt's tokens up to where the options' continuations differ.
        choice_ids: the first token of each option's continuation, in letter order.
        answer: index of the right option.
    """

    tokens: tuple[int, ...]
    choice_ids: tuple[int, ...]
    answer: int


def choice_items(model, questions: Sequence[Question] | QuestionSet, *, system: str | None = None,
                 answer_format: str = "{letter}", template: str | None = None,
                 prepend_bos: bool | None = None) -> list[ChoiceItem]:
    """Tokenise questions for scoring (see the module docs for how letter tokens are found).

    Raises:
        DataError: naming the question, when two options' continuations begin with
            the same token (the format cannot tell them apart by one token).
    """
    if "{letter}" not in answer_format:
        raise DataError(f"answer_format must contain '{{letter}}', got {answer_format!r}")
    out = []
    for q in questions:
        renderings = encode(model, [Prompt(q.text, system, answer_format.format(letter=x)) for x in q.letters],
                            template=template, prepend_bos=prepend_bos)
        toks = [r.tokens for r in renderings]
        n = min(common_prefix_len(toks[0], t) for t in toks[1:])
        firsts = [t[n] if n < len(t) else None for t in toks]
        if n == 0 or None in firsts or len(set(firsts)) != len(firsts):
            raise DataError(f"question {q.id}: the options {', '.join(q.letters)} written as {answer_format!r} "
                            "do not begin with distinct tokens, so they cannot be scored by one next token")
        out.append(ChoiceItem(tuple(toks[0][:n]), tuple(firsts), q.answer_index))
    return out


@torch.no_grad()
def choice_logprobs(model, items: Sequence[ChoiceItem], *, batch_size: int = 16,
                    share_prefixes: bool = True, progress: bool = False) -> list[Float[Tensor, " choice"]]:
    """Full-vocabulary log-probabilities of each item's choice tokens at its next position.

    ``progress`` shows a bar counting questions.
    """
    if not items:
        raise DataError("no questions to score")
    last = model.cfg.n_layers - 1
    encoded, positions = _encoded(items)
    finals: list[Tensor | None] = [None] * len(items)
    cap = Capture([last], position_mean)  # the final residual at each row's one read position: [batch, d_model]

    def on_batch(members: list[int]) -> None:
        for row, i in enumerate(members):
            finals[i] = cap[last][row]

    with progress_bar(progress, len(items), "questions", unit="question") as bar:
        run_batches(model, encoded, positions, batch_size=batch_size, stop_at_layer=cap.stop_at_layer,
                    capture=cap, on_batch=on_batch, share_prefixes=share_prefixes, progress=bar.update)
    return _readout(model, items, finals)


@torch.no_grad()
def branched_choice_logprobs(model, items: Sequence[ChoiceItem], branches: Sequence[Branch], *,
                             batch_size: int = 16, share_prefixes: bool = True, progress: bool = False,
                             desc: str = "questions") -> list[list[Float[Tensor, " choice"]]]:
    """:func:`choice_logprobs` under each of ``branches`` (one list per branch), sharing the work below them.

    Each question's prompt (the trunk and prefixes through the KV cache, as in
    :func:`choice_logprobs`) runs once up to the deepest branch layer; each branch
    (:class:`~lens_roles.runtime.branching.Branch`: an intervention from its layer
    on) runs only the blocks after its layer
    (:func:`lens_roles.runtime.batching.run_branched`). No hooks may be attached
    around the call. ``progress`` shows a bar (labelled ``desc``) counting questions × branches.
    """
    if not items:
        raise DataError("no questions to score")
    last = model.cfg.n_layers - 1
    encoded, positions = _encoded(items)
    finals: list[list[Tensor | None]] = [[None] * len(items) for _ in branches]
    cap = Capture([last], position_mean)

    def on_batch(b: int, members: list[int]) -> None:
        for row, i in enumerate(members):
            finals[b][i] = cap[last][row]

    with progress_bar(progress, len(items) * len(branches), desc, unit="question") as bar:
        run_branched(model, encoded, positions, branches, batch_size=batch_size, stop_at_layer=cap.stop_at_layer,
                     capture=cap, on_batch=on_batch, share_prefixes=share_prefixes, progress=bar.update)
    return [_readout(model, items, f) for f in finals]


def _encoded(items: Sequence[ChoiceItem]) -> tuple[list[Encoded], list[list[int]]]:
    """The items as prompts to run, each read at its last token."""
    return [Encoded(it.tokens, (0, 0), (0, 0), None) for it in items], [[len(it.tokens) - 1] for it in items]


def _readout(model, items: Sequence[ChoiceItem], finals: Sequence[Tensor]) -> list[Float[Tensor, " choice"]]:
    """Log-probabilities of each item's choice tokens from its final residual ``[d_model]``."""
    out = []
    for start in range(0, len(items), 64):  # unembed in chunks: the vocabulary can be large
        chunk = items[start : start + 64]
        logp = logprobs_at(model, torch.stack(list(finals[start : start + len(chunk)])))
        out += [logp[row, list(it.choice_ids)].cpu() for row, it in enumerate(chunk)]
    return out


def score_questions(model, questions: QuestionSet | Sequence[Question], *, system: str | None = None,
                    answer_format: str = "{letter}", batch_size: int = 16, template: str | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Score each question under whatever hooks are attached to ``model``.

    Returns one row per question: ``question, subject, answer, pred, correct,
    p_correct`` (softmax over the letter tokens), ``letter_mass`` (total
    full-vocabulary probability of the letter tokens: how much the model answers
    with a letter at all). ``progress`` shows a bar counting questions.
    """
    qs = list(questions)
    items = choice_items(model, qs, system=system, answer_format=answer_format, template=template)
    return choice_frame(qs, items, choice_logprobs(model, items, batch_size=batch_size, progress=progress))


def choice_frame(qs: Sequence[Question], items: Sequence[ChoiceItem], logps: Sequence[Tensor]) -> pd.DataFrame:
    """The per-question rows of :func:`score_questions` from the choice log-probabilities."""
    rows = []
    for q, it, logp in zip(qs, items, logps):
        probs = torch.softmax(logp.double(), -1)
        pred = int(probs.argmax())
        rows.append({"question": q.id, "subject": q.subject, "answer": q.answer, "pred": q.letters[pred],
                     "correct": pred == it.answer, "p_correct": float(probs[it.answer]),
                     "letter_mass": float(logp.double().exp().sum())})
    return pd.DataFrame(rows)


def persona_prompt(role: str, template: str = SYSTEM_TEMPLATE) -> str:
    """``"financial_analyst"`` → ``"You are a financial analyst."`` (with ``template``)."""
    name = role.replace("_", " ").strip()
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return template.format(article=article, role=name)


@dataclass(frozen=True)
class Condition(Config):
    """One evaluation condition.

    Attributes:
        kind: ``"none"``, ``"addition"`` (``x + α·v_layer`` at ``layer``, every
            position), ``"ablation"`` (project ``v̂_layer`` out at every layer and
            position) or ``"prompting"`` (``system`` as the system prompt).
        layer: the role vector's layer used (addition, ablation).
        alpha: multiple of the raw role vector added (addition).
        system: the system prompt (prompting).
    """

    kind: str
    layer: int | None = None
    alpha: float | None = None
    system: str | None = None

    def __post_init__(self):
        if self.kind not in CONDITIONS:
            raise ConfigError(f"Condition: unknown condition kind={self.kind!r}; use one of {', '.join(CONDITIONS)}")
        if self.kind in ("addition", "ablation") and self.layer is None:
            raise ConfigError(f"Condition: condition {self.kind!r} needs a layer, got layer=None")
        if self.kind == "addition" and self.alpha is None:
            raise ConfigError("Condition: condition 'addition' needs alpha, got alpha=None")
        if self.kind == "prompting" and not self.system:
            raise ConfigError(f"Condition: condition 'prompting' needs a system prompt, got system={self.system!r}")

    @contextmanager
    def applied(self, model, direction: Direction | None = None):
        """Attach this condition's hooks for the block (none for ``none`` and ``prompting``)."""
        self._check_direction(direction)
        if self.kind == "addition":
            ctx = steer(model, direction, self.alpha, layers=[self.layer])
        elif self.kind == "ablation":
            ctx = ablate(model, direction, unit_layer=self.layer)
        else:
            ctx = nullcontext(model)
        with ctx:
            yield model


    def branch(self, model, direction: Direction | None = None) -> Branch | None:
        """This condition as a :class:`~lens_roles.runtime.branching.Branch` of the unprompted run, or None
        for ``prompting`` (another prompt shares nothing). ``ablation`` acts from the first block's output on,
        so it shares only the embedding and block 0."""
        if self.kind == "none":
            return unsteered(model)
        if self.kind == "prompting":
            return None
        self._check_direction(direction)
        if self.kind == "ablation":
            return Branch(0, tuple(ablation_hooks(model, direction, layers="all", unit_layer=self.layer)))
        return Branch(self.layer % model.cfg.n_layers,
                      tuple(steering_hooks(model, direction, self.alpha, layers=[self.layer])))

    def _check_direction(self, direction: Direction | None) -> None:
        if self.kind in ("addition", "ablation"):
            if direction is None:
                raise DirectionError(f"condition {self.kind!r} needs a direction")
            if self.layer not in direction:
                raise DirectionError(f"the direction has no layer {self.layer} (it has {list(direction.layers)})")


def evaluate_condition(model, questions: QuestionSet, condition: Condition, direction: Direction | None = None,
                       *, answer_format: str = "{letter}", batch_size: int = 16,
                       executor: Executor | None = None) -> pd.DataFrame:
    """:func:`score_questions` under ``condition``; adds ``condition, layer, alpha`` columns.

    With an ``executor`` the questions run as shards on its workers (:func:`sharded_choice_logprobs`).
    """
    if executor is not None:
        condition._check_direction(direction)  # here, before any shard is sent
        qs = list(questions)
        items = choice_items(model, qs, system=condition.system, answer_format=answer_format)
        (logps,) = sharded_choice_logprobs(model, items, [(condition, direction)], batch_size=batch_size,
                                           executor=executor, branched=False)
        return choice_frame(qs, items, logps).assign(condition=condition.kind, layer=condition.layer,
                                               alpha=condition.alpha)
    with condition.applied(model, direction):
        frame = score_questions(model, questions, system=condition.system, answer_format=answer_format,
                                batch_size=batch_size)
    return frame.assign(condition=condition.kind, layer=condition.layer, alpha=condition.alpha)


def evaluate_conditions(model, questions: QuestionSet | Sequence[Question],
                        conditions: Sequence[tuple[Condition, Direction | None]], *, answer_format: str = "{letter}",
                        batch_size: int = 16, progress: bool = False,
                        executor: Executor | None = None) -> list[pd.DataFrame]:
    """:func:`evaluate_condition` for each ``(condition, direction)``, sharing what they have in common.

    The conditions that branch off the unprompted run (``none``, every
    ``addition`` whatever its layer, α or direction, and ``ablation``, which shares
    only block 0) are scored together: each question runs once up to the deepest
    addition layer, then each condition runs only the blocks above its layer
    (:func:`branched_choice_logprobs`). ``prompting`` runs on its own. The frames come back in the order of
    ``conditions`` and equal :func:`evaluate_condition`'s (to float rounding where
    batching differs). ``progress`` shows a bar per shared run. With an ``executor`` the questions run as
    shards on its workers (:func:`sharded_choice_logprobs`): the same frames, bit for bit.
    """
    qs = list(questions)
    out: list[pd.DataFrame | None] = [None] * len(conditions)
    branches = {k: c.branch(model, d) for k, (c, d) in enumerate(conditions)}
    shared = [k for k, b in branches.items() if b is not None]
    if shared:
        items = choice_items(model, qs, answer_format=answer_format)
        if executor is None:
            logps = branched_choice_logprobs(model, items, [branches[k] for k in shared], batch_size=batch_size,
                                             progress=progress)
        else:
            logps = sharded_choice_logprobs(model, items, [conditions[k] for k in shared], batch_size=batch_size,
                                            executor=executor, progress=progress)
        for k, lp in zip(shared, logps):
            c = conditions[k][0]
            out[k] = choice_frame(qs, items, lp).assign(condition=c.kind, layer=c.layer, alpha=c.alpha)
    for k, (c, d) in enumerate(conditions):
        if out[k] is None:
            out[k] = evaluate_condition(model, qs, c, d, answer_format=answer_format, batch_size=batch_size,
                                        executor=executor)
    return out


@dataclass(frozen=True)
class ChoiceJob:
    """What every shard of one sharded scoring shares (sent to each worker once).

    ``items`` are scored under each of ``conditions`` (``(Condition, Direction | None)``
    pairs, built into hooks on the worker's own model): as branches of one run when
    ``branched`` (every condition but ``prompting``), else the one condition's hooks
    around a plain run. ``schedule`` is the items' forward passes, whose chunks the
    shards divide between them.
    """

    items: tuple[ChoiceItem, ...]
    conditions: tuple[tuple[Condition, Direction | None], ...]
    branched: bool
    batch_size: int
    schedule: Schedule


@dataclass(frozen=True)
class ChoiceShard:
    """One shard's final residuals at the items' answer positions.

    Attributes:
        chunks: the schedule chunks this shard ran (its identity).
        index: ``[n]`` indices into ``ChoiceJob.items`` (long).
        finals: ``[condition, n, d_model]`` on the CPU, in the model's dtype.
    """

    chunks: tuple[int, ...]
    index: Tensor
    finals: Float[Tensor, "condition n d_model"]


@torch.no_grad()
def choice_finals(model, job: ChoiceJob, chunks: Sequence[int]) -> ChoiceShard:
    """Run the given chunks of ``job.schedule`` under every condition; the per-shard computation of
    :func:`sharded_choice_logprobs` (the same batches as :func:`branched_choice_logprobs` /
    :func:`choice_logprobs` run, so the same residuals)."""
    last = model.cfg.n_layers - 1
    encoded, positions = _encoded(job.items)
    cap = Capture([last], position_mean)
    rows: list[list[Tensor]] = [[] for _ in job.conditions]
    order: list[list[int]] = [[] for _ in job.conditions]

    def keep(b: int, members: list[int]) -> None:
        order[b].extend(members)
        rows[b].append(cap[last].cpu())

    kw = dict(batch_size=job.batch_size, stop_at_layer=cap.stop_at_layer, capture=cap,
              only=job.schedule.subset(chunks))
    if job.branched:
        branches = [c.branch(model, d) for c, d in job.conditions]
        run_branched(model, encoded, positions, branches, on_batch=keep, **kw)
    else:
        ((condition, direction),) = job.conditions
        with condition.applied(model, direction):
            run_batches(model, encoded, positions, on_batch=lambda members: keep(0, members), **kw)
    finals = torch.stack([torch.cat(r) if r else torch.zeros(0, model.cfg.d_model, dtype=model.cfg.dtype)
                          for r in rows])
    return ChoiceShard(tuple(chunks), torch.tensor(order[0], dtype=torch.long), finals)


@torch.no_grad()
def sharded_choice_logprobs(model, items: Sequence[ChoiceItem],
                            conditions: Sequence[tuple[Condition, Direction | None]], *, batch_size: int = 16,
                            executor: Executor, branched: bool = True, progress: bool = False
                            ) -> list[list[Float[Tensor, " choice"]]]:
    """:func:`branched_choice_logprobs` under each condition (``branched``), or :func:`choice_logprobs` under
    the one condition's hooks (not ``branched``; as :func:`evaluate_condition` scores), with the forward
    passes run as identified shards on ``executor``'s workers.

    Each worker builds the conditions' hooks on its own model and returns the final
    residual of its shard's questions; the driver puts them in question order (each
    chunk exactly once, however often a shard ran) and reads out the letters here,
    so the log-probabilities equal the single-process ones bit for bit.

    Raises:
        DataError: no questions; a ``prompting`` condition among branches (its prompt shares
            nothing with the others), or several conditions not ``branched``.
    """
    if not items:
        raise DataError("no questions to score")
    if branched and any(c.kind == "prompting" for c, _ in conditions):
        raise DataError("a prompting condition is scored on its own (branched=False): its prompt shares nothing")
    if not branched and len(conditions) != 1:
        raise DataError(f"branched=False scores one condition, got {len(conditions)}")
    executor.check(model)
    encoded, positions = _encoded(items)
    job = ChoiceJob(tuple(items), tuple(conditions), branched, batch_size,
                    schedule(encoded, positions, batch_size=batch_size))
    n_chunks = len(job.schedule.chunks)
    payloads = split_units([len(job.schedule.members(c)) for c in range(n_chunks)], executor.shards(n_chunks))
    shards = executor.map(choice_finals, job, payloads, desc="question shards", progress=progress)
    check_cover([s.chunks for s in shards], n_chunks)
    finals = torch.zeros(len(conditions), len(items), model.cfg.d_model, dtype=shards[0].finals.dtype)
    for s in shards:
        finals[:, s.index] = s.finals
    return [_readout(model, items, list(f.to(model.cfg.device))) for f in finals]
