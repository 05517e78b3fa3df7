"""Decoding through the KV cache without whole-cache copies (runtime.decode_attention): the logits of
every step are bit for bit those of TransformerLens's plain attention, on a multi-head and a
grouped-query tiny model, with hooks inside the attention, when the buffers grow, and when they
are refused for memory."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lens_roles as lr
import lens_roles.runtime.decode_attention as decode_attention
import lens_roles.runtime.generation as generation
from lens_roles.interventions.steering import intervene, steering_hooks
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.readout import final_logits

from conftest import make_tiny_model

pytestmark = pytest.mark.usefixtures("no_hook_leaks")

PROMPTS = ["Where can I find old maps?", "Tell me about the sea.", "Hi"]


@pytest.fixture(scope="module")
def gqa_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer, n_key_value_heads=2, name="tiny-gqa", seed=3)


@pytest.fixture(params=["mha", "gqa"])
def model(request, tiny_model, gqa_model):
    return tiny_model if request.param == "mha" else gqa_model


def _decode(model, hooks=(), max_new_tokens=8, temperature=0.0):
    """New tokens and per-step logits of one cached generation of PROMPTS under ``hooks``."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    rows = [it.tokens for it in lr.encode(model, [lr.Prompt(p) for p in PROMPTS])]
    tokens, mask = pad_batch(rows, pad_id(model), side="left")
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(rows))
    logits: list = []
    with torch.no_grad(), intervene(model, list(hooks)):
        with generation.position_state(generation.PositionState(offset=0, prompt_len=tokens.shape[1])):
            resid = model(tokens, attention_mask=mask, past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
        new = generation.decode(model, final_logits(model, resid[:, -1]), cache, tokens.shape[1],
                                max_new_tokens=max_new_tokens, stop_at_eos=False, temperature=temperature,
                                seed=5, step_logits=logits)
    return new, torch.stack(logits), cache


def _plain(monkeypatch):
    """Make the decoding loop use TransformerLens's attention as it is."""
    @contextlib.contextmanager
    def plain(model, **kwargs):
        yield

    monkeypatch.setattr(generation, "decoding_attention", plain)


def _assert_same(model, monkeypatch, **kwargs):
    new, logits, cache = _decode(model, **kwargs)
    with monkeypatch.context() as m:
        _plain(m)
        new_ref, logits_ref, cache_ref = _decode(model, **kwargs)
    assert torch.equal(new, new_ref)
    assert torch.equal(logits, logits_ref)
    for entry, ref in zip(cache.entries, cache_ref.entries):  # the cache holds the same keys and values
        assert torch.equal(entry.past_keys, ref.past_keys) and torch.equal(entry.past_values, ref.past_values)
        assert "append" not in vars(entry)
    for block in model.blocks:  # every shortcut is undone
        assert not {"forward", "apply_rotary", "calculate_attention_scores", "calculate_z_scores"} & set(
            vars(block.attn))
    return logits


def test_decoding_is_bit_identical(model, monkeypatch):
    writes: list = []
    write = decode_attention._Buffer.write

    def spy(self, part, start):
        writes.append((self.dim, start > 0))
        return write(self, part, start)

    monkeypatch.setattr(decode_attention._Buffer, "write", spy)
    _assert_same(model, monkeypatch)
    # the shortcuts were taken: single new positions written after the cached ones, in the cache
    # (dim 1), the keys of every head (dim 3) and the values of every head (dim 2)
    assert {(1, True), (2, True), (3, True)} <= set(writes)


def test_sampled_decoding_is_bit_identical(model, monkeypatch):
    _assert_same(model, monkeypatch, temperature=1.0)


def test_steered_decoding_is_bit_identical(model, monkeypatch):
    torch.manual_seed(0)
    direction = lr.Direction(list(range(model.cfg.n_layers)), torch.randn(model.cfg.n_layers, model.cfg.d_model),
                             {"name": "random"})
    _assert_same(model, monkeypatch, hooks=steering_hooks(model, direction, 3.0, layers=[1], positions="all"))


def test_hooks_inside_the_attention_see_and_change_what_they_did(model, monkeypatch):
    """A hook that replaces the rotated keys and one that scales the pattern: the shortcut steps aside
    where a hook returns other tensors, and the results stay those of the plain attention."""
    seen: list = []

    def keys(k, hook):
        seen.append(tuple(k.shape))
        return k * 1.5 if hook.layer() == 0 else None

    def pattern(p, hook):
        return p * 0.9

    hooks = [("blocks.0.attn.hook_rot_k", keys), ("blocks.1.attn.hook_rot_k", keys),
             ("blocks.2.attn.hook_pattern", pattern)]
    _assert_same(model, monkeypatch, hooks=hooks)
    half = len(seen) // 2
    assert seen[:half] == seen[half:]  # every key at every step, in both runs


def test_buffers_that_grow_and_buffers_refused_for_memory(model, monkeypatch):
    monkeypatch.setattr(decode_attention, "_HEADROOM", 1)  # a growth at every step
    _assert_same(model, monkeypatch, max_new_tokens=12)
    monkeypatch.setattr(decode_attention, "BUFFER_BUDGET_BYTES", 1)  # no expanded buffer fits
    writes: list = []
    write = decode_attention._Buffer.write

    def spy(self, part, start):
        writes.append(self.dim)
        return write(self, part, start)

    monkeypatch.setattr(decode_attention._Buffer, "write", spy)
    _assert_same(model, monkeypatch, max_new_tokens=12)
    # once refused, a block's expanded buffers are not tried again (no expansion thrown away each step)
    assert writes.count(2) == writes.count(3) == model.cfg.n_layers


def test_a_raising_hook_leaves_the_model_clean(model):
    calls = []

    def boom(z, hook):
        calls.append(1)
        if len(calls) == 3 * model.cfg.n_layers:  # the last block of the second decoding step
            raise RuntimeError("hook failed")

    hooks = [(f"blocks.{i}.attn.hook_z", boom) for i in range(model.cfg.n_layers)]
    with pytest.raises(RuntimeError, match="hook failed"):
        _decode(model, hooks=hooks)
    for block in model.blocks:
        assert not {"forward", "apply_rotary", "calculate_attention_scores", "calculate_z_scores"} & set(
            vars(block.attn))


def test_models_without_rotary_embeddings_are_left_alone(tiny_tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=64, d_vocab=len(tiny_tokenizer),
                                  act_fn="gelu", positional_embedding_type="standard")
    model = HookedTransformer(cfg, tokenizer=tiny_tokenizer)
    with decode_attention.decoding_attention(model):
        assert not vars(model.blocks[0].attn).keys() & {"forward", "apply_rotary"}
