"""Benchmark: activation patching vs attribution patching of the residual stream on the default model.

A role prompt against a baseline of the same token length (system prompt "You are a
chemist." vs "You are an assistant.", same user turn), metric: the logit difference
between " chemist" and " assistant" at the last prompt position, so every one of the
30 layers is on the grid. Prints, as medians over ``--repeats`` runs:

* the clean/corrupt setup (two forwards that cache every patchable site);
* activation patching of the full layer × position grid (``blocks.{l}.hook_resid_pre``,
  batched cells, each forward starting at the patched layer, identical cells skipped);
* attribution patching of the same grid (one forward and one backward);
* the speed-up, method alone and end to end (setup included), goal >= 10x, and the
  Pearson correlation between the two grids;
* with ``--transformer-lens``: TransformerLens's ``get_act_patch_resid_pre`` on the same
  grid (one forward per cell), once, and its largest difference from ours.

Run: ``.venv/bin/python benchmarks/patch.py [--repeats N] [--batch-size B] [--transformer-lens]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lens_roles as lr

USER = "What is your job?"


def timed(fn, repeats: int, warmup: bool = True) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs (after an optional warm-up), and its last result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--transformer-lens", action="store_true",
                        help="also time transformer_lens.patching.get_act_patch_resid_pre (slow)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    model = lr.load_model()
    clean = lr.Prompt(USER, system="You are a chemist.")
    corrupt = lr.Prompt(USER, system="You are an assistant.")
    metric = lr.LogitDiff(" chemist", " assistant")

    t_setup, setup = timed(lambda: lr.PatchSetup(model, clean, corrupt, metric), args.repeats)
    print(f"{setup}")
    n_layers, n_pos = model.cfg.n_layers, setup.n_prompt
    print(f"grid: resid_pre, {n_layers} layers x {n_pos} positions = {n_layers * n_pos} cells")

    def attribution():
        setup._grads = None  # recompute the forward and backward every time
        return setup.attribution_patch("resid")

    t_att, att = timed(attribution, args.repeats)
    setup.activation_patch("resid", layers=[n_layers - 1], batch_size=args.batch_size)  # warm-up, one layer
    t_act, act = timed(lambda: setup.activation_patch("resid", batch_size=args.batch_size), args.repeats,
                       warmup=False)
    r = float(lr.patch_agreement(act, att).pearson.iloc[0])
    print(f"setup (clean + corrupt runs, cached sites)  {t_setup:7.2f} s")
    print(f"activation patching, full grid              {t_act:7.2f} s   ({act.meta['forwards']} forwards, "
          f"{act.meta['skipped_identical_cells']} identical cells skipped)")
    print(f"attribution patching, full grid             {t_att:7.2f} s   (one forward + one backward)")
    print(f"speed-up, method alone: {t_act / t_att:6.1f}x   end to end (setup included): "
          f"{(t_setup + t_act) / (t_setup + t_att):6.1f}x   (goal >= 10x)")
    print(f"Pearson r(attribution, activation) over the grid: {r:.3f}")

    if args.transformer_lens:
        import transformer_lens.patching as tlp

        a, b = metric.ids(model)
        clean_tokens = torch.tensor([setup.clean_ids])
        corrupt_tokens = torch.tensor([setup.corrupt_ids])

        def tl_run():
            with torch.no_grad():
                _, cache = model.run_with_cache(clean_tokens)
                return tlp.get_act_patch_resid_pre(model, corrupt_tokens, cache,
                                                   lambda logits: logits[0, -1, a] - logits[0, -1, b])

        t_tl, raw = timed(tl_run, 1, warmup=False)
        diff = float((setup.normalise(raw) - act.values).abs().max())
        print(f"TransformerLens get_act_patch_resid_pre      {t_tl:7.2f} s   (one forward per cell; "
              f"ours is {t_tl / t_act:.1f}x faster; max |difference| {diff:.1e})")


if __name__ == "__main__":
    main()
