"""The ``lens-roles`` command line. ``main(argv, load_model=...)`` runs without a subprocess.

Commands, one module per group (each defines its subparsers beside its handlers):

* :mod:`~lens_roles.cli.directions` — ``extract`` (a persona vector from contrast
  pairs), ``roles`` (one role vector per role), ``demo`` (the main job: the librarian
  persona and every role, written to ``figures/``);
* :mod:`~lens_roles.cli.steering` — ``sweep`` and ``generate``;
* :mod:`~lens_roles.cli.evaluation` — ``evaluate`` (role vectors on multiple-choice
  domains) and ``ab-curve`` (CAA behaviour curves against the multiplier);
* :mod:`~lens_roles.cli.patching` — ``patch`` (activation and attribution patching);
* :mod:`~lens_roles.cli.psr` — ``psr train|compare`` (Prompt Steering Replacement);
* :mod:`~lens_roles.cli.sae` — ``train-sae``, ``sae-align``, ``sae-attribute``;
* :mod:`~lens_roles.cli.persona` — ``persona-space`` (persona space and the assistant axis).

:mod:`~lens_roles.cli.options` holds what they share: model options and batch-size
defaults, the argument checks that run before any model loads, and loading.
Every error is printed as one line ``lens-roles <command>: error: …`` with exit code 2.
"""

from lens_roles.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
