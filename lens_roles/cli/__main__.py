"""``python -m lens_roles.cli`` runs the ``lens-roles`` command line."""

import sys

from lens_roles.cli.app import main

sys.exit(main())
