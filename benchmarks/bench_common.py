"""What several benchmarks share: timing functions alternately, and checking which checkout a run imports.

The scripts in ``benchmarks/`` run as ``python benchmarks/<name>.py``, so this folder is on
``sys.path`` and they import from here with ``from bench_common import ...``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def alternated(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each function over ``repeats`` rounds, the order alternating per round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    out = {}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            out[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, out


def imported_from(tree: Path) -> Path:
    """Where ``lens_roles`` comes from with ``PYTHONPATH=tree`` (must be inside ``tree``)."""
    out = subprocess.run([sys.executable, "-c", "import lens_roles; print(lens_roles.__file__)"], cwd=tree,
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip()).resolve()
    if tree.resolve() not in path.parents:
        sys.exit(f"lens_roles from {tree} imports {path}, not that tree's code")
    return path
