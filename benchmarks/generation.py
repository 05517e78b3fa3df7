"""Benchmark: generation with the last-position prefill and branched α sweeps, against the loops they replace.

Prints, on the default model:

* **one generation** (the SAE corpus's sampling: ``--prompts`` corpus prompts, ``--tokens`` new
  tokens, temperature 1, one batch): :func:`~lens_roles.runtime.generation.generate`
  (the prefill and every step unembed only the position that predicts the next token,
  and each step rotates only the new key) against the loop it replaced (``model(...)[:, -1]``:
  the prefill unembeds every prompt position, each step copies the transposed unembedding
  and TransformerLens re-rotates every cached key), alternated; the ratio and whether the
  sampled tokens are the same;
* **the generation sweep** (:func:`~lens_roles.measures.sweeps.generation_sweep`, greedy,
  ``--sweep-prompts`` prompts × the α values + 0 at ``--layers``): branched (the prompt
  prefilled once below each layer, α = 0 once, every setting decoded in one batch) against
  the loop it replaced (per layer one batch of prompts × α, α per row, full prefill), alternated;
  the ratio and whether the texts are the same.

Corpus generation against a bare forward over the same tokens (the floor) is in
``benchmarks/sae.py --floor-only``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/generation.py [--repeats 3]``; ``--quick`` is a
smoke run (tiny sizes, one round; numbers not meaningful).
"""

from __future__ import annotations

import argparse

import torch

from bench_common import alternated

import lens_roles as lr
from lens_roles.analysis.sae.corpus import corpus_prompts
from lens_roles.interventions.steering import intervene, residual_norms, steering_hooks
from lens_roles.measures.behaviour import generation_coherence
from lens_roles.measures.sweeps import generation_sweep
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.generation import PositionState, generate, position_state


@torch.no_grad()
def loop_generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list:
    """The generation loop before the last-position prefill: full logits from ``model(...)`` at every step."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    rows = [it.tokens for it in lr.encode(model, prompts)]
    pad = pad_id(model)
    tokens, mask = pad_batch(rows, pad, side="left")
    batch, prompt_len = tokens.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    new = torch.full((batch, 0), pad, dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    eos = model.tokenizer.eos_token_id
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch)
    for step in range(max_new_tokens):
        if step == 0:
            inputs, attn, offset = tokens, mask, 0
        else:
            inputs, attn, offset = new[:, -1:], torch.ones((batch, 1), dtype=torch.long), prompt_len + step - 1
        with position_state(PositionState(offset=offset, prompt_len=prompt_len)):
            logits = model(inputs, attention_mask=attn, past_kv_cache=cache)[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new = torch.cat([new, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    out = []
    for ids in new.tolist():
        out.append(tuple(ids[: ids.index(eos)] if eos in ids else ids))
    return out


@torch.no_grad()
def loop_sweep(model, direction, prompts, layers, alphas, norms, max_new_tokens: int) -> list[tuple]:
    """The generation sweep before branching: per layer one batch of prompts × α (α per row), full prefill,
    and the coherence of every generation of that batch."""
    alpha_list = sorted(set(alphas) | {0.0})
    items = lr.encode(model, [lr.Prompt(p) for p in prompts])
    texts = []
    for layer in layers:
        batch = [p for p in prompts for _ in alpha_list]
        hooks = steering_hooks(model, direction, torch.tensor(alpha_list).repeat(len(prompts)), layers=[layer],
                               relative=norms)
        with intervene(model, hooks):
            outs = generate(model, batch, max_new_tokens=max_new_tokens)
        generation_coherence(model, [items[r // len(alpha_list)].tokens for r in range(len(outs))],
                             [o.tokens for o in outs])  # the sweep's metrics, as it computed them
        texts += [(layer, alpha_list[r % len(alpha_list)], o.text) for r, o in enumerate(outs)]
    return sorted(texts)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=32, help="corpus prompts in the one-generation timing")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per prompt there")
    parser.add_argument("--sweep-prompts", type=int, default=3, help="prompts of the generation sweep")
    parser.add_argument("--sweep-tokens", type=int, default=32)
    parser.add_argument("--layers", default="6,12,18", help="steering layers of the sweep")
    parser.add_argument("--alphas", default="-1,-0.5,0.5,1", help="relative α of the sweep (0 is added)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one round")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.tokens, args.sweep_prompts, args.sweep_tokens, args.repeats = 2, 3, 1, 3, 1
        args.layers, args.alphas = "18", "1"
    quick = " (QUICK: not meaningful)" if args.quick else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s){quick}")
    model = lr.load_model()

    prompts = corpus_prompts(0)[: args.prompts]
    secs, out = alternated({
        "ours": lambda: [g.tokens for g in generate(model, prompts, max_new_tokens=args.tokens, temperature=1.0)],
        "loop": lambda: loop_generate(model, prompts, max_new_tokens=args.tokens, temperature=1.0),
    }, args.repeats)
    n = sum(len(t) for t in out["ours"])
    print(f"one generation, {len(prompts)} prompts x up to {args.tokens} new tokens ({n} sampled), temperature 1: "
          f"ours {secs['ours']:.2f} s ({n / secs['ours']:,.1f} sampled tokens/s), full-logits loop "
          f"{secs['loop']:.2f} s; ratio loop/ours {secs['loop'] / secs['ours']:.2f}; same tokens: "
          f"{out['ours'] == out['loop']}")

    layers = [int(x) for x in args.layers.split(",")]
    alphas = [float(a) for a in args.alphas.split(",")]
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    persona = lr.persona_vector(model, pairs, layers=layers)
    users = [p.user for p in pairs.pairs[: args.sweep_prompts]]
    norms = residual_norms(model, users, layers=layers)

    def branched():
        _, texts = generation_sweep(model, persona, users, steer_layers=layers, alphas=alphas, relative=norms,
                                    max_new_tokens=args.sweep_tokens)
        return sorted(zip(texts.layer, texts.alpha, texts.text))

    secs, out = alternated({"branched": branched, "loop": lambda: loop_sweep(
        model, persona, users, layers, alphas, norms, args.sweep_tokens)}, args.repeats)
    print(f"generation sweep, {len(users)} prompts x {len(alphas) + 1} α x layers {layers}, {args.sweep_tokens} new "
          f"tokens: branched {secs['branched']:.2f} s, per-layer loop {secs['loop']:.2f} s; ratio loop/branched "
          f"{secs['loop'] / secs['branched']:.2f}; same texts: {out['branched'] == out['loop']}")


if __name__ == "__main__":
    main()
