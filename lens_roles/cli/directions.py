"""``extract``, ``roles`` and ``demo``: directions read from prompt sets."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lens_roles.cli.options import (
    ModelLoader,
    add_collect_options,
    add_command,
    add_input,
    add_model_options,
    add_ray_options,
    add_output,
    collect_kw,
    open_model,
    ray_executor,
)
from lens_roles.directions.builders import persona_vector, role_vectors
from lens_roles.inputs.prompts import load_baseline, load_pairs, load_role, resolve_roles
from lens_roles.io import atomic_write
from lens_roles.studies.demo import default_steer_layers, run_demo


def run_extract(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles extract``: a persona vector from contrast pairs → ``.safetensors`` + ``.json``."""
    pairs = load_pairs(args.pairs)
    model = open_model(args, load_model)
    layers = args.layers.resolve(model)
    with ray_executor(args) as executor:
        direction = persona_vector(model, pairs, layers=layers, positions=args.positions, method=args.method,
                                   executor=executor, **collect_kw(args))
    direction.save(args.out)
    print(f"wrote {args.out} ({len(pairs)} pairs, {len(direction.layers)} layers, method {args.method})")
    return 0


def run_roles(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles roles``: one role vector per role (instructions minus baseline) → a folder."""
    names = resolve_roles(args.roles, args.roles_dir)
    role_sets = [load_role(name, args.roles_dir) for name in names]
    baseline = load_baseline(args.baseline)
    model = open_model(args, load_model)
    layers = args.layers.resolve(model)
    with ray_executor(args) as executor:
        vectors = role_vectors(model, role_sets, baseline, layers=layers, positions=args.positions,
                               executor=executor, **collect_kw(args))
    out = Path(args.out)
    for name, direction in vectors.items():
        direction.save(out / f"{name.replace(' ', '_')}.safetensors")
    print(f"wrote {len(vectors)} role vectors ({len(layers)} layers each) to {out}/")
    return 0


def run_demo_command(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles demo``: the librarian persona and every role, figures to ``--out``.

    With ``--timings`` the seconds of each phase (loading the model first, then
    :func:`~lens_roles.studies.demo.run_demo`'s phases, and ``total``) are written there as JSON.
    """
    t0 = time.perf_counter()
    model = open_model(args, load_model)
    timings = {"load model": time.perf_counter() - t0}
    steer_layers = [] if args.no_steering else default_steer_layers(model.cfg.n_layers)
    run_demo(
        model,
        timings=timings,
        out=Path(args.out),
        directions_out=Path(args.directions_out),
        layers=args.layers.resolve(model),
        steer_layers=steer_layers,
        **collect_kw(args),
    )
    if args.timings is not None:
        timings["total"] = time.perf_counter() - t0
        atomic_write(args.timings, lambda tmp: Path(tmp).write_text(json.dumps(timings, indent=2)))
    return 0


def register(sub) -> None:
    """Add ``extract``, ``roles`` and ``demo`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "extract", run_extract, help="persona vector from contrast pairs")
    add_input(p, "--pairs", required=True, help="JSONL {user, positive, negative} or CAA JSON {positive, negative}")
    add_output(p, "--out", kind="file", suffix=".safetensors", required=True,
               help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--method", default="mean_diff", choices=["mean_diff", "pca", "probe"])
    add_collect_options(p, positions=["reply", "last", "eoi", "user", "all"])
    add_model_options(p, batch="read")
    add_ray_options(p)

    p = add_command(sub, "roles", run_roles,
                    help="role vectors (role instructions minus baseline), one file per role")
    p.add_argument("--roles", default="all", help="'all' or comma-separated role names from --roles-dir")
    add_input(p, "--roles-dir", kind="folder", default=None,
              help="folder of <role>.jsonl (default: the shipped lens_roles/data/roles)")
    add_input(p, "--baseline", default=None, help="baseline JSONL/JSON (default: the shipped roles/baseline.jsonl)")
    add_output(p, "--out", required=True, help="output folder")
    add_collect_options(p, positions=["eoi", "last", "user", "all"])
    add_model_options(p, batch="read")
    add_ray_options(p)

    p = add_command(sub, "demo", run_demo_command,
                    help="the main job: librarian persona + all roles, figures to figures/")
    add_output(p, "--out", default="figures", help="figure folder (default: figures)")
    add_output(p, "--directions-out", default="build/directions",
               help="where the vectors are saved (default: build/directions)")
    p.add_argument("--no-steering", action="store_true", help="skip the steering sweep")
    add_output(p, "--timings", kind="file", suffix=".json", default=None,
               help="write the seconds of each phase there as JSON (for benchmarks/demo.py)")
    add_collect_options(p)
    add_model_options(p, batch="read")
