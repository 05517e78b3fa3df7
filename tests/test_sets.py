"""The one set API (``lens_roles.inputs.sets``) on PromptSet, PairSet and QuestionSet, and proof
that the one split rule selects exactly what each splitting routine it replaced selected."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.errors import DataError
from lens_roles.inputs.prompts import ContrastPair, PairSet, Prompt, PromptSet
from lens_roles.inputs.questions import Question, QuestionSet
from lens_roles.inputs.sets import split_indices, split_point

SIZES = [2, 3, 4, 5, 7, 10, 12, 13, 32, 33, 64, 100, 264]
SEEDS = [0, 1, 3, 7, 42]


def prompts(n: int) -> PromptSet:
    return PromptSet("p", tuple(Prompt(f"u{i}", "s" if i % 3 else None, f"r{i}") for i in range(n)), "mem.jsonl")


def pairs(n: int) -> PairSet:
    return PairSet("c", tuple(ContrastPair(f"u{i}", f"a{i}", f"b{i}") for i in range(n)), "mem.jsonl")


def questions(n: int) -> QuestionSet:
    qs = tuple(Question(f"Q{i}\nA. x\nB. y", ("A", "B"), "AB"[i % 2], f"f:{i}") for i in range(n))
    return QuestionSet("econ", qs, "f.json", ("skipped one",))


# ------------------------------------------------- the routines the split rule replaced, frozen here


def old_first_fraction(items: tuple, fraction: float) -> tuple[tuple, tuple]:
    """PromptSet.split / PairSet.split before the one set API."""
    k = split_point(len(items), fraction)
    return items[:k], items[k:]


def old_question_split(items: tuple, validation: float, seed: int) -> tuple[tuple, tuple]:
    """QuestionSet.split(validation, seed) before the one set API."""
    n = len(items)
    k = max(1, min(n - 1, round(n * validation)))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return tuple(items[i] for i in sorted(order[:k])), tuple(items[i] for i in sorted(order[k:]))


def old_split_pairs(items: tuple, n_train: int, n_test: int, seed: int) -> tuple[tuple, tuple]:
    """studies.ab_curves.split_pairs before the one set API."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if n_train + n_test > len(items):
        n_train = max(1, min(n_train, len(items) - min(n_test, len(items) // 2)))
        n_test = len(items) - n_train
    return (tuple(items[i] for i in sorted(order[:n_train])),
            tuple(items[i] for i in sorted(order[n_train:n_train + n_test])))


def old_demo_split_indices(n: int) -> tuple[range, range]:
    """studies.demo._split_indices before the one set API (TRAIN_FRACTION = 0.75)."""
    k = split_point(n, 0.75)
    return range(k), range(k, n)


def old_corpus_split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """analysis.sae.corpus.Corpus.split before the one split rule: (train, eval) positions."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * eval_fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def old_fingerprint(items) -> str:
    return hashlib.sha256(json.dumps(items, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------- equivalence per call site


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("fraction", [0.01, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_first_fraction_split_is_the_old_prompt_and_pair_split(n, fraction):
    ps, cs = prompts(n), pairs(n)
    assert tuple(p.prompts for p in ps.split(fraction)) == old_first_fraction(ps.prompts, fraction)
    assert tuple(p.pairs for p in cs.split(fraction)) == old_first_fraction(cs.pairs, fraction)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("validation", [0.1, 0.25, 0.5])
def test_seeded_fraction_split_is_the_old_question_split(n, seed, validation):
    qs = questions(n)
    val, test = qs.split(validation, seed=seed, names=(f"{qs.name}[val]", None))
    assert (val.questions, test.questions) == old_question_split(qs.questions, validation, seed)
    assert (val.name, test.name) == ("econ[val]", "econ")  # as the old split named them (selected_on column)
    assert val.source == test.source == "f.json" and val.skipped == test.skipped == ("skipped one",)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_train, n_test", [(1, 1), (6, 3), (6, 6), (10, 50), (50, 10), (100, 100), (32, 32)])
def test_counted_seeded_split_is_the_old_split_pairs(n, seed, n_train, n_test):
    cs = pairs(n)
    train, test = cs.split(n_train, seed=seed, rest=n_test)
    assert (train.pairs, test.pairs) == old_split_pairs(cs.pairs, n_train, n_test, seed)


@pytest.mark.parametrize("n", SIZES)
def test_split_indices_is_the_old_demo_split(n):
    first, rest = split_indices(n, 0.75)
    old_first, old_rest = old_demo_split_indices(n)
    assert first == list(old_first) and rest == list(old_rest)


@pytest.mark.parametrize("n", SIZES + [1000, 4097])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("eval_fraction", [0.05, 0.1, 0.25])
def test_corpus_split_is_the_old_corpus_split(n, seed, eval_fraction):
    corpus = Corpus(tuple((i, i + 1) for i in range(n)), tuple("prompt" for _ in range(n)), {"seed": 0})
    train, held = corpus.split(eval_fraction, seed=seed)
    old_train, old_eval = old_corpus_split(n, eval_fraction, seed)
    assert [s[0] for s in train.sequences] == old_train and [s[0] for s in held.sequences] == old_eval
    assert train.meta["part"] == "train" and held.meta["part"] == "eval"


def test_fingerprints_did_not_move():
    ps, cs, qs = prompts(5), pairs(5), questions(5)
    assert ps.fingerprint() == old_fingerprint([(p.system, p.user, p.reply) for p in ps.prompts])
    assert cs.fingerprint() == old_fingerprint([(p.system, p.user, p.positive, p.negative) for p in cs.pairs])
    assert qs.fingerprint() == old_fingerprint([(q.text, q.answer) for q in qs.questions])


# ------------------------------------------------------------------------------- the one set API


@pytest.mark.parametrize("make", [prompts, pairs, questions])
def test_every_set_has_the_same_api(make):
    s = make(7)
    items = s.items
    assert len(s) == 7 and list(s) == list(items)
    assert s.head(3).items == items[:3] and s.head(None) is s and s.head(100) is s
    sub = s.subset([4, 0, 2], name="picked")
    assert sub.items == (items[4], items[0], items[2]) and sub.name == "picked" and sub.source == s.source
    assert type(sub) is type(s) and s.subset([1]).name == s.name
    a, b = s.halves()
    assert a.items == items[0::2] and b.items == items[1::2]
    assert (a.name, b.name) == (f"{s.name}[even]", f"{s.name}[odd]")
    first, rest = s.split(0.5)
    assert first.items + rest.items == items and first.name == rest.name == s.name
    first, rest = s.split(2, seed=5)
    assert len(first) == 2 and len(rest) == 5 and sorted(first.items + rest.items, key=items.index) == list(items)
    assert s.fingerprint() == make(7).fingerprint() != make(6).fingerprint()
    with pytest.raises(DataError, match="cannot keep 0 items"):
        s.head(0)
    with pytest.raises(DataError, match="cannot halve it"):
        s.head(1).halves()
    with pytest.raises(DataError, match="has 1 item"):
        s.head(1).split(0.5)


def test_split_rule_edges():
    assert split_indices(5, 2) == ([0, 1], [2, 3, 4])
    assert split_indices(5, 2, rest=1) == ([0, 1], [2])
    assert split_indices(5, 0.5, rest=1) == ([0, 1], [2])  # round(2.5) == 2
    first, rest = split_indices(10, 3, seed=0)
    assert first == sorted(first) and rest == sorted(rest) and sorted(first + rest) == list(range(10))
    with pytest.raises(DataError, match="leaves none for the rest"):
        split_indices(5, 5)
    with pytest.raises(DataError, match="at least one item, got size=0"):
        split_indices(5, 0)
    with pytest.raises(DataError, match="got rest=0"):
        split_indices(5, 2, rest=0)
    with pytest.raises(DataError, match=r"split fraction must be in \(0, 1\), got 1.5"):
        split_indices(5, 1.5)
    with pytest.raises(DataError, match="PairSet 'c' has 1 item"):
        pairs(1).split(0.5)
