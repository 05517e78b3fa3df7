"""Exact algebra of the interventions, steered generation and the sweeps, on the tiny model."""

from __future__ import annotations

import pytest
import torch

import lens_roles as lr
from lens_roles.interventions.steering import ablate, ablate_then_add, clamp, residual_norms, steer
from lens_roles.measures.behaviour import repetition_rate
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep, generation_sweep
from lens_roles.runtime.generation import generate

PROMPTS = ["Where are the atlases kept?", "Can I renew a book online, and how long can I keep it?", "Hi"]


@pytest.fixture(scope="module")
def tokens(tiny_model):
    items = lr.encode(tiny_model, [lr.Prompt(p) for p in PROMPTS[:2]])
    n = min(len(i) for i in items)
    return torch.tensor([list(i.tokens[:n]) for i in items])


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(1)
    vectors = torch.randn(tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    return lr.Direction(tuple(range(tiny_model.cfg.n_layers)), vectors,
                        {"model": tiny_model.cfg.model_name, "name": "random"})


def _resid(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    return [cache[lr.resid_hook(layer)] for layer in range(model.cfg.n_layers)], cache


def test_alpha_zero_is_bit_identical(tiny_model, tokens, direction):
    base = tiny_model(tokens)
    with steer(tiny_model, direction, 0.0, layers=[1]):
        steered = tiny_model(tokens)
    assert torch.equal(base, steered)


def test_plus_then_minus_is_identity(tiny_model, tokens, direction):
    base = tiny_model(tokens)
    with steer(tiny_model, direction, 3.0, layers=[0, 1]), steer(tiny_model, direction, -3.0, layers=[0, 1]):
        both = tiny_model(tokens)
    with steer(tiny_model, direction, 3.0, layers=[0, 1]):
        plus = tiny_model(tokens)
    torch.testing.assert_close(both, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plus, base, atol=1e-3)


def test_addition_adds_exactly_alpha_v_and_leaves_earlier_layers(tiny_model, tokens, direction):
    base, _ = _resid(tiny_model, tokens)
    with steer(tiny_model, direction, 2.5, layers=[1]):
        steered, _ = _resid(tiny_model, tokens)
    assert torch.equal(steered[0], base[0])  # before the intervention: untouched
    torch.testing.assert_close(steered[1], base[1] + 2.5 * direction[1], rtol=0, atol=1e-5)
    assert not torch.allclose(steered[2], base[2])


def test_relative_alpha_scales_the_unit_vector_by_the_norm(tiny_model, tokens, direction):
    norms = residual_norms(tiny_model, PROMPTS, layers=[1])
    base, _ = _resid(tiny_model, tokens)
    with steer(tiny_model, direction, 0.5, layers=[1], relative=norms):
        steered, _ = _resid(tiny_model, tokens)
    torch.testing.assert_close(steered[1] - base[1], (0.5 * norms[1] * direction.unit(1)).expand_as(base[1]),
                               rtol=0, atol=1e-5)


def test_ablation_removes_the_projection(tiny_model, tokens, direction):
    with ablate(tiny_model, direction):
        resid, _ = _resid(tiny_model, tokens)
    for layer in range(tiny_model.cfg.n_layers):
        proj = resid[layer] @ direction.unit(layer)
        assert (proj.abs() <= 1e-5 * resid[layer].norm(dim=-1)).all()


def test_ablation_with_one_unit_vector_everywhere(tiny_model, tokens, direction):
    with ablate(tiny_model, direction, unit_layer=1):
        resid, _ = _resid(tiny_model, tokens)
    u = direction.unit(1)
    assert all((r @ u).abs().max() < 1e-5 * r.norm(dim=-1).max() for r in resid)


def test_clamp_sets_the_projection_and_ablate_then_add(tiny_model, tokens, direction):
    with clamp(tiny_model, direction, 4.0, layers=[2]):
        resid, _ = _resid(tiny_model, tokens)
    torch.testing.assert_close(resid[2] @ direction.unit(2), torch.full(resid[2].shape[:2], 4.0), rtol=0, atol=1e-4)
    with ablate_then_add(tiny_model, direction, 2.0, layers=[2]):
        resid, _ = _resid(tiny_model, tokens)
    expected = 2.0 * float(direction[2] @ direction.unit(2))
    torch.testing.assert_close(resid[2] @ direction.unit(2), torch.full(resid[2].shape[:2], expected),
                               rtol=0, atol=1e-4)


def test_per_row_alpha_equals_one_run_per_alpha(tiny_model, tokens, direction):
    alphas = [-2.0, 0.0, 1.0, 4.0]
    batch = tokens.repeat_interleave(len(alphas), dim=0)
    with steer(tiny_model, direction, torch.tensor(alphas).repeat(tokens.shape[0]), layers=[1]):
        batched = tiny_model(batch).reshape(tokens.shape[0], len(alphas), *tokens.shape[1:], -1)
    for a, alpha in enumerate(alphas):
        with steer(tiny_model, direction, alpha, layers=[1]):
            single = tiny_model(tokens)
        torch.testing.assert_close(batched[:, a], single, rtol=1e-5, atol=1e-5)


def test_mask_positions_touch_only_masked_tokens(tiny_model, tokens, direction):
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, -2:] = True
    base, _ = _resid(tiny_model, tokens)
    with steer(tiny_model, direction, 1.5, layers=[0], positions=mask):
        steered, _ = _resid(tiny_model, tokens)
    assert torch.equal(steered[0][:, :-2], base[0][:, :-2])
    torch.testing.assert_close(steered[0][:, -2:], base[0][:, -2:] + 1.5 * direction[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": float("nan")}, "alpha must be finite"),
    ({"alpha": float("inf")}, "alpha must be finite"),
    ({"layers": [7]}, "out of range"),
    ({"positions": "middle"}, "unknown positions"),
])
def test_bad_steering_input_is_one_clear_error(tiny_model, tokens, direction, kwargs, message):
    args = {"alpha": 1.0, **kwargs}
    with pytest.raises(lr.LensRolesError, match=message):
        with steer(tiny_model, direction, args.pop("alpha"), **args):
            tiny_model(tokens)


def test_wrong_width_or_missing_layer_is_rejected(tiny_model, tokens, direction):
    wide = lr.Direction((0,), torch.ones(1, 7), {"model": "other"})
    with pytest.raises(lr.DirectionError, match="width 7"):
        with steer(tiny_model, wide, 1.0):
            pass
    with pytest.raises(lr.DirectionError, match="no vector for layer"):
        with steer(tiny_model, direction.select([0]), 1.0, layers=[2]):
            pass
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(lr.DirectionError, match="does not cover"):
        with steer(tiny_model, direction, 1.0, layers=[0], positions=mask):
            tiny_model(tokens)


def test_hook_that_raises_leaves_no_hook(tiny_model, tokens, direction):
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_model, direction, 1.0, layers=[0]):
            raise RuntimeError("boom")
    alpha = torch.tensor([1.0, 2.0, 3.0])  # wrong number of rows: raised inside the hook
    with pytest.raises(lr.DirectionError, match="alpha has 3 entries"):
        with steer(tiny_model, direction, alpha, layers=[0]):
            tiny_model(tokens)


def test_generation_with_and_without_kv_cache_and_batching_agree(tiny_model, direction):
    for ctx in (lambda: steer(tiny_model, direction, 0.0, layers=[0]),
                lambda: steer(tiny_model, direction, 2.0, layers=[1], positions="all"),
                lambda: steer(tiny_model, direction, 2.0, layers=[1], positions="generated")):
        with ctx():
            cached = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_eos=False)
            fresh = generate(tiny_model, PROMPTS, max_new_tokens=8, stop_at_eos=False, use_kv_cache=False)
            single = [generate(tiny_model, [p], max_new_tokens=8, stop_at_eos=False)[0] for p in PROMPTS]
        assert [g.tokens for g in cached] == [g.tokens for g in fresh] == [g.tokens for g in single]
        assert all(len(g.tokens) == 8 for g in cached)


def test_generated_positions_change_only_generated_tokens(tiny_model, direction):
    plain = generate(tiny_model, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    with steer(tiny_model, direction, 50.0, positions="prompt"):
        on_prompt = generate(tiny_model, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    with steer(tiny_model, direction, 50.0, positions="generated"):
        on_generated = generate(tiny_model, PROMPTS, max_new_tokens=6, stop_at_eos=False)
    # steering only generated tokens cannot change the first new token (predicted from the prompt)
    assert [g.tokens[0] for g in on_generated] == [g.tokens[0] for g in plain]
    assert [g.tokens for g in on_prompt] != [g.tokens for g in plain]


def test_sampling_is_seeded(tiny_model):
    a = generate(tiny_model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3, stop_at_eos=False)
    b = generate(tiny_model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=3, stop_at_eos=False)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    with pytest.raises(lr.DataError, match="temperature"):
        generate(tiny_model, PROMPTS, temperature=float("nan"))


@pytest.fixture(scope="module")
def few_pairs():
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    return lr.PairSet("librarian", pairs.pairs[:3])


def test_cosine_sweep_is_one_at_alpha_zero_and_matches_direct(tiny_model, direction):
    frame = cosine_sweep(tiny_model, direction, PROMPTS, steer_layers=[1], alphas=[2.0], batch_size=2)
    assert set(frame.read_layer) == {1, 2} and set(frame.layer) == {1} and set(frame.alpha) == {0.0, 2.0}
    assert (frame[frame.alpha == 0].value == 1.0).all()
    # direct computation for one prompt, layer 2
    items = lr.encode(tiny_model, [lr.Prompt(p) for p in PROMPTS])
    direct = []
    for item in items:
        toks = torch.tensor([item.tokens])
        base, _ = _resid(tiny_model, toks)
        with steer(tiny_model, direction, 2.0, layers=[1]):
            steered, _ = _resid(tiny_model, toks)
        direct.append(torch.nn.functional.cosine_similarity(base[2], steered[2], dim=-1).mean())
    value = frame[(frame.alpha == 2.0) & (frame.read_layer == 2)].value.item()
    assert value == pytest.approx(float(torch.stack(direct).mean()), abs=1e-5)


def test_adherence_sweep_matches_direct_logprob_margin(tiny_model, direction, few_pairs):
    frame = adherence_sweep(tiny_model, direction, few_pairs, steer_layers=[0], alphas=[1.0], batch_size=2)
    margin = frame[(frame.metric == "logprob_margin")].set_index("alpha").value
    kl = frame[(frame.metric == "kl_from_unsteered")].set_index("alpha").value
    assert kl[0.0] == pytest.approx(0.0, abs=1e-6) and kl[1.0] > 0

    def mean_lp(prompt, alpha):
        item = lr.encode(tiny_model, [prompt])[0]
        toks = torch.tensor([item.tokens])
        with steer(tiny_model, direction, alpha, layers=[0]):
            logp = torch.log_softmax(tiny_model(toks)[0], -1)
        a, b = item.reply
        return float(torch.stack([logp[t - 1, item.tokens[t]] for t in range(a, b)]).mean())

    for alpha in (0.0, 1.0):
        direct = sum(mean_lp(p.as_prompts()[0], alpha) - mean_lp(p.as_prompts()[1], alpha)
                     for p in few_pairs.pairs) / len(few_pairs)
        assert margin[alpha] == pytest.approx(direct, abs=1e-4)


def test_generation_sweep_and_repetition(tiny_model, direction):
    metrics, texts = generation_sweep(tiny_model, direction, PROMPTS[:2], steer_layers=[1], alphas=[3.0],
                                      max_new_tokens=5)
    assert set(metrics.metric) == {"perplexity", "repetition"} and len(texts) == 4
    assert (metrics[metrics.metric == "perplexity"].value >= 1).all()
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 / 4)  # (1,2,3) repeats once among 4 trigrams
    assert repetition_rate([1, 2]) == 0.0
