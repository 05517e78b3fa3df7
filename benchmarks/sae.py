"""Benchmark: SAE training throughput and the time of a feature-attribution pass.

Prints, on the default model:

* SAE training throughput in activations (tokens) per second, for the shipped
  configuration (TopK, k = 32, 2304 features, batch 1024) on activations harvested
  from the shipped corpus, and the harvest throughput itself (model forward up to
  the layer);
* the time of one gradient × activation attribution pass over 128 prompts (the
  librarian pairs' user turns with both replies) with the shipped layer-12 SAE,
  the metric read after layer 24; and of the same forward with no SAE and no
  gradient, for scale.

Before those, the floor comparison (issue 17: at least 0.7x a bare forward):

* the harvest (:func:`~lens_roles.analysis.sae.core.harvest`, layer 12) of ``--sequences``
  corpus sequences against a bare forward over the same token batches stopped after
  layer 12, and
* corpus generation (:func:`~lens_roles.analysis.sae.corpus.generate_sequences`, the
  sampling of :func:`build_corpus`: ``--gen-prompts`` prompts, ``--gen-tokens`` new tokens
  each, KV cache) against a bare full forward (logits) over the sequences it produced,
  in batches of ``--batch-size``; and the same generation with TransformerLens's own
  attention at each step (:func:`~lens_roles.runtime.decode_attention.decoding_attention`
  switched off: the whole cache copied per block and step), with whether its tokens
  and sequences are the same,

each as tokens per second (every token of the sequences: prompt and continuation),
medians over ``--repeats`` rounds alternating the runs, and the ratios.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sae.py [--samples N] [--device cpu|cuda]``;
``--floor-only`` stops after the floor comparison; ``--quick`` is a smoke test (a few
sequences and tokens, one repeat, no SAE training; numbers not meaningful).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from bench_common import alternated

import lens_roles as lr
import lens_roles.runtime.generation as generation
from lens_roles.analysis.sae.core import harvest, load_sae
from lens_roles.analysis.sae.corpus import Corpus, corpus_prompts, generate_sequences
from lens_roles.analysis.sae.mixture import MixtureRecipe
from lens_roles.analysis.sae.features import ProjectionMetric, attribute_features
from lens_roles.analysis.sae.training import SAETrainConfig, train_sae
from lens_roles.runtime.batching import token_batches
from lens_roles.studies.sae_suite import CORPUS_BATCH_SIZE

REPO = Path(__file__).resolve().parent.parent
SAES = REPO / "lens_roles" / "data" / "saes"


@torch.no_grad()
def bare_forward(model, sequences, batch_size: int, **kwargs) -> None:
    """The floor: one forward per length-sorted batch of ``sequences``, nothing kept."""
    for batch in token_batches(model, sequences, batch_size):
        batch.forward(model, **kwargs)


@contextlib.contextmanager
def transformer_lens_attention():
    """Decode with TransformerLens's attention as it is (no :func:`decoding_attention` shortcuts)."""
    @contextlib.contextmanager
    def plain(model, **kwargs):
        yield

    keep = generation.decoding_attention
    generation.decoding_attention = plain
    try:
        yield
    finally:
        generation.decoding_attention = keep


def floor_comparison(model, corpus: Corpus, args) -> None:
    """Harvest and corpus generation tokens/s against a bare forward over the same tokens."""
    sequences = corpus.sequences[: args.sequences]
    n = sum(len(s) for s in sequences)
    times, _ = alternated({"ours": lambda: harvest(model, sequences, [12], batch_size=args.batch_size),
                           "floor": lambda: bare_forward(model, sequences, args.batch_size, stop_at_layer=13)},
                          args.repeats)
    t_ours, t_floor = times["ours"], times["floor"]
    print(f"harvest to layer 12, {len(sequences)} sequences ({n} tokens), batch {args.batch_size}: "
          f"{n / t_ours:,.0f} tokens/s ({t_ours:.2f} s); bare forward to layer 12: {n / t_floor:,.0f} tokens/s "
          f"({t_floor:.2f} s); ratio {t_floor / t_ours:.2f}x (goal >= 0.7x)")

    prompts = corpus_prompts(0)[: args.gen_prompts]
    n_prompt = sum(len(item.tokens) for item in lr.encode(model, prompts))
    for gen_batch in [int(b) for b in str(args.gen_batch).split(",")]:
        def ours(gen_batch=gen_batch):
            return generate_sequences(model, prompts, max_new_tokens=args.gen_tokens, temperature=1.0, seed=0,
                                      batch_size=gen_batch)

        def plain_attention():
            with transformer_lens_attention():
                return ours()

        made = ours()  # the sequences the floor runs over (and a warm-up)
        n = sum(len(s) for s in made)
        times, out = alternated({"ours": ours, "tl": plain_attention,
                                 "floor": lambda made=made: bare_forward(model, made, args.batch_size)},
                                args.repeats)
        t_ours, t_tl, t_floor = times["ours"], times["tl"], times["floor"]
        print(f"corpus generation, {len(prompts)} prompts x up to {args.gen_tokens} new tokens ({n} tokens, "
              f"{n - n_prompt} sampled), batch {gen_batch}: {n / t_ours:,.0f} tokens/s "
              f"({(n - n_prompt) / t_ours:,.1f} sampled tokens/s, {t_ours:.2f} s); with TransformerLens's "
              f"attention: {n / t_tl:,.0f} tokens/s ({t_tl:.2f} s, {t_tl / t_ours:.2f}x ours' time; same "
              f"sequences: {'yes' if out['tl'] == out['ours'] == made else 'NO'}); bare full forward over the same "
              f"sequences (batch {args.batch_size}): {n / t_floor:,.0f} tokens/s ({t_floor:.2f} s); ratio "
              f"{t_floor / t_ours:.2f}x (goal >= 0.7x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=204_800, help="activations drawn while training")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sequences", type=int, default=400, help="corpus sequences harvested")
    ap.add_argument("--batch-size", type=int, default=16,
                    help="harvest batch size (the suite's default), and the floor's batch size")
    ap.add_argument("--gen-prompts", type=int, default=CORPUS_BATCH_SIZE,
                    help="prompts continued in the generation timing")
    ap.add_argument("--gen-tokens", type=int, default=48, help="new tokens per prompt (the shipped corpus: 48)")
    recipe_batch = MixtureRecipe().batch_size
    ap.add_argument("--gen-batch", default=f"{recipe_batch},{CORPUS_BATCH_SIZE}",
                    help=f"generation batch size(s), comma-separated (default {recipe_batch}: the mixture recipe's, "
                         f"`sae-corpus`; and {CORPUS_BATCH_SIZE}: the SAE suite's own corpus)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--floor-only", action="store_true", help="stop after the floor comparison")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, one repeat, floor comparison only")
    args = ap.parse_args()
    if args.quick:
        args.sequences, args.gen_prompts, args.gen_tokens, args.gen_batch = 12, 4, 4, "2,4"
        args.repeats, args.floor_only = 1, True
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}"
          f"{' (QUICK: not meaningful)' if args.quick else ''}")
    model = lr.load_model(device=args.device)
    corpus = Corpus.load(SAES / "corpus.json")
    floor_comparison(model, corpus, args)
    if args.floor_only:
        return

    t0 = time.perf_counter()
    acts = harvest(model, corpus.sequences[:400], [12])[12]
    seconds = time.perf_counter() - t0
    print(f"harvest (forward to layer 12): {len(acts)} tokens in {seconds:.1f} s = {len(acts) / seconds:,.0f} tokens/s")

    config = SAETrainConfig(d_sae=2304, k=32, samples=args.samples, batch_size=1024)
    t0 = time.perf_counter()
    train_sae(acts.to(args.device), layer=12, model_name=model.cfg.model_name, config=config)
    seconds = time.perf_counter() - t0
    print(f"SAE training (TopK k=32, 2304 features, batch 1024): {config.samples:,} activations in {seconds:.1f} s "
          f"= {config.samples / seconds:,.0f} tokens/s")

    pairs = lr.load_pairs(REPO / "lens_roles" / "data" / "personas" / "librarian.jsonl")
    prompts = [p for pair in pairs.pairs for p in pair.as_prompts()][: args.prompts]
    librarian = lr.persona_vector(model, pairs, layers=[12, 24])
    sae = load_sae(SAES / "layer_12", device=args.device)
    metric = ProjectionMetric(librarian, 24)
    t0 = time.perf_counter()
    frame = attribute_features(model, sae, prompts, metric)
    seconds = time.perf_counter() - t0
    items = lr.encode(model, prompts)
    n_tok = sum(len(it.tokens) for it in items)
    print(f"attribution pass over {len(prompts)} prompts ({n_tok} tokens), SAE layer 12, metric after layer 24: "
          f"{seconds:.1f} s ({frame.attrs['metric']:.2f} mean projection)")
    from lens_roles.analysis.sae.features import metric_values

    t0 = time.perf_counter()
    metric_values(model, sae, prompts, metric)
    print(f"same prompts, spliced forward without gradients: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
