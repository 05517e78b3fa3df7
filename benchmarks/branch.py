"""Benchmark: α sweeps branched at the steered layer against the loop they replace, on the default model.

Prints, for the adherence + KL sweep and the cosine sweep (α values given plus the
α = 0 reference, steering at one layer, 18 of 30 by default):

* the time of the branched sweep (:func:`lens_roles.measures.sweeps.adherence_sweep`,
  :func:`~lens_roles.measures.sweeps.cosine_sweep`: each batch once unsteered, each α
  only the blocks after the steering layer);
* the time of the loop (one α at a time, a full steered forward each, through
  ``steer`` and ``Batch.forward``: the unbranched path), measured alternately with it;
* their ratio (loop / branched; the block count predicts
  ``runs · n_layers / (n_layers + (runs − 1) · (n_layers − layer − 1))``) and the
  largest absolute difference between the two sweeps' values.

Run: ``.venv/bin/python benchmarks/branch.py [--repeats 3] [--layer 18] [--quick]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch

from bench_common import alternated

import lens_roles as lr
from lens_roles.inputs.positions import encode, select_positions
from lens_roles.interventions.steering import residual_norms, steer
from lens_roles.measures.behaviour import logprob_margin, reply_logprob, reply_logprobs
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep
from lens_roles.runtime.batching import token_batches
from lens_roles.runtime.capture import capture
from lens_roles.runtime.readout import kl_divergence


@torch.no_grad()
def loop_adherence(model, direction, pairs, layer: int, alphas: list[float], norms, batch_size: int = 4
                   ) -> pd.DataFrame:
    """The adherence + KL sweep one α at a time, a full steered forward each (α = 0 first, the reference)."""
    prompts = [p for pair in pairs.pairs for p in pair.as_prompts()]
    items = encode(model, prompts)
    spans = select_positions(items, "reply")
    all_alphas = sorted(set(alphas) | {0.0})
    logps: dict[float, list] = {}
    mean_lp: dict[float, list] = {}
    for alpha in [0.0] + [a for a in all_alphas if a != 0.0]:
        logps[alpha], mean_lp[alpha] = [], []
        with steer(model, direction, alpha, layers=[layer], relative=norms):
            for batch in token_batches(model, [it.tokens for it in items], 2 * batch_size, sort=False):
                resid = batch.forward(model, stop_at_layer=model.cfg.n_layers)
                for c, i in enumerate(batch.index):
                    a, b = spans[i][0], spans[i][-1] + 1
                    lp = reply_logprobs(model, resid[c], (a, b)).cpu()
                    logps[alpha].append(lp)
                    mean_lp[alpha].append(reply_logprob(lp, items[i].tokens[a:b]).double())
    rows = []
    for alpha in all_alphas:
        lp = torch.stack(mean_lp[alpha])
        margin = float(logprob_margin(lp[0::2], lp[1::2]).sum(0) / len(pairs))
        kl = float(sum(kl_divergence(p0, p).mean(-1).double() for p0, p in zip(logps[0.0], logps[alpha])) / len(lp))
        rows.append({"alpha": alpha, "metric": "logprob_margin", "value": margin})
        rows.append({"alpha": alpha, "metric": "kl_from_unsteered", "value": kl})
    return pd.DataFrame(rows)


@torch.no_grad()
def loop_cosine(model, direction, prompts, layer: int, alphas: list[float], norms, batch_size: int = 8
                ) -> pd.DataFrame:
    """The cosine sweep one α at a time, a full steered forward each, against the unsteered run."""
    items = encode(model, lr.inputs.prompts.as_prompts(prompts))
    downstream = list(range(layer, model.cfg.n_layers))
    all_alphas = sorted(set(alphas) | {0.0})
    sums = {(a, d): 0.0 for a in all_alphas for d in downstream}
    for batch in token_batches(model, [it.tokens for it in items], batch_size, sort=False):
        valid = batch.mask.bool()
        with capture(model, downstream) as ref:
            batch.forward(model, stop_at_layer=model.cfg.n_layers)
        reference = dict(ref.values)
        for alpha in all_alphas:
            with steer(model, direction, alpha, layers=[layer], relative=norms), capture(model, downstream) as cap:
                batch.forward(model, stop_at_layer=model.cfg.n_layers)
            for d in downstream:
                cos = torch.nn.functional.cosine_similarity(cap[d], reference[d], dim=-1)
                sums[(alpha, d)] += float(((cos * valid).sum(-1) / valid.sum(-1)).double().sum())
    return pd.DataFrame([{"alpha": a, "read_layer": d, "metric": "cosine", "value": v / len(items)}
                         for (a, d), v in sums.items()])



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layer", type=int, default=18)
    parser.add_argument("--pairs", type=int, default=8, help="held-out librarian pairs (2 prompts each)")
    parser.add_argument("--alphas", default="-0.5,-0.25,0.25,0.5,1.0", help="relative α (× typical norm)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.repeats = 2, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    model = lr.load_model()
    n, layer = model.cfg.n_layers, args.layer
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    train, held = pairs.split(0.75)
    held = lr.PairSet("librarian", held.pairs[: args.pairs])
    persona = lr.persona_vector(model, train, layers=[layer])
    norms = residual_norms(model, [p.user for p in held.pairs], layers=[layer])
    alphas = [float(a) for a in args.alphas.split(",")]
    runs = len(set(alphas) | {0.0})
    predicted = runs * n / (n + (runs - 1) * (n - layer - 1))
    print(f"model {model.cfg.model_name} ({n} layers), steering at layer {layer}, α {alphas} + the α = 0 reference "
          f"({runs} runs per sweep), {len(held)} pairs; block-count prediction loop/branched {predicted:.2f}")

    secs, out = alternated({
        "branched": lambda: adherence_sweep(model, persona, held, steer_layers=[layer], alphas=alphas, relative=norms),
        "loop": lambda: loop_adherence(model, persona, held, layer, alphas, norms),
    }, args.repeats)
    diff = np.abs(out["branched"].sort_values(["metric", "alpha"]).value.to_numpy()
                  - out["loop"].sort_values(["metric", "alpha"]).value.to_numpy()).max()
    print(f"adherence + KL sweep: branched {secs['branched']:.2f} s, loop {secs['loop']:.2f} s, "
          f"ratio loop/branched {secs['loop'] / secs['branched']:.2f} (goal >= 2); max |difference| {diff:.1e} "
          "(goal <= 1e-5)")

    prompts = [p.user for p in held.pairs]
    secs, out = alternated({
        "branched": lambda: cosine_sweep(model, persona, prompts, steer_layers=[layer], alphas=alphas, relative=norms),
        "loop": lambda: loop_cosine(model, persona, prompts, layer, alphas, norms),
    }, args.repeats)
    diff = np.abs(out["branched"].sort_values(["alpha", "read_layer"]).value.to_numpy()
                  - out["loop"].sort_values(["alpha", "read_layer"]).value.to_numpy()).max()
    print(f"cosine sweep: branched {secs['branched']:.2f} s, loop {secs['loop']:.2f} s, "
          f"ratio loop/branched {secs['loop'] / secs['branched']:.2f}; max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
