"""Activation and attribution patching on the tiny model: exact algebra, parity with
TransformerLens's own ``patching`` module, the gradient approximation, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import _MODELS, make_tiny_model

import lens_roles as lr
from lens_roles.analysis import patching as P
from lens_roles.errors import PatchingError

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "You are a chemist."
USER = "Explain the mechanism of an SN2 reaction."




@pytest.fixture(scope="module")
def ids(tiny_model):
    """Clean token ids of a chat prompt, and a corrupt copy with three tokens replaced."""
    clean = list(lr.encode(tiny_model, [lr.Prompt(USER, system=SYSTEM)])[0].tokens)
    corrupt = list(clean)
    for p in (4, 5, 6):
        corrupt[p] = (clean[p] + 37) % tiny_model.cfg.d_vocab
    return clean, corrupt


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(3)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random", "dataset": {"positive": "abc"}})


def metrics(direction):
    return {
        "logit_diff": P.LogitDiff(11, 23),
        "logprob_margin": P.LogprobMargin((40, 41, 42), (50, 51)),
        "projection": P.DirectionProjection(direction, 1),
    }


@pytest.fixture(scope="module")
def setup(tiny_model, ids):
    return P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(11, 23))


# ----------------------------------------------------------------- exact algebra


@pytest.mark.parametrize("kind", ["logit_diff", "logprob_margin", "projection"])
def test_whole_layer0_residual_is_exactly_one_and_nothing_exactly_zero(tiny_model, ids, direction, kind):
    s = P.PatchSetup(tiny_model, ids[0], ids[1], metrics(direction)[kind])
    assert s.patch({"blocks.0.hook_resid_pre": "all"}) == 1.0
    assert s.patch({}) == 0.0
    # and in the metric's own units: the clean and the corrupt run, bit for bit
    assert s.patch({"blocks.0.hook_resid_pre": "all"}, normalise=False) == s.clean_value
    assert s.patch({}, normalise=False) == s.corrupt_value


def test_positions_before_the_first_difference_are_exactly_zero(setup):
    res = setup.activation_patch("resid")
    assert res.meta["skipped_identical_cells"] > 0
    assert (res.values[:, :4] == 0).all()  # prompts agree on positions 0..3 at every layer
    assert (res.values[0, 7:] == 0).all()  # embeddings agree after the replaced tokens


def test_batched_equals_unbatched_equals_single_patch(setup):
    one = setup.activation_patch("resid", batch_size=1)
    many = setup.activation_patch("resid", batch_size=7)
    torch.testing.assert_close(one.values, many.values, rtol=0, atol=1e-5)
    for layer, pos in [(1, 5), (2, setup.n_prompt - 1)]:
        single = setup.patch({f"blocks.{layer}.hook_resid_pre": [pos]})
        assert single == pytest.approx(float(many.values[layer, pos]), abs=1e-5)


def test_all_heads_at_all_positions_equal_the_attention_output(setup):
    for layer in range(setup.read_layer + 1):
        z = setup.patch({f"blocks.{layer}.attn.hook_z": "all"})
        out = setup.patch({f"blocks.{layer}.hook_attn_out": "all"})
        assert z == pytest.approx(out, abs=1e-5)
    attn = setup.activation_patch("attn")
    torch.testing.assert_close(attn.values, torch.tensor(
        [setup.patch({f"blocks.{layer}.hook_attn_out": "all"}) for layer in range(3)], dtype=torch.float64),
        rtol=0, atol=1e-5)


# ------------------------------------------------------- parity with TransformerLens


def _tl_normalised(model, clean_tokens, corrupt_tokens, metric_fn, patch_fn):
    _, clean_cache = model.run_with_cache(clean_tokens)
    with torch.no_grad():
        clean_value = float(metric_fn(model(clean_tokens)))
        corrupt_value = float(metric_fn(model(corrupt_tokens)))
    raw = patch_fn(model, corrupt_tokens, clean_cache, metric_fn)
    return (raw.double() - corrupt_value) / (clean_value - corrupt_value)


@pytest.mark.parametrize("grid, tl_name", [
    ("resid", "get_act_patch_resid_pre"),
    ("attn_pos", "get_act_patch_attn_out"),
    ("mlp_pos", "get_act_patch_mlp_out"),
    ("heads", "get_act_patch_attn_head_out_all_pos"),
])
def test_grids_match_transformer_lens_patching(tiny_model, ids, setup, grid, tl_name):
    import transformer_lens.patching as tlp

    a, b = 11, 23

    def metric_fn(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    expected = _tl_normalised(tiny_model, torch.tensor([ids[0]]), torch.tensor([ids[1]]), metric_fn,
                              getattr(tlp, tl_name))
    ours = setup.activation_patch(grid)
    torch.testing.assert_close(ours.values, expected, rtol=0, atol=1e-4)


def test_two_continuation_margin_matches_transformer_lens(tiny_model, ids):
    """Two rows (prompt + good, prompt + bad); TransformerLens patches both rows at each prompt position."""
    import transformer_lens.patching as tlp

    good, bad = [40, 41, 42], [50, 51]
    n = len(ids[0])

    def rows(prompt):
        return torch.tensor([prompt + good, prompt + bad + [0]])  # right-padded

    def metric_fn(logits):
        logp = torch.log_softmax(logits.float(), -1)
        g = logp[0, torch.arange(n - 1, n + 2), good].mean()
        b_ = logp[1, torch.arange(n - 1, n + 1), bad].mean()
        return g - b_

    expected = _tl_normalised(tiny_model, rows(ids[0]), rows(ids[1]), metric_fn, tlp.get_act_patch_resid_pre)
    ours = P.PatchSetup(tiny_model, ids[0], ids[1], P.LogprobMargin(tuple(good), tuple(bad))).activation_patch()
    torch.testing.assert_close(ours.values, expected[:, :n], rtol=0, atol=1e-4)


# ------------------------------------------------------------- attribution patching


@pytest.fixture(scope="module")
def model64(tiny_tokenizer):
    """A float64 copy of the tiny model, so finite differences are accurate."""
    model = make_tiny_model(tiny_tokenizer, name="tiny-float64")
    model.to(torch.float64)
    model.cfg.dtype = torch.float64
    return model


def test_attribution_is_the_exact_first_order_term(model64, ids):
    """Central finite differences of m(corrupt + ε·(clean − corrupt)) at single sites."""
    s = P.PatchSetup(model64, ids[0], ids[1], P.LogitDiff(11, 23))
    resid = s.attribution_patch("resid")
    heads = s.attribution_patch("heads")
    eps = 1e-4

    def directional(name, mask):
        def run(t):
            clean, corrupt = s._acts["clean", name], s._acts["corrupt", name]

            def hook(acts, hook):
                return torch.where(mask[..., None], corrupt + t * (clean - corrupt), acts)

            with torch.no_grad(), model64.hooks(fwd_hooks=[(name, hook)]):
                return float(s.metric(model64, model64(s._inputs["corrupt"], stop_at_layer=3), s.n_prompt))

        return (run(eps) - run(-eps)) / (2 * eps) / (s.clean_value - s.corrupt_value)

    for layer, pos in [(0, 5), (1, 6), (2, 5), (2, s.n_prompt - 1)]:
        mask = torch.zeros(s.n_prompt, dtype=torch.bool)
        mask[pos] = True
        assert float(resid.values[layer, pos]) == pytest.approx(directional(f"blocks.{layer}.hook_resid_pre", mask),
                                                                rel=1e-6, abs=1e-9)
    mask = torch.zeros(s.n_prompt, model64.cfg.n_heads, dtype=torch.bool)
    mask[:, 2] = True
    assert float(heads.values[1, 2]) == pytest.approx(directional("blocks.1.attn.hook_z", mask), rel=1e-6)


def test_attribution_equals_patching_where_the_metric_is_linear(tiny_model, ids, direction):
    """A projection read after layer 1 is linear in that layer's MLP output (its last term)."""
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.DirectionProjection(direction, 1))
    for grid in ("mlp", "mlp_pos"):
        act, att = s.activation_patch(grid), s.attribution_patch(grid)
        torch.testing.assert_close(att.values[1], act.values[1], rtol=1e-4, atol=1e-5)
        assert abs(float(att.values[1].sum()) - float(act.values[1].sum())) < 1e-4


def test_agreement_table(setup):
    grids = ["resid", "attn", "heads"]
    frame = P.patch_agreement([setup.activation_patch(g) for g in grids], [setup.attribution_patch(g) for g in grids])
    assert list(frame.grid) == grids
    assert frame.pearson.between(-1, 1).all()
    assert list(frame.cells) == [3 * setup.n_prompt, 3, 12]


# --------------------------------------------------------------- steering effect


def test_steering_effect_lives_downstream_only(tiny_model, ids, direction):
    metric = P.LogprobMargin((40, 41, 42), (50, 51))
    s = P.steering_setup(tiny_model, ids[0], direction, 4.0, 0, metric)
    assert s.patch({"blocks.1.hook_resid_pre": "all"}) == 1.0  # the steered residual stream, exactly
    assert s.patch({"blocks.0.hook_resid_pre": "all", "blocks.0.hook_mlp_out": "all"}) == 0.0
    default = s.activation_patch("resid")
    assert default.labels[0] == (1, 2)  # downstream of the steering layer by default
    full = s.activation_patch("resid", layers=[0, 1, 2])
    assert (full.values[0] == 0).all() and (s.attribution_patch("mlp", layers=[0, 1, 2]).values[0] == 0)
    assert s.meta["steering"]["convention"].startswith("clean = steered")


def test_steering_with_a_metric_read_upstream_is_refused(tiny_model, ids, direction):
    with pytest.raises(PatchingError, match="downstream of the steering"):
        P.steering_setup(tiny_model, ids[0], direction, 4.0, 1, P.DirectionProjection(direction, 1))


# ----------------------------------------------------------------------- result


def test_result_frame_and_labels(setup, direction):
    res = setup.activation_patch("resid", layers=[1, 2], positions=[4, 5, -1])
    assert res.values.shape == (2, 3) and res.labels == ((1, 2), (4, 5, setup.n_prompt - 1))
    frame = res.to_frame()
    assert list(frame.columns) == ["grid", "method", "metric", "layer", "pos", "head", "token", "corrupt_token",
                                   "value", "raw"]
    assert len(frame) == 6 and frame["head"].isna().all()
    assert list(frame.token[:3]) == [setup.tokens[4], setup.tokens[5], setup.tokens[-1]]
    torch.testing.assert_close(torch.tensor(frame.raw.values), res.raw.flatten())
    assert res.top(2).value.abs().tolist() == sorted(frame.value.abs(), reverse=True)[:2]
    heads = setup.activation_patch("heads", heads=[0, 3]).to_frame()
    assert heads["pos"].isna().all() and sorted(heads["head"].unique()) == [0, 3]
    for key in ("model", "metric", "clean_tokens_hash", "template", "prepend_bos", "normalisation", "lens_roles"):
        assert key in res.meta
    import json

    projection = P.PatchSetup(setup.model, setup.clean_ids, setup.corrupt_ids, P.DirectionProjection(direction, 2))
    assert json.loads(json.dumps(projection.activation_patch("attn").meta))["metric"]["direction_dataset"] == {
        "positive": "abc"}


# -------------------------------------------------------------------- bad input


def test_different_lengths_are_explained_and_align_fixes_them(tiny_model):
    clean = lr.Prompt(USER, system="You are a chemist.")
    corrupt = lr.Prompt(USER, system="You are a helpful and friendly general assistant.")
    n_clean = len(lr.encode(tiny_model, [clean])[0])
    n_corrupt = len(lr.encode(tiny_model, [corrupt])[0])
    assert n_clean != n_corrupt
    with pytest.raises(PatchingError) as err:
        P.PatchSetup(tiny_model, clean, corrupt, P.LogitDiff(11, 23))
    msg = str(err.value)
    assert f"clean {n_clean} tokens" in msg and f"corrupt {n_corrupt} tokens" in msg
    assert "align=True" in msg and "'<|im_start|>'" in msg
    s = P.PatchSetup(tiny_model, clean, corrupt, P.LogitDiff(11, 23), align=True)
    assert s.n_prompt == max(n_clean, n_corrupt) and s.meta["aligned_with_filler"] == " ."
    a, b = P.align_prompts(tiny_model, clean, corrupt)
    assert a.system.startswith("You are a chemist. .") and b == corrupt
    with pytest.raises(PatchingError, match="token ids"):
        P.align_prompts(tiny_model, [1, 2], [1, 2, 3])
    with pytest.raises(PatchingError, match="clean 2 tokens .* corrupt 3 tokens .* pad or cut the token ids"):
        P.PatchSetup(tiny_model, [1, 2], [1, 2, 3], P.LogitDiff(11, 23), align=True)


def test_metric_that_cannot_depend_on_the_site_is_refused(tiny_model, ids, direction):
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.DirectionProjection(direction, 1, position=8))
    assert s.activation_patch("resid").labels == ((0, 1), tuple(range(9)))  # defaults stop at the read point
    with pytest.raises(PatchingError, match="does not depend on"):
        s.activation_patch("resid", layers=[1, 2])
    with pytest.raises(PatchingError, match="does not depend on"):
        s.attribution_patch("mlp", layers=[2])
    with pytest.raises(PatchingError, match="does not depend on"):
        s.patch({"blocks.2.hook_attn_out": "all"})
    with pytest.raises(PatchingError, match="comes after it"):
        s.activation_patch("resid", positions=[3, 12])
    with pytest.raises(PatchingError, match="outside the prompt"):
        s.activation_patch("resid", positions=[400])


def test_same_metric_value_is_refused(tiny_model, ids):
    with pytest.raises(PatchingError, match="same .* normalised patching .* undefined"):
        P.PatchSetup(tiny_model, ids[0], list(ids[0]), P.LogitDiff(11, 23))


def test_unknown_grid_and_bad_sites(setup):
    with pytest.raises(PatchingError, match="unknown grid 'neurons'; use one of resid, attn, mlp, heads"):
        setup.activation_patch("neurons")
    with pytest.raises(PatchingError, match="unknown grid"):
        setup.attribution_patch("resid_post")
    with pytest.raises(PatchingError, match="not a patchable site"):
        setup.patch({"blocks.0.hook_resid_mid": "all"})
    with pytest.raises(PatchingError, match="heads"):
        setup.activation_patch("heads", heads=[9])
    with pytest.raises(lr.ModelError, match="out of range"):
        setup.activation_patch("resid", layers=[7])


def test_bad_metrics(tiny_model, tiny_tokenizer, ids):
    multi = next(w for w in (" chemistry", " mechanism", " reaction") if len(tiny_tokenizer(w)["input_ids"]) > 1)
    with pytest.raises(PatchingError, match="not one"):
        P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(multi, 3))
    with pytest.raises(PatchingError, match="identical"):
        P.LogprobMargin(" yes", " yes")
    with pytest.raises(PatchingError, match="Metric"):
        P.PatchSetup(tiny_model, ids[0], ids[1], lambda logits: logits[0, -1, 0])
    with pytest.raises(lr.DirectionError, match="no vector for layer 5"):
        P.DirectionProjection(lr.Direction((0,), torch.ones(1, 32)), 5)


def test_no_hooks_left_after_a_failing_metric(tiny_model, ids):
    class Boom(P.Metric):
        calls = 0

        def __call__(self, model, resid, n_prompt):
            Boom.calls += 1
            if Boom.calls > 2:
                raise RuntimeError("boom")
            return resid[:, -1, 0] * Boom.calls

    s = P.PatchSetup(tiny_model, ids[0], ids[1], Boom())
    with pytest.raises(RuntimeError, match="boom"):
        s.activation_patch("resid")
    with pytest.raises(RuntimeError, match="boom"):
        s.attribution_patch("resid")
    assert tiny_model in _MODELS  # the autouse fixture checks every hook point after the test


# ------------------------------------------------------------------ plots and CLI


def test_heatmap_has_token_labels_and_a_centred_scale(setup):
    from lens_roles import viz

    results = [setup.activation_patch(g) for g in ("resid", "attn", "mlp", "heads")]
    results += [setup.attribution_patch(g) for g in ("resid", "attn", "mlp", "heads")]
    fig = viz.patch_heatmap(results)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == 6  # (resid, attn+mlp, heads) × (activation, attribution)
    resid = heatmaps[0]
    assert len(resid.x) == setup.n_prompt and len(set(resid.x)) == setup.n_prompt
    differing = [p for p in range(setup.n_prompt) if setup.tokens[p] != setup.corrupt_tokens[p]]
    assert resid.x[differing[0]] == f"{differing[0]} {setup.tokens[differing[0]]}|{setup.corrupt_tokens[differing[0]]}"
    assert list(heatmaps[1].x) == ["attn", "mlp"] and list(heatmaps[2].x) == ["0", "1", "2", "3"]
    for axis, method in (("coloraxis", "activation"), ("coloraxis2", "attribution")):
        ca = fig.layout[axis]
        bound = max(float(r.values.abs().max()) for r in results if r.method == method)
        assert ca.cmin == -ca.cmax and ca.cmax == pytest.approx(bound) and ca.cmid == 0
    mixed = viz.patch_heatmap([setup.activation_patch("attn"), setup.attribution_patch("resid")])
    assert [t.type for t in mixed.data] == ["heatmap", "heatmap"]
    first_shown = mixed.layout["yaxis" + mixed.data[0].yaxis[1:]]  # activation row: only its attn panel is shown
    assert first_shown.showticklabels and first_shown.title.text == "layer"
    assert [a.text for a in mixed.layout.annotations if a.text] == ["activation: attn",
                                                                    "attribution: residual stream (resid_pre)"]
    scatter = viz.patch_scatter(results)
    assert [a.text.split(" (")[0] for a in scatter.layout.annotations] == ["resid", "attn", "mlp", "heads"]


@pytest.fixture
def patched_cli(tiny_model, monkeypatch):
    monkeypatch.setattr("lens_roles.viz.export.find_browser", lambda: None)  # HTML only: PNG export takes seconds
    monkeypatch.setattr("lens_roles.viz.export._png_warned", True)
    from functools import partial

    from lens_roles.cli import main

    return partial(main, load_model=lambda *a, **k: tiny_model)


def test_cli_patch_writes_results_and_figures(patched_cli, tiny_model, direction, tmp_path, capsys):
    import pandas as pd

    vector = direction.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    argv = ["patch", "--clean", USER, "--corrupt", USER, "--clean-system", "You are a chemist.",
            "--corrupt-system", "You are a helpful and friendly general assistant.", "--align",
            "--metric", "projection", "--vector", str(vector), "--read-layer", "2", "--grid", "resid,attn,heads",
            "--out", str(out)]
    assert patched_cli(argv) == 0
    frame = pd.read_csv(out / "patch.csv")
    assert set(frame.grid) == {"resid", "attn", "heads"} and set(frame.method) == {"activation", "attribution"}
    agreement = pd.read_csv(out / "agreement.csv")
    assert list(agreement.grid) == ["resid", "attn", "heads"]
    assert {p.name for p in out.glob("*.html")} == {"patch_resid.html", "patch_attn.html", "patch_heads.html",
                                                     "patch_overview.html", "attribution_vs_activation.html"}
    assert "Pearson r" in capsys.readouterr().out
    assert patched_cli(["patch", "--clean", "Hello there", "--corrupt", "Hello here", "--metric", "logit_diff",
                        "--good", "e", "--bad", "o", "--method", "attribution", "--out", str(tmp_path / "o2")]) == 0


def test_cli_patch_bad_input(patched_cli, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--metric", "logprob_margin", "--good", " Sure", "--bad", " No", "--out", str(out)]
    assert patched_cli(["patch", "--clean", USER, "--corrupt", USER, "--grid", "resid,neurons", *base]) == 2
    assert "unknown grid 'neurons'" in capsys.readouterr().err
    assert patched_cli(["patch", "--clean", USER, "--corrupt", USER, "--clean-system", "You are a chemist.",
                        "--corrupt-system", "You are a helpful and friendly general assistant.", *base]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("lens-roles patch: error: clean and corrupt prompts have different token lengths")
    assert "--align" in err
    assert patched_cli(["patch", "--clean", USER, "--corrupt", USER, *base]) == 2
    assert "normalised patching (0 = corrupt, 1 = clean) is undefined" in capsys.readouterr().err
    assert patched_cli(["patch", "--clean", "a", "--corrupt", "b", "--metric", "projection", "--out", str(out)]) == 2
    assert "needs --vector" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------ real model


@pytest.mark.integration
def test_default_model_patching_is_exact_and_matches_transformer_lens(real_model):
    """On SmolLM2: exact 0 and 1, and TransformerLens's own patching on a few residual cells."""
    import pandas as pd
    import transformer_lens.patching as tlp

    user = "Tell me about your work."
    s = lr.PatchSetup(real_model, lr.Prompt(user, system="You are a chemist."),
                      lr.Prompt(user, system="You are an assistant."), lr.LogitDiff(" chemist", " assistant"))
    assert s.patch({"blocks.0.hook_resid_pre": "all"}) == 1.0 and s.patch({}) == 0.0
    layers, positions = [0, 14, 29], [6, s.n_prompt - 1]
    ours = s.activation_patch("resid", layers=layers, positions=positions)
    a, b = s.metric.ids(real_model)
    with torch.no_grad():
        _, cache = real_model.run_with_cache(torch.tensor([s.clean_ids]))
        raw = tlp.generic_activation_patch(
            real_model, torch.tensor([s.corrupt_ids]), cache, lambda logits: logits[0, -1, a] - logits[0, -1, b],
            patch_setter=tlp.layer_pos_patch_setter, activation_name="resid_pre",
            index_df=pd.DataFrame([(lay, p) for lay in layers for p in positions], columns=["layer", "pos"]))
    print("ours:", ours.values.flatten().tolist(), "TransformerLens:", s.normalise(raw).tolist())
    torch.testing.assert_close(ours.values.flatten(), s.normalise(raw), rtol=0, atol=1e-3)
    attn = s.activation_patch("attn", layers=[27, 28, 29])
    assert float(attn.values[-1]) == pytest.approx(s.patch({"blocks.29.hook_attn_out": "all"}), abs=1e-4)
