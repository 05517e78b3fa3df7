"""The SAE corpus's sampling on the tiny model: batched through generate with the KV cache,
reproducible, in a documented batch order."""

from __future__ import annotations

import pytest

import lens_roles as lr
from lens_roles.analysis.sae.corpus import build_corpus, corpus_prompts, generate_sequences
from lens_roles.runtime.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generate_sequences_is_the_documented_batched_sampling(tiny_model):
    prompts = corpus_prompts(0)[:5]
    seqs = generate_sequences(tiny_model, prompts, max_new_tokens=3, temperature=1.0, seed=2, batch_size=2)
    assert seqs == generate_sequences(tiny_model, prompts, max_new_tokens=3, temperature=1.0, seed=2, batch_size=2)
    order = sorted(range(5), key=lambda i: (len(prompts[i].user), i))
    expected = []
    for b, start in enumerate(range(0, 5, 2)):
        batch = [prompts[i] for i in order[start:start + 2]]
        outs = generate(tiny_model, batch, max_new_tokens=3, temperature=1.0, seed=2 * 100_003 + b)
        expected += [tuple(item.tokens) + out.tokens for item, out in zip(lr.encode(tiny_model, batch), outs)]
    assert seqs == expected
    assert all(len(s) > len(item.tokens) for s, item in zip(seqs, lr.encode(tiny_model, [prompts[i] for i in order])))


def test_build_corpus_is_reproducible(tiny_model):
    one = build_corpus(tiny_model, max_new_tokens=2, seed=1, max_prompts=3, batch_size=2)
    two = build_corpus(tiny_model, max_new_tokens=2, seed=1, max_prompts=3, batch_size=2)
    assert one.sequences == two.sequences and one.meta["fingerprint"] == two.meta["fingerprint"]
    assert one.kinds[:3] == ("generation",) * 3 and one.meta["n_continued"] == 3
