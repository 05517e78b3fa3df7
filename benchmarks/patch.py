"""Benchmark: activation patching vs attribution patching (plain and integrated gradients) on the default model.

Three clean/corrupt setups of the same token length:

* ``logit``: "You are a chemist." vs "You are an assistant." (same user turn), metric the
  logit difference between " chemist" and " assistant" at the last prompt position, so
  all 30 layers are on the grid;
* ``chemist`` and ``librarian``: the two setups of notebook 03 (projection on the chemist
  role vector / the librarian persona vector after layer 28, last position).

For each setup and grid (``resid`` = layer × position, ``attn``, ``mlp``, ``heads``) it prints
the time of activation patching, of plain attribution patching (``atp``: one forward and
one backward) and of integrated-gradients attribution (``ig``, K steps along the straight
corrupt → clean path, the forwards and backwards batched ``--ig-batch`` steps at a time), each
method's speed-up over activation patching (method alone; gradients recomputed for every
timing, so each grid pays for them as if it were the only one), and the Pearson r of each
method's grid against activation patching. Times are medians over ``--repeats`` runs,
the methods alternated within a repeat. Goals (issue 17): IG r >= 0.9 on the resid and
mlp grids of ``chemist`` and ``librarian``, and IG >= 10x faster than activation patching
on the resid grid.

With ``--transformer-lens``: TransformerLens's ``get_act_patch_resid_pre`` on the ``logit``
setup's resid grid (one forward per cell), once, and its largest difference from ours.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/patch.py [--repeats N] [--steps 2,4,8,16]
[--transformer-lens]``; ``--quick`` is a smoke test (few layers and prompts, one repeat,
numbers not meaningful).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lens_roles as lr

USER = "What is your job?"
READ = 28
GRIDS = ("resid", "attn", "mlp", "heads")


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall time of ``fn(*args, **kwargs)`` and its result."""
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t0, result


def setups(model, quick: bool) -> dict[str, lr.PatchSetup]:
    """The benchmark's setups: the logit-difference one and notebook 03's chemist and librarian."""
    out = {"logit": lr.PatchSetup(model, lr.Prompt(USER, system="You are a chemist."),
                                  lr.Prompt(USER, system="You are an assistant."),
                                  lr.LogitDiff(" chemist", " assistant"))}
    n_base, n_pairs = (8, 4) if quick else (96, 24)  # notebook 03's sizes
    role_train, _ = lr.load_role("chemist").split(0.75)
    baseline_train, _ = lr.load_baseline().split(0.75)
    chemist = lr.role_vector(model, role_train, lr.PromptSet("baseline", baseline_train.prompts[:n_base]))
    out["chemist"] = lr.PatchSetup(model, lr.Prompt("Tell me about your work.", system="You are a chemist."),
                                   lr.Prompt("Tell me about your work.", system="You are an assistant."),
                                   lr.DirectionProjection(chemist, READ))
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    train, _ = pairs.split(0.75)
    persona = lr.persona_vector(model, lr.PairSet("librarian", train.pairs[:n_pairs]))
    request = "Can you help me find books about the history of our town?"
    out["librarian"] = lr.PatchSetup(model, lr.Prompt(request, system="You are a helpful librarian."),
                                     lr.Prompt(request, system="You are a rude librarian."),
                                     lr.DirectionProjection(persona, READ))
    return out


def bench_grid(setup: lr.PatchSetup, grid: str, steps: list[int], *, layers, repeats: int, batch_size: int,
               ig_batch: int) -> list[dict]:
    """Time activation patching, atp and IG (each step count) on one grid, alternated; r against activation."""
    methods = [("activation", None), ("atp", None)] + [("ig", k) for k in steps]
    times: dict[tuple, list[float]] = {m: [] for m in methods}
    results: dict[tuple, lr.PatchResult] = {}
    for _ in range(repeats):
        for method, k in methods:
            setup.forget_gradients()
            if method == "activation":
                t, res = timed(setup.activation_patch, grid, layers=layers, batch_size=batch_size)
            else:
                t, res = timed(setup.attribution_patch, grid, layers=layers, method=method, steps=k,
                               batch_size=ig_batch)
            times[method, k].append(t)
            results[method, k] = res
    act = results["activation", None]
    t_act = statistics.median(times["activation", None])
    rows = []
    for method, k in methods:
        t = statistics.median(times[method, k])
        r = 1.0 if method == "activation" else float(lr.patch_agreement(act, results[method, k]).pearson.iloc[0])
        rows.append({"grid": grid, "method": method if k is None else f"ig{k}", "cells": act.values.numel(),
                     "seconds": t, "speedup": t_act / t, "r": r})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="activation-patching cells per forward")
    parser.add_argument("--ig-batch", type=int, default=8, help="IG steps per forward and backward")
    parser.add_argument("--steps", default="2,4,8,16", help="IG step counts, comma-separated")
    parser.add_argument("--setups", default="logit,chemist,librarian")
    parser.add_argument("--transformer-lens", action="store_true",
                        help="also time transformer_lens.patching.get_act_patch_resid_pre (slow)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 layers, 1 repeat, IG steps 2")
    args = parser.parse_args()
    steps = [2] if args.quick else [int(k) for k in args.steps.split(",")]
    repeats = 1 if args.quick else args.repeats
    layers = [0, 14, READ] if args.quick else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), activation batch {args.batch_size}, "
          f"IG batch {args.ig_batch}, repeats {repeats}{' (QUICK: not meaningful)' if args.quick else ''}")
    model = lr.load_model()
    chosen = [s.strip() for s in args.setups.split(",")]
    all_setups = setups(model, args.quick)
    summary = []
    for name in chosen:
        setup = all_setups[name]
        t_setup, _ = timed(lr.PatchSetup, model, setup.clean_ids, setup.corrupt_ids, setup.metric)
        print(f"\n{name}: {setup}   (setup: {t_setup:.2f} s)")
        print(f"{'grid':6s} {'method':10s} {'cells':>6s} {'seconds':>9s} {'speed-up':>9s} {'r vs act':>9s}")
        for grid in GRIDS:
            for row in bench_grid(setup, grid, steps, layers=layers, repeats=repeats, batch_size=args.batch_size,
                                  ig_batch=args.ig_batch):
                print(f"{row['grid']:6s} {row['method']:10s} {row['cells']:6d} {row['seconds']:9.3f} "
                      f"{row['speedup']:8.1f}x {row['r']:9.3f}")
                summary.append(dict(row, setup=name))
    print("\nPearson r against activation patching (goal: IG >= 0.9 on resid and mlp of chemist and librarian):")
    for name in chosen:
        for grid in GRIDS:
            cells = [r for r in summary if r["setup"] == name and r["grid"] == grid and r["method"] != "activation"]
            print(f"  {name:9s} {grid:6s} " + "  ".join(f"{r['method']} {r['r']:.3f}" for r in cells))
    resid = [r for r in summary if r["grid"] == "resid" and r["method"].startswith("ig")]
    if resid:
        print("IG speed-up on the layer x position (resid) grid (goal >= 10x): "
              + ", ".join(f"{r['setup']} {r['method']} {r['speedup']:.1f}x" for r in resid))

    if args.transformer_lens and "logit" in chosen:
        import transformer_lens.patching as tlp

        setup = all_setups["logit"]
        a, b = setup.metric.ids(model)
        act = setup.activation_patch("resid", batch_size=args.batch_size)

        def tl_run():
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.tensor([setup.clean_ids]))
                return tlp.get_act_patch_resid_pre(model, torch.tensor([setup.corrupt_ids]), cache,
                                                   lambda logits: logits[0, -1, a] - logits[0, -1, b])

        t_tl, raw = timed(tl_run)
        diff = float((setup.normalise(raw) - act.values).abs().max())
        print(f"TransformerLens get_act_patch_resid_pre: {t_tl:.2f} s (one forward per cell; "
              f"max |difference| from ours {diff:.1e})")


if __name__ == "__main__":
    main()
