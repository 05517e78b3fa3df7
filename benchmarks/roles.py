"""Benchmark: the role study's cost on the default model, and the plan that keeps it under 30 minutes.

Prints

* the time to extract a role vector for every shipped role (``lens_roles/data/roles``) against the
  baseline, at every layer, read at the end-of-instruction positions;
* the time to evaluate one domain set under every condition for one role: no
  intervention, the validation grid (layers × α) for addition, and addition,
  ablation and prompting on the test questions — with the number of scored
  questions and the seconds per question of each;
* the predicted time of the whole study (``lens-roles evaluate``) for the
  default settings and for a few larger ones, from the measured seconds per
  question (every condition costs one forward per question).

With ``--study`` it times the whole study instead (``run_role_study`` at the
``lens-roles evaluate`` defaults: the first role of each domain, every domain,
16 validation / ``--max-test`` test questions, 3 layers × 3 α): the branched
implementation (no intervention and every addition share the blocks below their
layer) against the unbranched one (every condition and grid point a full run of
its own, as before branching), alternated, with the ratio, whether the selections
are the same and the largest difference between the tables. ``--quick`` is a
smoke run of that (2 roles × 2 domains, 4 questions).

With ``--baseline TREE`` it times ``lens-roles evaluate`` end to end (model load, role
vectors, the study, its tables and figures; the CLI defaults unless ``--max-test``) in a
fresh process per run, this checkout's code against another checkout's (e.g. a worktree of
an older commit), alternated, each with ``PYTHONPATH=<tree>``; prints the wall time of each
run, the ratio baseline / this tree, whether the two chose the same layer and α for every
role (``selection.csv``), and whether each table (``selection.csv``, ``table.csv``, ...) is the
same byte for byte, else the largest difference of its numbers (values are written to 6
significant digits since 204088b, after ab86173, so differences of a unit in the sixth digit
are expected against it). ``--quick`` makes that a smoke run (2 domains, 4 validation / 4 test questions,
200 bootstrap draws).

Run: ``.venv/bin/python benchmarks/roles.py [--domain econ] [--questions DIR]``, or
``benchmarks/roles.py --study [--max-test 30|128] [--repeats 1] [--quick]``, or
``benchmarks/roles.py --baseline /work/base_ab86173 [--max-test 30|128] [--repeats 1] [--quick]``
(serially, on an otherwise idle machine; ``git worktree add --detach /work/base_ab86173 ab86173``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_common import imported_from

import lens_roles as lr
from lens_roles.inputs.questions import load_domains
from lens_roles.cli.evaluation import resolve_role_sets
from lens_roles.measures.multiple_choice import Condition, evaluate_condition, persona_prompt
from lens_roles.studies import role_study
from lens_roles.studies.role_study import StudyConfig, default_selection_layers, load_role_domains, select_addition

# ../shared/data/role-vectors/splits beside the checkout, or beside a folder above it (a worktree elsewhere)
SHARED = next((p / "shared" / "data" / "role-vectors" / "splits" for p in Path(__file__).resolve().parents[2:]
               if (p / "shared" / "data" / "role-vectors" / "splits").is_dir()),
              Path(__file__).resolve().parents[2] / "shared" / "data" / "role-vectors" / "splits")
HERE = Path(__file__).resolve().parent.parent


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@contextmanager
def unbranched():
    """The role study as before branching: every condition and grid point scored by a full run of its own."""
    real = role_study.evaluate_conditions

    def one_by_one(model, questions, conditions, *, answer_format="{letter}", batch_size=16, progress=False):
        return [evaluate_condition(model, questions, c, d, answer_format=answer_format, batch_size=batch_size)
                for c, d in conditions]

    role_study.evaluate_conditions = one_by_one
    try:
        yield
    finally:
        role_study.evaluate_conditions = real


def study(model, args) -> None:
    """Time the whole role study, branched against unbranched (see the module docs)."""
    domains = load_domains(args.questions)
    role_domains = load_role_domains()
    config = StudyConfig(max_test=args.max_test)
    if args.quick:
        domains = dict(list(domains.items())[:2])
        config = StudyConfig(max_val=4, max_test=4, n_boot=200)
    role_sets = resolve_role_sets("domain", None, list(domains), role_domains)
    t_extract, vectors = timed(lambda: lr.role_vectors(model, role_sets, lr.load_baseline()))
    print(f"study: {len(vectors)} roles × {len(domains)} domains, {config.max_val} validation / {config.max_test} "
          f"test questions per domain, layers {default_selection_layers(model.cfg.n_layers)} × α {config.alphas}; "
          f"role vectors extracted in {t_extract:.1f} s (the same for both, not in the times below)")

    def run():
        return role_study.run_role_study(model, vectors, domains, role_domains=role_domains, config=config,
                                         progress=False)

    def run_unbranched():
        with unbranched():
            return run()

    times: dict[str, list[float]] = {"branched": [], "unbranched": []}
    out = {}
    fns = {"branched": run, "unbranched": run_unbranched}
    for r in range(args.repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            secs, out[name] = timed(fns[name])
            times[name].append(secs)
            print(f"  round {r + 1}: {name} {secs:.1f} s", flush=True)
    a, b = out["branched"], out["unbranched"]
    same_selection = a.selection.equals(b.selection)
    diff = max(float(np.nanmax(np.abs(a.table[c].to_numpy(float) - b.table[c].to_numpy(float))))
               for c in ("value", "lo", "hi", "delta", "delta_lo", "delta_hi"))
    tb, tu = statistics.median(times["branched"]), statistics.median(times["unbranched"])
    print(f"role study: branched {tb:.1f} s, unbranched {tu:.1f} s, ratio unbranched/branched {tu / tb:.2f}; "
          f"same selections: {same_selection}; largest table difference {diff:.1e}")



def evaluate_cli(tree: Path, out: Path, args) -> float:
    """One ``lens-roles evaluate`` in a fresh process with ``tree``'s code; returns its wall seconds."""
    cmd = [sys.executable, "-m", "lens_roles.cli", "evaluate", "--questions", str(args.questions), "--out", str(out),
           "--max-test", str(args.max_test)]
    if args.quick:
        domains = sorted(p.stem.removeprefix("target_test_") for p in Path(args.questions).glob("target_test_*.json"))
        cmd += ["--domains", ",".join(domains[:2]), "--max-val", "4", "--max-test", "4", "--n-boot", "200"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the numeric columns of two CSV tables of the same shape."""
    fa, fb = pd.read_csv(a), pd.read_csv(b)
    if list(fa.columns) != list(fb.columns) or len(fa) != len(fb):
        return float("inf")
    num = fa.select_dtypes("number").columns
    other = [c for c in fa.columns if c not in num]
    if not fa[other].equals(fb[other]):
        return float("inf")
    return float(np.nanmax(np.abs(fa[num].to_numpy(float) - fb[num].to_numpy(float)))) if len(num) else 0.0


def against_baseline(args) -> None:
    """``lens-roles evaluate`` end to end, this tree against ``--baseline`` (see the module docs)."""
    trees = {"this tree": HERE, "baseline": args.baseline.resolve()}
    for name, tree in trees.items():
        print(f"{name}: {tree} (lens_roles from {imported_from(tree)})")
    walls: dict[str, list[float]] = {name: [] for name in trees}
    outs: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench_roles_") as work:
        for r in range(args.repeats):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                out = Path(work) / f"{name.replace(' ', '_')}_{r}"
                walls[name].append(evaluate_cli(trees[name], out, args))
                outs[name] = out
                print(f"  run {r + 1} {name}: {walls[name][-1]:.1f} s", flush=True)
        ours, base = statistics.median(walls["this tree"]), statistics.median(walls["baseline"])
        size = "--quick" if args.quick else f"default size, --max-test {args.max_test}"
        print(f"\nlens-roles evaluate ({size}): baseline {base:.1f} s, this tree {ours:.1f} s, "
              f"baseline / this tree {base / ours:.2f}x (median of {args.repeats})")
        chosen = [pd.read_csv(outs[name] / "selection.csv").query("chosen")[["role", "layer", "alpha"]]
                  .reset_index(drop=True) for name in trees]
        print(f"  same selections (role, layer, alpha chosen on validation): {chosen[0].equals(chosen[1])}")
        for table in ("selection.csv", "table.csv", "scores.csv", "baseline.csv", "summary.csv"):
            a, b = outs["this tree"] / table, outs["baseline"] / table
            same = a.read_bytes() == b.read_bytes()
            print(f"  {table}: " + ("identical files" if same else f"differ, largest difference "
                                                                 f"{largest_difference(a, b):.1e}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default=str(SHARED))
    parser.add_argument("--domain", default="econ")
    parser.add_argument("--role", default=None, help="default: the domain's first role in roles/domains.json")
    parser.add_argument("--study", action="store_true", help="time the whole study, branched vs unbranched")
    parser.add_argument("--max-test", type=int, default=30, help="--study: test questions per domain")
    parser.add_argument("--repeats", type=int, default=1, help="--study: rounds (each runs both, alternated)")
    parser.add_argument("--quick", action="store_true", help="--study smoke run: 2 roles × 2 domains, 4 questions")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout: time lens-roles evaluate end to end, this tree against it")
    args = parser.parse_args()
    if args.baseline is not None:
        against_baseline(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_load, model = timed(lr.load_model)
    print(f"model {model.cfg.model_name}: loaded in {t_load:.1f} s")
    if args.study or args.quick:
        study(model, args)
        return

    roles = [lr.load_role(r) for r in lr.available_roles()]
    baseline = lr.load_baseline()
    t_extract, vectors = timed(lambda: lr.role_vectors(model, roles, baseline))
    n_prompts = sum(len(r) for r in roles) + len(baseline)
    print(f"extract: {len(roles)} role vectors × {model.cfg.n_layers} layers ({n_prompts} prompts, eoi positions) "
          f"in {t_extract:.1f} s")

    config = StudyConfig()
    domains = load_domains(args.questions)
    qs = domains[args.domain]
    val, test = qs.split(config.validation, seed=config.seed)
    val, test = val.head(config.max_val), test.head(config.max_test)
    role = args.role or next(r for r, d in load_role_domains().items() if d == args.domain)
    direction = vectors[role]
    layers = default_selection_layers(model.cfg.n_layers)

    timings = {}
    timings["none"] = (timed(lambda: evaluate_condition(model, test, Condition("none")))[0], len(test))
    t_sel, (chosen, grid) = timed(lambda: select_addition(model, direction, val, layers=layers,
                                                          alphas=config.alphas))
    timings["selection grid"] = (t_sel, len(val) * len(grid))
    for cond in (chosen, Condition("ablation", chosen.layer), Condition("prompting", system=persona_prompt(role))):
        timings[cond.kind] = (timed(lambda c=cond: evaluate_condition(model, test, c, direction))[0], len(test))
    print(f"\nevaluate one domain ({args.domain}: {len(val)} validation, {len(test)} test questions), role {role}, "
          f"chosen layer {chosen.layer}, α {chosen.alpha:g}:")
    total = 0.0
    for name, (secs, n) in timings.items():
        total += secs
        print(f"  {name:15s} {secs:7.1f} s  {n:5d} questions  {secs / n * 1000:6.1f} ms/question")
    print(f"  {'all conditions':15s} {total:7.1f} s")

    per_q = sum(s for s, _ in timings.values()) / sum(n for _, n in timings.values())

    def plan(n_roles: int, n_domains: int, n_val: int, n_test: int, grid: int) -> tuple[int, float]:
        questions = n_domains * n_test + n_roles * (grid * n_val + 3 * n_domains * n_test)
        return questions, questions * per_q

    print(f"\nplan ({per_q * 1000:.1f} ms per scored question, measured above; role extraction "
          f"{t_extract:.0f} s for all roles):")
    grid_size = len(layers) * len(config.alphas)
    for label, args_ in [
        (f"default: 8 domain roles × 8 domains, {config.max_val} val / {config.max_test} test, grid {grid_size}",
         (8, 8, config.max_val, config.max_test, grid_size)),
        ("8 roles × 8 domains, 32 val / 128 test", (8, 8, 32, 128, grid_size)),
        ("30 roles × 8 domains, 32 val / 64 test", (30, 8, 32, 64, grid_size)),
    ]:
        n, secs = plan(*args_)
        print(f"  {label:70s} {n:6d} questions  {secs / 60:5.1f} min")


if __name__ == "__main__":
    main()
