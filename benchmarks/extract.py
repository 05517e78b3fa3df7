"""Benchmark: persona-vector extraction at all layers on the default model.

Prints, for the librarian pairs (72 pairs = 144 texts) read at the last token:

* the extraction time of ``lens_roles.persona_vector`` divided by
  (a) a bare ``HookedTransformer`` forward over the same texts (same batch size), and
  (b) the ``steering-vectors`` library computing the same mean-difference vectors
      from the same texts on the Hugging Face model with the same weights;
* the per-layer cosine between (b)'s vectors and ours (layers before the last);
* peak memory added by activation collection for 128 vs 1024 prompts (each in a
  fresh subprocess, resident set size sampled every 5 ms).

Goals (issue 2): (a) ≤ 1.05, (b) ≤ 0.67, memory flat.
Run: ``make bench`` or ``.venv/bin/python benchmarks/extract.py [--repeats N] [--batch-size B]``.
``steering-vectors`` is needed for (b): ``pip install --no-deps steering-vectors``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

import lens_roles as lr
from lens_roles.inputs.prompts import render
from lens_roles.runtime.batching import pad_batch, pad_id


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up), and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def bare_forward(model, texts_tokens: list[list[int]], batch_size: int) -> None:
    """A plain full forward (logits) over the texts in their given order, right-padded."""
    with torch.inference_mode():
        for start in range(0, len(texts_tokens), batch_size):
            tokens, _ = pad_batch(texts_tokens[start : start + batch_size], pad_id(model))
            model(tokens)


def memory_child(n_prompts: int, batch_size: int) -> None:
    """Collect last-token means over ``n_prompts`` prompts; print the peak RSS added (MiB)."""
    model = lr.load_model()
    prompts = [p for role in lr.available_roles() for p in lr.load_role(role).prompts]
    prompts += list(lr.load_baseline().prompts)
    prompts = (prompts * (n_prompts // len(prompts) + 1))[:n_prompts]

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    # warm up (allocator pools, rotary tables, lazy imports) so only the collection's own growth is measured
    lr.collect(model, prompts[:batch_size], positions="last", batch_size=batch_size)
    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    lr.collect(model, prompts, positions="last", batch_size=batch_size)
    done.set()
    thread.join()
    print(json.dumps({"n": n_prompts, "peak_added_mib": (max(peak[0], rss()) - base) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.batch_size)
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    model = lr.load_model()
    pairs = lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")
    layers = list(range(model.cfg.n_layers))
    texts = [render(model.tokenizer, p).text for pair in pairs.pairs for p in pair.as_prompts()]
    items = lr.encode(model, [p for pair in pairs.pairs for p in pair.as_prompts()])
    print(f"{len(pairs)} pairs -> {len(texts)} texts, {sum(map(len, items))} tokens, all {len(layers)} layers")

    t_ours, ours = timed(
        lambda: lr.persona_vector(model, pairs, layers=layers, positions="last", batch_size=args.batch_size),
        args.repeats,
    )
    t_bare, _ = timed(lambda: bare_forward(model, [list(i.tokens) for i in items], args.batch_size), args.repeats)
    print(f"lens_roles extraction      {t_ours:7.2f} s")
    print(f"(a) bare HookedTransformer {t_bare:7.2f} s   ratio {t_ours / t_bare:.3f}  (goal <= 1.05)")

    try:
        from steering_vectors import SteeringVectorTrainingSample, train_steering_vector
    except ImportError:
        print("(b) steering-vectors not installed (pip install --no-deps steering-vectors): skipped")
    else:
        hf, tokenizer = lr.load_hf_model(None)
        samples = [SteeringVectorTrainingSample(texts[2 * i], texts[2 * i + 1]) for i in range(len(pairs))]
        assert tokenizer(texts[0])["input_ids"] == list(items[0].tokens), "tokenisations differ"
        t_sv, sv = timed(
            lambda: train_steering_vector(hf, tokenizer, samples, layers=layers, read_token_index=-1,
                                          batch_size=args.batch_size, show_progress=False),
            args.repeats,
        )
        print(f"(b) steering-vectors       {t_sv:7.2f} s   ratio {t_ours / t_sv:.3f}  (goal <= 0.67)")
        cos = [float(torch.nn.functional.cosine_similarity(ours[layer], sv.layer_activations[layer].float(), dim=0))
               for layer in layers[:-1]]
        print(f"    cosine with steering-vectors, layers 0..{layers[-2]}: min {min(cos):.7f}, "
              f"mean {statistics.mean(cos):.7f} (goal >= 0.99999)")
        del hf

    for n in (128, 1024):
        out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--batch-size", str(args.batch_size)],
                             capture_output=True, text=True, check=True)
        rec = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"peak memory added by collection, {rec['n']:>5d} prompts: {rec['peak_added_mib']:7.1f} MiB")


if __name__ == "__main__":
    main()
