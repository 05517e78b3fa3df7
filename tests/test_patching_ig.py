"""Integrated-gradients attribution patching on the tiny model: one step is plain attribution,
many steps converge to activation patching where the straight path is the patch, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

import lens_roles as lr
from lens_roles.analysis import patching as P
from lens_roles.errors import PatchingError

pytestmark = pytest.mark.usefixtures("one_thread")

GRIDS = ("resid", "attn", "mlp", "heads", "attn_pos", "mlp_pos")


@pytest.fixture(scope="module")
def ids(tiny_model):
    """Clean token ids of a chat prompt, and a corrupt copy with three tokens replaced."""
    clean = list(lr.encode(tiny_model, [lr.Prompt("Explain an SN2 reaction.", system="You are a chemist.")])[0].tokens)
    corrupt = list(clean)
    for p in (4, 5, 6):
        corrupt[p] = (clean[p] + 37) % tiny_model.cfg.d_vocab
    return clean, corrupt


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(3)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random"})


@pytest.fixture(scope="module")
def model64(tiny_tokenizer):
    """A float64 copy of the tiny model, so Riemann sums converge visibly past float32 noise."""
    model = make_tiny_model(tiny_tokenizer, name="tiny-float64-ig")
    model.to(torch.float64)
    model.cfg.dtype = torch.float64
    return model


@pytest.mark.parametrize("metric", ["logit_diff", "margin"])
def test_one_step_is_plain_attribution_patching(tiny_model, ids, metric):
    """``method="ig", steps=1`` evaluates the gradient at the corrupt run only: the numbers of "atp"."""
    m = P.LogitDiff(11, 23) if metric == "logit_diff" else P.LogprobMargin((40, 41, 42), (50, 51))
    s = P.PatchSetup(tiny_model, ids[0], ids[1], m)
    for grid in GRIDS:
        atp, ig = s.attribution_patch(grid), s.attribution_patch(grid, method="ig", steps=1)
        torch.testing.assert_close(ig.values, atp.values, rtol=1e-6, atol=1e-7)
        assert (atp.meta["attribution"], atp.meta["steps"]) == ("atp", 1)
        assert (ig.meta["attribution"], ig.meta["steps"], ig.method) == ("ig", 1, "attribution")


def test_steps_batched_or_not_give_the_same_gradients(tiny_model, ids):
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(11, 23))
    one = s.attribution_patch("resid", method="ig", steps=6, batch_size=1)
    s2 = P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(11, 23))
    many = s2.attribution_patch("resid", method="ig", steps=6, batch_size=4)
    torch.testing.assert_close(one.values, many.values, rtol=1e-5, atol=1e-6)


def test_many_steps_converge_to_activation_patching_on_the_straight_path(model64, tiny_tokenizer):
    """Clean and corrupt differ in one token: the residual stream entering block 0 at that position
    moves along the straight path IG integrates over, so IG there converges to its activation patch
    (exactly the clean run: 1.0) like a Riemann sum, O(1/K); plain attribution misses by a lot."""
    clean = list(lr.encode(model64, [lr.Prompt("Explain an SN2 reaction.", system="You are a chemist.")])[0].tokens)
    corrupt = list(clean)
    p = 5
    corrupt[p] = (clean[p] + 37) % model64.cfg.d_vocab
    s = P.PatchSetup(model64, clean, corrupt, P.LogitDiff(11, 23))
    exact = float(s.activation_patch("resid", layers=[0]).values[0, p])
    assert exact == pytest.approx(1.0, abs=1e-12)
    errors = {k: abs(float(s.attribution_patch("resid", layers=[0], method="ig", steps=k).values[0, p]) - exact)
              for k in (1, 4, 16, 64, 256)}
    assert errors[1] > 0.02  # the model is non-linear along this path
    assert errors[256] < errors[64] < errors[16] < errors[4]
    assert errors[256] < 0.01 * errors[1] and errors[256] < 2e-3
    # the other positions do not move: exactly 0 by both methods
    ig = s.attribution_patch("resid", layers=[0], method="ig", steps=16).values[0]
    assert (ig[torch.arange(s.n_prompt) != p] == 0).all()


def test_completeness_at_the_first_layer(model64, ids):
    """Patching the whole residual stream entering the first layer is the clean run (1.0); IG's cells
    of that layer sum to it as the steps grow (completeness along the straight path), also from the
    steered layer of a steering setup."""
    s = P.PatchSetup(model64, ids[0], ids[1], P.LogprobMargin((40, 41, 42), (50, 51)))
    steer_dir = lr.Direction((0, 1, 2), torch.randn(3, model64.cfg.d_model, dtype=torch.float64), {"name": "r"})
    steered = P.steering_setup(model64, ids[0], steer_dir, 4.0, 0, P.LogitDiff(11, 23))
    for setup, first in ((s, 0), (steered, 1)):
        assert setup.patch({f"blocks.{first}.hook_resid_pre": "all"}) == 1.0
        sums = {k: float(setup.attribution_patch("resid", layers=[first], method="ig", steps=k).values.sum())
                for k in (1, 32, 512)}
        err = {k: abs(v - 1) for k, v in sums.items()}
        assert err[512] < err[32] / 8 and err[32] < err[1]  # a Riemann sum's O(1/K)
        assert err[512] < 0.05


def test_ig_equals_patching_where_the_metric_is_linear(tiny_model, ids, direction):
    """A projection read after layer 1 is linear in that layer's MLP output: every step count is exact."""
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.DirectionProjection(direction, 1))
    for grid in ("mlp", "mlp_pos"):
        act = s.activation_patch(grid)
        for steps in (1, 3, 10):
            ig = s.attribution_patch(grid, method="ig", steps=steps)
            torch.testing.assert_close(ig.values[1], act.values[1], rtol=1e-4, atol=1e-5)


def test_gradients_are_cached_per_step_count(tiny_model, ids):
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(11, 23))
    first = s.integrated_gradients(4)
    assert s.integrated_gradients(4) is first and s.integrated_gradients(5) is not first
    assert set(first) == set(s.site_names)
    assert all(first[n].shape == s._acts["corrupt", n].shape for n in s.site_names)


def test_bad_ig_input_is_one_clear_error(tiny_model, ids):
    s = P.PatchSetup(tiny_model, ids[0], ids[1], P.LogitDiff(11, 23))
    for steps in (0, -2, 1.5, True, "8"):
        with pytest.raises(PatchingError, match="steps must be an integer >= 1"):
            s.attribution_patch("resid", method="ig", steps=steps)
    with pytest.raises(PatchingError, match="attribution method must be one of atp, ig"):
        s.attribution_patch("resid", method="integrated")
    with pytest.raises(PatchingError, match="for method='ig'"):
        s.attribution_patch("resid", steps=4)
    with pytest.raises(PatchingError, match="batch_size must be an integer >= 1"):
        s.attribution_patch("resid", method="ig", steps=4, batch_size=0)
    with pytest.raises(PatchingError, match="unknown grid"):
        s.attribution_patch("neurons", method="ig", steps=4)
    assert s._ig_grads == {}  # refused before any run


def test_no_hooks_left_after_a_failing_metric_in_ig(tiny_model, ids):
    class Boom(P.Metric):
        calls = 0

        def __call__(self, model, resid, n_prompt):
            Boom.calls += 1
            if Boom.calls > 2:
                raise RuntimeError("boom")
            return resid[:, -1, 0] * Boom.calls

    s = P.PatchSetup(tiny_model, ids[0], ids[1], Boom())
    with pytest.raises(RuntimeError, match="boom"):
        s.attribution_patch("resid", method="ig", steps=3)
    # the autouse no_hook_leaks fixture checks every hook point of the tiny model after the test


# ------------------------------------------------------------------------- CLI


@pytest.fixture
def patched_cli(tiny_model, monkeypatch):
    monkeypatch.setattr("lens_roles.viz.export.find_browser", lambda: None)  # HTML only: PNG export takes seconds
    monkeypatch.setattr("lens_roles.viz.export._png_warned", True)
    from functools import partial

    from lens_roles.cli import main

    return partial(main, load_model=lambda *a, **k: tiny_model)


def test_cli_patch_with_integrated_gradients(patched_cli, tiny_model, direction, tmp_path, capsys):
    import pandas as pd

    vector = direction.save(tmp_path / "v.safetensors")
    out = tmp_path / "out"
    base = ["patch", "--clean", "Hello there", "--corrupt", "Hello here", "--metric", "projection", "--vector",
            str(vector), "--read-layer", "2"]
    assert patched_cli([*base, "--grid", "resid,mlp,attn", "--attribution", "resid=ig,mlp=ig", "--steps", "3",
                        "--out", str(out)]) == 0
    agreement = pd.read_csv(out / "agreement.csv")
    assert list(agreement.attribution) == ["ig", "ig", "atp"] and list(agreement.steps) == [3, 3, 1]
    printed = capsys.readouterr().out
    assert "IG attribution (3 steps) vs activation, resid: Pearson r" in printed
    assert "attribution vs activation, attn: Pearson r" in printed
    # the CSV holds exactly what the API gives
    setup = P.PatchSetup(tiny_model, lr.Prompt("Hello there"), lr.Prompt("Hello here"),
                         P.DirectionProjection(direction, 2))
    frame = pd.read_csv(out / "patch.csv")
    ig = frame[(frame.grid == "mlp") & (frame.method == "attribution")].value.to_numpy()
    torch.testing.assert_close(torch.tensor(ig), setup.attribution_patch("mlp", method="ig", steps=3).values,
                               rtol=1e-6, atol=1e-9)
    assert patched_cli([*base, "--attribution", "ig", "--method", "attribution", "--out", str(tmp_path / "o2")]) == 0
    assert f"ig ({P.IG_STEPS} steps)" in capsys.readouterr().out  # IG_STEPS by default


def test_cli_patch_bad_ig_options(patched_cli, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["patch", "--clean", "Hello there", "--corrupt", "Hello here", "--metric", "logit_diff", "--good", "e",
            "--bad", "o", "--out", str(out)]
    cases = [
        (["--steps", "0"], "--steps"),
        (["--steps", "4"], "pass --attribution ig"),
        (["--attribution", "integrated"], "attribution method must be one of atp, ig, got 'integrated'"),
        (["--attribution", "mlp=ig"], "grids ['mlp'] that are not patched"),
        (["--attribution", "resid=ig,=atp"], "use atp, ig, or GRID=METHOD"),
        (["--method", "activation", "--attribution", "ig"], "--method activation runs none"),
    ]
    for extra, message in cases:
        assert patched_cli([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()
