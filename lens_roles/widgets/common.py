"""What every explorer shares: live-kernel detection, pane-fitted figure widgets, and a
cancellable background job with a progress bar.

A :class:`Job` runs one computation on a model in a worker thread. The computation
gets a :class:`Ticket`; wrapping its forward passes in ``with ticket.watch(model):``
attaches one recording hook per residual stream (``model.hooks``, so they go when
the block ends, however it ends) that counts finished forwards for the progress bar
and raises :class:`~lens_roles.errors.Cancelled` inside the next forward once the
user pressed Cancel. Every intervention the computation opened is a ``with`` block
around that forward, so cancelling unwinds all of them: no hook stays on the model.
Only one job per :class:`Runner` touches the model at a time: a new one waits for
the previous (cancelled) one to finish before it starts.

PyTorch hooks belong to the model, not to a thread: while a job runs, a forward of
the same model started elsewhere (another notebook cell) would pass through the
job's hooks, steering included. The watch hooks therefore refuse such a forward
with a :class:`~lens_roles.errors.ModelError` (before any of the job's hooks at that
point can change it); wait for the job (``runner.wait()``) or cancel it first.
"""

from __future__ import annotations

import threading
import traceback
from contextlib import contextmanager
from typing import Callable

import plotly.graph_objects as go

from lens_roles.errors import Cancelled, ModelError, UsageError
from lens_roles.runtime.models import resid_pre_hook
from lens_roles.viz.style import fit_to_pane, in_kernel


def live(requested: bool | None) -> bool:
    """Whether to build a live widget: ``requested`` when given, else whether a Jupyter kernel runs us.

    Without a kernel (a script, a test, a notebook exported to HTML) there is no
    frontend to talk to, so the explorers return their static figure instead.
    """
    return in_kernel() if requested is None else bool(requested)


class FigureWidget(go.FigureWidget):
    """A plotly ``FigureWidget`` whose data and layout travel in the message that creates its frontend model.

    plotly's ``FigureWidget`` (an ``anywidget`` since plotly 6) opens its comm inside
    ``ipywidgets.Widget.__init__``, before it has set its synced ``_widget_data`` and
    ``_widget_layout``, and sends those in two updates right after. In JupyterLab the
    first such models of a session take seconds to create (each loads plotly's 5 MB
    widget bundle), and updates that arrive meanwhile are lost: the view draws empty
    default axes (no trace, no title) and never redraws, since plotly's view reads
    ``_widget_data`` only when it renders. Seen in headless Chromium on a fresh
    JupyterLab: the first plain ``FigureWidget`` s of a notebook came up empty, while
    this class's, opened only once the constructor has set both traits, drew their data.
    """

    def __init__(self, *args, **kwargs):
        self._defer_open = True
        try:
            super().__init__(*args, **kwargs)
        finally:
            self._defer_open = False
        self.open()

    def open(self) -> None:
        """Open the comm (with the full figure as its state), unless the constructor is still running."""
        if not getattr(self, "_defer_open", False):
            super().open()


def figure_widget(fig: go.Figure) -> FigureWidget:
    """A :class:`FigureWidget` of ``fig``, fitted to the notebook pane (responsive width, wrapping legend).

    Used where Python must hear the figure's events (the patching explorer's clicks);
    figures that are only shown go through :class:`FigureOutput`.
    """
    return FigureWidget(fit_to_pane(fig))


class FigureOutput:
    """An ``ipywidgets.Output`` showing one plotly figure, fitted to the pane, replaceable from any thread.

    The figure goes out as plotly's own notebook mimetype (what a cell's figure
    output is), so it renders like every other figure in the notebook, hover
    included. :attr:`figure` is the figure shown (fitted); :meth:`show` replaces it.
    """

    def __init__(self, fig: go.Figure | None = None):
        self.figure: go.Figure | None = None
        # the first figure goes in the widget's creation message, not in an update after it
        # (updates that reach JupyterLab while it still creates the model can be lost; see FigureWidget)
        self.widget = ui().Output(outputs=self._outputs(fig) if fig is not None else ())

    def _outputs(self, fig: go.Figure) -> tuple[dict, ...]:
        """The Output widget's outputs showing ``fig`` fitted to the pane (and remember it as :attr:`figure`)."""
        import plotly.io as pio

        self.figure = fit_to_pane(fig)
        bundle = pio.renderers["plotly_mimetype"].to_mimebundle(self.figure.to_dict())
        bundle["text/plain"] = f"<figure: {self.figure.layout.title.text or 'plotly'}>"
        return ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def show(self, fig: go.Figure) -> None:
        self.widget.outputs = self._outputs(fig)


def ui():
    """The ``ipywidgets`` module (imported late: ``import lens_roles`` does not need it)."""
    try:
        import ipywidgets
    except ImportError:  # pragma: no cover - ipywidgets is a dependency
        raise UsageError("the explorers need ipywidgets (pip install ipywidgets)") from None
    return ipywidgets


class Ticket:
    """A running job's handle: its cancel flag and its progress (finished forwards of the model)."""

    def __init__(self, on_progress: Callable[[int], None] | None = None):
        self.cancelled = threading.Event()
        self.forwards = 0
        self.on_progress = on_progress

    def check(self) -> None:
        """Raise :class:`Cancelled` if the user cancelled this job."""
        if self.cancelled.is_set():
            raise Cancelled("cancelled")

    @contextmanager
    def watch(self, model):
        """Count the forwards that run in this block and stop the next one after a cancel.

        One hook per ``blocks.{l}.hook_resid_pre``: at any layer it checks the flag
        (so a cancel takes effect within one block), at the last layer it counts a
        forward. The hooks return None, so they never change an activation. They sit on
        ``hook_resid_pre``, not ``hook_resid_post``, because a branched run
        (:mod:`lens_roles.runtime.branching`) restarts from ``hook_resid_post`` and refuses
        outside hooks there.
        """
        last = model.cfg.n_layers - 1
        owner = threading.get_ident()

        def check(acts, hook):
            if threading.get_ident() != owner:
                raise ModelError(f"{model.cfg.model_name} is busy: an explorer is running on it in the background "
                                 "and its hooks are attached; wait for it (explorer.runner.wait()) or cancel it")
            self.check()

        def count(acts, hook):
            check(acts, hook)
            self.forwards += 1
            if self.on_progress is not None:
                self.on_progress(self.forwards)

        hooks = [(resid_pre_hook(layer), check) for layer in range(last)] + [(resid_pre_hook(last), count)]
        self.check()
        with model.hooks(fwd_hooks=hooks):
            yield self


class Runner:
    """Runs one job at a time in a worker thread, with a progress bar, a status line and a Cancel button.

    :meth:`submit` cancels the running job (if any) and starts the new one after it
    has stopped. ``widget`` is the bar, the status and the button in one row.
    """

    def __init__(self, label: str = "working"):
        w = ui()
        self.label = label
        self.bar = w.IntProgress(value=0, min=0, max=1, description="", layout=w.Layout(width="40%"))
        self.status = w.HTML("")
        self.cancel_button = w.Button(description="Cancel", icon="stop", disabled=True,
                                      layout=w.Layout(width="auto"))
        self.cancel_button.on_click(lambda _: self.cancel())
        self.widget = w.HBox([self.bar, self.cancel_button, self.status])
        self._thread: threading.Thread | None = None
        self._ticket: Ticket | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_outcome: str | None = None  # "done", "cancelled" or "failed"

    def cancel(self) -> None:
        """Ask the running job to stop (it stops inside its next forward pass)."""
        with self._lock:
            if self._ticket is not None:
                self._ticket.cancelled.set()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current job has finished (tests and scripts; the notebook never needs it)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def submit(self, work: Callable[[Ticket], None], *, total: int, label: str | None = None,
               done: Callable[[], None] | None = None) -> None:
        """Cancel the running job and run ``work(ticket)`` next, expecting about ``total`` forwards.

        ``done`` runs in the worker after ``work`` returned normally. A cancelled job
        ends with status "cancelled"; an error is shown in the status line and kept
        in :attr:`last_error`.
        """
        previous = self._thread
        self.cancel()
        ticket = Ticket(on_progress=lambda n: setattr(self.bar, "value", min(n, self.bar.max)))
        text = label or self.label

        def run() -> None:
            if previous is not None:
                previous.join()
            with self._lock:
                if ticket.cancelled.is_set():  # superseded before it started
                    return
            self.bar.max, self.bar.value, self.bar.bar_style = max(1, total), 0, "info"
            self.status.value = f"{text} …"
            self.cancel_button.disabled = False
            try:
                work(ticket)
                if done is not None:
                    done()
            except Cancelled:
                self.last_outcome, self.bar.bar_style = "cancelled", "warning"
                self.status.value = f"{text}: cancelled"
            except Exception as exc:  # shown to the user; the kernel keeps running
                self.last_outcome, self.bar.bar_style = "failed", "danger"
                self.last_error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self.status.value = f"<span style='color:#b00'>{text} failed: {self.last_error}</span>"
            else:
                self.last_outcome, self.bar.bar_style = "done", "success"
                self.bar.value = self.bar.max
                self.status.value = f"{text}: done"
            finally:
                with self._lock:
                    if self._ticket is ticket:
                        self.cancel_button.disabled = True

        with self._lock:
            self._ticket = ticket
            self._thread = threading.Thread(target=run, name=f"lens_roles {text}", daemon=True)
            self._thread.start()
