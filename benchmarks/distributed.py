"""Benchmark: activation collection on Ray workers vs one process, and the driver's merge cost.

Prints

* the wall time of ``collect`` (all layers, role prompts at their end-of-instruction
  positions, the default model) on this process, on 1 Ray worker and on 2 Ray workers,
  alternated over the repeats, and the ratios 1 worker / 2 workers and
  one process / 2 workers (the speed-up); on a machine with fewer free cores than
  workers expect little gain — the workers share the cores;
* the largest relative difference of the distributed means from the single-process
  ones (should be ≤ 1e-12) and whether the per-prompt rows are identical;
* the driver's merge cost (``merge_sums``) against the number of shards, for
  shards the size of the default model's (30 layers × 576 floats per prompt set):
  total and per shard — the driver's only serial work per shard.

Run: ``.venv/bin/python benchmarks/distributed.py [--repeats N] [--prompts N] [--address ADDR]``;
``--quick`` is a smoke run (few prompts, one repeat). Needs ``pip install -e '.[distributed]'``.
Without ``--address`` a local Ray instance with ``--cpus`` CPUs is started.
"""

from __future__ import annotations

import argparse
import time

import torch

import lens_roles as lr
from lens_roles.distributed import RayExecutor
from lens_roles.inputs.prompts import PromptSet
from lens_roles.runtime.activations import ShardSums, SumsJob, collect, merge_sums
from lens_roles.runtime.batching import Schedule


def prompts(n: int) -> PromptSet:
    pool = [p for role in lr.available_roles() for p in lr.load_role(role).prompts]
    return PromptSet("bench", tuple((pool * (n // len(pool) + 1))[:n]))


def merge_cost(n_shards: int, n_layers: int, d_model: int, repeats: int) -> float:
    """Median seconds of ``merge_sums`` over ``n_shards`` shards of one prompt set each holding 1 prompt."""
    chunks = tuple(((), (i,)) for i in range(n_shards))
    job = SumsJob(items=[None] * n_shards, positions=[[0]] * n_shards, owner=[0] * n_shards, n_sets=1,
                  layers=tuple(range(n_layers)), keep_per_prompt=False, batch_size=1,
                  schedule=Schedule((), tuple((c,) for c in chunks)))
    shards = [ShardSums((i,), torch.randn(1, n_layers, d_model, dtype=torch.float64),
                        torch.ones(1, dtype=torch.long), torch.tensor([i]), None) for i in range(n_shards)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merge_sums(job, shards)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 prompts, 1 repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance (default: 2)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.repeats, args.batch_size = 16, 1, 4
    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    model = lr.load_model()
    data = prompts(args.prompts)
    kw = dict(layers="all", positions="eoi", batch_size=args.batch_size, keep_per_prompt=True)
    print(f"{args.prompts} prompts, batch {args.batch_size}, {model.cfg.n_layers} layers, "
          f"torch threads on the driver {torch.get_num_threads()}")
    t0 = time.perf_counter()
    each = ray.cluster_resources().get("CPU", 1) / 3  # three workers alive at once share the cluster's CPUs
    one_ex = RayExecutor(None, workers=1, cpus_per_worker=each)
    two_ex = RayExecutor(None, workers=2, cpus_per_worker=each)
    print(f"3 workers started (each loading the model) in {time.perf_counter() - t0:.1f} s")
    times = {"process": [], "1 worker": [], "2 workers": []}
    runs = {"process": None, "1 worker": one_ex, "2 workers": two_ex}
    results = {}
    for r in range(args.repeats + 1):  # the first round warms up
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            t0 = time.perf_counter()
            results[name] = collect(model, data, executor=runs[name], **kw)
            if r:
                times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:10s} {v:8.2f} s  ({args.prompts / v:.1f} prompts/s)")
    print(f"ratio 1 worker / 2 workers: {med['1 worker'] / med['2 workers']:.2f}")
    print(f"ratio one process / 2 workers: {med['process'] / med['2 workers']:.2f}")
    base = results["process"]
    for name in ("1 worker", "2 workers"):
        got = results[name]
        rel = ((got.mean - base.mean).norm(dim=-1) / base.mean.norm(dim=-1)).max().item()
        print(f"  {name}: max relative difference of the means {rel:.2e}; "
              f"rows identical: {torch.equal(got.per_prompt, base.per_prompt)}")
    one_ex.close()
    two_ex.close()
    print(f"merge cost ({model.cfg.n_layers} layers × d_model {model.cfg.d_model}, float64):")
    for n in (1, 4, 16, 64) if args.quick else (1, 4, 16, 64, 256, 1024):
        t = merge_cost(n, model.cfg.n_layers, model.cfg.d_model, 3 if args.quick else 11)
        print(f"  {n:5d} shards: {t * 1e3:8.3f} ms  ({t / n * 1e6:.1f} µs per shard)")
    ray.shutdown()


if __name__ == "__main__":
    main()
