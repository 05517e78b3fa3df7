"""SAE features on the tiny model: the splice, alignment, decomposition, attribution
against finite differences and ablation, training with sae_lens, cards, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model

import lens_roles as lr
from lens_roles import cli
from lens_roles.analysis.sae.cards import feature_cards, write_cards
from lens_roles.analysis.sae.core import check_sae, decoder_directions, harvest, identity_sae, load_sae, spliced
from lens_roles.analysis.sae.features import (
    ProjectionMetric,
    ablate_features,
    ablation_check,
    attribute_features,
    decompose,
    feature_alignment,
    metric_values,
)
from lens_roles.analysis.sae.quality import sae_quality
from lens_roles.analysis.sae.training import SAETrainConfig, save_sae, train_sae
from lens_roles.errors import ConfigError, SAEError

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [lr.Prompt("Where can I find books about the history of our town?", system="You are a helpful librarian."),
           lr.Prompt("Explain the mechanism of an SN2 reaction.", system="You are a chemist."),
           lr.Prompt("What should I read next?"),
           lr.Prompt("How do I renew a loan?", reply="You can renew it at the desk or online.")]




def random_sae(d_model: int, layer: int, *, d_sae: int = 48, seed: int = 0, dtype=torch.float32):
    """A TopK SAE with random weights (k = 8) reading ``blocks.{layer}.hook_resid_post``."""
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=8, metadata=SAEMetadata(
        model_name="tiny-test", hook_name=f"blocks.{layer}.hook_resid_post")))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_model, d_sae) / d_model ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_model))
        sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
        sae.b_dec.copy_(torch.randn(d_model) * 0.1)
    return sae.to(dtype)


@pytest.fixture(scope="module")
def direction(tiny_model):
    torch.manual_seed(5)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random"})


@pytest.fixture(scope="module")
def model64(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, name="tiny-test")
    model.to(torch.float64)
    model.cfg.dtype = torch.float64
    return model


def _tokens(model):
    return [list(it.tokens) for it in lr.encode(model, PROMPTS)]


# ----------------------------------------------------------------- the splice


def test_identity_sae_splice_leaves_logits_unchanged(tiny_model):
    sae = identity_sae(tiny_model.cfg.d_model, layer=1)
    tokens = torch.tensor([_tokens(tiny_model)[0]])
    with torch.no_grad():
        clean = tiny_model(tokens)
        with spliced(tiny_model, sae):
            spliced_logits = tiny_model(tokens)
    torch.testing.assert_close(spliced_logits, clean, rtol=0, atol=1e-6)


def test_error_term_splice_is_the_clean_run_and_without_it_is_not(tiny_model):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    tokens = torch.tensor([_tokens(tiny_model)[1]])
    with torch.no_grad():
        clean = tiny_model(tokens)
        with spliced(tiny_model, sae, error_term=True):
            with_error = tiny_model(tokens)
        with spliced(tiny_model, sae):
            without = tiny_model(tokens)
    torch.testing.assert_close(with_error, clean, rtol=1e-5, atol=1e-5)
    assert (without - clean).abs().max() > 1e-2
    # position 0 is never touched, so its logits are the clean ones even without the error term
    torch.testing.assert_close(without[:, 0], clean[:, 0], rtol=0, atol=0)


def test_splice_hooks_are_removed_also_when_the_body_raises(tiny_model):
    sae = random_sae(tiny_model.cfg.d_model, 2)
    with pytest.raises(RuntimeError, match="boom"):
        with spliced(tiny_model, sae):
            raise RuntimeError("boom")
    assert not tiny_model.hook_dict["blocks.2.hook_resid_post"]._forward_hooks


# ----------------------------------------------------------------- alignment and decomposition


def test_alignment_equals_a_direct_cosine(tiny_model, direction):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    frame = feature_alignment(sae, direction)
    v = direction[1]
    direct = torch.nn.functional.cosine_similarity(sae.W_dec.detach(), v[None].expand_as(sae.W_dec), dim=-1)
    assert len(frame) == sae.cfg.d_sae
    assert list(frame.feature) == torch.argsort(direct, descending=True).tolist()
    torch.testing.assert_close(torch.tensor(frame.cosine.to_numpy().copy()), direct[frame.feature.to_numpy().copy()],
                               rtol=1e-5, atol=1e-6)
    assert feature_alignment(sae, direction, top=5).feature.tolist() == frame.feature.head(5).tolist()


def test_decomposition_reconstructs_to_its_reported_residual(tiny_model, direction):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    dec = decompose(sae, direction, max_features=6)
    rows = decoder_directions(sae).double()
    recon = torch.tensor(dec.coefficients, dtype=torch.float64) @ rows[list(dec.features)]
    v = direction[1].double()
    assert all(c > 0 for c in dec.coefficients) and len(dec.features) <= 6
    assert float((v - recon).norm()) == pytest.approx(dec.residual, rel=1e-6)
    assert dec.relative_residual == pytest.approx(dec.residual / float(v.norm()), rel=1e-9)
    assert dec.steps[-1] == pytest.approx(dec.relative_residual, rel=1e-6)
    assert all(b <= a + 1e-12 for a, b in zip(dec.steps, dec.steps[1:]))  # refitting never loses ground


def test_decomposition_refuses_no_features(tiny_model, direction):
    with pytest.raises(SAEError, match="max_features must be >= 1, got 0"):
        decompose(random_sae(tiny_model.cfg.d_model, 1), direction, max_features=0)


def test_decomposition_recovers_a_planted_combination(tiny_model):
    sae = random_sae(tiny_model.cfg.d_model, 1, d_sae=40)
    rows = decoder_directions(sae)
    planted = 3.0 * rows[4] + 1.5 * rows[17] + 0.5 * rows[30]
    dec = decompose(sae, planted, max_features=8)
    assert dec.relative_residual < 1e-6
    got = dict(zip(dec.features, dec.coefficients))
    assert got[4] == pytest.approx(3.0, rel=1e-4) and got[17] == pytest.approx(1.5, rel=1e-4)
    assert got[30] == pytest.approx(0.5, rel=1e-3)


# ----------------------------------------------------------------- attribution


def test_attribution_matches_finite_differences(model64, direction):
    sae = random_sae(model64.cfg.d_model, 0, dtype=torch.float64)
    metric = ProjectionMetric(direction, 2)
    frame = attribute_features(model64, sae, PROMPTS, metric, batch_size=3).set_index("feature")
    eps = 1e-5
    checked = 0
    for feature in frame.index[:6]:
        def scaled(s, f=int(feature)):
            def edit(acts):
                acts = acts.clone()
                acts[..., f] = acts[..., f] * s
                return acts
            return metric_values(model64, sae, PROMPTS, metric, edit=edit, batch_size=3).mean()

        fd = float(scaled(1 + eps) - scaled(1 - eps)) / (2 * eps)
        assert frame.loc[feature, "attribution"] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        checked += abs(fd) > 1e-6
    assert checked >= 3  # the check is not vacuous
    assert frame.attrs["metric"] == pytest.approx(float(metric_values(model64, sae, PROMPTS, metric).mean()))


def test_ablation_equals_attribution_where_the_metric_is_linear(tiny_model, direction):
    """Read at the SAE's own layer, the metric is linear in the feature activations (error term fixed)."""
    sae = random_sae(tiny_model.cfg.d_model, 1)
    metric = ProjectionMetric(direction, 1)
    frame = attribute_features(tiny_model, sae, PROMPTS, metric)
    check = ablation_check(tiny_model, sae, PROMPTS, metric, frame, top=6)
    torch.testing.assert_close(torch.tensor(check.actual.to_numpy()), torch.tensor(check.predicted.to_numpy()),
                               rtol=1e-4, atol=1e-4)
    assert check.attrs["pearson"] == pytest.approx(1.0, abs=1e-6)
    assert (check.predicted.abs() > 1e-4).sum() >= 3
    # per-token mean activation and the share of prompts a feature fires in, against a direct computation
    seqs = _tokens(tiny_model)
    per_prompt = [sae.encode(harvest(tiny_model, [s], [1])[1]).detach() for s in seqs]
    frame = frame.set_index("feature").sort_index()
    torch.testing.assert_close(torch.tensor(frame.mean_activation.to_numpy()),
                               torch.cat(per_prompt).mean(0).double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(frame.frac_prompts_active.to_numpy()),
                               torch.stack([(a > 0).any(0) for a in per_prompt]).double().mean(0))


def test_ablating_features_changes_only_those_features(tiny_model):
    edit = ablate_features([2, 5])
    acts = torch.rand(2, 3, 8) + 0.1
    out = edit(acts)
    assert (out[..., [2, 5]] == 0).all() and torch.equal(out[..., [0, 1, 3, 4, 6, 7]], acts[..., [0, 1, 3, 4, 6, 7]])
    assert (acts > 0).all()  # the input is not modified


def test_metric_before_the_sae_layer_is_refused(tiny_model, direction):
    sae = random_sae(tiny_model.cfg.d_model, 2)
    with pytest.raises(SAEError, match="before the SAE's layer 2"):
        attribute_features(tiny_model, sae, PROMPTS, ProjectionMetric(direction, 1))


# ----------------------------------------------------------------- training, saving, quality


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    seqs = _tokens(tiny_model) * 8
    acts = harvest(tiny_model, seqs, [1])[1]
    sae = train_sae(acts, layer=1, model_name=tiny_model.cfg.model_name,
                    config=SAETrainConfig(d_sae=64, k=4, samples=64 * 60, batch_size=64, lr=3e-3))
    folder = save_sae(sae, tmp_path_factory.mktemp("sae") / "layer_1", extra={"note": "test"})
    return sae, folder, seqs, acts


def test_harvest_skips_bos_and_padding(tiny_model):
    seqs = _tokens(tiny_model)
    acts = harvest(tiny_model, seqs, [0, 2], batch_size=2)
    assert acts[0].shape == (sum(len(s) - 1 for s in seqs), tiny_model.cfg.d_model)
    _, cache = tiny_model.run_with_cache(torch.tensor([seqs[2]]), names_filter="blocks.2.hook_resid_post")
    start = sum(len(s) - 1 for s in seqs[:2])
    torch.testing.assert_close(acts[2][start:start + len(seqs[2]) - 1], cache["blocks.2.hook_resid_post"][0, 1:],
                               rtol=1e-5, atol=1e-5)



def test_harvest_progress_goes_to_stderr(tiny_model, capsys):
    seqs = _tokens(tiny_model)
    quiet = harvest(tiny_model, seqs, [1], batch_size=2)
    assert capsys.readouterr() == ("", "")
    shown = harvest(tiny_model, seqs, [1], batch_size=2, progress=True)
    out, err = capsys.readouterr()
    n = len(seqs)  # the bar counts sequences
    assert out == "" and "harvest: 100%|" in err and f"{n}/{n}" in err
    assert torch.equal(shown[1], quiet[1])


def test_training_with_sae_lens_learns_and_saves_a_loadable_sae(tiny_model, trained):
    from sae_lens import SAE

    sae, folder, seqs, acts = trained
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)  # decoder folded to unit rows
    loaded = SAE.load_from_disk(str(folder))  # sae_lens's own loader, offline
    assert loaded.cfg.metadata.hook_name == "blocks.1.hook_resid_post" and loaded.W_dec.dtype == torch.float16
    ours = load_sae(folder)
    assert ours.W_dec.dtype == torch.float32
    torch.testing.assert_close(ours.W_dec, sae.W_dec.detach(), rtol=1e-3, atol=1e-3)
    assert json.loads((folder / "lens_roles.json").read_text()) == {"note": "test"}
    q = sae_quality(tiny_model, ours, seqs[:4])
    assert 0.3 < q["explained_variance"] <= 1 and q["l0"] <= 4 + 1e-9
    assert 0 <= q["dead_fraction"] < 1  # (a random model need not do worse with the stream zeroed)
    assert q["loss_recovered"] == pytest.approx((q["ce_zero"] - q["ce_sae"]) / (q["ce_zero"] - q["ce_clean"]))


def test_quality_of_an_identity_sae_is_perfect(tiny_model):
    q = sae_quality(tiny_model, identity_sae(tiny_model.cfg.d_model, layer=1), _tokens(tiny_model))
    assert q["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert q["ce_sae"] == pytest.approx(q["ce_clean"], abs=1e-5) and q["loss_recovered"] == pytest.approx(1.0)


def test_save_replaces_an_existing_folder_whole(tiny_model, tmp_path):
    a, b = random_sae(tiny_model.cfg.d_model, 1, seed=1), random_sae(tiny_model.cfg.d_model, 1, seed=2)
    save_sae(a, tmp_path / "s")
    save_sae(b, tmp_path / "s", dtype=torch.float32)
    torch.testing.assert_close(load_sae(tmp_path / "s").W_dec, b.W_dec.detach())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folder left behind
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o755  # not mkdtemp's private 0700
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "s").iterdir()} == {0o644}


# ----------------------------------------------------------------- cards


def test_cards_show_the_peak_contexts_and_the_decoder_logits(tiny_model, direction, tmp_path):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    seqs = _tokens(tiny_model)
    features = [0, 7]
    cards = feature_cards(tiny_model, sae, features, seqs, directions={"random": direction}, n_contexts=3)
    acts = harvest(tiny_model, seqs, [1])[1]
    feats = sae.encode(acts).detach()[:, features]
    for card, j in zip(cards, range(len(features))):
        assert card.max_activation == pytest.approx(float(feats[:, j].max()), rel=1e-5)
        assert card.density == pytest.approx(float((feats[:, j] > 0).float().mean()), rel=1e-6)
        assert [c.peak for c in card.contexts] == sorted((c.peak for c in card.contexts), reverse=True)
        assert max(card.contexts[0].activations) == pytest.approx(card.contexts[0].peak, rel=1e-6)
        logits = decoder_directions(sae)[card.feature] @ tiny_model.W_U.detach()
        assert card.promoted[0][0] == tiny_model.tokenizer.decode([int(logits.argmax())])
        assert card.alignment["random"] == pytest.approx(
            float(decoder_directions(sae)[card.feature] @ direction.unit(1)), rel=1e-5)
    with pytest.raises(SAEError, match="features must be in 0..47"):
        feature_cards(tiny_model, sae, [48], seqs)
    page = write_cards(cards, tmp_path / "cards.html", title="t <script>")
    text = page.read_text()
    assert "Feature 7" in text and "<script>" not in text and (tmp_path / "cards.json").is_file()


# ----------------------------------------------------------------- bad input


def test_an_sae_of_another_width_or_layer_is_refused(tiny_model, direction):
    wide = random_sae(tiny_model.cfg.d_model + 8, 1)
    with pytest.raises(SAEError, match="40-wide activations.*d_model 32"):
        check_sae(wide, tiny_model)
    sae = random_sae(tiny_model.cfg.d_model, 1)
    with pytest.raises(SAEError, match="reads layer 1.*used at layer 2"):
        check_sae(sae, tiny_model, layer=2)
    deep = random_sae(tiny_model.cfg.d_model, 7)
    with pytest.raises(SAEError, match="has only 3 layers"):
        check_sae(deep, tiny_model)
    with pytest.raises(SAEError, match="no vector at the SAE's layer 1"):
        feature_alignment(sae, direction.select([0, 2]))
    with pytest.raises(SAEError, match="shape \\(8,\\)"):
        feature_alignment(sae, torch.ones(8))


def test_a_missing_or_foreign_sae_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SAEError, match="no SAE folder at"):
        load_sae(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="has no cfg.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(SAEError, match="of release 'no-such-release' from sae_lens's registry"):
        load_sae("no-such-release", "blocks.0.hook_resid_post")


def test_train_config_rejects_bad_values():
    for bad in (dict(k=None, l1=None), dict(k=4, l1=1.0), dict(k=0), dict(d_sae=8, k=8), dict(k=None, l1=-1.0),
                dict(lr=0.0)):
        with pytest.raises(ConfigError, match="SAETrainConfig: "):
            SAETrainConfig(**bad)


def test_cli_sae_align_without_cards_and_its_errors(tiny_model, direction, tmp_path, capsys):
    sae = random_sae(tiny_model.cfg.d_model, 1)
    save_sae(sae, tmp_path / "sae")
    direction.save(tmp_path / "v.safetensors")
    assert cli.main(["sae-align", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(tmp_path / "sae"),
                     "--top", "5", "--cards", "no", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "alignment.csv").is_file() and (tmp_path / "out" / "decomposition.html").is_file()
    assert "relative residual" in capsys.readouterr().out
    assert cli.main(["sae-align", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(tmp_path / "no"),
                     "--out", str(tmp_path / "o2")]) == 2
    assert "no SAE folder at" in capsys.readouterr().err
    direction.select([0, 2]).save(tmp_path / "v02.safetensors")
    assert cli.main(["sae-align", "--vector", str(tmp_path / "v02.safetensors"), "--sae", str(tmp_path / "sae"),
                     "--out", str(tmp_path / "o3")]) == 2
    assert "reads layer 1" in capsys.readouterr().err
    assert cli.main(["sae-attribute", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(tmp_path / "sae"),
                     "--prompts", "x.jsonl", "--check", "-1", "--out", str(tmp_path / "o5")]) == 2
    assert "--check >= 0" in capsys.readouterr().err
    save_sae(random_sae(16, 1), tmp_path / "narrow")
    assert cli.main(["sae-align", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(tmp_path / "narrow"),
                     "--out", str(tmp_path / "o4")]) == 2
    assert "32-wide, but the SAE" in capsys.readouterr().err


def test_an_l1_sae_trains_too(tiny_model, trained):
    from sae_lens.saes.standard_sae import StandardSAE

    _, _, seqs, acts = trained
    sae = train_sae(acts, layer=1, model_name=tiny_model.cfg.model_name,
                    config=SAETrainConfig(d_sae=64, k=None, l1=0.5, samples=64 * 40, batch_size=64, lr=3e-3))
    assert isinstance(sae, StandardSAE) and sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    q = sae_quality(tiny_model, sae, seqs[:4])
    assert q["explained_variance"] > 0 and 0 < q["l0"] < 64
