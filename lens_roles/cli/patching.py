"""``patch``: activation and attribution patching between a clean and a corrupt prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_roles.analysis.patching.grids import get_grid
from lens_roles.analysis.patching.metrics import DirectionProjection, LogitDiff, LogprobMargin
from lens_roles.analysis.patching.runs import IG_STEPS, PatchSetup
from lens_roles.cli.options import (
    ModelLoader,
    add_command,
    add_input,
    add_model_options,
    add_output,
    check_model_match,
    int_at_least,
    layer_spec,
    open_model,
)
from lens_roles.directions.direction import Direction
from lens_roles.errors import PatchingError
from lens_roles.inputs.prompts import Prompt
from lens_roles.studies.patch_report import attribution_methods, run_patch_report


def run_patch(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles patch``: one PatchSetup, the asked grids by the asked methods, written to --out."""
    grids = [g.strip() for g in args.grid.split(",") if g.strip()]
    if not grids:
        raise PatchingError("--grid names no grid")
    for grid in grids:
        get_grid(grid)  # unknown grids fail before the model loads
    attribution = attribution_option(args.attribution, grids)
    if args.method == "activation" and (args.attribution != "atp" or args.steps is not None):
        raise PatchingError("--attribution and --steps choose how attribution patching runs; "
                            "--method activation runs none")
    if args.steps is not None and "ig" not in attribution.values():
        raise PatchingError("--steps is the number of integrated-gradients steps; pass --attribution ig "
                            "(or GRID=ig,...) too")
    direction = None
    if args.metric == "projection":
        if not args.vector:
            raise PatchingError("--metric projection needs --vector (a direction .safetensors) and --read-layer")
        direction = Direction.load(args.vector)
        if args.read_layer is None and len(direction.layers) != 1:
            raise PatchingError(
                f"--metric projection needs --read-layer: the vector has {len(direction.layers)} layers"
            )
    elif args.good is None or args.bad is None:
        raise PatchingError(f"--metric {args.metric} needs --good and --bad")
    model = open_model(args, load_model)
    layers = None if args.layers is None or args.layers.is_all else list(args.layers.resolve(model))
    if direction is not None:
        check_model_match(direction, model)
        read = direction.layers[0] if args.read_layer is None else args.read_layer
        metric = DirectionProjection(direction, read)  # a layer the vector lacks is a DirectionError
    elif args.metric == "logit_diff":
        metric = LogitDiff(args.good, args.bad)
    else:
        metric = LogprobMargin(args.good, args.bad)
    setup = PatchSetup(
        model,
        Prompt(args.clean, system=args.clean_system),
        Prompt(args.corrupt, system=args.corrupt_system),
        metric,
        align=args.align,
    )
    print(setup)
    methods = ["activation", "attribution"] if args.method == "both" else [args.method]
    report = run_patch_report(
        setup, grids, out=Path(args.out), methods=methods, layers=layers, batch_size=args.batch_size,
        attribution=attribution, steps=args.steps,
    )
    if report.agreement is not None:
        for row in report.agreement.itertuples():
            how = "attribution" if row.attribution == "atp" else f"IG attribution ({row.steps} steps)"
            print(f"{how} vs activation, {row.grid}: Pearson r = {row.pearson:.3f} over {row.cells} cells")
    print(f"wrote {args.out}/patch.csv and heatmaps")
    return 0


def attribution_option(text: str, grids: list[str]) -> dict[str, str]:
    """``--attribution``: ``atp`` or ``ig`` for every grid, or ``GRID=METHOD,...`` (unnamed grids: atp)."""
    if "=" not in text:
        return attribution_methods(grids, text.strip())
    chosen = {}
    for part in text.split(","):
        grid, sep, method = part.partition("=")
        if not sep or not grid.strip():
            raise PatchingError(f"--attribution {text!r}: use atp, ig, or GRID=METHOD,... (e.g. resid=ig,mlp=ig)")
        chosen[grid.strip()] = method.strip()
    return attribution_methods(grids, chosen)


def register(sub) -> None:
    """Add ``patch`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "patch", run_patch,
                    help="activation and attribution patching between a clean and a corrupt prompt")
    p.add_argument("--clean", required=True, help="clean user text (e.g. role-flavoured)")
    p.add_argument("--corrupt", required=True, help="corrupt (baseline) user text, same token length")
    p.add_argument("--clean-system", default=None, help="system prompt of the clean run (e.g. 'You are a chemist.')")
    p.add_argument("--corrupt-system", default=None, help="system prompt of the corrupt run")
    p.add_argument(
        "--metric",
        required=True,
        choices=["projection", "logprob_margin", "logit_diff"],
        help="projection: final-position residual on --vector after --read-layer; logprob_margin: "
        "log p(--good) - log p(--bad) continuations; logit_diff: logit(--good) - logit(--bad) tokens",
    )
    add_input(p, "--vector", default=None, help="direction .safetensors (projection)")
    p.add_argument(
        "--read-layer",
        type=int,
        default=None,
        help="layer the projection is read after (default: the vector's only layer)",
    )
    p.add_argument("--good", default=None, help="continuation or token the clean run should favour")
    p.add_argument("--bad", default=None, help="continuation or token the corrupt run should favour")
    p.add_argument(
        "--grid",
        default="resid",
        help="resid, attn, mlp, heads, attn_pos, mlp_pos, or a comma-separated list (default: resid)",
    )
    p.add_argument("--method", default="both", choices=["activation", "attribution", "both"])
    p.add_argument(
        "--attribution",
        default="atp",
        help="how attribution patching runs: atp (one gradient at the corrupt run), ig (integrated gradients "
        "along the corrupt-to-clean path, faithful where the change is non-linear), or per grid, e.g. "
        "resid=ig,mlp=ig (unnamed grids: atp) (default: atp)",
    )
    p.add_argument("--steps", type=int_at_least("--steps", 1), default=None,
                   help=f"integrated-gradients steps of --attribution ig (default: {IG_STEPS}; 1 = atp)")
    p.add_argument("--layers", type=layer_spec("--layers"), default=None,
                   help="layers to patch: 5, 3,7, 10-20 or all (default: up to the read layer)")
    p.add_argument(
        "--align", action="store_true", help="pad the shorter prompt with filler tokens when the token lengths differ"
    )
    add_output(p, "--out", required=True, help="output folder: patch.csv, agreement.csv, heatmaps")
    add_model_options(p, batch="patch")
