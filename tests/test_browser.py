"""Every notebook opened in JupyterLab in a real (headless) Chromium: run all cells, no error output,
every plotly figure and widget rendered, a screenshot per notebook (and per explorer of
``07_explorers``) in ``build/screenshots/``.

Where a Chromium and playwright are present this test is what executes the notebooks in the
suite: ``tests/test_notebooks.py`` then leaves them to it (it runs them with ``nbclient`` only
where the browser cannot), so each notebook runs once, with every check ``nbclient``'s run
makes (every cell ran, none has an error output) and those only a browser can make.

One JupyterLab serves every notebook: headless, on a free local port with a random token, in
its own process group, with the kernels' environment of ``tests/test_notebooks.py`` (fast mode,
``LENS_ROLES_FAST=1``, unless set) and this checkout first on the kernels' path. Its settings,
workspaces and runtime files live in a temporary folder, and it serves copies of the notebooks,
so the repository is not touched. Each notebook's kernel is shut down once it is checked.
Playwright drives the system Chromium (``executable_path``); no browser is downloaded.
JupyterLab and its kernels are stopped at the end, also when a test fails, and the test checks
that none of their processes is left.

Skipped, saying why, without ``chromium`` (``make browser``), without ``playwright`` (the
``browser`` extra), or with ``LENS_ROLES_BROWSER=0`` (then ``nbclient`` runs the notebooks).
``make browser-test`` runs just this file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_notebooks import NOTEBOOKS, kernel_env

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "build" / "screenshots"
WIDTH = 1400  # the window width the report was made at
CELL_TIMEOUT_S = float(os.environ.get("LENS_ROLES_BROWSER_TIMEOUT", 1200))

def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def unavailable() -> str | None:
    """Why the notebooks cannot be run in JupyterLab in a browser here; None when they can."""
    if os.environ.get("LENS_ROLES_BROWSER") == "0":
        return "LENS_ROLES_BROWSER=0: the notebooks run with nbclient instead (tests/test_notebooks.py)"
    if find_chromium() is None:
        return "no Chromium on this machine (install Debian's with `make browser`, as root)"
    for module, install in (("playwright", "pip install -e '.[browser]'"), ("jupyterlab", "pip install -e .")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    return None


UNAVAILABLE = unavailable()
pytestmark = [pytest.mark.browser, pytest.mark.integration,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list:
    """The server's process and every descendant (kernels start their own sessions, so the
    process group alone would miss them)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop(server: subprocess.Popen, known: list) -> list:
    """Stop JupyterLab and its kernels: SIGTERM to its process group (it shuts its kernels down),
    then SIGKILL for anything of ``known`` (and the group) still alive. Returns the survivors (none)."""
    import psutil

    known = {p.pid: p for p in known + process_tree(server.pid)}
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    _, alive = psutil.wait_procs(list(known.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=10)
    _, alive = psutil.wait_procs(list(known.values()), timeout=10)
    return alive


class Lab:
    """A running JupyterLab: its address, token, served folder and server process, and every process of
    it seen while it ran (the server's descendants: the kernels), so that :func:`stop` can check them all."""

    def __init__(self, base: str, token: str, root: Path, server: subprocess.Popen):
        self.base, self.token, self.root, self.server = base, token, root, server
        self.seen: list = []

    def api(self, method: str, path: str):
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=30) as r:
            body = r.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self) -> None:
        """End every session and its kernel (each notebook's kernel holds a model: one at a time)."""
        self.seen += process_tree(self.server.pid)
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """One running JupyterLab serving copies of the notebooks, for every notebook: a :class:`Lab`."""
    home = tmp_path_factory.mktemp("jupyterlab")
    root = home / "notebooks"
    root.mkdir()
    for nb in NOTEBOOKS:
        shutil.copy(nb, root / nb.name)
    settings = home / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # render every cell (no virtual scrolling), so that the checks and the screenshots see them all
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    apputils = home / "settings" / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True)
    (apputils / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    port, token = free_port(), secrets.token_hex(16)
    env = dict(kernel_env(),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(home / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"))
    log = open(home / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
         "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    lab = Lab(f"http://127.0.0.1:{port}", token, root, server)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{lab.base}/api/status?token={token}", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    tail = (home / "jupyterlab.log").read_text()[-2000:]
                    raise RuntimeError(f"JupyterLab did not start: {tail}") from None
                time.sleep(0.5)
        yield lab
    finally:
        left = stop(server, lab.seen)
        log.close()
        assert not left, f"processes left running after JupyterLab stopped: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


# JavaScript run in the page (JupyterLab exposes its application as window.jupyterapp)
RUNNING = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.sessionContext || !panel.sessionContext.session) return 'no-session';
  const kernel = panel.sessionContext.session.kernel;
  if (!kernel) return 'no-kernel';
  const prompts = [...panel.node.querySelectorAll('.jp-InputArea-prompt')].map(p => p.textContent.trim());
  if (prompts.some(t => t.includes('*'))) return 'running';
  return kernel.status;
}"""
CELLS = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .filter(c => c.model.type === 'code').map(c => c.model.toJSON())"""
RENDERED = """() => {
  const panel = window.jupyterapp.shell.currentWidget.node;
  const plots = [...panel.querySelectorAll('.js-plotly-plot')];
  const outputs = [...panel.querySelectorAll('.jp-OutputArea-output')];
  return {
    plots: plots.length,
    drawn: plots.filter(p => p.querySelector('.main-svg') && p.getBoundingClientRect().width > 0).length,
    // a figure whose data never arrived draws empty axes: no trace, heatmap or table in it
    empty: plots.filter(p => !p.querySelector('g.trace, g.hm, g.table')).length,
    too_wide: plots.filter(p => p.getBoundingClientRect().width > panel.getBoundingClientRect().width).length,
    widget_views: outputs.filter(o => o.classList.contains('jupyter-widgets')
                                      || o.querySelector('.jupyter-widgets')).length,
    widget_errors: outputs.filter(o => /Error displaying widget|Loading widget/.test(o.textContent)).length,
    height: Math.max(...[...panel.querySelectorAll('*')].map(e => e.scrollHeight)),
  };
}"""
EXPLORER_CELLS = ".jp-CodeCell:has(.widget-vbox)"  # the explorers are VBoxes (tqdm's bars are HBoxes)


def wait_for(page, predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.time() + timeout_s
    while True:
        value = page.evaluate(predicate)
        if value in ("idle",) or value is True:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last state {value!r})")
        time.sleep(poll_s)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_renders_in_jupyterlab(path, jupyterlab, chromium):
    from playwright.sync_api import Error

    try:
        try:
            check_notebook(path, jupyterlab, chromium)
        except Error as err:  # a renderer crash (memory on a crowded machine) is the browser's, not the notebook's
            if "crashed" not in str(err):
                raise
            print(f"{path.name}: the page crashed ({err}); once more in a fresh page")
            jupyterlab.shut_down_kernels()
            check_notebook(path, jupyterlab, chromium)
    finally:
        jupyterlab.shut_down_kernels()


def check_notebook(path, lab: Lab, chromium):
    page = chromium.new_page(viewport={"width": WIDTH, "height": 1000})
    try:
        # ?reset: a fresh workspace, not one that reopens (and starts kernels for) the notebooks checked before
        page.goto(f"{lab.base}/lab/tree/{path.name}?reset&token={lab.token}")
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                               "&& window.jupyterapp.shell.currentWidget.content", timeout=120_000)
        wait_for(page, RUNNING, 180, "the kernel to start")
        lab.seen += process_tree(lab.server.pid)
        start = time.time()
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        time.sleep(1)
        wait_for(page, RUNNING, CELL_TIMEOUT_S, "every cell to finish")
        seconds = time.time() - start
        cells = page.evaluate(CELLS)
        # what tests/test_notebooks.py asserts of an nbclient run: every cell ran, none has an error output
        errors = [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(cells)
                  for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, "\n".join(errors)
        unrun = [i for i, c in enumerate(cells) if c["source"].strip() and c.get("execution_count") is None]
        assert not unrun, f"cells that did not run: {unrun}"
        fallbacks = [i for i, c in enumerate(cells) for o in c.get("outputs", [])
                     if o.get("name") == "stderr" and "IProgress not found" in o.get("text", "")]
        assert not fallbacks, f"cells {fallbacks}: tqdm fell back to text bars (IProgress not found)"
        plotly_outputs = sum("application/vnd.plotly.v1+json" in o.get("data", {}) for c in cells
                             for o in c.get("outputs", []))
        widget_outputs = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in cells
                             for o in c.get("outputs", []))
        # the last figures and widgets draw after the kernel went idle: wait until they all have (or 30 s)
        done = (f"() => {{ const s = ({RENDERED})(); return s.drawn === s.plots && s.plots >= {plotly_outputs} "
                f"&& s.empty === 0 && s.widget_views >= {widget_outputs} && s.widget_errors === 0; }}")
        try:
            wait_for(page, done, 30, "the figures and widgets to draw")
        except AssertionError:
            pass  # the assertions below say what is missing
        state = page.evaluate(RENDERED)
        assert state["drawn"] == state["plots"] >= plotly_outputs, state
        assert state["empty"] == 0, f"figures drawn without their data: {state}"
        assert state["too_wide"] == 0, f"figures wider than the notebook pane: {state}"
        assert state["widget_errors"] == 0, state
        assert state["widget_views"] >= widget_outputs, f"widgets that did not render: {state}"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
        page.set_viewport_size({"width": WIDTH, "height": min(max(1000, state["height"] + 200), 16000)})
        page.wait_for_timeout(1000)
        # Run All leaves the notebook scrolled to its end: back to the top, so the page shows it all
        page.evaluate("() => window.jupyterapp.shell.currentWidget.node.querySelectorAll('*')"
                      ".forEach(e => { if (e.scrollTop) e.scrollTop = 0; })")
        page.wait_for_timeout(300)
        page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
        if path.stem == "07_explorers":  # one screenshot per explorer
            outputs = page.locator(EXPLORER_CELLS)
            for i in range(outputs.count()):
                outputs.nth(i).screenshot(path=str(SCREENSHOTS / f"{path.stem}_explorer{i + 1}.png"))
        print(f"{path.name}: all cells ran in {seconds:.0f} s in the browser; {state}")
    finally:
        page.close()
