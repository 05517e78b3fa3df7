"""``sweep`` and ``generate``: steering with a direction."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_roles.cli.drift import add_cap_options
from lens_roles.cli.options import (
    ModelLoader,
    add_command,
    add_input,
    add_model_options,
    add_output,
    check_model_match,
    finite_float,
    fraction,
    int_at_least,
    layer_spec,
    number_list,
    open_model,
)
from lens_roles.directions.direction import Direction
from lens_roles.inputs.prompts import load_pairs
from lens_roles.errors import UsageError
from lens_roles.interventions.steering import cap, residual_norms, steer
from lens_roles.runtime.generation import generate
from lens_roles.studies.steering_report import run_steering_report


def run_sweep(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles sweep``: steer over layers × α on the held-out pairs; cosine, adherence, coherence."""
    direction = Direction.load(args.vector)
    pairs = load_pairs(args.pairs)
    model = open_model(args, load_model)
    check_model_match(direction, model)
    _, held = pairs.split(1 - args.eval_fraction)
    run_steering_report(
        model,
        direction,
        held,
        layers=args.layers.resolve(model),
        alphas=args.alphas,
        relative=not args.absolute,
        out=Path(args.out),
        n_generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    return 0


def run_generate(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles generate``: each prompt unsteered, steered by +α and by -α, and/or capped (``--cap``)."""
    if args.alpha is None and args.cap is None:
        raise UsageError("generate needs --alpha (steer by ±α), --cap LOW,HIGH (activation capping) or both")
    direction = Direction.load(args.vector)
    model = open_model(args, load_model)
    check_model_match(direction, model)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    base = generate(model, args.prompt, **kw)
    rows = [("unsteered", base)]
    if args.alpha is not None:
        relative = None if args.absolute else residual_norms(model, args.prompt, layers=[args.layer])
        with steer(model, direction, args.alpha, layers=[args.layer], relative=relative):
            rows.append((f"+{args.alpha:g}", generate(model, args.prompt, **kw)))
        with steer(model, direction, -args.alpha, layers=[args.layer], relative=relative):
            rows.append((f"-{args.alpha:g}", generate(model, args.prompt, **kw)))
    if args.cap is not None:
        cap_layers = [args.layer] if args.cap_layers is None else list(args.cap_layers.resolve(model))
        with cap(model, direction, args.cap, layers=cap_layers):
            low, high = ("none" if b is None else f"{b:g}" for b in args.cap)
            rows.append((f"capped [{low}, {high}]", generate(model, args.prompt, **kw)))
    unit = "residual units" if args.absolute else "x typical residual norm"
    for i, prompt in enumerate(base):
        print(f"prompt: {prompt.prompt}")
        for label, gens in rows:
            suffix = f" ({unit})" if label[0] in "+-" else ""
            print(f"  {label + suffix:<15}: {gens[i].text.strip()}")
    return 0


def register(sub) -> None:
    """Add ``sweep`` and ``generate`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "sweep", run_sweep,
                    help="steer with a vector over layers x alpha: cosine, adherence, coherence")
    add_input(p, "--vector", required=True, help="direction .safetensors (from extract)")
    add_input(p, "--pairs", required=True, help="contrast pairs; the last --eval-fraction of them are evaluated")
    p.add_argument("--layers", type=layer_spec("--layers", allow_all=True), default="12",
                   help="steering layers: 5, 3,7, 10-20 or all (default: 12)")
    p.add_argument("--alphas", type=number_list("--alphas", "alpha"), default="-0.5,-0.25,0.25,0.5",
                   help="comma-separated α values, e.g. --alphas -0.5,0.5 (0 is always added)")
    p.add_argument(
        "--absolute",
        action="store_true",
        help="α in residual units (default: α × the typical residual norm at the layer)",
    )
    p.add_argument(
        "--eval-fraction",
        type=fraction("--eval-fraction"),
        default=0.25,
        help="evaluate on the last fraction of the pairs (default 0.25: held out by extract's demo split)",
    )
    p.add_argument("--generate", type=int_at_least("--generate", 0, note=" (0: skip)"), default=3,
                   help="prompts to generate from per α (0: skip)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=32)
    add_output(p, "--out", required=True, help="output folder: sweep.csv, generations.csv, figures")
    add_model_options(p, batch="generate")

    p = add_command(sub, "generate", run_generate, help="generate with and without steering")
    p.add_argument("prompt", nargs="+", help="user prompt(s)")
    add_input(p, "--vector", required=True, help="direction .safetensors")
    p.add_argument("--layer", type=int, required=True, help="steered layer")
    p.add_argument("--alpha", type=finite_float("--alpha"), default=None,
                   help="α (× typical residual norm unless --absolute); steer by +α and -α")
    p.add_argument("--absolute", action="store_true")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=48)
    p.add_argument("--temperature", type=finite_float("--temperature", minimum=0), default=0.0)
    p.add_argument("--seed", type=int, default=0)
    add_cap_options(p, layer_default="--layer")
    add_model_options(p, batch=None)
