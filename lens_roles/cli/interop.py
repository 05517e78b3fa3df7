"""``export`` and ``import``: directions to and from the vector files of other tools (llama.cpp, repeng,
steering-vectors, persona_vectors, assistant-axis, numpy); see :mod:`lens_roles.directions.formats`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_roles.cli.options import ModelLoader, add_command, add_input, add_output, int_at_least, layer_spec, open_model
from lens_roles.directions.direction import Direction
from lens_roles.directions.formats import CONVENTIONS, FORMATS, FULL_DEPTH, export_direction, import_direction
from lens_roles.errors import UsageError

#: the file ending each format is written with
SUFFIXES = {"gguf": ".gguf", "repeng": ".gguf", "steering-vectors": ".pt", "persona-pt": ".pt",
            "assistant-axis": ".pt", "npz": ".npz"}


def _int(option: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {option} {text!r}: need a whole number") from None

    parse.__name__ = "integer"
    return parse


def _export_layers(args: argparse.Namespace, direction: Direction) -> tuple[int, ...] | None:
    """``--layers`` as block indices of the direction (None: all of them)."""
    spec = args.layers
    if spec.is_all:
        return None
    layers = [layer for low, high in spec.ranges for layer in range(low, high + 1)]
    missing = [layer for layer in layers if layer not in direction.layers]
    if missing:
        raise UsageError(f"--layers {spec.text}: the direction has no vector at layer(s) {missing} "
                         f"(it has {list(direction.layers)})")
    return tuple(dict.fromkeys(layers))


def run_export(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles export``: a saved direction → another tool's vector file (no model needed)."""
    if Path(args.out).suffix != SUFFIXES[args.format]:
        raise UsageError(f"--out must end in {SUFFIXES[args.format]} for --format {args.format}, got {args.out}")
    if args.format in FULL_DEPTH and args.n_layers is None:
        raise UsageError(f"--format {args.format} writes a row for every layer: give the model's depth with --n-layers")
    direction = Direction.load(args.vector)
    layers = _export_layers(args, direction)
    path = export_direction(direction, args.out, args.format, layers=layers, n_layers=args.n_layers,
                            layer_offset=args.layer_offset, model_hint=args.model_hint)
    written = layers or direction.layers
    print(f"wrote {path} ({args.format}, {CONVENTIONS[args.format].tool}; layers {list(written)}: "
          f"{CONVENTIONS[args.format].text})")
    return 0


def run_import(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles import``: another tool's vector file → ``.safetensors`` + ``.json`` (checked against
    ``--model`` when given)."""
    if args.format == "npz" and args.layer_offset is None:
        raise UsageError("--format npz: numpy files say nothing about layers; give --layer-offset "
                         "(0: row k is block k's output; -1: hidden_states with the embeddings first)")
    if args.format != "npz" and args.layer_offset is not None:
        raise UsageError(f"--layer-offset is for --format npz; {args.format} has a fixed layer convention")
    # the file is checked on its own before any model loads, then against the model
    direction = import_direction(args.input_file, args.format, layer_offset=args.layer_offset)
    model = open_model(args, load_model) if args.model is not None else None
    if model is not None:
        direction = import_direction(args.input_file, args.format, model=model, layer_offset=args.layer_offset)
    direction.save(args.out)
    print(f"wrote {args.out} ({len(direction.layers)} layers {list(direction.layers)}, d_model "
          f"{direction.d_model}, from {CONVENTIONS[args.format].tool}: {CONVENTIONS[args.format].text})")
    return 0


def register(sub) -> None:
    """Add ``export`` and ``import`` to the ``lens-roles`` subparsers ``sub``."""
    formats = ", ".join(f"{f} ({CONVENTIONS[f].tool})" for f in FORMATS)
    p = add_command(sub, "export", run_export, help="write a direction as another tool's vector file")
    add_input(p, "--vector", required=True, help="a direction .safetensors (from extract, roles, import, ...)")
    p.add_argument("--format", required=True, choices=FORMATS, help=formats)
    add_output(p, "--out", kind="file", required=True, help="output file (.gguf, .pt or .npz by format)")
    p.add_argument("--layers", type=layer_spec("--layers"), default="all",
                   help="layers of the direction to write: all, 5, 3,7 or 10-20 (default: all)")
    p.add_argument("--n-layers", type=int_at_least("--n-layers", 1), default=None,
                   help="the model's depth (persona-pt and assistant-axis hold a row for every layer)")
    p.add_argument("--layer-offset", type=_int("--layer-offset"), default=0,
                   help="npz: layer l is written as layer_{l - offset} (default: 0)")
    p.add_argument("--model-hint", default=None,
                   help="gguf/repeng: controlvector.model_hint (default: the direction's model)")

    p = add_command(sub, "import", run_import, help="read another tool's vector file as a direction")
    p.add_argument("--format", required=True, choices=FORMATS, help=formats)
    add_input(p, "--in", dest="input_file", required=True, help="the vector file")
    add_output(p, "--out", kind="file", suffix=".safetensors", required=True,
               help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--model", default=None,
                   help="check the file against this model's width and depth and record it as its direction "
                        "(embedded name, local Hugging Face folder or TransformerLens name; default: no check)")
    p.add_argument("--layer-offset", type=_int("--layer-offset"), default=None,
                   help="npz, required there: row or layer_k is block k + offset (-1 for hidden_states)")
    p.set_defaults(device="cpu", dtype="float32")
