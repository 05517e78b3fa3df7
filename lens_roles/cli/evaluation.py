"""``evaluate`` and ``ab-curve``: role vectors on multiple-choice questions, CAA behaviour curves."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from lens_roles.cli.options import (
    ModelLoader,
    add_collect_options,
    add_command,
    add_input,
    add_model_options,
    add_output,
    add_ray_options,
    add_template_option,
    collect_kw,
    fraction,
    int_at_least,
    layer_spec,
    number_list,
    open_model,
    ray_executor,
)
from lens_roles.errors import DataError, UsageError
from lens_roles.inputs.prompts import PromptSet, load_baseline, load_pairs, load_prompt_set, load_role, resolve_roles
from lens_roles.inputs.questions import load_domains
from lens_roles.studies.ab_report import run_ab_report
from lens_roles.studies.role_eval_report import run_role_evaluation
from lens_roles.studies.role_study import StudyConfig, load_role_domains


def resolve_role_sets(spec: str, roles_dir, domains: list[str], role_domains: dict[str, str]) -> list[PromptSet]:
    """The prompt sets ``evaluate --roles`` names.

    ``spec`` is ``"domain"`` (the first role of each of ``domains`` in ``role_domains``),
    ``"all"``, comma-separated role names from ``roles_dir``, or comma-separated
    prompt-file paths (JSONL, or Role-Vectors JSON ``target_train_<role>.json``).
    """
    if spec == "domain":
        names = []
        for d in domains:
            home = [r for r, dom in role_domains.items() if dom == d]
            if home:
                names.append(home[0])
        if not names:
            raise DataError(
                f"no role in --role-domains belongs to the domains {', '.join(domains)}; name the roles with --roles"
            )
        return [load_role(n, roles_dir) for n in names]
    parts = [s.strip() for s in spec.split(",") if s.strip()]
    if any(s.endswith((".json", ".jsonl")) for s in parts):
        sets = []
        for s in parts:
            path = Path(s)
            stem = path.stem.removeprefix("target_train_").replace(" ", "_")
            sets.append(load_prompt_set(path, stem))
        return sets
    return [load_role(n, roles_dir) for n in resolve_roles(spec if spec == "all" else parts, roles_dir)]


def run_evaluate(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles evaluate``: addition, ablation and prompting on multiple-choice domains."""
    domains = load_domains(
        args.questions,
        domains=args.domains.split(",") if args.domains else None,
        letters=args.letters,
        skip_invalid=args.skip_invalid,
    )
    role_domains = load_role_domains(args.role_domains)
    role_sets = resolve_role_sets(args.roles, args.roles_dir, list(domains), role_domains)
    baseline = load_baseline(args.baseline)
    try:  # the layers wait for the model's depth; everything else is checked now
        config = StudyConfig(
            alphas=tuple(args.alphas),
            validation=args.validation,
            max_val=args.max_val or None,
            max_test=args.max_test or None,
            conditions=tuple(c.strip() for c in args.conditions.split(",") if c.strip()),
            n_boot=args.n_boot,
            seed=args.seed,
            batch_size=args.batch_size,
            answer_format=args.answer_format,
            system_template=args.system_template,
        )
    except ValueError as exc:  # StudyConfig's own checks: a bad argument, found before the model loads
        raise UsageError(str(exc)) from None
    model = open_model(args, load_model)
    if args.select_layers is not None:
        config = dataclasses.replace(config, layers=args.select_layers.resolve(model))
    with ray_executor(args) as executor:  # --ray: role vectors and every scoring run on the workers
        study = run_role_evaluation(
            model,
            role_sets,
            baseline,
            domains,
            role_domains=role_domains,
            config=config,
            out=Path(args.out),
            collect_kw=dict(collect_kw(args), executor=executor),
            progress=True,
        )
    summary = study.summary[study.summary.metric == "accuracy"]
    print(study.baseline[study.baseline.metric == "accuracy"].round(3).to_string(index=False))
    print(summary.round(3).to_string(index=False))
    print(f"wrote {args.out}/ in {study.meta['seconds']['total']:.0f} s")
    return 0


def run_ab_curve(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles ab-curve``: p(matching answer) against the multiplier, one curve per pair file (and layer)."""
    if (args.layer is None) == (args.layers is None):
        raise UsageError("give either --layer (one layer: curves) or --layers (e.g. all or 10-20: curves per layer "
                         "in one branched run, with the steerability of each)")
    pair_sets = [load_pairs(p) for p in args.pairs]
    model = open_model(args, load_model)
    layer = args.layer if args.layers is None else list(args.layers.resolve(model))
    with ray_executor(args) as executor:  # --ray: vectors and scoring run on the workers
        frame, mono, steer = run_ab_report(
            model,
            pair_sets,
            layer=layer,
            multipliers=args.multipliers,
            out=Path(args.out),
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            template=args.template,
            batch_size=args.batch_size,
            progress=True,
            executor=executor,
        )
    if args.layers is None:
        print(frame.round(3).to_string(index=False))
        print(mono.round(3).to_string(index=False))
    else:
        print(steer.round(4).to_string(index=False))
    return 0


def register(sub) -> None:
    """Add ``evaluate`` and ``ab-curve`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "evaluate", run_evaluate,
                    help="role vectors on multiple-choice domains: addition, ablation, prompting")
    p.add_argument(
        "--roles",
        default="domain",
        help="'domain' (the first role of each evaluated domain in --role-domains), 'all', "
        "comma-separated names from --roles-dir, or paths to prompt files (JSONL or Role-Vectors "
        "JSON)",
    )
    add_input(p, "--questions", kind="path", required=True,
              help="a folder of domain files (target_test_<domain>.json, else *.json/*.jsonl) or one file")
    p.add_argument("--domains", default=None, help="comma-separated domains to keep (default: every file)")
    add_output(p, "--out", required=True, help="output folder: CSV tables, study.json, figures, vectors/")
    add_input(p, "--roles-dir", kind="folder", default=None,
              help="folder of <role>.jsonl (default: the shipped lens_roles/data/roles)")
    add_input(p, "--baseline", default=None, help="baseline JSONL/JSON (default: the shipped roles/baseline.jsonl)")
    add_input(p, "--role-domains", default=None,
              help="JSON {domain: [roles]}: which role is in-domain where (default: the shipped roles/domains.json)")
    p.add_argument("--select-layers", type=layer_spec("--select-layers", allow_all=False, why_not_all=(
        "is not a choice: name a few addition layers, e.g. 7,15,22")), default=None,
        help="addition layers tried on validation, e.g. 7,15,22 or 10-12 (default: 25/50/75%% of depth)")
    p.add_argument("--alphas", type=number_list("--alphas", "alpha"), default="0.5,1,2",
                   help="multiples of the role vector tried on validation (default: 0.5,1,2)")
    p.add_argument("--conditions", default="addition,ablation,prompting")
    p.add_argument("--validation", type=fraction("--validation"), default=0.25,
                   help="fraction of each domain used for selection")
    p.add_argument("--max-val", type=int_at_least("--max-val", 0, note=" (0: all)"), default=16,
                   help="validation questions per domain (0: all)")
    p.add_argument("--max-test", type=int_at_least("--max-test", 0, note=" (0: all)"), default=30,
                   help="test questions per domain (0: all)")
    p.add_argument("--letters", default="ABCD", help="option letters, in order")
    p.add_argument("--answer-format", default="{letter}", help="how the reply writes a letter, e.g. '({letter})'")
    p.add_argument("--system-template", default="You are {article} {role}.", help="persona prompt")
    p.add_argument("--skip-invalid", action="store_true", help="leave out malformed questions instead of failing")
    p.add_argument("--n-boot", type=int_at_least("--n-boot", 100), default=2000, help="bootstrap draws")
    p.add_argument("--seed", type=int, default=0)
    add_collect_options(p, layers=False)
    add_model_options(p, batch="read")
    add_ray_options(p)

    p = add_command(sub, "ab-curve", run_ab_curve,
                    help="CAA A/B behaviour curves: p(matching answer) against the multiplier")
    add_input(p, "--pairs", required=True, nargs="+",
              help="CAA JSON files {positive, negative} (one per behaviour)")
    p.add_argument("--layer", type=int, default=None, help="layer the vector is read at and added to")
    p.add_argument("--layers", type=layer_spec("--layers"), default=None,
                   help="instead of --layer: every layer of this spec (all, 3,7 or 10-20), in one run that shares "
                   "the blocks below each; writes steerability.csv (slope of p(match) per layer) and a layer × "
                   "multiplier heatmap")
    p.add_argument(
        "--multipliers",
        type=number_list("--multipliers", "multiplier"),
        default="-2,-1,-0.5,0,0.5,1,2",
        help="comma-separated multiples of the raw mean-difference vector, e.g. --multipliers -2,0,2",
    )
    p.add_argument("--n-train", type=int_at_least("--n-train", 1), default=128, help="pairs that build the vector")
    p.add_argument("--n-test", type=int_at_least("--n-test", 1), default=64, help="disjoint pairs that are scored")
    p.add_argument("--seed", type=int, default=0)
    add_output(p, "--out", required=True,
               help="output folder: curves.csv, scores.csv, monotonicity.csv, steerability.csv, figure")
    add_template_option(p)
    add_model_options(p, batch="read")
    add_ray_options(p)
