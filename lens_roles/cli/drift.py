"""``monitor`` and ``screen``: persona drift over conversations, and screening data by a direction;
and the ``--cap LOW,HIGH`` value shared with ``generate``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from lens_roles.cli.options import (
    ModelLoader,
    add_command,
    add_input,
    add_model_options,
    add_output,
    check_model_match,
    finite_float,
    int_at_least,
    layer_spec,
    open_model,
)
from lens_roles.directions.direction import Direction
from lens_roles.inputs.conversations import load_conversations, load_screen_records
from lens_roles.runtime.models import validate_layers
from lens_roles.studies.drift_report import run_monitor, run_screen


def cap_option(option: str):
    """``type=`` for ``LOW,HIGH``: a capping range; either side may be ``none`` (open); ``LOW <= HIGH``."""

    def parse(text: str) -> tuple[float | None, float | None]:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"cannot read {option} {text!r}: use LOW,HIGH, e.g. {option}=-3,5 "
                                             "(none for an open side: none,5)")
        values = []
        for p in parts:
            if p.lower() in ("none", ""):
                values.append(None)
                continue
            try:
                v = float(p)
            except ValueError:
                raise argparse.ArgumentTypeError(f"cannot read {option} {text!r}: {p!r} is not a number") from None
            if not math.isfinite(v):
                raise argparse.ArgumentTypeError(f"{option} bounds must be finite (or none), got {text!r}")
            values.append(v)
        if values[0] is None and values[1] is None:
            raise argparse.ArgumentTypeError(f"{option} {text!r} caps nothing: give LOW, HIGH or both")
        if None not in values and values[0] > values[1]:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: low {values[0]:g} > high {values[1]:g}; "
                                             "write LOW,HIGH with LOW <= HIGH")
        return values[0], values[1]

    parse.__name__ = "range"
    return parse


def add_cap_options(p: argparse.ArgumentParser, *, layer_default: str) -> None:
    """``--cap LOW,HIGH`` and ``--cap-layers``."""
    p.add_argument("--cap", type=cap_option("--cap"), default=None,
                   help="activation capping: keep the projection on the vector within LOW,HIGH (none: open side)")
    p.add_argument("--cap-layers", type=layer_spec("--cap-layers"), default=None,
                   help=f"layers capped (default: {layer_default})")


def run_monitor_command(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles monitor``: per-turn and per-token projections of conversations on a direction."""
    direction = Direction.load(args.vector)
    conversations = load_conversations(args.conversations or None)
    model = open_model(args, load_model)
    check_model_match(direction, model)
    read = validate_layers(model, args.layer)[0]
    layers = None if args.layers is None else list(args.layers.resolve(model))
    cap_layers = [read] if args.cap_layers is None else list(args.cap_layers.resolve(model))
    run_monitor(model, conversations, direction, read_layer=read, layers=layers, out=Path(args.out),
                use_self_play=args.self_play, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                seed=args.seed, bounds=args.cap, cap_layers=cap_layers if args.cap else None,
                batch_size=args.batch_size)
    return 0


def run_screen_command(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles screen``: rank records by projection(response) − projection(the model's own response)."""
    direction = Direction.load(args.vector)
    records = load_screen_records(args.records)
    model = open_model(args, load_model)
    check_model_match(direction, model)
    run_screen(model, records, direction, layer=validate_layers(model, args.layer)[0], out=Path(args.out),
               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, top=args.top)
    return 0


def register(sub) -> None:
    """Add ``monitor`` and ``screen`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "monitor", run_monitor_command,
                    help="persona drift: projection of conversations on a direction per token and per turn")
    add_input(p, "--vector", required=True, help="direction .safetensors (e.g. the assistant axis)")
    p.add_argument("--conversations", nargs="*", default=None,
                   help="conversation JSONL files, folders or shipped categories (ordinary, meta, vulnerable, "
                        "roleplay); default: all shipped")
    p.add_argument("--layer", type=int, required=True, help="layer whose projection is reported")
    p.add_argument("--layers", type=layer_spec("--layers"), default=None,
                   help="also record these layers in turns.csv (default: the vector's layers)")
    p.add_argument("--self-play", action="store_true",
                   help="let the model write every assistant reply itself, turn by turn")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=48)
    p.add_argument("--temperature", type=finite_float("--temperature", minimum=0), default=0.0)
    p.add_argument("--seed", type=int, default=0)
    add_cap_options(p, layer_default="--layer")
    add_output(p, "--out", required=True, help="output folder: turns.csv, tokens.csv, drift.csv, figures")
    add_model_options(p, batch="generate")

    p = add_command(sub, "screen", run_screen_command,
                    help="rank {prompt, response} records by projection(response) - projection(own response)")
    add_input(p, "--vector", required=True, help="direction .safetensors")
    add_input(p, "--records", required=True, help='JSONL of {"prompt": ..., "response": ...}')
    p.add_argument("--layer", type=int, required=True, help="layer whose projection is compared")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=48,
                   help="length of the model's own responses")
    p.add_argument("--top", type=int_at_least("--top", 1), default=5, help="records marked and printed")
    add_output(p, "--out", required=True, help="output folder: ranking.csv, screen_histogram")
    add_model_options(p, batch="generate")
