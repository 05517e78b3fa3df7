"""The ``lens-roles`` parser, assembled from the command modules, and :func:`main`."""

from __future__ import annotations

import sys
from typing import Sequence

from lens_roles.cli import directions, drift, evaluation, interop, patching, persona, psr, sae, steering
from lens_roles.cli.options import CommandParser, ModelLoader, check_paths, join_negative_values
from lens_roles.errors import LensRolesError, UsageError
from lens_roles.runtime.models import load_model as default_loader

#: The command modules, in the order ``lens-roles --help`` lists their commands.
COMMAND_MODULES = (directions, steering, evaluation, patching, psr, sae, interop, persona, drift)


def build_parser() -> CommandParser:
    """The ``lens-roles`` parser: every command module adds its subcommands and their handlers."""
    parser = CommandParser(prog="lens-roles", description="Role and persona directions in language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def one_line(prog: str, message: str) -> str:
    """``<prog>: error: <message>`` on one line (a multi-line message is joined with "; ")."""
    text = "; ".join(line.strip() for line in str(message).splitlines() if line.strip())
    return f"{prog}: error: {text}"


def main(argv: Sequence[str] | None = None, *, load_model: ModelLoader = default_loader) -> int:
    """Run one ``lens-roles`` command; return its exit code.

    Arguments are checked (values while parsing, then input and output paths) before
    ``load_model(name, *, device, dtype)`` is called, so a bad argument costs no model
    load. Every :class:`~lens_roles.errors.LensRolesError` is printed as one line,
    ``lens-roles <command>: error: …``, and gives exit code 2. Tests pass a loader
    that returns a small model.
    """
    argv = join_negative_values(sys.argv[1:] if argv is None else list(argv))
    prog = "lens-roles"
    try:
        args, unknown = build_parser().parse_known_args(argv)
        prog = args.prog
        if unknown:
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        check_paths(args)
        return args.handler(args, load_model)
    except LensRolesError as exc:
        print(one_line(getattr(exc, "prog", None) or prog, exc), file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
