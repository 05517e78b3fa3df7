"""The commands no other unit test runs end to end, on the tiny model passed as the loader.

``extract``, ``roles``, ``demo``, and the SAE chain ``train-sae`` → ``sae-align``
(with cards) → ``sae-attribute``; each exits 0 and writes what its help promises.
"""

from __future__ import annotations

import functools
import json

import pandas as pd
import pytest

import lens_roles as lr
from lens_roles import cli

PAIRS = lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"


@pytest.fixture
def main(tiny_model, one_thread):
    """``lens-roles`` with the tiny model as its model loader; records what the loader was asked for."""
    asked = []

    def loader(name, *, device, dtype):
        asked.append(name)
        return tiny_model

    run = functools.partial(cli.main, load_model=loader)
    run.asked = asked
    return run


def test_extract_roles_and_demo(main, tmp_path, capsys):
    vector = tmp_path / "v.safetensors"
    assert main(["extract", "--pairs", str(PAIRS), "--out", str(vector), "--layers", "0-2", "--model", "tiny"]) == 0
    assert lr.Direction.load(vector).layers == (0, 1, 2) and (tmp_path / "v.json").is_file()
    assert main(["roles", "--roles", "chemist,lawyer", "--out", str(tmp_path / "roles"), "--layers", "-1"]) == 0
    assert sorted(p.name for p in (tmp_path / "roles").glob("*.safetensors")) == ["chemist.safetensors",
                                                                                    "lawyer.safetensors"]
    assert lr.Direction.load(tmp_path / "roles" / "lawyer.safetensors").layers == (2,)
    assert main(["demo", "--out", str(tmp_path / "fig"), "--directions-out", str(tmp_path / "dirs"), "--no-steering",
                 "--layers", "1", "--timings", str(tmp_path / "t.json")]) == 0
    assert (tmp_path / "dirs" / "librarian.safetensors").is_file() and any((tmp_path / "fig").glob("*.html"))
    timings = json.loads((tmp_path / "t.json").read_text())
    assert list(timings)[0] == "load model" and list(timings)[-1] == "total" and "role activations" in timings
    assert timings["total"] >= sum(v for k, v in timings.items() if k != "total")
    assert main.asked == ["tiny", None, None]
    assert "wrote 2 role vectors (1 layers each)" in capsys.readouterr().out


def test_sae_chain(main, tmp_path, capsys):
    saes = tmp_path / "saes"
    assert main(["extract", "--pairs", str(PAIRS), "--out", str(tmp_path / "v.safetensors"), "--layers", "1,2"]) == 0
    assert main(["train-sae", "--layer", "1", "--d-sae", "16", "--k", "4", "--tokens", "2000", "--max-prompts", "2",
                 "--max-new-tokens", "4", "--out", str(saes)]) == 0
    quality = pd.read_csv(saes / "quality.csv")
    assert len(quality) == 1 and {"explained_variance", "l0", "size_mb", "kind"} <= set(quality.columns)
    assert (saes / "corpus.json").is_file() and (saes / "layer_1" / "cfg.json").is_file()
    assert main(["sae-align", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(saes / "layer_1"),
                 "--top", "3", "--out", str(tmp_path / "align")]) == 0  # cards: the corpus beside the SAE
    assert {"alignment.csv", "decomposition.csv", "cards.html"} <= {p.name for p in (tmp_path / "align").iterdir()}
    assert main(["sae-attribute", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(saes / "layer_1"),
                 "--prompts", str(PAIRS), "--max-prompts", "4", "--check", "2", "--out", str(tmp_path / "attr")]) == 0
    assert len(pd.read_csv(tmp_path / "attr" / "check.csv")) == 2
    assert "Pearson r" in capsys.readouterr().out


def test_sae_corpus_and_sweep_chain(main, tmp_path, capsys):
    corpus = tmp_path / "corpus.json"
    small = ["--samples", "2", "--sample-tokens", "4", "--docs-tokens", "400", "--code-tokens", "400",
             "--chat-replies", "1", "--chat-new-tokens", "3", "--conversations", "2", "--seq-len", "64"]
    assert main(["sae-corpus", *small, "--out", str(corpus)]) == 0
    assert "fingerprint" in capsys.readouterr().out
    saes = tmp_path / "saes"
    assert main(["train-sae", "--layer", "1,2", "--corpus", str(corpus), "--sweep", "topk:64:2,batchtopk:64:2",
                 "--tokens", "2048", "--eval-tokens", "200", "--card-tokens", "400", "--out", str(saes)]) == 0
    quality = pd.read_csv(saes / "quality.csv")
    assert {"ood", "code", "chat"} <= set(quality["eval_set"]) and set(quality["layer"]) == {1, 2}
    assert len(pd.read_csv(saes / "sweep.csv")["config"].unique()) == 2
    assert {"corpus.json", "corpus_recipe.json", "layer_1", "layer_2"} <= {p.name for p in saes.iterdir()}
    assert main(["extract", "--pairs", str(PAIRS), "--out", str(tmp_path / "v.safetensors"), "--layers", "1"]) == 0
    assert main(["sae-align", "--vector", str(tmp_path / "v.safetensors"), "--sae", str(saes / "layer_1"),
                 "--top", "3", "--cards", "no", "--exclude-dead-dense", "--out", str(tmp_path / "align")]) == 0
    align = pd.read_csv(tmp_path / "align" / "alignment.csv")
    assert "status" in align.columns and not set(align["status"]) & {"dead", "dense", "unknown"}
    summary = json.loads((tmp_path / "align" / "decomposition_summary.json").read_text())
    assert summary["excluded_dead_dense"] and 0 <= summary["span_fraction"] <= 1 + 1e-9
    assert summary["candidates"] >= len(align)
    assert main(["train-sae", "--layer", "1", "--corpus", str(corpus), "--sweep", "topk:32", "--out", str(saes)]) != 0
    assert "is not ARCH:WIDTH:K" in capsys.readouterr().err
