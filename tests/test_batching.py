"""Shared-prefix batching: the plan, and exact agreement with plain batching."""

from __future__ import annotations

import pytest
import torch

import lens_roles as lr
from lens_roles.runtime.batching import MIN_GROUP_PREFIX, plan


@pytest.fixture(scope="module")
def pairs():
    return lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")


def _pair_prompts(pairs, n=10):
    return [p for pair in pairs.pairs[:n] for p in pair.as_prompts()]


def test_plan_shares_chat_trunk_and_pair_user_turns(tiny_model, pairs):
    prompts = _pair_prompts(pairs)
    items = lr.encode(tiny_model, prompts)
    positions = lr.select_positions(items, "reply")
    p = plan(items, positions)
    # every chat-formatted prompt starts with the same template tokens
    assert len(p.trunk) > 0 and all(it.tokens[: len(p.trunk)] == p.trunk for it in items)
    # the two sides of each pair form one group whose prefix ends exactly where the reply starts
    assert sorted(sorted(members) for _, members in p.groups) == [[2 * i, 2 * i + 1] for i in range(10)]
    for prefix, members in p.groups:
        for i in members:
            assert len(p.trunk) + len(prefix) == items[i].reply[0]
            assert items[i].tokens[len(p.trunk): items[i].reply[0]] == prefix


def test_plan_never_covers_read_positions_or_last_token(tiny_model, pairs):
    items = lr.encode(tiny_model, _pair_prompts(pairs))
    for rule in ("last", "eoi", "user", "all"):
        positions = lr.select_positions(items, rule)
        p = plan(items, positions)
        for prefix, members in p.groups:
            assert len(prefix) == 0 or len(prefix) >= MIN_GROUP_PREFIX
            for i in members:
                start = len(p.trunk) + len(prefix)
                assert start <= min(positions[i]) and start < len(items[i])
        assert sorted(i for _, m in p.groups for i in m) == list(range(len(items)))


def test_plan_without_sharing_is_one_group_per_prompt(tiny_model, pairs):
    items = lr.encode(tiny_model, _pair_prompts(pairs, 3))
    p = plan(items, lr.select_positions(items, "last"), share=False)
    assert p.trunk == () and p.groups == tuple(((), (i,)) for i in range(6))


@pytest.mark.parametrize("rule", ["last", "reply", "eoi", "all"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_shared_prefixes_equal_plain_batches(tiny_model, pairs, rule, batch_size):
    prompts = _pair_prompts(pairs, 8) + [lr.Prompt("Name three rivers.", reply="Nile, Amazon, Danube."),
                                         lr.Prompt("Write a haiku about tea.", reply="Steam curls, leaves unfold.")]
    kw = dict(layers="all", positions=rule, batch_size=batch_size, keep_per_prompt=True)
    shared = lr.collect(tiny_model, prompts, share_prefixes=True, **kw)
    plain = lr.collect(tiny_model, prompts, share_prefixes=False, **kw)
    torch.testing.assert_close(shared.per_prompt, plain.per_prompt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.mean, plain.mean, rtol=1e-6, atol=1e-6)


def test_shared_prefixes_with_plain_template_and_bos(tiny_model, pairs):
    prompts = _pair_prompts(pairs, 6)
    kw = dict(layers=[0, 2], positions="reply", batch_size=4, keep_per_prompt=True, template="plain")
    shared = lr.collect(tiny_model, prompts, share_prefixes=True, **kw)
    plain = lr.collect(tiny_model, prompts, share_prefixes=False, **kw)
    assert shared.meta["prepend_bos"] is True
    torch.testing.assert_close(shared.per_prompt, plain.per_prompt, rtol=1e-5, atol=1e-5)
