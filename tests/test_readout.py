"""One readout: on a tiny model with an output logit soft-cap, every reader of log-probabilities
(adherence sweep, multiple-choice scoring, the PSR's KL objective, patching metrics) reads what a plain
``model(tokens)`` gives, and the old readout without the soft-cap would not have."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from conftest import make_tiny_model

import lens_roles as lr
from lens_roles.analysis import patching as P
from lens_roles.inputs.prompts import Prompt
from lens_roles.inputs.questions import Question
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import prepare, psr_loss
from lens_roles.interventions.steering import steer
from lens_roles.measures.multiple_choice import choice_items, choice_logprobs, score_questions
from lens_roles.measures.sweeps import adherence_sweep
from lens_roles.runtime.readout import final_logits, logprobs_at

pytestmark = pytest.mark.usefixtures("one_thread")

CAP = 2.0  # the tiny model's raw logits reach about ±2.5: a cap of 2 changes every distribution
TOL = 1e-5  # float32 agreement of two computations of the same log-probabilities
SYSTEM = "You are a warm, knowledgeable public librarian."


@pytest.fixture(scope="module")
def capped(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, name="tiny-softcap")
    model.cfg.output_logits_soft_cap = CAP
    return model


@contextmanager
def uncapped(model):
    """The model as the old readout saw it: no soft-cap (``model(tokens)`` then gives the old numbers)."""
    cap = model.cfg.output_logits_soft_cap
    model.cfg.output_logits_soft_cap = -1.0
    try:
        yield model
    finally:
        model.cfg.output_logits_soft_cap = cap


def plain_logprobs(model, tokens) -> torch.Tensor:
    """``log_softmax(model(tokens))`` of one sequence, ``[pos, d_vocab]``: the reference."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([list(tokens)])).float(), -1)[0]


def differs(new: float, old: float) -> bool:
    return abs(new - old) > 100 * TOL


@pytest.fixture(scope="module")
def pairs():
    return lr.PairSet("librarian", lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
                      .pairs[:3])


@pytest.fixture(scope="module")
def direction(capped):
    torch.manual_seed(1)
    n = capped.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, capped.cfg.d_model),
                        {"model": capped.cfg.model_name, "name": "random"})


def test_readout_is_the_full_forward_at_the_positions_read(capped):
    tokens = lr.encode(capped, [Prompt("Where are the atlases kept?", SYSTEM, "On the second floor.")])[0].tokens
    with torch.no_grad():
        resid = capped(torch.tensor([tokens]), stop_at_layer=capped.cfg.n_layers)[0]
        logits = capped(torch.tensor([tokens]))[0]
        torch.testing.assert_close(final_logits(capped, resid[3:7]), logits[3:7], rtol=0, atol=TOL)
        torch.testing.assert_close(logprobs_at(capped, resid), plain_logprobs(capped, tokens), rtol=0, atol=TOL)
        assert logits.abs().max() < CAP  # the cap is on ...
        with uncapped(capped):
            assert (capped(torch.tensor([tokens]))[0] - logits).abs().max() > 0.3  # ... and it matters


def test_adherence_sweep_reads_the_plain_forward(capped, direction, pairs):
    frame = adherence_sweep(capped, direction, pairs, steer_layers=[0], alphas=[1.0], batch_size=2)
    margin = float(frame[(frame.metric == "logprob_margin") & (frame.alpha == 0.0)].value.item())

    def direct(model) -> float:
        total = 0.0
        for pair in pairs.pairs:
            lps = []
            for prompt in pair.as_prompts():
                item = lr.encode(model, [prompt])[0]
                logp = plain_logprobs(model, item.tokens)
                a, b = item.reply
                lps.append(float(torch.stack([logp[t - 1, item.tokens[t]] for t in range(a, b)]).mean()))
            total += lps[0] - lps[1]
        return total / len(pairs)

    assert margin == pytest.approx(direct(capped), abs=TOL)
    with uncapped(capped):
        assert differs(margin, direct(capped))


def test_multiple_choice_reads_the_plain_forward(capped):
    questions = [Question(f"{text}\nA. red\nB. green\nC. blue\nD. black\nAnswer:", ("A", "B", "C", "D"), "ABCD"[i],
                          f"test:{i}") for i, text in enumerate(["Which colour is the sky?", "Which colour is grass?",
                                                                 "Which colour is coal?"])]
    items = choice_items(capped, questions)
    logps = choice_logprobs(capped, items, batch_size=2)
    frame = score_questions(capped, questions, batch_size=2)
    for item, logp, row in zip(items, logps, frame.itertuples()):
        direct = plain_logprobs(capped, item.tokens)[-1, list(item.choice_ids)]
        torch.testing.assert_close(logp, direct, rtol=0, atol=TOL)
        assert row.p_correct == pytest.approx(float(torch.softmax(direct.double(), -1)[item.answer]), abs=TOL)
        assert row.letter_mass == pytest.approx(float(direct.double().exp().sum()), abs=TOL)
        with uncapped(capped):
            assert (plain_logprobs(capped, item.tokens)[-1, list(item.choice_ids)] - logp).abs().max() > 100 * TOL


def test_psr_kl_objective_reads_the_plain_forward(capped, direction, pairs):
    prompts = [Prompt(p.user, None, p.positive) for p in pairs.pairs]
    psr = PSR(direction, [1], 1.3)  # no sink: its constant twin is plain steering of every token
    data = prepare(capped, psr, prompts, SYSTEM, batch_size=len(prompts))  # one batch: the loss is one mean
    loss = psr_loss(capped, psr, data, "kl", constant_alpha=1.3)

    def direct(model) -> float:
        kls = []
        for run in data.runs:
            u, p = run.compared_kl()
            logp = plain_logprobs(model, run.prompted.tokens)[p]
            with steer(model, direction, 1.3, layers=[1]):
                logq = plain_logprobs(model, run.unprompted.tokens)[u]
            kls.append((logp.exp() * (logp - logq)).sum(-1))
        return float(torch.cat(kls).mean())

    assert loss == pytest.approx(direct(capped), abs=TOL)
    with uncapped(capped):
        assert differs(loss, direct(capped))


@pytest.mark.parametrize("metric", [P.LogprobMargin((40, 41, 42), (50, 51)), P.LogitDiff(11, 23)],
                         ids=["logprob_margin", "logit_diff"])
def test_patching_metrics_read_the_plain_forward(capped, metric):
    clean = list(lr.encode(capped, [Prompt("Explain the mechanism of an SN2 reaction.", SYSTEM)])[0].tokens)
    corrupt = [(t + 37) % capped.cfg.d_vocab if p in (4, 5, 6) else t for p, t in enumerate(clean)]
    setup = P.PatchSetup(capped, clean, corrupt, metric)

    def direct(model, ids) -> float:
        if isinstance(metric, P.LogitDiff):
            with torch.no_grad():
                logits = model(torch.tensor([ids]))[0, -1]
            return float(logits[11] - logits[23])
        means = []
        for cont in (metric.good, metric.bad):
            logp = plain_logprobs(model, list(ids) + list(cont))
            means.append(float(torch.stack([logp[len(ids) - 1 + k, t] for k, t in enumerate(cont)]).mean()))
        return means[0] - means[1]

    for ids, value in ((clean, setup.clean_value), (corrupt, setup.corrupt_value)):
        assert value == pytest.approx(direct(capped, ids), abs=TOL)
        with uncapped(capped):
            assert differs(value, direct(capped, ids))
