"""Persona space and the assistant axis on the tiny model: the algebra (axis = difference of the two
means, PCA = an SVD of the centred role vectors), the default system prompt, bad input, the study with
its reply cache, and the ``persona-space`` command."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from lens_roles import cli
from lens_roles.directions.direction import Direction
from lens_roles.directions.persona_space import persona_space, principal_components
from lens_roles.errors import DataError, DirectionError
from lens_roles.inputs.personas import default_personas, default_system_prompt, load_archetypes
from lens_roles.inputs.prompts import Prompt, PromptSet, render
from lens_roles.runtime.activations import collect_sets
from lens_roles.studies import persona_space as study

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QUESTIONS = ["What do you do all day?", "How do I make tea?", "What scares you?", "Tell me about yourself."]
REPLIES = ["I read books in the quiet.", "Boil the water first.", "Nothing at all, friend.", "I am old and wise."]


def _sets(name: str, system: str | None, shift: int) -> PromptSet:
    """One persona's prompts: every question with a reply (rotated by ``shift`` so personas differ)."""
    prompts = [Prompt(q, system, REPLIES[(i + shift) % len(REPLIES)]) for i, q in enumerate(QUESTIONS)]
    return PromptSet(name, tuple(prompts), "test")


@pytest.fixture(scope="module")
def acts(tiny_model):
    """Per-prompt reply activations of four role personas and two default points, every layer."""
    specs = [("chemist", "You are a chemist.", 0), ("bard", "You are a bard.", 1), ("ghost", "You are a ghost.", 2),
             ("judge", "You are a judge.", 3), ("assistant", None, 0), ("assistant_empty", "", 1)]
    sets = collect_sets(tiny_model, [_sets(n, s, k) for n, s, k in specs], positions="reply", keep_per_prompt=True)
    return {name: a for (name, _, _), a in zip(specs, sets)}


def _space(acts, **kw):
    roles = {n: acts[n] for n in ("chemist", "bard", "ghost", "judge")}
    default = {n: acts[n] for n in ("assistant", "assistant_empty")}
    return persona_space(roles, default, **kw), roles, default


def test_axis_is_the_difference_of_the_two_means(acts):
    space, roles, default = _space(acts)
    pooled_default = torch.cat([a.per_prompt for a in default.values()]).double().mean(0)
    pooled_roles = torch.cat([a.per_prompt for a in roles.values()]).double().mean(0)
    expected = (pooled_default - pooled_roles).float()  # [layer, d_model]
    torch.testing.assert_close(space.axis.vectors, expected, rtol=1e-5, atol=1e-5)
    assert space.axis.method == "assistant_axis" and space.axis.meta["positions"] == "reply"


def test_pca_fractions_and_pc1_match_an_svd(acts):
    space, roles, _ = _space(acts)
    for j, layer in enumerate(space.layers):
        assert float(space.fractions[j].sum()) <= 1 + 1e-9
        assert (space.fractions[j] >= 0).all()
        x = torch.stack([a.mean[j].double() for a in roles.values()])
        x = x - x.mean(0)
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        assert abs(float(vh[0] @ space.components[j, 0])) == pytest.approx(1.0, abs=1e-9)
        assert float(space.fractions[j, 0]) == pytest.approx(float(s[0] ** 2 / (s**2).sum()), abs=1e-12)
        # PC1 is signed towards the axis
        assert float(space.components[j, 0] @ space.axis.unit(layer).double()) >= 0
    table = space.table()
    assert list(table.layer) == list(space.layers)
    pc1 = space.coordinates(space.role_vectors)[..., 0]
    default = space.coordinates(space.default_vectors)[..., 0].mean(0)
    assert list(table.default_rank) == [int((pc1[:, j] > default[j]).sum()) for j in range(len(space.layers))]
    cos = [float(torch.nn.functional.cosine_similarity(space.axis[layer].double(), space.components[j, 0], dim=0))
           for j, layer in enumerate(space.layers)]
    assert table.cos_axis_pc1.tolist() == pytest.approx(cos, abs=1e-6)


def test_held_out_auc_and_points(acts):
    roles = {n: acts[n] for n in ("chemist", "bard", "ghost", "judge")}
    default = {n: acts[n] for n in ("assistant", "assistant_empty")}
    space = persona_space(roles, default, held_out=(roles, default))
    table = space.table()
    assert table.auc.between(0, 1).all()
    assert (table.auc_n_default == 8).all() and (table.auc_n_roles == 16).all()
    points = space.points()
    assert set(points.name) == set(roles) | set(default)
    assert set(points.kind) == {"role", "default"}
    # the colour is the projection on the unit axis, centred on the roles' mean
    layer = space.layers[-1]
    j = space.layers.index(layer)
    row = points[(points.name == "bard") & (points.layer == layer)].iloc[0]
    direct = float((acts["bard"].mean[j].double() - space.centre[j]) @ space.axis.unit(layer).double())
    assert row["axis"] == pytest.approx(direct, abs=1e-6)


def test_colouring_direction_from_another_width_is_one_clear_error(acts):
    space, _, _ = _space(acts)
    other = Direction(space.layers, torch.ones(len(space.layers), 16), {"name": "wide", "model": "other"})
    with pytest.raises(DirectionError, match="d_model 16.*width 32"):
        space.points(other)


def test_too_few_roles_is_an_error(acts):
    with pytest.raises(DataError, match="at least two role-playing"):
        persona_space({"chemist": acts["chemist"]}, {"assistant": acts["assistant"]})
    with pytest.raises(DataError, match="two rows"):
        principal_components(torch.zeros(1, 4))


def test_default_system_prompt_of_the_template(tiny_tokenizer):
    assert default_system_prompt(tiny_tokenizer) is None  # plain ChatML inserts nothing
    smol = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    smol.chat_template = SMOL_TEMPLATE
    assert default_system_prompt(smol) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    names = [p.name for p in default_personas(smol, "chat")]
    assert names == ["assistant", "assistant_no_system"]
    assert [p.name for p in default_personas(smol, "plain")] == ["assistant"]
    # "" renders an empty system turn, None the template's default
    assert "<|im_start|>system\n<|im_end|>" in render(smol, Prompt("Hi", "")).text
    assert "named SmolLM" in render(smol, Prompt("Hi")).text


def test_archetypes_shipped_and_bad_files(tmp_path):
    shipped = load_archetypes()
    assert len(shipped) >= 30
    assert {"bard", "oracle", "trickster", "ghost", "demon", "sage"} <= {p.name for p in shipped}
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        load_archetypes(empty)
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"name": "bard", "system": "You are a bard."}\n{"name": "bard", "system": "You sing."}\n')
    with pytest.raises(DataError, match="twice.jsonl line 2: archetype 'bard' is already defined on line 1"):
        load_archetypes(twice)


def test_unknown_role_is_one_clear_error(tiny_tokenizer):
    with pytest.raises(DataError, match="unknown role.*'alchemist'"):
        study.persona_roster(tiny_tokenizer, "chat", study.PersonaSpaceConfig(roles=("chemist", "alchemist")))


@pytest.fixture
def archetypes(tmp_path):
    path = tmp_path / "arch.jsonl"
    path.write_text("".join(json.dumps({"name": n, "system": f"You are a {n}.", "group": "g"}) + "\n"
                            for n in ("bard", "ghost")))
    return path


def test_study_caches_its_replies(tiny_model, archetypes, tmp_path, monkeypatch, one_thread):
    config = study.PersonaSpaceConfig(roles=("chemist", "lawyer"), archetypes=str(archetypes), n_questions=3,
                                      max_new_tokens=4, batch_size=8)
    first = study.run_persona_space(tiny_model, config=config, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("replies-*.jsonl"))) == 1
    assert first.space.names == ("chemist", "lawyer", "bard", "ghost")
    assert first.space.default_names == ("assistant",)
    assert set(first.table.columns) >= {"var_pc1", "var_pc2", "var_pc3", "cos_axis_pc1", "auc", "default_pc1"}

    def no_generation(*a, **k):
        raise AssertionError("replies were regenerated")

    monkeypatch.setattr(study, "generate", no_generation)
    again = study.run_persona_space(tiny_model, config=config, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(again.axis.vectors, first.axis.vectors)
    written = study.write_persona_space(again, tmp_path / "out", png=False)
    assert {p.name for p in written} >= {"assistant_axis.safetensors", "persona_space.csv", "persona_map.html",
                                         "variance_explained.html", "replies.jsonl", "persona_pc1.safetensors"}
    loaded = Direction.load(tmp_path / "out" / "assistant_axis.safetensors")
    torch.testing.assert_close(loaded.vectors, first.axis.vectors)


@pytest.fixture
def main(tiny_model, one_thread):
    asked = []

    def loader(name, *, device, dtype):
        asked.append(name)
        return tiny_model

    run = functools.partial(cli.main, load_model=loader)
    run.asked = asked
    return run


def test_persona_space_command(main, archetypes, tmp_path, capsys):
    out = tmp_path / "ps"
    args = ["persona-space", "--out", str(out), "--roles", "chemist,lawyer", "--archetypes", str(archetypes),
            "--n-questions", "3", "--max-new-tokens", "3", "--layers", "0-2", "--map-layer", "1"]
    assert main(args) == 0
    for name in ("assistant_axis.safetensors", "assistant_axis.json", "persona_space.csv", "points.csv",
                 "persona_map.html", "variance_explained.html"):
        assert (out / name).is_file(), name
    assert "best held-out AUC" in capsys.readouterr().out


def test_persona_space_command_bad_input_loads_no_model(main, archetypes, tmp_path, capsys):
    out = str(tmp_path / "ps")
    assert main(["persona-space", "--out", out, "--roles", "alchemist"]) == 2
    assert "unknown role(s) 'alchemist'" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["persona-space", "--out", out, "--archetypes", str(empty)]) == 2
    assert "holds no records" in capsys.readouterr().err
    wide = tmp_path / "wide.safetensors"
    Direction([0, 1, 2], torch.ones(3, 16), {"name": "wide", "model": "tiny-test"}).save(wide)
    assert main.asked == []
    assert main(["persona-space", "--out", out, "--roles", "chemist,lawyer", "--archetypes", str(archetypes),
                 "--n-questions", "3", "--max-new-tokens", "2", "--colour-by", str(wide)]) == 2
    assert "d_model 16" in capsys.readouterr().err


def test_given_replies_must_cover_every_persona_and_question(tiny_model, archetypes, tmp_path):
    config = study.PersonaSpaceConfig(roles=("chemist", "lawyer"), archetypes=str(archetypes), n_questions=2)
    path = tmp_path / "given.jsonl"
    path.write_text(json.dumps({"persona": "chemist", "user": "What do you do on a typical day?",
                                "reply": "I titrate."}) + "\n")
    with pytest.raises(DataError, match=r"no reply for 9 persona × question pair\(s\), e.g. chemist"):
        study.run_persona_space(tiny_model, config=config, replies=study.load_replies(path))
    path.write_text('{"persona": "chemist", "user": "Hi"}\n')
    with pytest.raises(DataError, match="given.jsonl line 1: field 'reply' must be a string"):
        study.load_replies(path)
