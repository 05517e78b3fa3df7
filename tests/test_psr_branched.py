"""The PSR comparison's evaluations branched from the unsteered run below the steered layer equal the
same evaluations run in full under the intervention (tiny model)."""

from __future__ import annotations

import pytest
import torch

import lens_roles as lr
from lens_roles.inputs.prompts import Prompt
from lens_roles.interventions.psr import PSR
from lens_roles.interventions.psr.train import make_psr
from lens_roles.interventions.steering import intervene
from lens_roles.measures.behaviour import generation_coherence, logprob_margin, reply_logprob, reply_logprobs
from lens_roles.measures.multiple_choice import score_questions
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.generation import generate
from lens_roles.studies import psr_compare

pytestmark = pytest.mark.usefixtures("no_hook_leaks")

SYSTEM = "You are a warm, knowledgeable public librarian."


@pytest.fixture(scope="module")
def pairs():
    full = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    return lr.PairSet("held", full.pairs[:3])


@pytest.fixture
def direction(tiny_model):
    torch.manual_seed(3)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random"})


def _full_coherence(model, hooks, users, max_new_tokens):
    with intervene(model, hooks):
        outs = generate(model, users, max_new_tokens=max_new_tokens)
    items = lr.encode(model, users)
    ppl, rep = generation_coherence(model, [it.tokens for it in items], [o.tokens for o in outs]).nanmean(0)
    return float(ppl), float(rep)


def _full_margin(model, hooks, pairs, batch_size=8):
    prompts = [Prompt(p.user, None, r) for p in pairs.pairs for r in (p.positive, p.negative)]
    items = lr.encode(model, prompts)
    lps = []
    with torch.no_grad(), intervene(model, hooks):
        for batch in token_batches(model, [it.tokens for it in items], batch_size, sort=False):
            resid = batch.forward(model, stop_at_layer=model.cfg.n_layers)
            for r, it in enumerate(items[i] for i in batch.index):
                a, b = it.reply
                lps.append(reply_logprob(reply_logprobs(model, resid[r], it.reply).cpu(), it.tokens[a:b]))
    lp = torch.stack(lps).double()
    return float(logprob_margin(lp[0::2], lp[1::2]).mean())


@pytest.mark.parametrize("sink", [False, True])
def test_branched_evaluations_equal_full_runs(tiny_model, direction, pairs, sink):
    if sink:
        prompts = [Prompt(p.user, None, p.positive) for p in pairs.pairs]
        psr = make_psr(tiny_model, direction, prompts, SYSTEM, layers=[1], alpha=1.5)
    else:
        psr = PSR(direction, [1], 1.5)
    with torch.no_grad():
        psr.w.normal_(0, 0.5)  # a λ that varies by token
    users = [Prompt(p.user) for p in pairs.pairs]
    shared = psr_compare._Shared(tiny_model, min(psr.layers))
    block0 = []
    for alpha in (0.5, 2.0, 0.5):
        for method in ("constant", "psr"):
            branch = psr_compare._branch(tiny_model, method, direction, psr, alpha)
            assert branch.layer == 1
            got = psr_compare._coherence(tiny_model, users, None, 5, branch=branch, shared=shared)
            assert got == pytest.approx(_full_coherence(tiny_model, list(branch.hooks), users, 5), rel=1e-9)
            with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda acts, hook: block0.append(1))]):
                margin = psr_compare._margin(tiny_model, pairs, None, branch=branch, shared=shared)
            assert margin == pytest.approx(_full_margin(tiny_model, list(branch.hooks), pairs), abs=1e-6)
    assert len(block0) == 1  # the behaviour prompts ran below the steered layer once, for every α and method
    assert psr_compare._branch(tiny_model, "none", direction, psr, 0.0) is None


def test_matched_points_multiple_choice_in_one_branched_run(tiny_model, direction):
    from lens_roles.inputs.questions import Question, QuestionSet

    qs = QuestionSet("q", tuple(Question(f"Which letter is {a}?\n A. a\n B. b\n Answer:", ("A", "B"), a, f"q:{i}")
                                for i, a in enumerate("ABA")))
    psr = PSR(direction, [1], 1.5)
    branches = {"none": None, "constant": psr_compare._branch(tiny_model, "constant", direction, psr, 2.0),
                "psr": psr_compare._branch(tiny_model, "psr", direction, psr, 0.7)}
    got = psr_compare._mc(tiny_model, qs, branches, SYSTEM)
    for method, branch in branches.items():
        with intervene(tiny_model, [] if branch is None else list(branch.hooks)):
            frame = score_questions(tiny_model, qs)
        assert got[method][0] == pytest.approx(float(frame.correct.mean()), abs=1e-12)
        assert got[method][1] == pytest.approx(float(frame.p_correct.mean()), abs=1e-6)
    frame = score_questions(tiny_model, qs, system=SYSTEM)
    assert got["prompting"] == (float(frame.correct.mean()), float(frame.p_correct.mean()))
