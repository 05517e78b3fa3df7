"""Writing figures: self-contained HTML always, PNG when a Chrome/Chromium is available.

:func:`save_figure` always writes a self-contained HTML file and, when a
Chrome/Chromium is available to ``kaleido``, a PNG beside it; a missing browser
only skips the PNG (with one warning), and a browser that hangs is given up after
``LENS_ROLES_PNG_TIMEOUT`` seconds (default 120). ``LENS_ROLES_PNG=0`` switches PNG
export off (the test suite does, so that it needs no browser)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import warnings
from pathlib import Path

import plotly.graph_objects as go

from lens_roles.io import atomic_write

#: whether the missing-browser warning was given (once per process)
_png_warned = False


def find_browser() -> str | None:
    """Path of a Chrome/Chromium for static export, or None."""
    env = os.environ.get("BROWSER_PATH")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def save_figure(fig: go.Figure, stem: str | Path, *, meta: dict | None = None, png: bool = True,
                scale: float = 2.0) -> list[Path]:
    """Write ``stem.html`` (always) and ``stem.png`` (when a browser exists), atomically.

    ``meta`` (what the figure depends on) is embedded in the HTML and written to
    ``stem.json``. Returns the paths written.
    """
    global _png_warned
    stem = Path(stem)
    written = []

    def _atomic(path: Path, write) -> None:
        written.append(atomic_write(path, write))

    if meta is not None:
        fig.update_layout(meta=meta)
        _atomic(stem.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(meta, indent=2, default=str)))
    # plotly.js is written once beside the figures, so the HTML works offline; figures in
    # sub-folders reuse a copy up to three folders above them (figures/plotly.min.js).
    plotlyjs = _shared_plotlyjs(stem.parent)
    _atomic(stem.with_suffix(".html"), lambda t: fig.write_html(t, include_plotlyjs=plotlyjs, full_html=True))
    if png and os.environ.get("LENS_ROLES_PNG", "1") == "0":
        png = False  # PNG export switched off (the test suite does this: it needs no browser)
    if png:
        browser = find_browser()
        if browser is None:
            if not _png_warned:
                warnings.warn("no Chrome/Chromium found: writing HTML figures only (install Debian's 'chromium' "
                              "or set BROWSER_PATH for PNGs)", stacklevel=2)
                _png_warned = True
        else:
            os.environ.setdefault("BROWSER_PATH", browser)
            try:
                _atomic(stem.with_suffix(".png"), lambda t: _write_png(fig, t, scale))
            except Exception as exc:  # kaleido/browser failures must not lose the HTML
                warnings.warn(f"PNG export of {stem} failed ({exc}); HTML written", stacklevel=2)
    return written


#: seconds a PNG export may take before it is given up (a browser can hang on a loaded machine)
PNG_TIMEOUT = float(os.environ.get("LENS_ROLES_PNG_TIMEOUT", "120"))


def _write_png(fig: go.Figure, path: str, scale: float) -> None:
    """Render ``fig`` as PNG in a worker thread and write it to ``path``, or raise after ``PNG_TIMEOUT`` s.

    The worker only renders to memory; the bytes are written here, by the caller's
    thread, and only if the worker finished in time. An abandoned export (a browser
    hanging on a loaded machine) can therefore never write a file after the
    deadline, when its temporary file has already been cleaned up.
    """
    result: list[bytes] = []
    errors: list[BaseException] = []

    def work():
        try:
            result.append(fig.to_image(format="png", scale=scale))
        except BaseException as exc:  # handed to the caller
            errors.append(exc)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(PNG_TIMEOUT)
    if worker.is_alive():
        raise TimeoutError(f"the browser did not finish within {PNG_TIMEOUT:g} s")
    if errors:
        raise errors[0]
    Path(path).write_bytes(result[0])


def _shared_plotlyjs(folder: Path) -> str:
    """``"directory"`` (write plotly.min.js here) or the relative path of a copy in a parent folder."""
    folder = folder.resolve()
    for parent in list(folder.parents)[:3]:
        if (parent / "plotly.min.js").is_file():
            return os.path.relpath(parent / "plotly.min.js", folder)
    return "directory"
