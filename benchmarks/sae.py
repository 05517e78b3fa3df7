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

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sae.py [--samples N] [--device cpu|cuda]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lens_roles as lr
from lens_roles.analysis.sae.core import harvest, load_sae
from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.analysis.sae.features import ProjectionMetric, attribute_features
from lens_roles.analysis.sae.training import SAETrainConfig, train_sae

REPO = Path(__file__).resolve().parent.parent
SAES = REPO / "lens_roles" / "data" / "saes"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=204_800, help="activations drawn while training")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}")
    model = lr.load_model(device=args.device)
    corpus = Corpus.load(SAES / "corpus.json")

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
