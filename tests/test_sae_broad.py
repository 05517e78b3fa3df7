"""The broad SAE corpus (reproducible by fingerprint), the sweep-and-train suite, quality-aware alignment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lens_roles.analysis.sae.core import FREQUENCY_FILE, load_feature_frequencies, load_sae
from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.analysis.sae.features import decompose, feature_alignment, feature_status, span_fraction
from lens_roles.analysis.sae.mixture import MixtureRecipe, build_mixture, is_permissive
from lens_roles.analysis.sae.quality import feature_frequencies, sae_quality
from lens_roles.analysis.sae.training import SAETrainConfig
from lens_roles.errors import ConfigError, SAEError
from lens_roles.studies.sae_suite import choose_config, ood_sequences, save_corpus_record, train_broad_suite
from tests.test_sae import random_sae

pytestmark = pytest.mark.usefixtures("one_thread")

SLICE = MixtureRecipe(samples=3, sample_tokens=6, docs_tokens=600, code_tokens=600, chat_replies=2, chat_new_tokens=4,
                      conversations=3, seq_len=64, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def mixture(tiny_model):
    return build_mixture(tiny_model, SLICE)


def test_the_corpus_rebuilds_to_the_same_fingerprint(tiny_model, mixture):
    again = build_mixture(tiny_model, SLICE)
    assert again.meta["fingerprint"] == mixture.meta["fingerprint"] and again.sequences == mixture.sequences
    other = build_mixture(tiny_model, MixtureRecipe.from_dict(dict(SLICE.to_dict(), seed=1)))
    assert other.meta["fingerprint"] != mixture.meta["fingerprint"]


def test_the_corpus_records_every_source_and_its_share(tiny_model, mixture):
    sources = mixture.meta["sources"]
    assert set(sources) == {"samples", "docs", "code", "chat_generation", "chat_prompt", "chat_written",
                            "conversation"}
    assert sum(v["tokens"] for v in sources.values()) == mixture.n_tokens
    assert sum(v["share"] for v in sources.values()) == pytest.approx(1, abs=1e-3)
    assert sources["samples"]["sequences"] == 3 and sources["chat_generation"]["sequences"] == 2
    bos = tiny_model.tokenizer.bos_token_id
    for kind in ("docs", "code", "samples"):
        seqs = [s for s, k in zip(mixture.sequences, mixture.kinds) if k == kind]
        assert seqs and all(s[0] == bos and len(s) <= SLICE.seq_len for s in seqs)
    assert 0 < sources["docs"]["tokens"] <= 600 + SLICE.seq_len and mixture.meta["files"]["code"]["files"] > 0


def test_only_permissive_licences_are_read():
    class Dist:
        def __init__(self, **fields):
            self.metadata = _Meta(fields)

    class _Meta(dict):
        def get_all(self, key):
            return self.get(key + "s")

    assert is_permissive(Dist(License="MIT License"))
    assert is_permissive(Dist(Classifiers=["License :: OSI Approved :: BSD License"]))
    assert is_permissive(Dist(**{"License-Expression": "Apache-2.0"}))
    assert not is_permissive(Dist(License="GPL-3.0-or-later"))
    assert not is_permissive(Dist())


def test_recipe_and_take_check_their_inputs(mixture):
    with pytest.raises(ConfigError, match="seq_len"):
        MixtureRecipe(seq_len=2)
    part = mixture.take(2000, seed=3)
    assert part.n_tokens <= 2000 and part.sequences == mixture.take(2000, seed=3).sequences
    assert set(part.sequences) <= set(mixture.sequences)


def test_sweep_trains_chooses_and_ships_with_frequencies(tiny_model, mixture, tmp_path):
    from sae_lens import SAE

    sweep = [SAETrainConfig(d_sae=64, k=4, samples=4096, batch_size=256),
             SAETrainConfig(d_sae=64, k=4, samples=4096, batch_size=256, architecture="batchtopk")]
    sweep_df, table = train_broad_suite(tiny_model, [1, 2], tmp_path, corpus=mixture, sweep=sweep, sweep_layer=1,
                                        eval_tokens=300, eval_fraction=0.2, batch_size=8, progress=False)
    assert set(sweep_df["config"]) == {0, 1}
    assert set(table["eval_set"]) >= {"ood", "chat", "docs", "code"} and set(table["layer"]) == {1, 2}
    assert table["ce_clean"].notna().all() and (table["explained_variance"] <= 1).all()
    for layer in (1, 2):
        folder = tmp_path / f"layer_{layer}"
        SAE.load_from_disk(str(folder))  # sae_lens's own loader, offline
        freq = load_feature_frequencies(folder)
        assert freq.shape == (64,) and (freq >= 0).all() and (freq <= 1).all()
        assert "quality" in json.loads((folder / "lens_roles.json").read_text())
    assert (tmp_path / "quality.csv").is_file() and (tmp_path / "sweep.csv").is_file()
    save_corpus_record(mixture, tmp_path, card_tokens=500)
    assert json.loads((tmp_path / "corpus_recipe.json").read_text())["fingerprint"] == mixture.meta["fingerprint"]
    assert Corpus.load(tmp_path / "corpus.json").n_tokens <= 500


def test_choose_config_prefers_the_best_worst_set_among_the_living():
    import pandas as pd

    rows = []
    for c, (ev, dead) in enumerate([(0.9, 0.2), (0.85, 0.01), (0.8, 0.0)]):
        for s, shift in (("a", 0.0), ("b", -0.05)):
            rows.append({"config": c, "d_sae": 64, "l0": 8, "eval_set": s, "explained_variance": ev + shift,
                         "dead_fraction": dead})
    assert choose_config(pd.DataFrame(rows)) == 1


def test_choose_config_reads_dead_features_on_training_tokens_where_the_sweep_has_them():
    import pandas as pd

    # config 0 looks dead on the small evaluation set only; on the training tokens config 1 is the dead one
    rows = [{"config": c, "d_sae": 64, "l0": 8, "eval_set": "a", "explained_variance": ev, "dead_fraction": d_eval,
             "dead_fraction_train": d_train}
            for c, ev, d_eval, d_train in ((0, 0.85, 0.3, 0.0), (1, 0.9, 0.0, 0.2))]
    assert choose_config(pd.DataFrame(rows)) == 0
    assert choose_config(pd.DataFrame(rows).drop(columns="dead_fraction_train")) == 1


def test_a_short_batchtopk_run_keeps_about_k_features_per_token():
    """The saved threshold must have converged: with sae_lens's start-up rate (0.01 from 0) a run of 117
    steps kept 23 features a token for k = 4 (threshold 31 % short) and reconstructed badly."""
    from lens_roles.analysis.sae.training import train_sae

    torch.manual_seed(0)
    dictionary = torch.randn(128, 32)
    codes = (torch.rand(20_000, 128) < 0.03).float() * torch.rand(20_000, 128) * 5
    acts = codes @ dictionary * 20 + 3
    sae = train_sae(acts, layer=1, model_name="synthetic",
                    config=SAETrainConfig(d_sae=128, k=4, samples=117 * 256, batch_size=256, architecture="batchtopk"))
    with torch.no_grad():
        l0 = float((sae.encode(acts) > 0).float().sum(-1).mean())
    assert l0 < 3 * 4, f"{l0:.1f} features a token for k = 4"


def test_ood_text_is_read_in_pieces(tiny_model):
    seqs = ood_sequences(tiny_model, seq_len=64)
    assert len(seqs) >= 10 and all(s[0] == tiny_model.tokenizer.bos_token_id and len(s) <= 64 for s in seqs)


def test_dead_and_dense_features_are_marked_and_can_be_excluded(tiny_model):
    sae = random_sae(tiny_model.cfg.d_model, 1, d_sae=48)
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    freq = torch.full((48,), 0.01)
    freq[:5] = 0.0
    freq[5:10] = 0.5
    status = feature_status(freq, 48)
    assert list(status[:5]) == ["dead"] * 5 and list(status[5:10]) == ["dense"] * 5 and status[10] == "live"
    full = feature_alignment(sae, v, frequencies=freq)
    kept = feature_alignment(sae, v, frequencies=freq, exclude=True)
    assert len(full) == 48 and len(kept) == 38 and set(kept["status"]) == {"live"}
    assert list(kept["feature"]) == [f for f in full["feature"] if f >= 10]
    with pytest.raises(SAEError, match="frequencies"):
        feature_alignment(sae, v, exclude=True)
    dec = decompose(sae, v, max_features=6, frequencies=freq, exclude=True)
    assert all(f >= 10 for f in dec.features) and dec.candidates == 38


def test_the_alignment_figure_names_and_greys_dead_and_dense_features(tiny_model):
    from lens_roles.viz.sae import STATUS_GREY, sae_alignment_bars

    sae = random_sae(tiny_model.cfg.d_model, 1, d_sae=48)
    v = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(5))
    freq = torch.full((48,), 0.01)
    freq[:5], freq[5:10] = 0.0, 0.5
    top = feature_alignment(sae, v, frequencies=freq).head(48)
    bar = sae_alignment_bars({"v": top}).data[0]
    for name, colour, f in zip(bar.y, bar.marker.color, top.feature.iloc[::-1]):
        expected = "dead" if f < 5 else "dense" if f < 10 else None
        assert name == f"f{f}" + (f" ({expected})" if expected else "")
        assert (colour == STATUS_GREY[expected]) if expected else colour not in STATUS_GREY.values()
    plain = sae_alignment_bars({"v": feature_alignment(sae, v, top=5)}).data[0]  # without frequencies: as before
    assert all("(" not in name for name in plain.y)


def test_span_fraction_tells_a_missing_subspace_from_a_non_sparse_direction(tiny_model):
    d = tiny_model.cfg.d_model
    sae = random_sae(d, 1, d_sae=48)
    with torch.no_grad():  # a narrow decoder: rows only in the first 8 coordinates
        sae.W_dec.zero_()
        sae.W_dec[:, :8] = torch.randn(48, 8)
    inside = torch.zeros(d)
    inside[:8] = torch.randn(8)
    mixed = inside.clone()
    mixed[8] = float(inside.norm())  # half the squared norm outside the span
    assert span_fraction(sae, inside) == pytest.approx(1.0, abs=1e-6)
    assert span_fraction(sae, mixed) == pytest.approx(2 ** -0.5, abs=1e-6)
    dec = decompose(sae, mixed, max_features=16)
    assert dec.span_fraction == pytest.approx(2 ** -0.5, abs=1e-6)
    assert dec.relative_residual >= (1 - dec.span_fraction ** 2) ** 0.5 - 1e-6  # the residual cannot beat the span


def test_frequencies_dense_and_dead_fractions_agree(tiny_model):
    sae = random_sae(tiny_model.cfg.d_model, 1, d_sae=48)
    acts = torch.randn(500, tiny_model.cfg.d_model)
    freq = feature_frequencies(sae, acts)
    q = sae_quality(tiny_model, sae, [], acts=acts, losses=False)
    assert q["dead_fraction"] == pytest.approx(float((freq == 0).float().mean()))
    assert q["dense_fraction"] == pytest.approx(float((freq > 0.1).float().mean()))
    assert np.isnan(q["loss_recovered"]) and q["l0"] == pytest.approx(float(freq.sum()), rel=1e-5)


def test_a_damaged_frequency_file_is_a_clear_error(tmp_path):
    (tmp_path / FREQUENCY_FILE).write_text("not safetensors")
    with pytest.raises(SAEError, match="feature-frequency"):
        load_feature_frequencies(tmp_path)
    assert load_feature_frequencies(tmp_path / "nowhere") is None
    with pytest.raises(SAEError):
        load_sae(tmp_path)
