"""The explorers without a browser: value changes driven from Python on the tiny model, the outputs
checked against the library's own computations, and no hook left behind (``no_hook_leaks``), also
after a cancelled run. And figures shown in a notebook fit the pane while saved ones keep their size."""

from __future__ import annotations

import time

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import lens_roles as lr
from lens_roles.analysis import patching as P
from lens_roles.analysis.sae.cards import feature_cards
from lens_roles.analysis.sae.core import decoder_directions
from lens_roles.analysis.sae.features import feature_alignment
from lens_roles.errors import PlotError, UsageError
from lens_roles.interventions.steering import steer
from lens_roles.measures.sweeps import adherence_sweep, cosine_sweep
from lens_roles.runtime.generation import generate
from lens_roles.runtime.readout import kl_divergence
from lens_roles.viz.steering import cosine_vs_alpha
from lens_roles.viz.style import fit_to_pane, notebook_display
from lens_roles.widgets import features as F
from lens_roles.widgets import steering as S
from lens_roles.widgets.patching import cell_sites, patching_explorer, top_tokens
from lens_roles.widgets.sweeps import sweep_viewer
from tests.conftest import hooks_left

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Where can I find old maps?", "Tell me about your work."]


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(5)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model), {"name": "random"})


def explorer(model, direction, **kw):
    kw = {"layer": 1, "alpha": 2.0, "alpha_mode": "absolute", "max_new_tokens": 4, **kw}
    return S.SteeringExplorer(model, {"random": direction}, PROMPTS, **kw)


def run(ex, change=None):
    """Apply a change (a callable setting widget values, which starts a run) or start one, and wait."""
    (change or ex.update)()
    ex.runner.wait(120)
    assert ex.runner.last_outcome == "done", ex.runner.last_error
    return ex.snapshot


# ----------------------------------------------------------------- steering explorer


def test_steering_explorer_matches_the_library(tiny_model, direction):
    ex = explorer(tiny_model, direction)
    snap = run(ex)
    assert snap.prompts == tuple(PROMPTS) and snap.layer == 1 and snap.alpha == 2.0
    assert [g.text for g in snap.unsteered] == [g.text for g in generate(tiny_model, PROMPTS, max_new_tokens=4)]
    with steer(tiny_model, direction, 2.0, layers=[1]):
        expected = generate(tiny_model, PROMPTS, max_new_tokens=4)
        logq = last_logprobs(tiny_model, PROMPTS)
    assert [g.text for g in snap.steered] == [g.text for g in expected]
    kl = kl_divergence(last_logprobs(tiny_model, PROMPTS), logq)
    assert list(snap.kl) == pytest.approx(kl.tolist(), rel=1e-4, abs=1e-6)
    cos = cosine_sweep(tiny_model, direction, PROMPTS, steer_layers=[1], alphas=[2.0])
    cos = cos[cos.alpha == 2.0]
    assert list(snap.cosine.read_layer) == [1, 2]
    assert list(snap.cosine.value) == pytest.approx(list(cos.value), rel=1e-6)
    assert "random, layer 1" in ex.table.value and len(ex.curve.figure.data) == 1
    shown = ex.curve.widget.outputs[0]["data"]["application/vnd.plotly.v1+json"]
    assert "width" not in shown["layout"] and len(shown["data"]) == 1  # fitted to the pane
    assert not hooks_left(tiny_model)


def last_logprobs(model, prompts):
    """The reference: each prompt alone through the model, log-softmax at its last position ``[prompt, d_vocab]``."""
    ids = lr.encode(model, [lr.Prompt(p) for p in prompts])
    return torch.stack([torch.log_softmax(model(torch.tensor([it.tokens]))[0, -1].float(), -1) for it in ids])


def test_unsteered_logprobs_are_the_models_last_position(tiny_model):
    shared = S.shared_runs(tiny_model, PROMPTS + ["Hi."], 1, batch_size=2)  # two batches, padded rows
    got = S.unsteered_logprobs(tiny_model, shared, 3)
    torch.testing.assert_close(got, last_logprobs(tiny_model, PROMPTS + ["Hi."]), rtol=1e-4, atol=1e-4)


def test_alpha_zero_changes_nothing_and_alpha_moves_reuse_the_unsteered_side(tiny_model, direction, monkeypatch):
    ex = explorer(tiny_model, direction, alpha=0.0)
    snap = run(ex)
    assert [g.text for g in snap.steered] == [g.text for g in snap.unsteered]
    assert max(snap.kl) == pytest.approx(0.0, abs=1e-6)
    assert list(snap.cosine.value) == pytest.approx([1.0, 1.0], abs=1e-5)
    calls, shared = [], []
    monkeypatch.setattr(S, "generate", lambda *a, **k: calls.append(a[1]) or generate(*a, **k))
    monkeypatch.setattr(S, "shared_run", lambda m, batch, layers: shared.append(list(layers)) or
                        lr.runtime.branching.shared_run(m, batch, layers))
    forwards = []  # blocks each forward started at (a branch starts after the steering layer)
    real_forward = type(tiny_model).forward
    monkeypatch.setattr(type(tiny_model), "forward", lambda self, *a, **k: forwards.append(
        k.get("start_at_layer") or 0) or real_forward(self, *a, **k))
    snap = run(ex, lambda: setattr(ex.alpha, "value", 3.0))  # the slider's change starts the run
    assert snap.alpha == 3.0 and calls == [list(PROMPTS)]  # only the steered side was generated
    assert shared == []  # the unsteered stream of layer 1 was reused: the KL and curve ran blocks 2.. only
    assert forwards.count(2) == 1 and forwards.count(0) == 4  # one branch; the steered generation's 4 steps
    assert len(ex.history) == 1 and len(ex.curve.figure.data) == 2  # the previous curve stays, faintly
    cos = cosine_sweep(tiny_model, direction, PROMPTS, steer_layers=[1], alphas=[3.0]).query("alpha == 3.0")
    assert list(snap.cosine.value) == pytest.approx(list(cos.value), rel=1e-6)
    snap = run(ex, lambda: setattr(ex.layer, "value", 2))
    assert snap.layer == 2 and list(snap.cosine.read_layer) == [2] and len(calls) == 2
    assert shared == [[2]]  # a new layer: one new shared run (one batch)


def test_the_curve_and_kl_follow_the_positions_setting(tiny_model, direction):
    """Steering only generated tokens leaves the prompt's stream and its next token alone: the cosine
    curve is 1 and the KL 0 (they read the prompt), while the steered generations still change."""
    ex = explorer(tiny_model, direction, alpha=6.0)
    moved = run(ex)
    assert min(moved.cosine.value) < 0.999 and max(moved.kl) > 1e-4
    snap = run(ex, lambda: setattr(ex.positions, "value", "generated"))
    assert list(snap.cosine.value) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert max(snap.kl) == pytest.approx(0.0, abs=1e-6)
    with steer(tiny_model, direction, 6.0, layers=[1], positions="generated"):
        expected = generate(tiny_model, PROMPTS, max_new_tokens=4)
    assert [g.text for g in snap.steered] == [g.text for g in expected]
    assert not hooks_left(tiny_model)


def test_relative_alpha_uses_the_typical_norm(tiny_model, direction):
    ex = explorer(tiny_model, direction)
    snap = run(ex, lambda: setattr(ex.mode, "value", "relative"))
    norm = lr.interventions.residual_norms(tiny_model, PROMPTS, layers=[1])[1]
    assert snap.alpha_mode == "relative" and snap.norm == pytest.approx(norm)
    assert ex.alpha.max == 1.0 and snap.alpha == 1.0  # clipped into the relative range
    with steer(tiny_model, direction, 1.0, layers=[1], relative={1: norm}):
        expected = generate(tiny_model, PROMPTS, max_new_tokens=4)
    assert [g.text for g in snap.steered] == [g.text for g in expected]


def test_cancel_stops_the_run_and_leaves_no_hook(tiny_model, direction):
    ex = explorer(tiny_model, direction, max_new_tokens=120)
    ex.update()
    deadline = time.time() + 60
    while ex.runner.bar.value < 3 and time.time() < deadline:  # a few forwards into the run
        time.sleep(0.01)
    assert ex.runner.busy
    ex.runner.cancel_button.click()
    ex.runner.wait(60)
    assert ex.runner.last_outcome == "cancelled" and "cancelled" in ex.runner.status.value
    assert ex.snapshot is None and not hooks_left(tiny_model)
    snap = run(ex, lambda: setattr(ex.max_new_tokens, "value", 3))  # the explorer still works after it
    assert len(snap.steered) == 2 and not hooks_left(tiny_model)


def test_a_new_change_supersedes_the_running_one(tiny_model, direction):
    ex = explorer(tiny_model, direction, max_new_tokens=60)
    ex.update()
    ex.alpha.value = -1.0  # cancels the first run; the second runs after it stopped
    ex.runner.wait(120)
    assert ex.runner.last_outcome == "done" and ex.snapshot.alpha == -1.0
    assert not hooks_left(tiny_model)


def test_a_forward_elsewhere_during_a_run_is_refused(tiny_model, direction):
    ex = explorer(tiny_model, direction, max_new_tokens=120)
    ex.update()
    deadline = time.time() + 60
    while ex.runner.bar.value < 2 and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(lr.ModelError, match="busy: an explorer is running"):
        for _ in range(200):  # until one lands while the job's hooks are attached
            tiny_model(torch.tensor([[1, 2, 3]]))
    ex.runner.cancel()
    ex.runner.wait(60)
    assert not hooks_left(tiny_model)


def test_errors_show_in_the_status_line(tiny_model, direction):
    ex = explorer(tiny_model, direction)
    ex.prompts.value = "  \n "
    ex.runner.wait(60)
    assert ex.runner.last_outcome == "failed" and "no prompts" in ex.runner.status.value
    with pytest.raises(lr.DirectionError, match="no layer of this model"):
        ex.add_direction("far", lr.Direction((7,), torch.ones(1, tiny_model.cfg.d_model)))
    with pytest.raises(UsageError, match="alpha_mode"):
        explorer(tiny_model, direction, alpha_mode="percent")


def test_without_a_kernel_the_explorer_is_a_static_figure(tiny_model, direction):
    fig = S.steering_explorer(tiny_model, direction, PROMPTS, layer=1, alpha=2.0, alpha_mode="absolute",
                              max_new_tokens=3, live_kernel=False)
    assert isinstance(fig, go.Figure) and not isinstance(fig, go.FigureWidget)
    assert {type(t).__name__ for t in fig.data} == {"Table", "Scatter"}
    assert fig.layout.width == 1100  # a static figure keeps its publication size
    widget = S.steering_explorer(tiny_model, direction, PROMPTS, layer=1, max_new_tokens=2, live_kernel=True)
    widget.explorer.runner.wait(60)
    assert widget.explorer.runner.last_outcome == "done" and not hooks_left(tiny_model)


# ----------------------------------------------------------------- sweep viewer


def test_sweep_viewer_follows_the_layer_selector(tiny_model, direction):
    cos = cosine_sweep(tiny_model, direction, PROMPTS, steer_layers=[0, 1], alphas=[-2.0, 2.0])
    pairs = lr.PairSet("p", (lr.ContrastPair("Hi?", "Hello, how can I help?", "Go away."),))
    beh = adherence_sweep(tiny_model, direction, pairs, steer_layers=[0, 1], alphas=[-2.0, 2.0])
    widget = sweep_viewer(cos, beh, subtitle="tiny", live_kernel=True)
    viewer = widget.viewer
    assert list(viewer.layer.options) == [0, 1]
    shown = viewer.cosine_output.figure
    heat = [t for t in shown.data if t.type == "heatmap"][0]
    assert "cosine %{z:.3f}" in heat.hovertemplate  # hover values
    assert shown.layout.width is None and shown.layout.autosize
    viewer.layer.value = 1
    expected = fit_to_pane(cosine_vs_alpha(cos, 1))
    assert viewer.cosine_output.figure.layout.title.text.startswith("Steering at layer 1")
    def xy(widget):
        return [(t.name, str(t.x), str(t.y), str(getattr(t, "z", None))) for t in widget.data]

    assert xy(viewer.cosine_output.figure) == xy(expected)
    faded = {t.legendgroup: t.opacity for t in viewer.behaviour_output.figure.data}
    assert faded == {"0": 0.2, "1": 1.0}
    static = sweep_viewer(cos, beh, live_kernel=False)
    assert isinstance(static, go.Figure) and static.layout.width == 1300
    with pytest.raises(PlotError, match="needs a cosine frame"):
        sweep_viewer(None, None, live_kernel=True)


# ----------------------------------------------------------------- patching explorer


@pytest.fixture(scope="module")
def patch_setup(tiny_model):
    clean = list(lr.encode(tiny_model, [lr.Prompt("Explain an SN2 reaction.", system="You are a chemist.")])[0].tokens)
    corrupt = list(clean)
    for p in (4, 5):
        corrupt[p] = (clean[p] + 37) % tiny_model.cfg.d_vocab
    return P.PatchSetup(tiny_model, clean, corrupt, P.LogitDiff(11, 23))


def test_patched_next_tokens_are_exact_at_the_ends(tiny_model, patch_setup):
    """Patching nothing is the corrupt run, the whole layer-0 stream the clean run (full forwards)."""
    def model_logp(ids):
        return torch.log_softmax(tiny_model(torch.tensor([ids]))[0, -1].float(), -1)

    torch.testing.assert_close(patch_setup.next_token_logprobs({}), model_logp(patch_setup.corrupt_ids))
    torch.testing.assert_close(patch_setup.next_token_logprobs({"blocks.0.hook_resid_pre": "all"}),
                               model_logp(patch_setup.clean_ids))


def test_patching_explorer_click_shows_the_patched_runs_tokens(tiny_model, patch_setup):
    results = [patch_setup.activation_patch("resid"), patch_setup.activation_patch("attn"),
               patch_setup.attribution_patch("heads")]
    widget = patching_explorer(patch_setup, results, k=5, live_kernel=True)
    ex = widget.explorer
    heat = ex.heatmap.data[0]
    assert "layer %{y}" in heat.hovertemplate and "%{x}" in heat.hovertemplate and "%{z" in heat.hovertemplate
    assert heat.x[4].startswith("4 ") and "|" in heat.x[4]  # position, clean|corrupt token

    class Points:  # what plotly hands an on_click callback
        def __init__(self, x, y):
            self.xs, self.ys, self.point_inds = [x], [y], [[0, 0]]

    ex._clicked(heat, Points(heat.x[4], 1), None)
    sites = cell_sites(patch_setup, results[0], 1, pos=4)
    assert sites == {"blocks.1.hook_resid_pre": [4]}
    expected = top_tokens(tiny_model, patch_setup.next_token_logprobs(sites), 5)
    assert "layer 1, position 4" in ex.tokens.value and "resid, activation" in ex.tokens.value
    assert ex.select(results[0], 1, pos=4) == expected
    attn = [t for t in ex.heatmap.data if list(t.x) == ["attn"]][0]
    ex._clicked(attn, Points("attn", 2), None)
    assert "layer 2 (attn, activation)" in ex.tokens.value
    heads = [t for t in ex.heatmap.data if "head" in t.hovertemplate][0]
    ex._clicked(heads, Points("3", 0), None)
    assert "head 3 (heads, attribution)" in ex.tokens.value
    mask = cell_sites(patch_setup, results[2], 0, head=3)["blocks.0.attn.hook_z"]
    assert mask[:, 3].all() and not mask[:, :3].any()
    assert not hooks_left(tiny_model)
    static = patching_explorer(patch_setup, results, live_kernel=False)
    assert isinstance(static, go.Figure) and not isinstance(static, go.FigureWidget)


# ----------------------------------------------------------------- feature explorer


def random_sae(d_model: int, layer: int, d_sae: int = 48):
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=8, metadata=SAEMetadata(
        model_name="tiny-test", hook_name=f"blocks.{layer}.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_model, d_sae) / d_model ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_model))
    return sae


def test_feature_explorer_lists_shows_cards_and_steers(tiny_model, direction):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    seqs = [list(it.tokens) for it in lr.encode(tiny_model, [lr.Prompt(p) for p in PROMPTS + ["What next?"]])]
    widget = F.feature_explorer(tiny_model, sae, direction, seqs, prompts=PROMPTS, metric_layer=2, top=4,
                                steer_prompts=PROMPTS[:1], live_kernel=True)
    ex = widget.explorer
    ex.steering.runner.wait(60)  # the steering explorer's first run (feature_explorer starts it)
    aligned = feature_alignment(sae, direction, top=4)
    assert list(ex.table.feature[:4]) == list(aligned.feature)
    attributed = lr.attribute_features(tiny_model, sae, [lr.Prompt(p) for p in PROMPTS],
                                       lr.ProjectionMetric(direction, 2))
    assert set(attributed.feature[:4]) <= set(ex.table.feature)
    assert len(ex.select.options) == len(ex.table) and ex.select.options[0][0].startswith(f"f{aligned.feature[0]}")
    feature = int(ex.table.feature[1])
    ex.select.value = feature
    card = feature_cards(tiny_model, sae, [feature], seqs, n_contexts=4)[0]
    assert f"Feature {feature}" in ex.card.value and ".lens-roles-cards .card{" in ex.card.value
    assert all(t in ex.card.value for t, _ in card.promoted[:3] if t.isalnum())
    ex.steer_button.click()
    ex.steering.runner.wait(60)
    snap = ex.steering.snapshot
    assert ex.steering.runner.last_outcome == "done" and snap.direction == f"feature {feature}" and snap.layer == 1
    torch.testing.assert_close(ex.steering.directions[snap.direction][1], decoder_directions(sae)[feature])
    assert not hooks_left(tiny_model)
    static = F.feature_explorer(tiny_model, sae, direction, seqs, top=4, live_kernel=False)
    assert isinstance(static, go.Figure) and len(static.data[0].y) == 4


def test_scoped_css_touches_only_the_cards():
    scoped = ".lens-roles-cards a,.lens-roles-cards b .c{x:1}.lens-roles-cards d{y:2}"
    assert F.scoped_css("a,b .c{x:1}d{y:2}") == scoped


# ----------------------------------------------------------------- figures that fit the pane


def test_fit_to_pane_drops_the_width_and_wraps_the_legend():
    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4], name="a"))
    fig.update_layout(width=1300, height=500, legend=dict(x=0.4, font=dict(size=9)))
    fitted = fit_to_pane(fig)
    assert fitted.layout.width is None and fitted.layout.autosize and fitted.layout.height == 500
    assert fitted.layout.legend.orientation == "h" and fitted.layout.legend.font.size == 9
    assert fig.layout.width == 1300 and fig.layout.legend.orientation is None  # the figure itself is unchanged
    d = fit_to_pane(fig.to_dict())
    assert "width" not in d["layout"] and d["layout"]["legend"]["orientation"] == "h"


def test_notebook_display_fits_shown_figures_only(tmp_path):
    fig = go.Figure(go.Scatter(x=[1], y=[1]))
    fig.update_layout(width=1300)
    before = pio.renderers.default
    try:
        pio.renderers.default = "plotly_mimetype"
        assert notebook_display() == "lens_roles_pane_plotly_mimetype"
        assert notebook_display() == "lens_roles_pane_plotly_mimetype"  # idempotent
        bundle = fig._repr_mimebundle_()
        shown = bundle["application/vnd.plotly.v1+json"]["layout"]
        assert "width" not in shown and shown["autosize"] and shown["legend"]["orientation"] == "h"
        lr.viz.save_figure(fig, tmp_path / "f")
        assert '"width":1300' in (tmp_path / "f.html").read_text()  # saving keeps the publication size
        assert notebook_display(False) == "plotly_mimetype"
    finally:
        pio.renderers.default = before


# ----------------------------------------------------------------- widgets whose state is in their creation message


@pytest.fixture
def comm_messages(monkeypatch):
    """Every widget comm opened and every message sent on one: ``[(kind, data)]``, in order."""
    import ipywidgets.comm as wcomm

    sent, create = [], wcomm.create_comm

    def recording(*args, **kwargs):
        sent.append(("open", kwargs.get("data")))
        made = create(*args, **kwargs)
        send = made.send
        made.send = lambda data=None, *a, **k: sent.append(("update", data)) or send(data, *a, **k)
        return made

    monkeypatch.setattr(wcomm, "create_comm", recording)
    return sent


def test_figure_widget_opens_with_its_data_and_layout(comm_messages):
    """JupyterLab can lose updates that reach it while it still creates a widget's model, so the
    patching heatmap's traces and layout go in the creation (comm open) message itself."""
    from lens_roles.widgets.common import figure_widget

    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], x=["a", "b"]), layout=dict(title="heat", width=1300))
    widget = figure_widget(fig)
    opened = [data["state"] for kind, data in comm_messages if kind == "open"]
    assert len(opened) == 1 and widget.comm is not None
    state = opened[0]
    assert [t["type"] for t in state["_widget_data"]] == ["heatmap"]
    assert state["_widget_layout"]["title"]["text"] == "heat" and "width" not in state["_widget_layout"]
    assert not [data for kind, data in comm_messages if kind == "update"
                and {"_widget_data", "_widget_layout"} & set(data.get("state", {}))]
    widget.add_trace(go.Scatter(x=[1], y=[2]))  # later changes still reach the frontend, as messages
    assert any("_py2js_addTraces" in data.get("state", {}) for kind, data in comm_messages if kind == "update")


def test_figure_output_opens_with_its_figure(comm_messages):
    from lens_roles.widgets.common import FigureOutput

    out = FigureOutput(go.Figure(go.Scatter(x=[1, 2], y=[3, 4]), layout=dict(title="curve", width=1300)))
    opened = [data["state"] for kind, data in comm_messages if kind == "open"
              and data["state"].get("_model_name") == "OutputModel"]
    shown = opened[0]["outputs"][0]["data"]["application/vnd.plotly.v1+json"]
    assert shown["data"][0]["type"] == "scatter" and "width" not in shown["layout"]
    assert out.figure.layout.width is None
    out.show(go.Figure(go.Bar(x=[1], y=[2])))  # a later figure replaces it by an update
    assert out.widget.outputs[0]["data"]["application/vnd.plotly.v1+json"]["data"][0]["type"] == "bar"
