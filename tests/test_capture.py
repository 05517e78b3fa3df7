"""The one capture primitive, the one batched-forward path, and progress bars on the long loops."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from conftest import hooks_left

import lens_roles as lr
from lens_roles.errors import DataError
from lens_roles.inputs.prompts import Prompt, PromptSet, as_prompts
from lens_roles.interventions.steering import residual_norms, steer
from lens_roles.runtime.activations import residual_rows
from lens_roles.runtime.batching import pad_batch, pad_id, padded, token_batches
from lens_roles.runtime.capture import Capture, capture, position_mean
from lens_roles.runtime.generation import generate
from lens_roles.runtime.models import resid_hook

TEXTS = ["Where can I find old maps?", "Recommend a book.", "How do I cite a source in a thesis about rivers?",
         "Hi", "What are the opening hours of the reading room on public holidays?"]


@pytest.fixture(scope="module")
def rows(tiny_model):
    return [list(it.tokens) for it in lr.encode(tiny_model, [Prompt(t) for t in TEXTS])]


def _cached(model, row, layer):
    """``[pos, d_model]`` residual after ``layer`` for one unpadded row, from ``run_with_cache``."""
    _, cache = model.run_with_cache(torch.tensor([row]), names_filter=resid_hook(layer))
    return cache[resid_hook(layer)][0]


# --------------------------------------------------------------------------- capture


def test_keep_equals_run_with_cache(tiny_model, rows):
    with torch.no_grad(), capture(tiny_model, [0, 2]) as cap:
        tiny_model(torch.tensor([rows[0]]))
    for layer in (0, 2):
        assert torch.equal(cap[layer][0], _cached(tiny_model, rows[0], layer))
    assert cap.stacked().shape == (2, 1, len(rows[0]), tiny_model.cfg.d_model)
    assert not cap[0].requires_grad


def test_position_mean_reads_only_the_chosen_positions(tiny_model, rows):
    batch = padded(tiny_model, rows[:3])
    chosen = [[0, 2], [len(rows[1]) - 1], list(range(1, len(rows[2])))]
    weights = torch.zeros(batch.tokens.shape)
    for r, pos in enumerate(chosen):
        weights[r, pos] = 1.0 / len(pos)
    with torch.no_grad(), capture(tiny_model, [1], position_mean, weights=weights) as cap:
        batch.forward(tiny_model, stop_at_layer=cap.stop_at_layer)
    assert cap[1].shape == (3, tiny_model.cfg.d_model)
    for r, pos in enumerate(chosen):
        ref = _cached(tiny_model, rows[r], 1)[pos].mean(0)
        torch.testing.assert_close(cap[1][r], ref, rtol=1e-5, atol=1e-5)


def test_running_float64_sums_over_batches(tiny_model, rows):
    sums = torch.zeros(tiny_model.cfg.n_layers, tiny_model.cfg.d_model, dtype=torch.float64)

    def add(acts, weights, layer):  # a caller's reduction: Σ over real tokens, float64, nothing returned
        sums[layer] += (acts * weights[..., None]).double().sum((0, 1))

    for batch in token_batches(tiny_model, rows, 2):
        with torch.no_grad(), capture(tiny_model, [0, 1, 2], add, weights=batch.mask.float()) as cap:
            batch.forward(tiny_model)
        assert cap.values == {0: None, 1: None, 2: None}
    for layer in range(3):
        ref = torch.cat([_cached(tiny_model, r, layer) for r in rows]).double().sum(0)
        torch.testing.assert_close(sums[layer], ref, rtol=1e-5, atol=1e-5)


def test_residual_rows_keep_every_real_position(tiny_model, rows):
    kept = residual_rows(tiny_model, rows, [2, 0], start=1, batch_size=2)  # layers come back sorted
    assert len(kept) == len(rows)
    for row, k in zip(rows, kept):
        assert k.shape == (2, len(row) - 1, tiny_model.cfg.d_model) and k.dtype == torch.float32
        for j, layer in enumerate((0, 2)):
            torch.testing.assert_close(k[j], _cached(tiny_model, row, layer)[1:], rtol=1e-5, atol=1e-5)


def test_capture_inside_an_intervention_sees_the_steered_stream(tiny_model, rows):
    torch.manual_seed(0)
    d = lr.Direction((1,), torch.randn(1, tiny_model.cfg.d_model), {"name": "random"})
    tokens = torch.tensor([rows[0]])
    with torch.no_grad(), steer(tiny_model, d, 3.0, layers=[1]):
        _, cache = tiny_model.run_with_cache(tokens, names_filter=resid_hook(1))
        with capture(tiny_model, [1]) as cap:
            tiny_model(tokens)
    assert torch.equal(cap[1], cache[resid_hook(1)])
    assert not torch.equal(cap[1][0], _cached(tiny_model, rows[0], 1))


def test_grad_keeps_the_graph(tiny_model, rows):
    start = torch.randn(1, len(rows[0]), tiny_model.cfg.d_model, requires_grad=True)
    with capture(tiny_model, [2], grad=True) as cap:
        tiny_model(start, start_at_layer=1, stop_at_layer=3)
    (grad,) = torch.autograd.grad(cap[2].sum(), start)
    assert grad.abs().sum() > 0


def test_hooks_removed_when_a_reduction_raises(tiny_model, rows):
    def broken(acts, weights, layer):
        raise RuntimeError(f"boom at layer {layer}")

    with pytest.raises(RuntimeError, match="boom at layer 0"):
        with torch.no_grad(), capture(tiny_model, [0, 1], broken):
            tiny_model(torch.tensor([rows[0]]))
    assert hooks_left(tiny_model) == []
    with pytest.raises(ValueError, match="body"):
        with capture(tiny_model, [1]):
            raise ValueError("body")
    assert hooks_left(tiny_model) == []


def test_capture_errors_name_what_is_missing(tiny_model, rows):
    with pytest.raises(DataError, match="at least one layer"):
        Capture([])
    with torch.no_grad(), capture(tiny_model, [0, 2]) as cap:
        tiny_model(torch.tensor([rows[0]]), stop_at_layer=1)
    with pytest.raises(DataError, match="layer 2 was not recorded"):
        cap[2]
    with pytest.raises(DataError, match="needs position weights"):
        with torch.no_grad(), capture(tiny_model, [0], position_mean):
            tiny_model(torch.tensor([rows[0]]), stop_at_layer=1)


# --------------------------------------------------------------------------- batching


def test_masked_right_padding_equals_unmasked_at_real_positions(tiny_model, rows):
    tokens, mask = pad_batch(rows, pad_id(tiny_model))
    with torch.no_grad():
        plain = tiny_model(tokens)
        masked = padded(tiny_model, rows).forward(tiny_model)
    assert torch.equal(mask, padded(tiny_model, rows).mask)
    for r, row in enumerate(rows):
        assert torch.equal(masked[r, : len(row)], plain[r, : len(row)])


def test_token_batches_sorted_or_in_order(tiny_model, rows):
    sorted_batches = list(token_batches(tiny_model, rows, 2))
    assert sorted(i for b in sorted_batches for i in b.index) == list(range(len(rows)))
    lengths = [n for b in sorted_batches for n in b.lengths]
    assert lengths == sorted(len(r) for r in rows)
    for b in sorted_batches:
        assert b.tokens.shape == (len(b.index), max(b.lengths))
        assert b.mask.sum(1).tolist() == b.lengths
    in_order = list(token_batches(tiny_model, rows, 2, sort=False))
    assert [b.index for b in in_order] == [[0, 1], [2, 3], [4]]
    twice = in_order[0].repeat_rows(3)
    assert twice.index == [0, 0, 0, 1, 1, 1] and torch.equal(twice.tokens[2], in_order[0].tokens[0])
    with pytest.raises(ValueError, match="batch_size"):
        next(token_batches(tiny_model, rows, 0))


def test_as_prompts_accepts_every_form():
    assert as_prompts("hi") == [Prompt("hi")]
    assert as_prompts(Prompt("a", "s")) == [Prompt("a", "s")]
    assert as_prompts(["a", Prompt("b")]) == [Prompt("a"), Prompt("b")]
    assert as_prompts(PromptSet("x", (Prompt("c"),))) == [Prompt("c")]
    with pytest.raises(DataError, match="no prompts given"):
        as_prompts([])


# --------------------------------------------------------------------------- progress


LONG_LOOPS = [
    "lens_roles.runtime.activations:collect", "lens_roles.runtime.activations:collect_sets",
    "lens_roles.runtime.activations:residual_rows", "lens_roles.runtime.generation:generate",
    "lens_roles.interventions.steering:residual_norms", "lens_roles.interventions.psr.align:prompt_steering",
    "lens_roles.measures.sweeps:cosine_sweep", "lens_roles.measures.sweeps:adherence_sweep",
    "lens_roles.measures.sweeps:generation_sweep", "lens_roles.measures.multiple_choice:choice_logprobs",
    "lens_roles.measures.multiple_choice:score_questions", "lens_roles.analysis.sae.core:harvest",
    "lens_roles.analysis.sae.quality:sae_quality", "lens_roles.analysis.sae.cards:feature_cards",
    "lens_roles.analysis.sae.features:attribute_features",
]


@pytest.mark.parametrize("path", LONG_LOOPS)
def test_long_loops_take_progress_off_by_default(path):
    module, name = path.split(":")
    param = inspect.signature(getattr(importlib.import_module(module), name)).parameters["progress"]
    assert param.default is False and param.kind is inspect.Parameter.KEYWORD_ONLY


def test_progress_bar_changes_no_number(tiny_model, capsys):
    quiet = residual_norms(tiny_model, TEXTS, layers=[0, 2], batch_size=2)
    shown = residual_norms(tiny_model, TEXTS, layers=[0, 2], batch_size=2, progress=True)
    assert quiet == shown
    assert "residual norms" in capsys.readouterr().err
    outs = generate(tiny_model, TEXTS[:2], max_new_tokens=3, progress=True, stop_at_eos=False)
    assert [len(o.tokens) for o in outs] == [3, 3]
