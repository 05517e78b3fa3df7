"""The behaviour metrics (lens_roles.measures.behaviour) and the readout's KL, against direct computations
on the tiny model; the patching and SAE projection metrics compute the same projection."""

from __future__ import annotations

import math

import pytest
import torch

import lens_roles as lr
from lens_roles.analysis import patching as P
from lens_roles.analysis.sae.features import ProjectionMetric
from lens_roles.errors import DataError
from lens_roles.measures import sweeps
from lens_roles.measures.behaviour import (
    direction_projection,
    generation_coherence,
    generation_perplexity,
    logprob_margin,
    projection_label,
    repetition_rate,
    reply_logprob,
    reply_logprobs,
)
from lens_roles.runtime.generation import Generation
from lens_roles.runtime.readout import kl_divergence
from lens_roles.studies import psr_compare

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def item(tiny_model):
    prompt = lr.Prompt("Where are the atlases kept?", reply="On the second floor, by the maps.")
    return lr.encode(tiny_model, [prompt])[0]


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(7)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random"})


@torch.no_grad()
def test_reply_logprob_is_the_mean_log_p_of_the_reply_tokens(tiny_model, item):
    tokens = torch.tensor([item.tokens])
    resid = tiny_model(tokens, stop_at_layer=tiny_model.cfg.n_layers)[0]
    plain = torch.log_softmax(tiny_model(tokens)[0].float(), -1)
    a, b = item.reply
    logp = reply_logprobs(tiny_model, resid, item.reply)
    assert logp.shape == (b - a, tiny_model.cfg.d_vocab)
    per_token = torch.stack([plain[t - 1, item.tokens[t]] for t in range(a, b)])
    reply = item.tokens[a:b]
    assert float(reply_logprob(logp, reply)) == pytest.approx(float(per_token.mean()), abs=1e-5)
    assert float(reply_logprob(logp, reply, reduce="sum")) == pytest.approx(float(per_token.sum()), abs=1e-4)
    # batch dimensions pass through: two copies, two values
    both = reply_logprob(reply_logprobs(tiny_model, torch.stack([resid, resid]), item.reply), reply)
    assert both.shape == (2,) and torch.equal(both[0], both[1])


def test_logprob_margin_is_positive_minus_negative():
    pos, neg = torch.tensor([-1.0, -2.5]), torch.tensor([-3.0, -2.0])
    assert torch.equal(logprob_margin(pos, neg), torch.tensor([2.0, -0.5]))


@torch.no_grad()
def test_reply_spans_and_reductions_are_checked(tiny_model, item):
    resid = torch.zeros(len(item.tokens), tiny_model.cfg.d_model)
    for span in [(0, 3), (4, 4), (2, len(item.tokens) + 1)]:
        with pytest.raises(DataError, match=r"reply span .* 1 <= start < stop <= length"):
            reply_logprobs(tiny_model, resid, span)
    logp = reply_logprobs(tiny_model, resid, (1, 4))
    with pytest.raises(DataError, match="reduce must be one of"):
        reply_logprob(logp, [1, 2, 3], reduce="max")
    with pytest.raises(DataError, match="2 reply tokens for log-probabilities at 3 positions"):
        reply_logprob(logp, [1, 2])


@torch.no_grad()
def test_generation_perplexity_against_a_direct_computation(tiny_model):
    prompts = [list(it.tokens) for it in lr.encode(tiny_model, [lr.Prompt("Hi"), lr.Prompt("Where are the atlases?")])]
    generations = [[40, 41, 42, 43], [], [7, 9]]
    prompts = prompts + prompts[:1]
    ppl = generation_perplexity(tiny_model, prompts, generations)
    assert ppl.dtype == torch.float64 and ppl.shape == (3,)
    assert math.isnan(float(ppl[1]))  # nothing generated, nothing to score
    for r in (0, 2):
        full = torch.tensor([prompts[r] + generations[r]])
        logp = torch.log_softmax(tiny_model(full)[0].float(), -1)
        n = len(prompts[r])
        nll = -torch.stack([logp[n + k - 1, t] for k, t in enumerate(generations[r])]).mean()
        assert float(ppl[r]) == pytest.approx(float(nll.exp()), rel=1e-5)
    with pytest.raises(DataError, match="2 prompts for 3 generations"):
        generation_perplexity(tiny_model, prompts[:2], generations)


def test_repetition_rate():
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # (1,2,3) repeats once among 4 trigrams
    assert repetition_rate([5, 5, 5, 5], n=1) == pytest.approx(3 / 4)
    assert repetition_rate([1, 2]) == 0.0


def test_kl_divergence_against_torch():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.randn(3, 5, 11), -1)
    logq = torch.log_softmax(torch.randn(3, 5, 11), -1)
    ref = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(logp, logq), ref)
    assert kl_divergence(logp, logp).abs().max() == 0
    assert kl_divergence(logp[0, 0], logq).shape == (3, 5)  # the reference broadcasts


@torch.no_grad()
def test_one_projection_for_patching_and_sae_metrics(tiny_model, direction):
    torch.manual_seed(1)
    resid = torch.randn(4, 6, tiny_model.cfg.d_model)
    v = direction[1]
    direct = resid @ (v / v.norm())
    torch.testing.assert_close(direction_projection(resid, direction, 1), direct)
    patching, sae = P.DirectionProjection(direction, 1), ProjectionMetric(direction, 1)
    assert torch.equal(patching(tiny_model, resid, 6), direction_projection(resid[:, -1], direction, 1))
    assert torch.equal(sae(resid[:, -1]), patching(tiny_model, resid, 6))
    assert patching.label == sae.label == projection_label(direction, 1) == "projection on random after layer 1"


def test_generation_coherence_leaves_empty_generations_out(tiny_model):
    prompts = [list(it.tokens) for it in lr.encode(tiny_model, [lr.Prompt("Hi"), lr.Prompt("Where are the atlases?")])]
    coherence = generation_coherence(tiny_model, prompts, [[40, 41, 42, 40, 41, 42], []])
    assert coherence.shape == (2, 2) and coherence.dtype == torch.float64
    alone = generation_perplexity(tiny_model, prompts[:1], [[40, 41, 42, 40, 41, 42]])
    assert float(coherence[0, 0]) == pytest.approx(float(alone[0]), rel=1e-6)
    assert float(coherence[0, 1]) == repetition_rate([40, 41, 42, 40, 41, 42]) == 0.25
    assert coherence[1].isnan().all()


def test_sweep_and_psr_comparison_average_coherence_the_same_way(tiny_model, direction, monkeypatch):
    """An empty generation (the model stopped at once) has no perplexity: both averages leave it out. The
    generation sweep used to count it as perplexity 1 and repetition 0, i.e. as perfectly coherent."""
    users = ["Where are the atlases kept?", "Can I renew a book online?"]
    # generation rows of the sweep: (prompt 0, α 0), (0, 3), (1, 0), (1, 3)
    made = {0: (40, 41, 42, 43), 1: (), 2: (7, 9, 7, 9, 7), 3: (50, 51)}

    def fake_generate(model, prompts, **kwargs):  # the PSR comparison's α = 3 generations
        return [Generation(str(p), "", made[2 * r + 1]) for r, p in enumerate(prompts)]

    def fake_branched(model, rows, branches, **kwargs):  # the sweep's: branch 0 unsteered, branch 1 α = 3
        assert len(branches) == 2
        return [[Generation(str(r), "", made[2 * r + b]) for r in range(len(rows))] for b in range(2)]

    monkeypatch.setattr(sweeps, "generate_branched", fake_branched)
    monkeypatch.setattr(psr_compare, "generate", fake_generate)
    metrics, _ = sweeps.generation_sweep(tiny_model, direction, users, steer_layers=[1], alphas=[3.0])
    value = metrics.set_index(["alpha", "metric"]).value
    items = [list(it.tokens) for it in lr.encode(tiny_model, [lr.Prompt(u) for u in users])]
    ppl = {r: float(generation_perplexity(tiny_model, [items[r // 2]], [made[r]])[0]) for r in (0, 2, 3)}
    assert value[(0.0, "perplexity")] == pytest.approx((ppl[0] + ppl[2]) / 2, rel=1e-6)
    assert value[(3.0, "perplexity")] == pytest.approx(ppl[3], rel=1e-6)  # not (1 + ppl[3]) / 2
    assert value[(3.0, "repetition")] == 0.0 and value[(0.0, "repetition")] == pytest.approx(1 / 6)
    # the PSR comparison's coherence of the α = 3 generations (rows 1 and 3) is the same number
    perplexity, repetition = psr_compare._coherence(tiny_model, [lr.Prompt(u) for u in users], None, 4)
    assert perplexity == pytest.approx(value[(3.0, "perplexity")], rel=1e-6)
    assert repetition == value[(3.0, "repetition")]
