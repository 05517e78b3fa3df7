"""Measurement (not timing): the persona-drift study on the default model, every number to ``summary.json``.

Runs :func:`lens_roles.studies.drift_study.run_drift_study` with the sizes used for the
issue-15 report: stand-in assistant axis from 8 roles × 1 instruction (24-token replies → 20
here), read after layer 18, capping at layers 12-16 from below at the ``--cap-quantile`` of the
default assistant's reply projections, self-play on two conversations per category, 18 held-out
librarian pairs × 3 system prompts for the correlation, the most-drifting self-play
conversation explained over layers 0, 3, …, 18.

Run: ``.venv/bin/python benchmarks/drift_study.py --out build/drift_study [--cap-quantile 0.25]``
(about 15 minutes on two busy CPU cores); ``--quick`` is a smoke run at tiny sizes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lens_roles.directions.direction import Direction
from lens_roles.runtime.models import load_model
from lens_roles.studies.drift_study import run_drift_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/drift_study")
    parser.add_argument("--cap-quantile", type=float, default=0.25)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a result")
    parser.add_argument("--axis", type=Path, default=None,
                        help="a Direction file to measure drift along (e.g. the assistant_axis.safetensors of "
                             "`lens-roles persona-space`); default: the stand-in axis built here")
    parser.add_argument("--read-layer", type=int, default=18, help="layer the drift is read at")
    args = parser.parse_args()
    model = load_model()
    sizes = (dict(n_roles=2, per_role=1, n_ordinary=2, max_new_tokens=6, n_self=1, n_pairs=4, n_boot=100,
                  categories=["meta", "ordinary"], explain_layers=[0, 9, 18])
             if args.quick else
             dict(n_roles=8, per_role=1, n_ordinary=6, max_new_tokens=20, n_self=2, n_pairs=18,
                  explain_layers=list(range(0, 19, 3))))
    direction = Direction.load(args.axis) if args.axis is not None else None
    summary = run_drift_study(model, out=Path(args.out), read_layer=args.read_layer, direction=direction,
                              cap_layers=[12, 13, 14, 15, 16],
                              cap_quantile=args.cap_quantile, batch_size=8, **sizes)
    print(json.dumps({k: summary[k] for k in ("cap_cost", "adherence", "correlation")}, indent=2))


if __name__ == "__main__":
    main()
