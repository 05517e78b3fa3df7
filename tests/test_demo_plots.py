"""The main job and the figures, on the tiny model (fast): files, columns, provenance."""

from __future__ import annotations

import json
import re
import warnings

import pandas as pd
import pytest

from lens_roles import Direction, viz
from lens_roles.studies.demo import run_demo


@pytest.fixture(scope="module")
def demo_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("figures")
    vectors = tmp_path_factory.mktemp("directions")
    summary = run_demo(tiny_model, out=out, directions_out=vectors, roles=["chemist", "lawyer", "nurse"],
                       steer_layers=[1], batch_size=32)
    return summary, out, vectors


def test_demo_summary_is_tidy_and_complete(demo_run, tiny_model):
    summary, out, _ = demo_run
    assert list(summary.columns) == ["direction", "kind", "layer", "metric", "value"]
    n = tiny_model.cfg.n_layers
    counts = summary.groupby(["direction", "metric"]).size()
    assert counts.loc[("librarian", "auc")] == n and counts.loc[("librarian", "split_half_cosine")] == n
    for role in ("chemist", "lawyer", "nurse"):
        assert counts.loc[(role, "norm")] == n and counts.loc[(role, "auc")] == n
        assert counts.loc[(role, "auc_vs_roles")] == n
    auc = summary[summary.metric.str.startswith("auc")].value
    assert auc.between(0, 1).all()
    pd.testing.assert_frame_equal(pd.read_csv(out / "directions_summary.csv"), summary, check_dtype=False)


def test_demo_writes_figures_with_provenance(demo_run):
    _, out, _ = demo_run
    for stem in ("direction_profile", "role_auc_heatmap", "role_specificity_heatmap", "librarian_split_half"):
        assert (out / f"{stem}.html").stat().st_size > 1000
        meta = json.loads((out / f"{stem}.json").read_text())
        assert meta["model"] == "tiny-test" and meta["positions"] == {"persona": "reply", "roles": "eoi"}
        assert "plotly.min.js" in (out / f"{stem}.html").read_text()
    assert (out / "plotly.min.js").is_file()  # the HTML works offline
    assert not list(out.glob(".tmp-*"))


def test_demo_writes_role_geometry(demo_run):
    import pandas as pd

    _, out, _ = demo_run
    for stem in ("role_cosine", "role_cosine_centred", "role_map", "role_sharing"):
        assert (out / "roles" / f"{stem}.html").stat().st_size > 1000
    cos = pd.read_csv(out / "roles" / "role_cosine.csv")
    assert len(cos) == 3 * 3 * 3  # roles × roles × layers
    near = pd.read_csv(out / "roles" / "nearest_roles.csv")
    assert set(near.role) == {"chemist", "lawyer", "nurse"} and "nearest_centred" in near


def test_demo_saves_directions_that_reload(demo_run, tiny_model):
    summary, _, vectors = demo_run
    chemist = Direction.load(vectors / "roles" / "chemist.safetensors")
    assert chemist.meta["method"] == "role_vector" and chemist.meta["positions"] == "eoi"
    norms = summary[(summary.direction == "chemist") & (summary.metric == "norm")].sort_values("layer").value
    assert list(norms.round(5)) == [round(v, 5) for v in chemist.norms().values()]
    librarian = Direction.load(vectors / "librarian.safetensors")
    assert librarian.meta["positions"] == "reply" and librarian.layers == tuple(range(tiny_model.cfg.n_layers))


def test_missing_browser_still_writes_html(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_ROLES_PNG", "1")
    monkeypatch.setattr(viz.export, "find_browser", lambda: None)
    monkeypatch.setattr(viz.export, "_png_warned", False)
    frame = pd.DataFrame({"direction": ["a", "a"], "layer": [0, 1], "metric": ["auc", "auc"], "value": [0.5, 0.9]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = viz.save_figure(viz.line_by_layer(frame, title="t"), tmp_path / "fig", meta={"model": "m"})
    assert (tmp_path / "fig.html").is_file() and not (tmp_path / "fig.png").exists()
    assert tmp_path / "fig.html" in written
    assert any("no Chrome/Chromium" in str(w.message) for w in caught)


def test_heatmap_orders_rows_by_peak_layer():
    frame = pd.DataFrame({
        "direction": ["late"] * 3 + ["early"] * 3,
        "layer": [0, 1, 2] * 2,
        "metric": ["auc"] * 6,
        "value": [0.5, 0.6, 0.9, 0.9, 0.6, 0.5],
    })
    fig = viz.layer_heatmap(frame, metric="auc")
    assert list(fig.data[0].y) == ["early", "late"]
    assert list(viz.layer_heatmap(frame, metric="auc", order="mean").data[0].y) == ["early", "late"]
    assert fig.data[0].z.tolist() == [[0.9, 0.6, 0.5], [0.5, 0.6, 0.9]]


def test_demo_writes_the_steering_study(demo_run):
    _, out, _ = demo_run
    steering = out / "steering"
    sweep = pd.read_csv(steering / "sweep.csv")
    assert list(sweep.columns[:4]) == ["layer", "alpha", "metric", "value"]
    assert set(sweep.metric) == {"cosine", "logprob_margin", "kl_from_unsteered", "perplexity", "repetition"}
    assert set(sweep.alpha) == {-0.5, -0.25, 0.0, 0.25, 0.5} and set(sweep.layer) == {1}
    assert (sweep[(sweep.metric == "cosine") & (sweep.alpha == 0)].value == 1.0).all()
    generations = pd.read_csv(steering / "generations.csv")
    assert len(generations) == 3 * 5
    meta = json.loads((steering / "steering_behaviour.json").read_text())
    assert meta["eval_pairs"]["n"] == 72 - 54  # the pairs held out from the persona vector
    for stem in ("cosine_vs_alpha_layer1", "steering_behaviour"):
        assert (steering / f"{stem}.html").is_file()
        assert json.loads((steering / f"{stem}.json").read_text())["alpha_mode"].startswith("relative")


def test_figures_in_subfolders_share_one_plotly_js(tmp_path):
    import plotly.graph_objects as go

    from lens_roles.viz import save_figure

    save_figure(go.Figure(), tmp_path / "top", png=False)
    save_figure(go.Figure(), tmp_path / "a" / "b" / "deep", png=False)
    assert (tmp_path / "plotly.min.js").is_file() and not (tmp_path / "a" / "b" / "plotly.min.js").exists()
    assert 'src="../../plotly.min.js"' in (tmp_path / "a" / "b" / "deep.html").read_text()


def test_a_hanging_browser_is_given_up_and_html_kept(tmp_path, monkeypatch):
    import time

    import plotly.graph_objects as go

    from lens_roles import viz

    monkeypatch.setenv("LENS_ROLES_PNG", "1")
    monkeypatch.setattr(viz.export, "find_browser", lambda: "/usr/bin/true")
    monkeypatch.setattr(viz.export, "PNG_TIMEOUT", 0.2)
    monkeypatch.setattr(viz.export, "_session", None)
    monkeypatch.setattr(viz.export, "_session_failed", True)  # the one-off export, a browser per figure
    monkeypatch.setattr(go.Figure, "to_image", lambda self, *a, **k: time.sleep(0.6) or b"late png")
    with pytest.warns(UserWarning, match="did not finish within 0.2 s"):
        viz.save_figure(go.Figure(), tmp_path / "fig")
    assert (tmp_path / "fig.html").is_file() and not (tmp_path / "fig.png").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    # the abandoned export finishes later: it must not write anything after the deadline
    before = sorted(tmp_path.iterdir())
    time.sleep(1.0)
    assert sorted(tmp_path.iterdir()) == before


def test_a_hanging_browser_session_is_given_up_and_dropped(tmp_path, monkeypatch):
    """The kept-open browser: a figure it does not render in time is given up (HTML kept, nothing written
    late) and the session is dropped, so that the next figure opens a new one."""
    import asyncio
    import threading
    import time

    import plotly.graph_objects as go

    from lens_roles import viz

    class SlowBrowser:
        async def calc_fig(self, *args, **kwargs):
            await asyncio.sleep(0.6)
            return b"late png"

        async def close(self):
            return None

    session = object.__new__(viz.export.BrowserSession)
    session.loop = asyncio.new_event_loop()
    threading.Thread(target=session.loop.run_forever, daemon=True).start()
    session.browser = SlowBrowser()
    monkeypatch.setenv("LENS_ROLES_PNG", "1")
    monkeypatch.setattr(viz.export, "find_browser", lambda: "/usr/bin/true")
    monkeypatch.setattr(viz.export, "PNG_TIMEOUT", 0.2)
    monkeypatch.setattr(viz.export, "_session", session)
    monkeypatch.setattr(viz.export, "_session_failed", False)
    with pytest.warns(UserWarning, match="did not finish within 0.2 s"):
        viz.save_figure(go.Figure(), tmp_path / "fig")
    assert viz.export._session is None
    assert (tmp_path / "fig.html").is_file() and not (tmp_path / "fig.png").exists()
    before = sorted(tmp_path.iterdir())
    time.sleep(1.0)
    assert sorted(tmp_path.iterdir()) == before and not session.loop.is_running()


@pytest.mark.skipif(viz.export.find_browser() is None, reason="needs a Chrome/Chromium")
def test_browser_session_renders_what_to_image_renders(monkeypatch):
    """One browser kept open gives the PNG bytes of plotly's one-off export, figure after figure."""
    monkeypatch.delenv("BROWSER_PATH", raising=False)  # other tests may have left a fake one
    monkeypatch.setenv("BROWSER_PATH", viz.export.find_browser())
    frame = pd.DataFrame({"direction": ["a"] * 3 + ["b"] * 3, "layer": [0, 1, 2] * 2, "metric": ["auc"] * 6,
                          "value": [0.5, 0.6, 0.9, 0.9, 0.6, 0.5]})
    figures = [viz.line_by_layer(frame, title="t"), viz.layer_heatmap(frame, metric="auc")]
    session = viz.export.BrowserSession()
    try:
        assert [session.render(f, 2.0) for f in figures] == [f.to_image(format="png", scale=2.0) for f in figures]
    finally:
        session.close()


def test_png_switch(tmp_path, monkeypatch):
    import plotly.graph_objects as go

    from lens_roles import viz

    calls = []
    monkeypatch.setattr(viz.export, "find_browser", lambda: calls.append(1) or None)
    monkeypatch.setenv("LENS_ROLES_PNG", "0")
    viz.save_figure(go.Figure(), tmp_path / "fig")
    assert not calls and (tmp_path / "fig.html").is_file()


def test_demo_progress_goes_to_stderr_only(tiny_model, tmp_path, capsys):
    """Every phase shows a tqdm bar on stderr; stdout holds the report alone, and the CSVs no trace of either."""
    kw = dict(roles=["chemist", "lawyer"], steer_layers=[1], batch_size=32)
    quiet = run_demo(tiny_model, out=tmp_path / "q", directions_out=tmp_path / "qv", progress=False, **kw)
    out, err = capsys.readouterr()
    assert err == "" and "demo finished" in out
    summary = run_demo(tiny_model, out=tmp_path / "f", directions_out=tmp_path / "v", progress=True, **kw)
    shown, err = capsys.readouterr()
    assert shown.splitlines()[:-1] == out.splitlines()[:-1]  # the same report (the last line has the time)
    assert "%|" not in shown and "\r" not in shown
    for phase in ("activations", "held-out AUCs", "figures", "role geometry"):
        assert f"{phase}: 100%|" in err
    # the steering phase comes last: residual norms, the sweeps and the generations, a bar each at least
    steering = err[err.index("role geometry: 100%|") + len("role geometry"):]
    assert len(set(re.findall(r"([^\r\n:]+): +\d+%\|", steering)) - {"role geometry"}) >= 3
    pd.testing.assert_frame_equal(summary, quiet)
    for csv in (tmp_path / "f").rglob("*.csv"):
        assert "%|" not in csv.read_text()


def test_a_rerun_writes_the_same_files(demo_run, tiny_model, tmp_path):
    """``make demo`` twice leaves ``git status`` clean: every file of a second run, figures and vectors,
    is byte-identical to the first run's (no random div ids, values to the precision they carry)."""
    _, out, vectors = demo_run
    timings: dict = {}
    run_demo(tiny_model, out=tmp_path / "f", directions_out=tmp_path / "d", roles=["chemist", "lawyer", "nurse"],
             steer_layers=[1], batch_size=32, timings=timings)
    for first, second in ((out, tmp_path / "f"), (vectors, tmp_path / "d")):
        files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
        changed = [str(f) for f in files if (first / f).read_bytes() != (second / f).read_bytes()]
        assert not changed
    assert list(timings) == ["persona", "role activations", "role vectors", "held-out AUCs", "figures",
                             "role geometry", "steering"]
    assert all(t >= 0 for t in timings.values())


def test_figure_files_round_float_noise_and_use_a_fixed_div_id(tmp_path):
    import numpy as np
    import plotly.graph_objects as go

    from lens_roles.io import write_csv

    z = np.float32([[0.1234567, 0.7654321], [1e-9, 12345.678]])
    noisy = np.nextafter(z, np.float32(1))  # the last bit of every value differs
    for name, values in (("a", z), ("b", noisy)):
        fig = go.Figure(go.Heatmap(z=values))
        viz.save_figure(fig, tmp_path / name / "fig", meta={"norm": float(values[0, 0])}, png=False)
        write_csv(pd.DataFrame({"v": values.ravel(), "k": range(4)}), tmp_path / name / "t.csv")
    for file in ("fig.html", "fig.json", "t.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    html = (tmp_path / "a" / "fig.html").read_text()
    assert 'id="lens-roles-fig"' in html and "[[0.123457,0.765432],[1e-09,12345.7]]" in html
    assert json.loads((tmp_path / "a" / "fig.json").read_text()) == {"norm": 0.123457}
    assert pd.read_csv(tmp_path / "a" / "t.csv").v.tolist() == [0.123457, 0.765432, 1e-09, 12345.7]


def test_round_significant_leaves_non_floats_alone():
    import numpy as np

    from lens_roles.io import round_significant

    value = {"a": (1, 2.123456789), "b": True, "c": "x", "d": np.arange(3), "e": float("nan"), "f": [np.float32(0.5)]}
    out = round_significant(value, 3)
    assert out["a"] == [1, 2.12] and out["b"] is True and out["c"] == "x" and out["d"] is value["d"]
    assert out["e"] != out["e"] and out["f"] == [0.5]
