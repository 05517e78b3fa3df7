"""Writing figures: self-contained HTML always, PNG when a Chrome/Chromium is available.

:func:`save_figure` always writes a self-contained HTML file and, when a
Chrome/Chromium is available to ``kaleido``, a PNG beside it; a missing browser
only skips the PNG (with one warning), and a browser that hangs is given up after
``LENS_ROLES_PNG_TIMEOUT`` seconds (default 120). ``LENS_ROLES_PNG=0`` switches PNG
export off (the test suite does, so that it needs no browser). One browser is kept
open for the whole process (:class:`BrowserSession`) instead of one launched per
figure, which took about 2.5 s of each PNG; the bytes are those of ``fig.to_image``.

A rerun writes the same files: the figure's data and metadata are rounded to
:data:`lens_roles.io.SIGNIFICANT_DIGITS` significant digits (float noise in the
seventh digit of a float32 result does not reach the files), and the HTML's plot
``<div>`` takes an id made from the file's name instead of plotly's random UUID."""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import json
import os
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio

from lens_roles.io import atomic_write, round_significant

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
        meta = round_significant(meta)
        fig.update_layout(meta=meta)
        _atomic(stem.with_suffix(".json"), lambda t: Path(t).write_text(json.dumps(meta, indent=2, default=str)))
    # plotly.js is written once beside the figures, so the HTML works offline; figures in
    # sub-folders reuse a copy up to three folders above them (figures/plotly.min.js).
    plotlyjs = _shared_plotlyjs(stem.parent)
    data = round_significant(_plain(fig.to_plotly_json()))
    _atomic(stem.with_suffix(".html"), lambda t: pio.write_html(data, t, include_plotlyjs=plotlyjs, full_html=True,
                                                                 div_id=div_id(stem), validate=False))
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


def _plain(value):
    """``value`` (a figure's ``to_plotly_json()``) with plotly's base64 typed arrays
    (``{"dtype", "bdata", "shape"}``) decoded into nested lists of numbers, which
    :func:`~lens_roles.io.round_significant` then rounds and the HTML writes as JSON numbers."""
    if isinstance(value, dict):
        if "bdata" in value and "dtype" in value and set(value) <= {"dtype", "bdata", "shape"}:
            array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
            if "shape" in value:
                array = array.reshape([int(n) for n in str(value["shape"]).split(",")])
            return array.tolist()
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def div_id(stem: str | Path) -> str:
    """The id of a figure's plot ``<div>`` in its HTML: ``lens-roles-`` and the file's name, in
    characters an HTML id and a CSS selector take as they are (the same on every run)."""
    return "lens-roles-" + re.sub(r"[^A-Za-z0-9_-]", "-", Path(stem).name)


#: seconds a PNG export may take before it is given up (a browser can hang on a loaded machine)
PNG_TIMEOUT = float(os.environ.get("LENS_ROLES_PNG_TIMEOUT", "120"))


def _write_png(fig: go.Figure, path: str, scale: float) -> None:
    """Render ``fig`` as PNG and write it to ``path``, or raise after ``PNG_TIMEOUT`` s.

    The rendering happens in memory (in the browser session's thread, or a worker
    thread for a one-off export); the bytes are written here, by the caller's
    thread, and only if the rendering finished in time. An abandoned export (a
    browser hanging on a loaded machine) can therefore never write a file after the
    deadline, when its temporary file has already been cleaned up.
    """
    Path(path).write_bytes(render_png(fig, scale))


def render_png(fig: go.Figure, scale: float) -> bytes:
    """``fig`` as PNG bytes, as ``fig.to_image(format="png", scale=scale)`` renders it.

    Through one browser session kept open for the whole process (:class:`BrowserSession`):
    a one-off ``to_image`` launches Chromium for every figure (about 1.5 s each), the
    session once. Where the session cannot start (a browser kaleido cannot drive), each
    figure falls back to the one-off export. Raises ``TimeoutError`` after
    ``PNG_TIMEOUT`` s; a session that timed out or failed is dropped, and the next
    figure opens a new one.
    """
    global _session, _session_failed
    if _session is None and not _session_failed:
        try:
            _session = BrowserSession()
        except Exception:  # noqa: BLE001 — no session: every figure exports on its own, as before
            _session_failed = True
    if _session is None:
        return _one_off_png(fig, scale)
    try:
        return _session.render(fig, scale)
    except BaseException:
        session, _session = _session, None
        session.close(wait=False)
        raise


def _one_off_png(fig: go.Figure, scale: float) -> bytes:
    """``fig.to_image`` (a browser launched for this figure alone) in a worker thread, given up after
    ``PNG_TIMEOUT`` s."""
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
    return result[0]


class BrowserSession:
    """One kaleido browser (Chromium) kept open, rendering figures one after another.

    Its asyncio loop runs in a daemon thread; :meth:`render` hands a figure to it and
    waits at most ``PNG_TIMEOUT`` s. The figure and the options are those
    ``plotly.io.to_image`` passes to kaleido (the figure's dict; its layout's width and
    height, else its template's, else plotly's defaults; plotly's topojson and
    kaleido options), so the PNG is the same, byte for byte. Closed at exit.
    """

    def __init__(self):
        import kaleido

        defaults = pio.defaults
        options = {name: getattr(defaults, name) for name in ("plotlyjs", "mathjax", "headers")
                   if getattr(defaults, name)}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="lens-roles-browser")
        self.thread.start()

        async def open_browser():
            browser = kaleido.Kaleido(**options)
            await browser.open()
            return browser

        try:
            self.browser = self._call(open_browser())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        atexit.register(self.close)

    def _call(self, coroutine):
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(PNG_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the browser did not finish within {PNG_TIMEOUT:g} s") from None

    def render(self, fig: go.Figure, scale: float) -> bytes:
        """``fig`` as PNG bytes (see the class docs)."""
        defaults = pio.defaults
        fig_dict = fig.to_dict()
        layout = fig_dict.get("layout", {})
        template = layout.get("template", {}).get("layout", {})
        opts = {"format": "png",
                "width": layout.get("width") or template.get("width") or defaults.default_width,
                "height": layout.get("height") or template.get("height") or defaults.default_height,
                "scale": scale or defaults.default_scale}
        return self._call(self.browser.calc_fig(fig_dict, opts=opts, topojson=defaults.topojson))

    def close(self, wait: bool = True) -> None:
        """Close the browser and stop the loop (without waiting for the browser when ``wait`` is False)."""
        if not self.loop.is_running():
            return
        future = asyncio.run_coroutine_threadsafe(self.browser.close(), self.loop)
        if wait:
            try:
                future.result(10)
            except Exception:  # noqa: BLE001 — a browser that will not close dies with the process
                pass
        future.add_done_callback(lambda _: self.loop.call_soon_threadsafe(self.loop.stop))


#: the browser session of this process (opened by the first PNG), and whether one failed to open
_session: BrowserSession | None = None
_session_failed = False


def _shared_plotlyjs(folder: Path) -> str:
    """``"directory"`` (write plotly.min.js here) or the relative path of a copy in a parent folder."""
    folder = folder.resolve()
    for parent in list(folder.parents)[:3]:
        if (parent / "plotly.min.js").is_file():
            return os.path.relpath(parent / "plotly.min.js", folder)
    return "directory"
