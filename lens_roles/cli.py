"""The ``lens-roles`` command line. ``main(argv)`` is testable without a subprocess.

Commands:

* ``extract`` — a persona vector from contrast pairs → ``.safetensors`` + ``.json``;
* ``roles`` — one role vector per role against the baseline, all layers → a folder;
* ``demo`` — the main job: the librarian persona and every role on the default
  model, with held-out separation and split-half agreement, written to ``figures/``.

Every library error is printed as one line ``lens-roles: error: …`` with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .errors import LensRolesError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="embedded name, local Hugging Face folder or TransformerLens name "
                        "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--layers", default="all", help="all, 5, 3,7 or 10-20 (default: all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="activation cache folder (default: none)")
    p.add_argument("--template", choices=["chat", "plain"], default=None,
                   help="chat template (default: the model's own if it has one, else plain)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lens-roles", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="persona vector from contrast pairs")
    p.add_argument("--pairs", required=True, help="JSONL {user, positive, negative} or CAA JSON {positive, negative}")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--positions", default="reply", choices=["reply", "last", "eoi", "user", "all"])
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    _model_args(p)

    p = sub.add_parser("roles", help="role vectors (role instructions minus baseline), one file per role")
    p.add_argument("--roles", default="all", help="'all' or comma-separated role names from --roles-dir")
    p.add_argument("--roles-dir", default=None, help="folder of <role>.jsonl (default: the project's data/roles)")
    p.add_argument("--baseline", default=None, help="baseline JSONL/JSON (default: data/roles/baseline.jsonl)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--positions", default="eoi", choices=["eoi", "last", "user", "all"])
    _model_args(p)

    p = sub.add_parser("demo", help="the main job: librarian persona + all roles, figures to figures/")
    p.add_argument("--out", default="figures", help="figure folder (default: figures)")
    p.add_argument("--directions-out", default="build/directions", help="where the vectors are saved")
    _model_args(p)
    return parser


def _load(args):
    from .models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    print(f"loaded {model.cfg.model_name} ({model.cfg.n_layers} layers, d_model {model.cfg.d_model}) "
          f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model


def _collect_kw(args) -> dict:
    return dict(batch_size=args.batch_size, cache_dir=args.cache_dir, template=args.template, progress=True)


def cmd_extract(args) -> int:
    from .directions import persona_vector
    from .models import parse_layers, validate_layers
    from .prompts import load_pairs

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise LensRolesError(f"--out must end in .safetensors, got {out}")
    pairs = load_pairs(args.pairs)
    model = _load(args)
    layers = validate_layers(model, parse_layers(args.layers))
    direction = persona_vector(model, pairs, layers=layers, positions=args.positions, method=args.method,
                               **_collect_kw(args))
    direction.save(out)
    print(f"wrote {out} ({len(pairs)} pairs, {len(direction.layers)} layers, method {args.method})")
    return 0


def cmd_roles(args) -> int:
    from .directions import role_vectors
    from .models import parse_layers, validate_layers
    from .prompts import load_baseline, load_role, resolve_roles

    names = resolve_roles(args.roles, args.roles_dir)
    role_sets = [load_role(name, args.roles_dir) for name in names]
    baseline = load_baseline(args.baseline)
    model = _load(args)
    layers = validate_layers(model, parse_layers(args.layers))
    vectors = role_vectors(model, role_sets, baseline, layers=layers, positions=args.positions, **_collect_kw(args))
    out = Path(args.out)
    for name, direction in vectors.items():
        direction.save(out / f"{name.replace(' ', '_')}.safetensors")
    print(f"wrote {len(vectors)} role vectors ({len(layers)} layers each) to {out}/")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    model = _load(args)
    run_demo(model, out=Path(args.out), directions_out=Path(args.directions_out), layers=args.layers,
             **_collect_kw(args))
    return 0


COMMANDS = {"extract": cmd_extract, "roles": cmd_roles, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LensRolesError as exc:
        print(f"lens-roles: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
