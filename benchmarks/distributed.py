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
  total and per shard — the driver's serial arithmetic per shard, O(layers × d_model);
* the Ray round trip per shard (a shard that does nothing, dispatched and collected by
  ``RayExecutor.map``) and, for the role study, the driver's letter readout per question
  (one unembedding row: the workers send back final residuals);
* a plan for N GPUs from those numbers: N × the per-worker throughput, until the driver's
  serial time per shard (round trip + merge) reaches a worker's time per shard divided
  by N — the worker count where it stops scaling, printed for a few shard sizes.

Run: ``.venv/bin/python benchmarks/distributed.py [--repeats N] [--prompts N] [--address ADDR]``;
``--quick`` is a smoke run (few prompts, one repeat). Needs ``pip install -e '.[distributed]'``.
Without ``--address`` a local Ray instance with ``--cpus`` CPUs is started (on this 2-core
machine the two workers share the cores with each other and the driver: expect little gain).
"""

from __future__ import annotations

import argparse
import time

import torch

import lens_roles as lr
from lens_roles.distributed import LocalCluster, RayExecutor
from lens_roles.inputs.prompts import PromptSet
from lens_roles.runtime.activations import ShardSums, SumsJob, collect, merge_sums
from lens_roles.runtime.batching import Schedule
from lens_roles.runtime.readout import logprobs_at


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


def _noop(model, shared, payload):
    """A shard that does nothing: what is left is Ray's dispatch and collection."""
    return payload


def round_trip(executor: RayExecutor, n: int, repeats: int) -> float:
    """Median seconds per shard of ``executor.map`` over ``n`` shards that do nothing."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        executor.map(_noop, None, list(range(n)))
        times.append((time.perf_counter() - t0) / n)
    return sorted(times)[len(times) // 2]


def readout_cost(model, repeats: int) -> float:
    """Median seconds per question of the driver's letter readout (unembedding 64 final residuals at once)."""
    resid = torch.randn(64, model.cfg.d_model, dtype=model.cfg.dtype)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            logprobs_at(model, resid)
        times.append((time.perf_counter() - t0) / 64)
    return sorted(times)[len(times) // 2]


def plan(per_worker: float, driver_per_shard: float, readout: float) -> None:
    """Print the N-GPU plan: throughput N × per_worker until the driver's serial work per shard is the bottleneck."""
    print("plan for N workers (one GPU each), from the numbers above:")
    print(f"  one worker: {per_worker:.1f} prompts/s; N workers: N × that while the driver keeps up")
    print(f"  the driver's serial work per shard: {driver_per_shard * 1e3:.2f} ms (Ray round trip + merge); "
          "it does not grow with N, the shards per second do")
    for size in (16, 64, 256):
        worker_s = size / per_worker  # one worker's time for a shard of `size` prompts
        n_max = worker_s / driver_per_shard
        print(f"  shards of {size:4d} prompts: a worker needs {worker_s:.2f} s per shard; the driver saturates "
              f"at N ≈ {n_max:,.0f} workers ({n_max * per_worker:,.0f} prompts/s)")
    q_max = 1 / readout
    print(f"  role study: the driver reads out the letters at {q_max:,.0f} questions/s (unembedding on its CPU); "
          f"scoring stops scaling at N ≈ {q_max / per_worker:,.0f} workers if a worker scores questions as fast as "
          "it reads prompts (use bigger shards, or a GPU for the driver's copy, beyond that)")
    print("  before either limit: the slowest shard (make shards_per_worker × N shards, so the tail is short), "
          "and model loading (each worker loads once; amortised over the job)")


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

    cluster = None
    if not args.address:  # ray start --head with fixed agent ports: ray.init(num_cpus=...) aborts on loaded cores
        cluster = LocalCluster(args.cpus)
        args.address = cluster.address
    try:
        ray.init(address=args.address, log_to_driver=False)
        run(args, ray)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.stop()


def run(args, ray) -> None:
    """The measurements, on the Ray session ``main`` joined."""
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
    trip = round_trip(two_ex, 8 if args.quick else 64, 1 if args.quick else args.repeats)
    print(f"Ray round trip per shard (2 workers, empty shards): {trip * 1e3:.2f} ms")
    one_ex.close()
    two_ex.close()
    print(f"merge cost ({model.cfg.n_layers} layers × d_model {model.cfg.d_model}, float64):")
    per_shard = []
    for n in (1, 4, 16, 64) if args.quick else (1, 4, 16, 64, 256, 1024):
        t = merge_cost(n, model.cfg.n_layers, model.cfg.d_model, 3 if args.quick else 11)
        per_shard.append(t / n)
        print(f"  {n:5d} shards: {t * 1e3:8.3f} ms  ({t / n * 1e6:.1f} µs per shard)")
    readout = readout_cost(model, 3 if args.quick else 11)
    print(f"driver letter readout: {readout * 1e6:.0f} µs per question (d_vocab {model.cfg.d_vocab})")
    plan(args.prompts / med["1 worker"], trip + max(per_shard), readout)


if __name__ == "__main__":
    main()
