"""Benchmark: ``lens-roles demo`` end to end, with the demo's own per-phase breakdown.

Runs the demo in a fresh process per run (``python -m lens_roles.cli demo``, figures and
vectors to a temporary folder), this checkout's code and, with ``--baseline``, another
checkout's (e.g. a worktree of the commit before) with the same Python, one after the
other and alternating, so that both see the same machine. Each run gets
``PYTHONPATH=<tree>``, and the script checks that ``lens_roles`` is imported from that tree.

Prints, per tree, the wall time of each run (median over ``--repeats``), the phases the
demo reports itself (``lens-roles demo --timings``: model load, persona, role
activations, role vectors, held-out AUCs, figures, role geometry, steering; a tree whose
demo has no ``--timings`` gives the total only) with each phase's share of the total,
and the ratio baseline / this tree. It also says whether the two runs of this tree wrote
identical files (the rerun-leaves-``git status``-clean check), when it made two.

Run (serially, on an otherwise idle machine)::

    git worktree add /tmp/demo_base <old commit>
    .venv/bin/python benchmarks/demo.py --baseline /tmp/demo_base --repeats 2

``--quick`` runs a reduced demo (layers 0 and 1, no steering), to show that the script
works (with ``--repeats 2``, that two runs write identical files).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import imported_from

HERE = Path(__file__).resolve().parent.parent


def has_timings(tree: Path) -> bool:
    out = subprocess.run([sys.executable, "-m", "lens_roles.cli", "demo", "--help"], cwd=tree,
                         env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, check=True)
    return "--timings" in out.stdout


def run_demo(tree: Path, work: Path, extra: list[str], timings: bool) -> tuple[float, dict, Path]:
    """One ``lens-roles demo`` in a fresh process; returns (wall seconds, phases, output folder)."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="figures_"))
    cmd = [sys.executable, "-m", "lens_roles.cli", "demo", "--out", str(out), "--directions-out",
           str(out / "_directions"), *extra]
    phases_file = out.with_suffix(".timings.json")
    if timings:
        cmd += ["--timings", str(phases_file)]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=dict(os.environ, PYTHONPATH=str(tree)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    phases = json.loads(phases_file.read_text()) if timings else {}
    return wall, phases, out


def same_files(a: Path, b: Path) -> list[str]:
    """Relative paths of the files that differ between two output folders (or exist in one only)."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diff = sorted(str(f) for f in files_a ^ files_b)
    diff += sorted(str(f) for f in files_a & files_b if not filecmp.cmp(a / f, b / f, shallow=False))
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout of lens_roles to compare")
    parser.add_argument("--repeats", type=int, default=1, help="runs per tree (alternating; default 1)")
    parser.add_argument("--quick", action="store_true", help="reduced demo (layers 0,1, no steering)")
    args = parser.parse_args()
    extra = ["--layers", "0,1", "--no-steering"] if args.quick else []
    repeats = args.repeats
    trees = {"this tree": HERE}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    for name, tree in trees.items():
        print(f"{name}: {tree} (lens_roles from {imported_from(tree)})")
    timed = {name: has_timings(tree) for name, tree in trees.items()}
    walls: dict[str, list[float]] = {name: [] for name in trees}
    phases: dict[str, list[dict]] = {name: [] for name in trees}
    outs: dict[str, list[Path]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as work:
        for r in range(repeats):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for name in order:
                wall, ph, out = run_demo(trees[name], Path(work), extra, timed[name])
                walls[name].append(wall)
                phases[name].append(ph)
                outs[name].append(out)
                print(f"  run {r + 1} {name}: {wall:.1f} s", flush=True)
        print(f"\nlens-roles demo {' '.join(extra) or '(full)'}: median wall time over {repeats} run(s)")
        for name in trees:
            total = statistics.median(walls[name])
            print(f"\n{name}: {total:.1f} s")
            if phases[name] and phases[name][0]:
                keys = list(phases[name][0])
                ref = statistics.median(p.get("total", 0.0) for p in phases[name]) or total
                for key in keys:
                    sec = statistics.median(p.get(key, 0.0) for p in phases[name])
                    share = "" if key == "total" else f"{100 * sec / ref:5.1f} %"
                    print(f"  {key:<18s} {sec:8.1f} s  {share}")
            else:
                print("  (no phases: this checkout's demo has no --timings)")
        if "baseline" in trees:
            ours, base = statistics.median(walls["this tree"]), statistics.median(walls["baseline"])
            print(f"\nbaseline / this tree: {base / ours:.2f}x  ({base:.1f} s vs {ours:.1f} s)")
        for name in trees:
            if len(outs[name]) >= 2:
                diff = same_files(outs[name][0], outs[name][1])
                print(f"{name}: second run wrote {'identical files' if not diff else f'{len(diff)} different files'}"
                      + (f" ({', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''})" if diff else ""))


if __name__ == "__main__":
    main()
