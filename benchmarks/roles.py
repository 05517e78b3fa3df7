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

Run: ``.venv/bin/python benchmarks/roles.py [--domain econ] [--questions DIR]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lens_roles as lr
from lens_roles.inputs.questions import load_domains
from lens_roles.measures.multiple_choice import Condition, evaluate_condition, persona_prompt
from lens_roles.studies.role_study import StudyConfig, default_selection_layers, load_role_domains, select_addition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "role-vectors" / "splits"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", default=str(SHARED))
    parser.add_argument("--domain", default="econ")
    parser.add_argument("--role", default=None, help="default: the domain's first role in roles/domains.json")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t_load, model = timed(lr.load_model)
    print(f"model {model.cfg.model_name}: loaded in {t_load:.1f} s")

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
