"""Benchmark: PSR training time per epoch and inference overhead over constant steering.

Prints, on the default model (librarian persona, one steered layer):

* the one-off preparation time (prompted targets and unprompted residuals cached)
  and the time of each training epoch, for the MSE and the KL objective;
* the time of a forward over held-out texts under the PSR divided by the same
  forward under constant steering (``steer``), and the same for greedy
  generation with the KV cache.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/psr.py [--prompts N] [--epochs E] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lens_roles as lr
from lens_roles.inputs.prompts import Prompt
from lens_roles.interventions.psr.train import TrainConfig, make_psr, prepare, train_psr
from lens_roles.interventions.steering import steer
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.runtime.generation import generate

SYSTEM = "You are a warm, helpful public librarian who loves connecting people with books and library resources."


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = lr.load_model()
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    train, held = pairs.split(0.75)
    persona = lr.persona_vector(model, train, layers=[args.layer])
    prompts = [Prompt(p.user, None, p.positive) for p in train.pairs[: args.prompts]]
    for objective in ("mse", "kl"):
        psr = make_psr(model, persona, prompts, SYSTEM, layer=args.layer, alpha=1.0)  # skips the sink, as in use
        t0 = time.perf_counter()
        data = prepare(model, psr, prompts, SYSTEM, batch_size=4)
        t_prep = time.perf_counter() - t0
        history = train_psr(model, psr, prompts, SYSTEM, TrainConfig(objective=objective, epochs=args.epochs),
                            data=data)
        per_epoch = history.seconds.iloc[1:]
        tokens = sum(len(r.unprompted) for r in data.runs)
        print(f"{objective}: preparation {t_prep:.1f} s; epoch {per_epoch.mean():.1f} s on {len(prompts)} prompts "
              f"({tokens} tokens; {', '.join(f'{s:.1f}' for s in per_epoch)} s); loss "
              f"{history.loss.iloc[0]:.4f} -> {history.loss.iloc[-1]:.4f}")

    held_prompts = [Prompt(p.user, None, p.positive) for p in held.pairs[:8]]
    items = lr.encode(model, held_prompts)
    tokens, _ = pad_batch([it.tokens for it in items], pad_id(model))

    def fwd(ctx):
        def run():
            with torch.no_grad(), ctx():
                model(tokens)
        return run

    t_const = timed(fwd(lambda: steer(model, persona, 1.0, layers=[args.layer])), args.repeats)
    t_psr = timed(fwd(lambda: psr.applied(model)), args.repeats)
    print(f"forward of {len(items)} texts ({tokens.numel()} padded tokens): constant {t_const:.3f} s, "
          f"PSR {t_psr:.3f} s, ratio {t_psr / t_const:.3f}")
    users = [p.user for p in held.pairs[:4]]

    def gen(ctx):
        def run():
            with ctx():
                generate(model, users, max_new_tokens=24, stop_at_eos=False)
        return run

    g_const = timed(gen(lambda: steer(model, persona, 1.0, layers=[args.layer])), args.repeats)
    g_psr = timed(gen(lambda: psr.applied(model)), args.repeats)
    print(f"greedy generation, {len(users)} prompts x 24 tokens, KV cache: constant {g_const:.2f} s, "
          f"PSR {g_psr:.2f} s, ratio {g_psr / g_const:.3f}")


if __name__ == "__main__":
    main()
