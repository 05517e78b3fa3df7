"""Interactive explorers for JupyterLab (``ipywidgets`` and plotly ``FigureWidget``).

Each explorer is a function that returns a widget to show in a notebook cell:

* :func:`steering_explorer` — a direction, layer, α (absolute or × typical norm) and
  positions; unsteered and steered generations side by side, next-token KL, and the
  cosine to the unsteered run over the downstream layers; runs in the background with a
  progress bar and a Cancel button;
* :func:`sweep_viewer` — the cosine-vs-α and adherence/coherence figures of sweep frames,
  with a steering-layer selector;
* :func:`feature_explorer` — an SAE's features aligned with / attributed to a direction,
  their cards, and steering with a feature's decoder row;
* :func:`patching_explorer` — a patching heatmap: hover for token, layer and value, click
  a cell for the patched run's next tokens.

Without a live Jupyter kernel (a script, a test, a notebook read without running it)
there is no frontend for a widget, so each function returns a static plotly figure of
its initial state instead; ``live_kernel=True`` / ``False`` forces either. No explorer
leaves a hook on the model after an interaction, a cancelled one included.

This layer sits above ``viz`` and ``studies``: it uses the computations and figures
below it and adds only the interaction.
"""

from lens_roles.widgets.features import FeatureExplorer, feature_explorer
from lens_roles.widgets.patching import PatchingExplorer, patching_explorer
from lens_roles.widgets.steering import SteeringExplorer, Snapshot, snapshot_figure, steering_explorer
from lens_roles.widgets.sweeps import SweepViewer, sweep_viewer

__all__ = [
    "steering_explorer",
    "SteeringExplorer",
    "Snapshot",
    "snapshot_figure",
    "sweep_viewer",
    "SweepViewer",
    "feature_explorer",
    "FeatureExplorer",
    "patching_explorer",
    "PatchingExplorer",
]
