"""Every notebook runs top to bottom on the public API (real default model).

By default the notebooks run in their fast mode (``LENS_ROLES_FAST=1`` in the kernel's
environment: fewer prompts, layers, α values and steps, every cell and figure still
run), so that the suite fits a slow CI machine. ``LENS_ROLES_FAST=0 make test`` runs
them at full size.

Where a Chromium and playwright are present, ``tests/test_browser.py`` executes the notebooks
(in JupyterLab, with this file's kernel environment and checks, and more), and
:func:`test_notebook_runs` leaves them to it rather than run each notebook twice;
``LENS_ROLES_BROWSER=0`` runs them here instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
FAST_FLAG = 'FAST = os.environ.get("LENS_ROLES_FAST", "0") == "1"'


def kernel_env() -> dict[str, str]:
    """The kernel's environment: ours, with ``LENS_ROLES_FAST`` defaulting to ``"1"``."""
    env = dict(os.environ)
    env.setdefault("LENS_ROLES_FAST", "1")
    return env


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    from tests.test_browser import unavailable

    if unavailable() is None:
        pytest.skip("executed in JupyterLab in a headless Chromium by tests/test_browser.py "
                    "(LENS_ROLES_BROWSER=0 runs it here with nbclient)")
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env())
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold at least one notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_fast_mode(path):
    """The first code cell reads the fast-mode flag, and the introduction documents it."""
    cells = json.loads(path.read_text())["cells"]
    first_code = next(c for c in cells if c["cell_type"] == "code")
    assert FAST_FLAG in "".join(first_code["source"]), f"{path.name}: first code cell lacks {FAST_FLAG!r}"
    intro = "".join(next(c for c in cells if c["cell_type"] == "markdown")["source"])
    assert "LENS_ROLES_FAST" in intro, f"{path.name}: the introduction should say what LENS_ROLES_FAST=1 does"


def test_kernel_env_defaults_to_fast(monkeypatch):
    monkeypatch.delenv("LENS_ROLES_FAST", raising=False)
    assert kernel_env()["LENS_ROLES_FAST"] == "1"
    monkeypatch.setenv("LENS_ROLES_FAST", "0")
    assert kernel_env()["LENS_ROLES_FAST"] == "0"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_outputs_hold_no_stderr(path):
    """Opened in JupyterLab, a notebook shows its stored outputs until it runs: none of them is a stderr
    stream (tqdm's text bars and its ``TqdmWarning: IProgress not found`` from a run without ipywidgets,
    with a machine's paths in it)."""
    cells = json.loads(path.read_text())["cells"]
    stderr = [i for i, c in enumerate(cells) for o in c.get("outputs", [])
              if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{path.name}: cells {stderr} have stored stderr output (clear it)"
