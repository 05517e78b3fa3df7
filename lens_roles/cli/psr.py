"""``psr train`` and ``psr compare``: Prompt Steering Replacement."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_roles.cli.options import (
    ModelLoader,
    add_command,
    add_input,
    add_model_options,
    add_output,
    finite_float,
    fraction,
    head,
    int_at_least,
    load_pairs_or_prompts,
    open_model,
)
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError, UsageError
from lens_roles.inputs.prompts import PairSet, Prompt, PromptSet
from lens_roles.inputs.questions import QuestionSet, load_domains
from lens_roles.interventions.psr.align import prompt_pairs
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import TrainConfig
from lens_roles.studies.psr_compare import CompareConfig, compare_at_matched_coherence
from lens_roles.studies.psr_report import run_psr_training, write_psr_comparison


def run_psr_train(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles psr train``: a PSR trained to mimic a system prompt; held-out distance, λ heatmap."""
    direction = Direction.load(args.vector)
    prompt_pairs([Prompt("x")], args.system_prompt)  # fail early on an empty system prompt
    try:
        config = TrainConfig(objective=args.objective, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    except ValueError as exc:  # TrainConfig's own checks: a bad argument, found before the model loads
        raise UsageError(str(exc)) from None
    items = load_pairs_or_prompts(args.prompts)
    if isinstance(items, PairSet):  # contrast pairs: the positive replies are the prompted behaviour
        train, held = ([Prompt(p.user, None, p.positive) for p in s.pairs] for s in items.split(args.train_fraction))
    else:  # a prompt set: no replies, mse only
        train, held = (list(s.prompts) for s in items.split(args.train_fraction))
    train, held = head(train, args.max_prompts), head(held, args.max_held_out)
    model = open_model(args, load_model)
    trained = run_psr_training(
        model,
        direction,
        train,
        held,
        args.system_prompt,
        config=config,
        out=Path(args.out),
        layers=args.layers,
        layer=args.layer,
        alpha=args.alpha,
        provenance={"vector": str(args.vector), "prompts": str(args.prompts)},
        progress=True,
    )
    print(trained.history.round(4).to_string(index=False))
    print("held-out distance to the prompted activations (relative = / unsteered):")
    print(trained.distance.round(4).to_string(index=False))
    print(f"wrote {args.out}/")
    return 0


def run_psr_compare(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles psr compare``: constant steering vs PSR vs prompting at matched coherence."""
    direction = Direction.load(args.vector)
    try:
        config = CompareConfig(
            target_perplexity=args.target_perplexity, max_new_tokens=args.max_new_tokens, steps=args.steps
        )
    except ValueError as exc:  # CompareConfig's own checks: a bad argument, found before the model loads
        raise UsageError(str(exc)) from None
    items = load_pairs_or_prompts(args.pairs)
    if isinstance(items, PairSet):
        held = items.split(1 - args.eval_fraction)[1]
        held = PairSet(held.name, tuple(head(held.pairs, args.max_pairs)), held.source)
    else:  # a role: instructions, no contrast pairs; behaviour = the multiple-choice effect
        if not args.questions:
            raise DataError(
                f"--pairs {args.pairs} holds no contrast pairs (no positive/negative replies), so there is no "
                "behaviour to measure: pass --questions to use the multiple-choice effect"
            )
        held = items.split(1 - args.eval_fraction)[1]
        held = PromptSet(held.name, tuple(head(held.prompts, args.max_pairs)), held.source)
    questions = None
    if args.questions:
        domains = args.domains.split(",") if args.domains else None
        sets = load_domains(args.questions, domains=domains)
        questions = QuestionSet("+".join(sets), tuple(q for s in sets.values() for q in head(s, args.max_questions)))
    model = open_model(args, load_model)
    psr = PSR.load(args.psr, model)
    system = args.system_prompt or psr.meta.get("system")
    result = compare_at_matched_coherence(
        model, direction, psr, held, system, questions=questions, config=config, progress=True
    )
    write_psr_comparison(result, Path(args.out), model_name=model.cfg.model_name, psr=psr, held=held)
    print("behaviour at matched coherence:")
    print(result.table.round(3).to_string(index=False))
    return 0


def register(sub) -> None:
    """Add ``psr train`` and ``psr compare`` to the ``lens-roles`` subparsers ``sub``."""
    p = sub.add_parser("psr", help="Prompt Steering Replacement: token-specific steering trained to mimic prompting")
    psr_sub = p.add_subparsers(dest="psr_command", required=True)

    q = add_command(psr_sub, "train", run_psr_train,
                    help="train a PSR to mimic a system prompt; held-out distance, λ heatmap")
    add_input(q, "--vector", required=True, help="direction .safetensors (from extract or roles)")
    q.add_argument("--system-prompt", required=True, help="the system prompt to mimic")
    add_input(q, "--prompts", required=True,
              help="contrast pairs JSONL (the positive replies are used) or a prompt set (no replies: mse only)")
    q.add_argument("--layers", default="one", choices=["one", "all"], help="one layer (S-PSR) or all (A-PSR)")
    q.add_argument("--layer", type=int, default=None, help="the steered layer of S-PSR (default: the middle one)")
    q.add_argument("--objective", default="mse", choices=["mse", "kl"])
    q.add_argument("--alpha", type=finite_float("--alpha"), default=None,
                   help="α (default: prompting's mean strength on v)")
    q.add_argument("--epochs", type=int_at_least("--epochs", 1), default=4)
    q.add_argument("--lr", type=finite_float("--lr", above=0), default=0.02, help="Adam learning rate")
    q.add_argument("--train-fraction", type=fraction("--train-fraction"), default=0.75,
                   help="the first fraction trains, the rest is held out")
    q.add_argument("--max-prompts", type=int_at_least("--max-prompts", 0, note=" (0: all)"), default=24,
                   help="training prompts used (0: all)")
    q.add_argument("--max-held-out", type=int_at_least("--max-held-out", 0, note=" (0: all)"), default=12,
                   help="held-out prompts scored (0: all)")
    add_output(q, "--out", required=True, help="folder: psr.safetensors, history.csv, distance.csv, figure")
    add_model_options(q, batch="generate")

    q = add_command(psr_sub, "compare", run_psr_compare,
                    help="constant steering vs PSR vs prompting at matched coherence")
    add_input(q, "--vector", required=True, help="the direction the PSR was trained with")
    add_input(q, "--psr", required=True, help="psr.safetensors from 'psr train'")
    add_input(
        q,
        "--pairs",
        required=True,
        help="contrast pairs; the last --eval-fraction are evaluated. For a role: its instructions "
        "(a prompt set; needs --questions, whose multiple-choice effect is then the behaviour)",
    )
    q.add_argument("--system-prompt", default=None, help="default: the one the PSR was trained to mimic")
    q.add_argument("--eval-fraction", type=fraction("--eval-fraction"), default=0.25)
    q.add_argument("--max-pairs", type=int_at_least("--max-pairs", 0, note=" (0: all)"), default=8,
                   help="held-out pairs evaluated (0: all)")
    q.add_argument("--target-perplexity", type=finite_float("--target-perplexity", above=1), default=None,
                   help="default: prompting's perplexity")
    q.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 2), default=24)
    q.add_argument("--steps", type=int_at_least("--steps", 1), default=5, help="bisection steps per method")
    add_input(q, "--questions", kind="path", default=None, help="optional multiple-choice domain folder or file")
    q.add_argument("--domains", default=None, help="comma-separated domains of --questions")
    q.add_argument("--max-questions", type=int_at_least("--max-questions", 0, note=" (0: all)"), default=16,
                   help="questions per domain (0: all)")
    add_output(q, "--out", required=True, help="folder: matched.csv, curve.csv, figure")
    add_model_options(q, batch=None)
