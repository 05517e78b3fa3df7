"""``persona-space``: the model's persona space and its assistant axis, from its replies in many roles."""

from __future__ import annotations

import argparse
from pathlib import Path

from lens_roles.cli.options import (
    ModelLoader,
    add_collect_options,
    add_command,
    add_input,
    add_model_options,
    add_output,
    add_ray_options,
    check_model_match,
    finite_float,
    fraction,
    int_at_least,
    open_model,
    ray_executor,
)
from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError
from lens_roles.inputs.personas import load_archetypes, load_persona_questions
from lens_roles.inputs.prompts import resolve_roles
from lens_roles.studies.persona_space import (
    PersonaSpaceConfig,
    load_replies,
    run_persona_space,
    write_persona_space,
)
from lens_roles.studies.reporting import report


def run_persona_space_command(args: argparse.Namespace, load_model: ModelLoader) -> int:
    """``lens-roles persona-space``: axis, per-layer table, 3-D map and variance figure → ``--out``."""
    roles = () if args.roles == "none" else tuple(resolve_roles(args.roles))
    if not args.no_archetypes:
        load_archetypes(args.archetypes)  # a bad file fails before the model loads
    load_persona_questions(args.questions)
    replies = load_replies(args.replies) if args.replies else None
    colour = Direction.load(args.colour_by) if args.colour_by else None
    model = open_model(args, load_model)
    if colour is not None:
        check_model_match(colour, model)
        if colour.d_model != model.cfg.d_model:
            raise DirectionError(f"--colour-by {args.colour_by}: the direction has d_model {colour.d_model}, but "
                                 f"{model.cfg.model_name} has d_model {model.cfg.d_model}")
    config = PersonaSpaceConfig(
        roles=roles, archetypes="" if args.no_archetypes else args.archetypes, questions=args.questions,
        n_questions=args.n_questions, held_out=args.held_out, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, seed=args.seed, layers=args.layers.resolve(model), map_layer=args.map_layer,
        batch_size=args.batch_size)
    with ray_executor(args) as executor:  # --ray: the replies and activations are made on the workers
        result = run_persona_space(model, config=config, replies=replies, template=args.template,
                                   cache_dir=args.cache_dir, progress=True, executor=executor)
    if colour is not None:
        result.points = result.space.points(colour)
    written = write_persona_space(result, Path(args.out))
    table = result.table
    best = table.loc[table.auc.idxmax()] if table.auc.notna().any() else table.iloc[len(table) // 2]
    report(True, f"{len(result.space.names)} personas, {len(table)} layers; PC1 explains "
                 f"{table.var_pc1.min():.0%}..{table.var_pc1.max():.0%}; best held-out AUC {best.auc:.3f} at layer "
                 f"{int(best.layer)} (cos(axis, PC1) {best.cos_axis_pc1:+.2f}, default assistant rank "
                 f"{int(best.default_rank)} of {int(best.n_roles)} on PC1)")
    report(True, f"wrote {len(written)} files to {args.out}/")
    return 0


def register(sub) -> None:
    """Add ``persona-space`` to the ``lens-roles`` subparsers ``sub``."""
    p = add_command(sub, "persona-space", run_persona_space_command,
                    help="persona space (PCA of role vectors read from the model's replies in each role) and the "
                         "assistant axis")
    add_output(p, "--out", required=True, help="output folder")
    p.add_argument("--roles", default="all", help="'all', 'none' or comma-separated role names of data/roles")
    add_input(p, "--archetypes", default=None,
              help="JSONL {name, system[, group]} (default: the shipped data/persona_space/archetypes.jsonl)")
    p.add_argument("--no-archetypes", action="store_true", help="use the roles only")
    add_input(p, "--questions", default=None,
              help="JSONL {instruction} (default: the shipped data/persona_space/questions.jsonl)")
    p.add_argument("--n-questions", type=int_at_least("--n-questions", 2), default=12,
                   help="the first N questions are asked (default: 12)")
    p.add_argument("--held-out", type=fraction("--held-out"), default=0.34,
                   help="fraction of the questions held out from the axis, for its AUC (default: 0.34)")
    p.add_argument("--max-new-tokens", type=int_at_least("--max-new-tokens", 1), default=32,
                   help="reply length (default: 32)")
    p.add_argument("--temperature", type=finite_float("--temperature", minimum=0), default=0.0,
                   help="0: greedy replies (default); else seeded sampling")
    p.add_argument("--seed", type=int, default=0, help="question split and sampling seed (default: 0)")
    add_input(p, "--replies", default=None,
              help="given replies, JSONL {persona, user, reply} for every persona x question (default: generate)")
    add_input(p, "--colour-by", default=None,
              help="colour the 3-D map by the projection on this direction (.safetensors) instead of the axis")
    p.add_argument("--map-layer", type=int_at_least("--map-layer", 0), default=None,
                   help="layer of the 3-D map (default: the middle layer read)")
    add_collect_options(p)
    add_model_options(p, batch="read")
    add_ray_options(p)
