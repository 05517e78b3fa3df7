"""Integration tests of the shipped SAEs (``lens_roles/data/saes``) on the default model.

Each SAE loads with ``sae_lens`` offline and fits the model; its recorded quality
agrees with the table; the SAE splice with the error term is the clean run; and
the ``sae-align`` / ``sae-attribute`` commands run end to end on the librarian
persona with a few prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles.analysis.sae.core import check_sae, load_sae, spliced
from lens_roles.analysis.sae.corpus import Corpus
from lens_roles.cli import main

pytestmark = pytest.mark.integration

SAES = Path(__file__).resolve().parent.parent / "lens_roles" / "data" / "saes"
FOLDERS = sorted(SAES.glob("layer_*"), key=lambda p: int(p.name.split("_")[1]))


def test_at_least_three_depths_are_shipped_with_a_quality_table():
    layers = [int(p.name.split("_")[1]) for p in FOLDERS]
    assert len(layers) >= 3 and min(layers) <= 8 and max(layers) >= 22, layers
    table = pd.read_csv(SAES / "quality.csv")
    assert sorted(set(table.layer)) == layers
    sets = {"samples", "docs", "code", "chat", "conversations", "ood"}  # every held-out source and the OOD text
    for path in FOLDERS:
        layer = int(path.name.split("_")[1])
        recorded = json.loads((path / "lens_roles.json").read_text())["quality"]
        assert set(recorded) == sets == set(table[table.layer == layer].eval_set)
        for name, q in recorded.items():
            row = table[(table.layer == layer) & (table.eval_set == name)].iloc[0]
            assert row.explained_variance == pytest.approx(q["explained_variance"])
            assert 0.5 < q["explained_variance"] <= 1 and 0 < q["loss_recovered"] <= 1.0001


@pytest.mark.parametrize("path", FOLDERS, ids=[p.name for p in FOLDERS])
def test_each_shipped_sae_loads_with_sae_lens_offline_and_fits_the_model(path, real_model):
    from sae_lens import SAE

    raw = SAE.load_from_disk(str(path))
    assert raw.W_dec.dtype == torch.float16  # shipped in half precision
    sae = load_sae(path)
    layer = int(path.name.split("_")[1])
    assert check_sae(sae, real_model) == layer and sae.cfg.d_in == real_model.cfg.d_model
    ids = torch.tensor([lr.encode(real_model, [lr.Prompt("Where are the atlases?")])[0].tokens])
    with torch.no_grad():
        clean = real_model(ids)
        with spliced(real_model, sae, error_term=True):
            same = real_model(ids)
    torch.testing.assert_close(same, clean, rtol=1e-4, atol=1e-3)


def test_librarian_align_and_attribute_commands(real_model, tmp_path, capsys):
    pairs = lr.load_pairs(Path(lr.inputs.prompts.data_dir()) / "personas" / "librarian.jsonl")
    vector = lr.persona_vector(real_model, pairs, layers=[12, 18])
    vector.save(tmp_path / "librarian.safetensors")
    corpus = Corpus.load(SAES / "corpus.json")
    Corpus(corpus.sequences[:120], corpus.kinds[:120], corpus.meta).save(tmp_path / "corpus.json")  # a quick slice
    assert main(["sae-align", "--vector", str(tmp_path / "librarian.safetensors"), "--sae", str(SAES / "layer_12"),
                 "--top", "4", "--decompose", "8", "--corpus", str(tmp_path / "corpus.json"),
                 "--out", str(tmp_path / "align")]) == 0
    out = capsys.readouterr().out
    assert "relative residual" in out and (tmp_path / "align" / "cards.html").is_file()
    cards = json.loads((tmp_path / "align" / "cards.json").read_text())["cards"]
    assert len(cards) >= 4 and sum(bool(c["contexts"]) for c in cards) >= 2  # aligned features fire somewhere
    assert main(["sae-attribute", "--vector", str(tmp_path / "librarian.safetensors"), "--sae",
                 str(SAES / "layer_12"), "--prompts",
                 str(Path(lr.inputs.prompts.data_dir()) / "personas" / "librarian.jsonl"),
                 "--max-prompts", "6", "--check", "4", "--out", str(tmp_path / "attr")]) == 0
    check = pd.read_csv(tmp_path / "attr" / "check.csv")
    assert len(check) == 4 and (check.actual != 0).any()
    assert main(["sae-attribute", "--vector", str(tmp_path / "librarian.safetensors"), "--sae",
                 str(SAES / "layer_6"), "--prompts",
                 str(Path(lr.inputs.prompts.data_dir()) / "personas" / "librarian.jsonl"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "reads layer 6" in capsys.readouterr().err
