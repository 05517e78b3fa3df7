"""Benchmark: batched α sweeps and steered generation on the default model.

Prints

* the time of one batched steered forward over α ∈ {0, ±0.25, ±0.5} (each text
  once per α, one α per row) divided by one forward per α, and the largest logit
  difference between the two; and the time of the whole adherence sweep;
* the time of steered greedy generation (one layer, all positions) divided by
  unsteered generation of the same prompts and length, with and without the KV
  cache (goal: at most 1.10).

Run: ``.venv/bin/python benchmarks/steer.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lens_roles as lr
from lens_roles.interventions.steering import residual_norms, steer
from lens_roles.measures.sweeps import adherence_sweep
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.generation import generate


def timed(fn, repeats: int):
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = lr.load_model()
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    train, held = pairs.split(0.75)
    held = lr.PairSet("librarian", held.pairs[:8])
    persona = lr.persona_vector(model, train, layers=[args.layer])
    norms = residual_norms(model, [p.user for p in held.pairs], layers=[args.layer])
    alphas = [-0.5, -0.25, 0.25, 0.5]

    all_alphas = [0.0, *alphas]
    items = lr.encode(model, [p for pair in held.pairs for p in pair.as_prompts()])
    tokens, _ = pad_batch([item.tokens for item in items], pad_id(model))

    def batched():
        rows = torch.tensor(all_alphas).repeat(len(items))
        with torch.no_grad(), steer(model, persona, rows, layers=[args.layer], relative=norms):
            return model(tokens.repeat_interleave(len(all_alphas), dim=0))

    def one_at_a_time():
        outs = []
        for alpha in all_alphas:
            with torch.no_grad(), steer(model, persona, alpha, layers=[args.layer], relative=norms):
                outs.append(model(tokens))
        return torch.stack(outs, dim=1).flatten(0, 1)

    t_batched, a = timed(batched, args.repeats)
    t_loop, b = timed(one_at_a_time, args.repeats)
    diff = float((a - b).abs().max())
    print(f"steered forward of {len(items)} texts x {len(all_alphas)} alpha: batched {t_batched:.2f} s, "
          f"one alpha at a time {t_loop:.2f} s, ratio {t_batched / t_loop:.3f}; max |logit difference| {diff:.1e}")
    t_sweep, _ = timed(lambda: adherence_sweep(model, persona, held, steer_layers=[args.layer], alphas=alphas,
                                               relative=norms), 1)
    print(f"full adherence + KL sweep (batched, reply-only unembedding): {t_sweep:.2f} s")

    prompts = [p.user for p in held.pairs]
    for use_cache in (True, False):
        kw = dict(max_new_tokens=32, stop_at_eos=False, use_kv_cache=use_cache)
        t_plain, _ = timed(lambda kw=kw: generate(model, prompts, **kw), args.repeats)

        def steered(kw=kw):
            with steer(model, persona, 0.25, layers=[args.layer], relative=norms):
                return generate(model, prompts, **kw)

        t_steer, _ = timed(steered, args.repeats)
        print(f"generation of {len(prompts)} x 32 tokens, KV cache {'on ' if use_cache else 'off'}: "
              f"unsteered {t_plain:.2f} s, steered {t_steer:.2f} s, ratio {t_steer / t_plain:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
