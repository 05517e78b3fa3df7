"""Branched generation (prefill shared below the steered layer, branches decoded together) against
one generation per branch under its hooks, on the tiny model."""

from __future__ import annotations


import pytest
import torch

import lens_roles as lr
from lens_roles.interventions.steering import intervene, steering_hooks
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.branching import Branch, unsteered
from lens_roles.runtime.generation import decode, generate_branched, generate_from_tokens
from lens_roles.runtime.readout import final_logits

pytestmark = pytest.mark.usefixtures("no_hook_leaks")

PROMPTS = ["Where can I find old maps?", "Tell me about the sea.", "Hi"]


@pytest.fixture
def direction(tiny_model):
    torch.manual_seed(0)
    n, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_model
    return lr.Direction(list(range(n)), torch.randn(n, d), {"name": "random"})


def _rows(model):
    return [it.tokens for it in lr.encode(model, [lr.Prompt(p) for p in PROMPTS])]


def _reference_logits(model, rows, hooks, max_new_tokens):
    """Per-step logits of one plain cached generation under ``hooks`` (the unbranched computation)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from lens_roles.runtime.generation import PositionState, position_state

    tokens, mask = pad_batch(rows, pad_id(model), side="left")
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(rows))
    logits: list = []
    with intervene(model, hooks):
        with position_state(PositionState(offset=0, prompt_len=tokens.shape[1])):
            resid = model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
        new = decode(model, final_logits(model, resid[:, -1]), cache, tokens.shape[1],
                     max_new_tokens=max_new_tokens, stop_at_eos=False, step_logits=logits)
    return new, torch.stack(logits)


def test_branched_generation_equals_one_generation_per_branch(tiny_model, direction):
    rows = _rows(tiny_model)
    branches = [unsteered(tiny_model)]
    for layer, alpha, positions in ((0, 3.0, "all"), (1, -2.0, "all"), (1, 4.0, "generated"), (0, 2.0, "prompt")):
        branches.append(Branch(layer, tuple(steering_hooks(tiny_model, direction, alpha, layers=[layer],
                                                           positions=positions))))
    out = generate_branched(tiny_model, rows, branches, max_new_tokens=7, stop_at_eos=False)
    assert len(out) == len(branches) and all(len(gens) == len(rows) for gens in out)
    texts = set()
    for branch, gens in zip(branches, out):
        with intervene(tiny_model, branch.hooks):
            ref = generate_from_tokens(tiny_model, rows, max_new_tokens=7, stop_at_eos=False)
        assert [g.tokens for g in gens] == [g.tokens for g in ref]
        assert [g.text for g in gens] == [g.text for g in ref]
        texts.add(tuple(g.tokens for g in gens))
    assert len(texts) > 2  # the steering does change the generations


def test_branched_generation_logits_match_within_1e6(tiny_model, direction, monkeypatch):
    rows = _rows(tiny_model)
    branches = [unsteered(tiny_model)] + [Branch(1, tuple(steering_hooks(tiny_model, direction, a, layers=[1])))
                                          for a in (-3.0, 3.0)]
    # the branched run's own per-step logits: capture them through decode's step_logits
    import lens_roles.runtime.generation as generation

    seen: list = []
    original = generation.decode

    def spy(*args, **kwargs):
        return original(*args, **kwargs, step_logits=seen)

    monkeypatch.setattr(generation, "decode", spy)
    out = generate_branched(tiny_model, rows, branches, max_new_tokens=5, stop_at_eos=False)
    monkeypatch.undo()
    stacked = torch.stack(seen)  # [step, branch * row, vocab]
    n = len(rows)
    for b, branch in enumerate(branches):
        new, ref = _reference_logits(tiny_model, rows, list(branch.hooks), 5)
        assert [tuple(r) for r in new.tolist()] == [g.tokens for g in out[b]]
        assert (stacked[:, b * n : (b + 1) * n] - ref).abs().max() <= 1e-6


def test_prefill_unembeds_only_the_last_position(tiny_model):
    rows = _rows(tiny_model)
    shapes = []

    def record(acts, hook):
        shapes.append(tuple(acts.shape))

    with tiny_model.hooks(fwd_hooks=[("unembed.hook_out", record)]):
        generate_from_tokens(tiny_model, rows, max_new_tokens=3, stop_at_eos=False)
    assert shapes and all(s[:-1] == (1, len(rows)) for s in shapes)
    # and the cached generation is still the uncached reference, token for token
    cached = generate_from_tokens(tiny_model, rows, max_new_tokens=6, stop_at_eos=False)
    fresh = generate_from_tokens(tiny_model, rows, max_new_tokens=6, stop_at_eos=False, use_kv_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in fresh]


def test_branched_generation_refuses_bad_branches(tiny_model, direction):
    rows = _rows(tiny_model)
    with pytest.raises(lr.DataError, match="no branches"):
        generate_branched(tiny_model, rows, [], max_new_tokens=2)
    hooks = tuple(steering_hooks(tiny_model, direction, 1.0, layers=[0]))
    with pytest.raises(lr.DataError, match="cannot run a hook"):
        generate_branched(tiny_model, rows, [Branch(1, hooks)], max_new_tokens=2)


def test_generation_sweep_equals_one_generation_per_setting(tiny_model, direction):
    from lens_roles.interventions.steering import steer
    from lens_roles.measures.behaviour import generation_coherence
    from lens_roles.measures.sweeps import generation_sweep
    from lens_roles.runtime.generation import generate

    metrics, texts = generation_sweep(tiny_model, direction, PROMPTS, steer_layers=[0, 1], alphas=[-3.0, 3.0],
                                      max_new_tokens=6)
    assert len(texts) == 2 * 3 * len(PROMPTS)
    rows = _rows(tiny_model)
    for layer in (0, 1):
        for alpha in (-3.0, 0.0, 3.0):
            with steer(tiny_model, direction, alpha, layers=[layer]):
                ref = generate(tiny_model, PROMPTS, max_new_tokens=6)
            got = texts[(texts.layer == layer) & (texts.alpha == alpha)]
            assert list(got.text) == [g.text for g in ref] and list(got.prompt) == PROMPTS
            ppl, rep = generation_coherence(tiny_model, rows, [g.tokens for g in ref]).nanmean(0)
            values = metrics[(metrics.layer == layer) & (metrics.alpha == alpha)].set_index("metric").value
            assert values["perplexity"] == pytest.approx(float(ppl), abs=1e-6)
            assert values["repetition"] == pytest.approx(float(rep), abs=1e-12, nan_ok=True)
