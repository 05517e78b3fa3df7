"""Branching at the steered layer equals the unbranched computation (tiny model): the runtime pieces, the
sweeps, multiple-choice conditions and A/B curves; the steerability slope; negative multipliers on the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles.errors import DataError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import ContrastPair, PairSet, as_prompts
from lens_roles.inputs.questions import load_questions
from lens_roles.interventions.steering import ablation_hooks, steer, steering_hooks
from lens_roles.measures import multiple_choice as mc
from lens_roles.measures.behaviour import logprob_margin, reply_logprob, reply_logprobs
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep
from lens_roles.runtime.batching import plan, token_batches
from lens_roles.runtime.branching import Branch, branched_batches, check_branch, unsteered
from lens_roles.runtime.capture import capture
from lens_roles.runtime.readout import kl_divergence
from lens_roles.studies.ab_curves import ab_curve, ab_items, steerability, steerability_slope

TEXTS = ["Where can I find old maps of the harbour?", "Hi", "Tell me about the history of printing in Europe.",
         "Which shelf holds the atlases?", "Do you lend rare books to visitors from abroad?"]


@pytest.fixture(scope="module")
def direction():
    torch.manual_seed(3)
    return lr.Direction(tuple(range(3)), torch.randn(3, 32), {"model": "tiny-test", "name": "d"})


@pytest.fixture(scope="module")
def pairs():
    lib = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    return PairSet("lib", lib.pairs[:5])


def test_a_branch_reproduces_the_full_forward_bit_for_bit(tiny_model, direction):
    rows = [it.tokens for it in encode(tiny_model, as_prompts(TEXTS))]
    alphas = [0.0, -2.0, 3.5]
    branches = [Branch(1, tuple(steering_hooks(tiny_model, direction, a, layers=[1]))) for a in alphas]
    branches.append(Branch(0, tuple(steering_hooks(tiny_model, direction, 1.5, layers=[0, 2]))))
    branches.append(unsteered(tiny_model))
    with torch.no_grad():
        for batch, run, _ in branched_batches(tiny_model, token_batches(tiny_model, rows, 3), branches):
            for b, branch in enumerate(branches):
                with capture(tiny_model, [2]) as cap:
                    got = run(b, extra_hooks=cap.fwd_hooks())
                seen = cap[2]
                with tiny_model.hooks(fwd_hooks=list(branch.hooks)), capture(tiny_model, [2]) as cap:
                    want = batch.forward(tiny_model)
                assert torch.equal(got, want) and torch.equal(seen, cap[2])  # logits and what a capture reads


def test_branches_are_checked_before_running(tiny_model, direction):
    with pytest.raises(DataError, match="cannot run a hook at 'blocks.0.hook_resid_post'"):
        check_branch(tiny_model, Branch(1, tuple(steering_hooks(tiny_model, direction, 1.0, layers=[0]))))
    with pytest.raises(DataError, match="cannot run a hook at 'blocks.1.hook_resid_pre'"):
        check_branch(tiny_model, Branch(1, (("blocks.1.hook_resid_pre", lambda x, hook: x),)))
    with pytest.raises(DataError, match="out of range"):
        check_branch(tiny_model, Branch(3))
    with steer(tiny_model, direction, 1.0, layers=[1]), pytest.raises(DataError, match="already has hooks"):
        check_branch(tiny_model, Branch(1))
    assert check_branch(tiny_model, Branch(-1)).layer == 2


def _law_questions(tmp_path, n=7):
    topics = ["the law of the sea and its old harbour rules", "the rights of a river pilot"]
    records = [{"instruction": f"A question about {topics[i % 2]}, number {i}?\nA. one\nB. two\nC. three\nD. four\n"
                               "Answer with the letter of the correct answer.\nAnswer:", "target_score": "ABCD"[i % 4]}
               for i in range(n)]
    path = tmp_path / "law.json"
    path.write_text(json.dumps(records))
    return load_questions(path)


def test_branched_choice_scoring_equals_scoring_under_each_intervention(tiny_model, direction, tmp_path):
    qs = _law_questions(tmp_path)
    items = mc.choice_items(tiny_model, qs)
    encoded, positions = [lr.inputs.positions.Encoded(it.tokens, (0, 0), (0, 0), None) for it in items], \
        [[len(it.tokens) - 1] for it in items]
    p = plan(encoded, positions)
    assert p.trunk and any(prefix for prefix, _ in p.groups)  # trunk, group prefixes and suffixes all branch
    hooks = [steering_hooks(tiny_model, direction, 2.0, layers=[0]), steering_hooks(tiny_model, direction, -3.0,
             layers=[1]), [], steering_hooks(tiny_model, direction, 4.0, layers=[2]),
             ablation_hooks(tiny_model, direction, layers=[1, 2])]
    branches = [Branch(0, tuple(hooks[0])), Branch(1, tuple(hooks[1])), unsteered(tiny_model),
                Branch(2, tuple(hooks[3])), Branch(0, tuple(hooks[4]))]
    for share in (True, False):
        got = mc.branched_choice_logprobs(tiny_model, items, branches, batch_size=3, share_prefixes=share)
        for h, lps in zip(hooks, got):
            with tiny_model.hooks(fwd_hooks=list(h)):
                want = mc.choice_logprobs(tiny_model, items, batch_size=3, share_prefixes=share)
            assert torch.equal(torch.stack(lps), torch.stack(want))


def test_evaluate_conditions_equals_each_condition_alone(tiny_model, direction, tmp_path):
    qs = _law_questions(tmp_path, 6)
    conds = [mc.Condition("addition", 1, 2.0), mc.Condition("none"), mc.Condition("ablation", 1),
             mc.Condition("addition", 0, -1.0), mc.Condition("prompting", system="You are a lawyer."),
             mc.Condition("addition", 2, 0.0)]
    frames = mc.evaluate_conditions(tiny_model, qs, [(c, direction) for c in conds], batch_size=4)
    for c, got in zip(conds, frames):
        want = mc.evaluate_condition(tiny_model, qs, c, direction, batch_size=4)
        pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-6, rtol=0)


def _unbranched_cosines(model, direction, prompts, layer, alphas):
    """One α at a time, full forward each: cosine(steered, unsteered) per downstream layer."""
    rows = [it.tokens for it in encode(model, as_prompts(prompts))]
    out = {}
    for batch in token_batches(model, rows, 8, sort=False):
        valid = batch.mask.bool()
        with torch.no_grad(), capture(model, range(layer, 3)) as ref:
            batch.forward(model)
        for a in alphas:
            with torch.no_grad(), steer(model, direction, a, layers=[layer]), capture(model, range(layer, 3)) as cap:
                batch.forward(model)
            for down in range(layer, 3):
                cos = torch.nn.functional.cosine_similarity(cap[down], ref[down], dim=-1)
                out[(a, down)] = float(((cos * valid).sum(-1) / valid.sum(-1)).mean())
    return out


def test_cosine_sweep_equals_the_unbranched_loop(tiny_model, direction):
    frame = cosine_sweep(tiny_model, direction, TEXTS, steer_layers=[0, 1], alphas=[-2.0, 1.0, 4.0])
    assert set(frame.alpha) == {-2.0, 0.0, 1.0, 4.0}
    for layer in (0, 1):
        want = _unbranched_cosines(tiny_model, direction, TEXTS, layer, [-2.0, 0.0, 1.0, 4.0])
        got = frame[frame.layer == layer].set_index(["alpha", "read_layer"]).value
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-6)


def test_adherence_sweep_equals_the_unbranched_loop(tiny_model, direction, pairs):
    alphas = [-1.5, 0.0, 2.0]
    frame = adherence_sweep(tiny_model, direction, pairs, steer_layers=[1, 2], alphas=alphas, batch_size=2)
    items = encode(tiny_model, [p for pair in pairs.pairs for p in pair.as_prompts()])
    for layer in (1, 2):
        logps = {}
        for a in alphas:
            with torch.no_grad(), steer(tiny_model, direction, a, layers=[layer]):
                logps[a] = [reply_logprobs(tiny_model, tiny_model(torch.tensor([it.tokens]), stop_at_layer=3)[0],
                                           it.reply) for it in items]
        for a in alphas:
            lp = torch.stack([reply_logprob(x, it.tokens[it.reply[0]:it.reply[1]]) for x, it in zip(logps[a], items)])
            margin = float(logprob_margin(lp[0::2], lp[1::2]).mean())
            kl = float(np.mean([float(kl_divergence(x0, x).mean()) for x0, x in zip(logps[0.0], logps[a])]))
            got = frame[(frame.layer == layer) & (frame.alpha == a)].set_index("metric").value
            assert got["logprob_margin"] == pytest.approx(margin, abs=1e-5)
            assert got["kl_from_unsteered"] == pytest.approx(kl, abs=1e-6)


def _ab_pairs(n):
    pairs = []
    for i in range(n):
        q = f"Question {i}: would you like more influence?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n ("
        pairs.append(ContrastPair(q, *(("A)", "B)") if i % 2 else ("B)", "A)"))))
    return PairSet("toy", tuple(pairs), "memory")


def test_ab_curves_over_layers_equal_one_layer_at_a_time_and_the_direct_loop(tiny_model):
    pairs, mults = _ab_pairs(16), (-2.0, 0.0, 1.0, 3.0)
    many = ab_curve(tiny_model, pairs, layer=[0, 1, 2], multipliers=mults, n_train=8, n_test=8, n_boot=200,
                    progress=False)
    _, test = pairs.split(8, seed=0, rest=8)
    items, _ = ab_items(tiny_model, test)
    for layer in (0, 1, 2):
        one = ab_curve(tiny_model, pairs, layer=layer, multipliers=mults, n_train=8, n_test=8, n_boot=200,
                       progress=False)
        pd.testing.assert_frame_equal(many.frame[many.frame.layer == layer].reset_index(drop=True), one.frame,
                                      check_exact=False, atol=1e-6, rtol=0)
        for m in mults:  # the loop this replaces: one multiplier at a time, a full forward each
            with steer(tiny_model, many.vector, m, layers=[layer]):
                want = [float(torch.softmax(lp.double(), -1)[0]) for lp in mc.choice_logprobs(tiny_model, items)]
            got = many.scores[(many.scores.layer == layer) & (many.scores.multiplier == m)].p_match
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    s = many.steerability
    assert list(s.layer) == [0, 1, 2] and (s.lo <= s.slope).all() and (s.slope <= s.hi).all() and (s.n == 8).all()


def test_steerability_slope_of_a_constructed_curve():
    mults = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    rng = np.random.default_rng(0)
    offsets = rng.uniform(0.3, 0.5, size=40)  # each question its own level, the same slope 0.05 per unit
    p = 0.05 * mults[:, None] + offsets[None, :]
    draws = lr.measures.statistics.bootstrap_indices(40, 500, 1)
    slope, lo, hi = steerability_slope(mults, p, draws)
    assert slope == pytest.approx(0.05, abs=1e-12) and lo == pytest.approx(0.05) and hi == pytest.approx(0.05)
    # a flat curve with noise: slope near 0, interval covering it
    noisy = offsets[None, :] + rng.normal(0, 0.05, size=(5, 40))
    slope, lo, hi = steerability_slope(mults, noisy, draws)
    assert lo < 0 < hi and abs(slope) < 0.02
    assert np.isnan(steerability_slope([1.0, 1.0], p[:2], draws)[0])
    scores = pd.DataFrame([{"behaviour": "b", "layer": 4, "multiplier": m, "pair": i, "p_match": p[k, i]}
                           for k, m in enumerate(mults) for i in range(40)])
    row = steerability(scores, draws).iloc[0]
    assert row.slope == pytest.approx(0.05) and row.p_at_min == pytest.approx(offsets.mean() - 0.1)


@pytest.fixture
def tiny_cli(tiny_model):
    """``lens-roles`` with the tiny model as its model loader."""
    from functools import partial

    from lens_roles.cli import main

    return partial(main, load_model=lambda *a, **k: tiny_model)


def test_cli_ab_curve_over_all_layers_with_negative_multipliers(tiny_cli, tmp_path, capsys):
    records = [{"positive": f"Q{i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n (" + ("A)" if i % 2 else "B)"),
                "negative": f"Q{i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n (" + ("B)" if i % 2 else "A)")}
               for i in range(10)]
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "ab"
    assert tiny_cli(["ab-curve", "--pairs", str(path), "--layers", "all", "--multipliers", "-4,-2,0", "--n-train",
                     "5", "--n-test", "5", "--out", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "slope" in shown
    curves = pd.read_csv(out / "curves.csv")
    assert sorted(set(curves.layer)) == [0, 1, 2] and sorted(set(curves.multiplier)) == [-4.0, -2.0, 0.0]
    steer_table = pd.read_csv(out / "steerability.csv")
    assert list(steer_table.layer) == [0, 1, 2] and (out / "steerability.html").exists()
    assert tiny_cli(["ab-curve", "--pairs", str(path), "--out", str(out)]) == 2
    assert "give either --layer" in capsys.readouterr().err
    assert tiny_cli(["ab-curve", "--pairs", str(path), "--layer", "1", "--layers", "all", "--out", str(out)]) == 2


def test_readout_keeps_one_transposed_unembedding_and_follows_weight_changes(tiny_model):
    from lens_roles.runtime.readout import final_logits, unembed_weight

    resid = torch.randn(2, 5, 32)
    first = unembed_weight(tiny_model)
    assert unembed_weight(tiny_model) is first  # made once, not at every call
    with torch.no_grad():
        assert torch.equal(final_logits(tiny_model, resid), tiny_model.unembed(tiny_model.ln_final(resid)))
        saved = tiny_model.unembed.W_U.clone()
        try:
            tiny_model.unembed.W_U.mul_(2.0)
            assert unembed_weight(tiny_model) is not first
            assert torch.equal(final_logits(tiny_model, resid), tiny_model.unembed(tiny_model.ln_final(resid)))
        finally:
            tiny_model.unembed.W_U.copy_(saved)
    assert torch.equal(unembed_weight(tiny_model), first)
