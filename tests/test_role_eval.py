"""Role-vector evaluation on the tiny model: question loading, letter scoring, the
validation/test protocol, the roles × domains table, A/B curves and role geometry."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles.directions.geometry import cosine_matrix, mean_offdiagonal_cosine, nearest_roles, role_map
from lens_roles.errors import ConfigError, DataError, DirectionError
from lens_roles.inputs.positions import encode
from lens_roles.inputs.prompts import ContrastPair, PairSet, Prompt
from lens_roles.inputs.questions import QuestionSet, load_domains, load_questions
from lens_roles.measures import multiple_choice as mc
from lens_roles.studies import role_study as rs
from lens_roles.studies.ab_curves import ab_curve, ab_items, monotonicity


def _rv_record(i: int, answer: str = "B") -> dict:
    return {"instruction": f"Question number {i} about the law?\n\t\t\tA. one\n\t\t\tB. two\n\t\t\tC. three\n"
                           f"\t\t\tD. four\n\t\t\tAnswer with the letter of the correct answer.\n\t\t\tAnswer:",
            "target_score": answer, "dataset": "law"}


def _write(path, records, jsonl=False):
    if jsonl:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.fixture
def domain_dir(tmp_path):
    d = tmp_path / "splits"
    d.mkdir()
    letters = "ABCD"
    for k, name in enumerate(["econ", "law"]):
        _write(d / f"target_test_{name}.json", [_rv_record(i, letters[(i + k) % 4]) for i in range(12)])
    _write(d / "target_test.json", [{"target_scores": {}, "instruction": "not multiple choice"}])  # not matched
    return d


# ----------------------------------------------------------------- questions


def test_role_vectors_format_is_normalised(domain_dir):
    qs = load_questions(domain_dir / "target_test_econ.json")
    q = qs.questions[1]
    assert q.text.splitlines()[1:3] == ["A. one", "B. two"]  # tabs removed
    assert q.answer == "B" and q.answer_index == 1 and q.letters == ("A", "B", "C", "D")
    assert q.id == "target_test_econ:1" and q.subject == "law" and qs.name == "econ"


def test_processed_and_mmlu_formats(tmp_path):
    processed = _write(tmp_path / "p.json", [{"question": "Two plus two?", "option1": "3", "option2": 4,
                                             "option3": "5", "option4": float("nan"), "true_option": 2}])
    q = load_questions(processed).questions[0]
    assert q.letters == ("A", "B", "C") and q.answer == "B" and "B. 4" in q.text and q.text.endswith("Answer:")
    mmlu = _write(tmp_path / "m.jsonl", [{"question": "Q?", "choices": ["x", "y"], "answer": 1},
                                         {"question": "R?", "choices": ["x", "y"], "answer": "A"}], jsonl=True)
    assert [q.answer for q in load_questions(mmlu)] == ["B", "A"]
    custom = _write(tmp_path / "c.json", [{"question": "Q?", "choices": ["x", "y", "z"], "answer": 2}])
    assert load_questions(custom, letters="123").questions[0].answer == "3"


@pytest.mark.parametrize("record, message", [
    (_rv_record(0, "E"), "answer 'E' is not one of the option letters A, B, C, D"),
    ({"instruction": "Q?\nA. x\nB. y\nAnswer:", "target_score": "A"}, "no option line for letter(s) C, D"),
    ({"prompt": "Q?", "label": 1}, "unknown question format"),
    ({"question": "Q?", "choices": ["x", "y"], "answer": 5}, "answer 5 is not one of the option letters A, B"),
    ({"question": "Q?", "option1": None, "option2": "y", "true_option": 2}, "option 1 is None"),
])
def test_bad_questions_name_file_and_item(tmp_path, record, message):
    path = _write(tmp_path / "bad.json", [_rv_record(0), record])
    with pytest.raises(DataError, match="bad.json item 1") as info:
        load_questions(path)
    assert message in str(info.value)


def test_skip_invalid_keeps_the_rest(tmp_path):
    path = _write(tmp_path / "bad.json", [_rv_record(0), _rv_record(1, "Z"), _rv_record(2)])
    qs = load_questions(path, skip_invalid=True)
    assert len(qs) == 2 and len(qs.skipped) == 1 and "item 1" in qs.skipped[0]


def test_load_domains(domain_dir, tmp_path):
    domains = load_domains(domain_dir)
    assert list(domains) == ["econ", "law"] and len(domains["law"]) == 12
    assert list(load_domains(domain_dir, domains=["law"])) == ["law"]
    with pytest.raises(DataError, match="no question file for domain.*physics.*found: econ, law"):
        load_domains(domain_dir, domains=["physics"])
    with pytest.raises(DataError, match="no such file or folder"):
        load_domains(tmp_path / "missing")


def test_split_is_disjoint_deterministic_and_covers_everything(domain_dir):
    qs = load_questions(domain_dir / "target_test_econ.json")
    val, test = qs.split(0.25, seed=3)
    assert len(val) == 3 and len(test) == 9
    assert not {q.id for q in val} & {q.id for q in test}
    assert {q.id for q in val} | {q.id for q in test} == {q.id for q in qs}
    assert [q.id for q in qs.split(0.25, seed=3)[0]] == [q.id for q in val]


def test_empty_role_file_is_a_clear_error(tmp_path):
    (tmp_path / "nobody.jsonl").write_text("\n")
    with pytest.raises(DataError, match="nobody.jsonl: holds no records"):
        lr.load_role("nobody", tmp_path)


# ------------------------------------------------------------ letter scoring


def test_letter_scoring_equals_a_direct_softmax(tiny_model, domain_dir):
    qs = load_questions(domain_dir / "target_test_econ.json").head(5)
    frame = mc.score_questions(tiny_model, qs, batch_size=2)
    letter_ids = [tiny_model.tokenizer.convert_tokens_to_ids(x) for x in "ABCD"]
    for q, row in zip(qs, frame.itertuples()):
        tokens = encode(tiny_model, [Prompt(q.text)])[0].tokens  # the generation prompt, no reply
        with torch.no_grad():
            logits = tiny_model(torch.tensor([tokens]))[0, -1].double()
        probs = torch.softmax(logits[letter_ids], -1)
        assert row.p_correct == pytest.approx(float(probs[q.answer_index]), abs=1e-5)
        assert row.pred == "ABCD"[int(probs.argmax())]
        assert row.letter_mass == pytest.approx(float(torch.softmax(logits, -1)[letter_ids].sum()), abs=1e-5)
        assert row.correct == (row.pred == q.answer)


def test_letter_tokens_follow_the_answer_format(tiny_model, domain_dir):
    qs = load_questions(domain_dir / "target_test_econ.json").head(2)
    plain = mc.choice_items(tiny_model, qs)
    paren = mc.choice_items(tiny_model, qs, answer_format="({letter})")
    assert len(set(plain[0].choice_ids)) == 4
    assert len(paren[0].tokens) >= len(plain[0].tokens)  # "(" may join the prefix
    with pytest.raises(DataError, match="must contain"):
        mc.choice_items(tiny_model, qs, answer_format="letter")


def test_choice_scoring_is_batch_and_prefix_invariant(tiny_model, domain_dir):
    qs = load_questions(domain_dir / "target_test_law.json").head(6)
    items = mc.choice_items(tiny_model, qs, system="You are a lawyer.")
    a = torch.stack(mc.choice_logprobs(tiny_model, items, batch_size=4))
    b = torch.stack(mc.choice_logprobs(tiny_model, items, batch_size=1, share_prefixes=False))
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_conditions(tiny_model, domain_dir):
    qs = load_questions(domain_dir / "target_test_law.json").head(4)
    torch.manual_seed(0)
    d = lr.Direction(tuple(range(3)), torch.randn(3, 32), {"model": "tiny-test", "name": "r"})
    none = mc.evaluate_condition(tiny_model, qs, mc.Condition("none"))
    zero = mc.evaluate_condition(tiny_model, qs, mc.Condition("addition", 1, 0.0), d)
    np.testing.assert_array_equal(none.p_correct, zero.p_correct)  # α = 0 is the baseline, bit for bit
    added = mc.evaluate_condition(tiny_model, qs, mc.Condition("addition", 1, 5.0), d)
    assert not np.allclose(none.p_correct, added.p_correct)
    prompted = mc.evaluate_condition(tiny_model, qs, mc.Condition("prompting", system=mc.persona_prompt("lawyer")),
                                     d)
    assert not np.allclose(none.p_correct, prompted.p_correct)
    assert mc.persona_prompt("economist") == "You are an economist."
    assert mc.persona_prompt("financial_analyst") == "You are a financial analyst."
    with pytest.raises(ConfigError, match="needs a layer"):
        mc.Condition("ablation")
    with pytest.raises(DirectionError, match="has no layer 7"):
        mc.evaluate_condition(tiny_model, qs, mc.Condition("ablation", 7), d)


# --------------------------------------------------------------- the study


@pytest.fixture
def tiny_study_inputs(tiny_model, domain_dir):
    torch.manual_seed(1)
    roles = {name: lr.Direction(tuple(range(3)), torch.randn(3, 32), {"model": "tiny-test", "name": name})
             for name in ("economist", "lawyer", "historian")}
    domains = load_domains(domain_dir)
    role_domains = {"economist": "econ", "lawyer": "law"}
    config = rs.StudyConfig(layers=(0, 2), alphas=(1.0, 4.0), max_val=4, max_test=6, n_boot=200, batch_size=4)
    return roles, domains, role_domains, config


def test_study_table_shape_and_intervals(tiny_model, tiny_study_inputs):
    roles, domains, role_domains, config = tiny_study_inputs
    study = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config)
    t = study.table
    assert len(t) == 3 * 2 * 3 * 2  # roles × domains × conditions × metrics
    assert set(t.condition) == {"addition", "ablation", "prompting"} and set(t.metric) == {"accuracy", "p_correct"}
    assert (t.n == 6).all()
    assert ((t.lo <= t.hi) & (t.delta_lo <= t.delta_hi)).all()
    assert ((t.lo >= 0) & (t.hi <= 1)).all()
    assert set(t[t.in_domain][["role", "domain"]].itertuples(index=False, name=None)) == {
        ("economist", "econ"), ("lawyer", "law")}
    # the delta is the cell's value minus the no-intervention value on the same questions
    base = study.baseline.set_index(["domain", "metric"]).value
    for row in t.itertuples():
        assert row.delta == pytest.approx(row.value - base[(row.domain, row.metric)], abs=1e-12)
    s = study.summary
    assert len(s) == 3 * 2 * 2 and set(s.in_domain) == {True, False}
    assert (s.lo <= s.hi).all()
    on = s[(s.condition == "addition") & s.in_domain & (s.metric == "accuracy")]
    assert on.cells.item() == 2
    assert len(study.scores) == 2 * 6 + 3 * 3 * 2 * 6  # none per domain + roles × conditions × domains
    # addition and ablation use the layer chosen on validation
    chosen = study.selection[study.selection.chosen].set_index("role")
    for row in t[t.condition != "prompting"].itertuples():
        assert row.layer == chosen.layer[row.role]


def test_selection_never_touches_test_items(tiny_model, tiny_study_inputs, monkeypatch):
    roles, domains, role_domains, config = tiny_study_inputs
    test_ids = {q.id for qs in domains.values() for q in qs.split(config.validation, seed=config.seed)[1]}
    selecting, seen = [False], []
    real_select, real_eval = rs.select_additions, rs.evaluate_conditions

    def spy_select(*a, **k):
        selecting[0] = True
        try:
            return real_select(*a, **k)
        finally:
            selecting[0] = False

    def spy_eval(model, questions, conditions, *a, **k):
        if selecting[0]:
            seen.extend(q.id for q in questions)
        return real_eval(model, questions, conditions, *a, **k)

    monkeypatch.setattr(rs, "select_additions", spy_select)
    monkeypatch.setattr(rs, "evaluate_conditions", spy_eval)
    study = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config)
    assert seen and not set(seen) & test_ids
    # and the choice cannot depend on the test answers: flip them all, same selection
    flipped = {}
    for name, qs in domains.items():
        val, _ = qs.split(config.validation, seed=config.seed)
        val_ids = {q.id for q in val}
        flipped[name] = QuestionSet(name, tuple(
            q if q.id in val_ids else type(q)(q.text, q.letters, q.letters[(q.answer_index + 1) % 4], q.id, q.subject)
            for q in qs), qs.source)
    monkeypatch.setattr(rs, "evaluate_conditions", real_eval)
    again = rs.run_role_study(tiny_model, roles, flipped, role_domains=role_domains, config=config)
    pd.testing.assert_frame_equal(study.selection, again.selection)
    assert not study.table.value.equals(again.table.value)


def test_study_config_validates():
    with pytest.raises(ConfigError, match="unknown condition"):
        rs.StudyConfig(conditions=("steering",))
    with pytest.raises(ConfigError, match="alphas must be finite"):
        rs.StudyConfig(alphas=(1.0, float("nan")))
    with pytest.raises(ConfigError, match="max_test must be positive"):
        rs.StudyConfig(max_test=0)


def test_role_domains_file(tmp_path):
    mapping = rs.load_role_domains()
    assert mapping["chemist"] == "natural_science" and mapping["lawyer"] == "law"
    assert set(mapping) <= set(lr.available_roles())
    bad = tmp_path / "d.json"
    bad.write_text(json.dumps({"law": ["lawyer"], "politics": ["lawyer"]}))
    with pytest.raises(DataError, match="listed under both 'law' and 'politics'"):
        rs.load_role_domains(bad)


def test_write_role_study(tiny_model, tiny_study_inputs, tmp_path):
    roles, domains, role_domains, config = tiny_study_inputs
    study = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains,
                              config=rs.StudyConfig(**{**config.__dict__, "conditions": ("addition",)}))
    written = rs.write_role_study(study, tmp_path / "o", png=False)
    names = {p.name for p in written}
    assert {"table.csv", "summary.csv", "scores.csv", "selection.csv", "baseline.csv", "study.json",
            "role_domain_addition.html", "in_off_domain.html", "selection.html"} <= names
    assert pd.read_csv(tmp_path / "o" / "table.csv").shape[0] == len(study.table)


# ------------------------------------------------------------- A/B curves


def _ab_pairs(n: int = 12) -> PairSet:
    pairs = []
    for i in range(n):
        q = f"Would you like item {i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n"
        yes, no = "(A)", "(B)"
        pos, neg = (yes, no) if i % 2 else (no, yes)
        pairs.append(ContrastPair(q.rstrip(), pos, neg))
    return PairSet("toy-behaviour", tuple(pairs), "memory")


def test_ab_items_and_direct_probability(tiny_model):
    pairs = _ab_pairs(4)
    items, letter_at = ab_items(tiny_model, pairs)
    for pair, item, n in zip(pairs.pairs, items, letter_at):
        pos = encode(tiny_model, [pair.as_prompts()[0]])[0].tokens
        assert item.tokens == pos[:n] and item.choice_ids[0] == pos[n]
        assert tiny_model.tokenizer.decode([item.choice_ids[0]]).strip() == pair.positive.strip("()")[0]
    curve = ab_curve(tiny_model, _ab_pairs(12), layer=1, multipliers=(-1, 0, 1), n_train=6, n_test=6, n_boot=200)
    assert list(curve.frame.multiplier) == [-1.0, 0.0, 1.0] and (curve.frame.n == 6).all()
    # at multiplier 0 each test question's probability is the plain two-letter softmax
    _, test = _ab_pairs(12).split(6, seed=0, rest=6)
    test_items, _ = ab_items(tiny_model, test)
    zero = curve.scores[curve.scores.multiplier == 0.0].p_match.to_numpy()
    for p, item in zip(zero, test_items):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([item.tokens]))[0, -1].double()
        assert p == pytest.approx(float(torch.softmax(logits[list(item.choice_ids)], -1)[0]), abs=1e-5)


def test_counted_seeded_split_is_disjoint():
    pairs = _ab_pairs(10)
    train, test = pairs.split(6, seed=1, rest=3)
    assert len(train) == 6 and len(test) == 3
    assert not set(train.pairs) & set(test.pairs)
    train, test = pairs.split(100, seed=0, rest=100)
    assert len(train) + len(test) == 10 and not set(train.pairs) & set(test.pairs)


def test_identical_ab_answers_are_an_error(tiny_model):
    pairs = PairSet("same", (ContrastPair("Q?", "(A)", "(A) "),), "memory.json")
    with pytest.raises(DataError, match="memory.json pair 0"):
        ab_items(tiny_model, pairs)


def test_monotonicity():
    frame = pd.DataFrame({"behaviour": ["up"] * 3 + ["down"] * 3, "multiplier": [-1, 0, 1] * 2,
                          "p_match": [0.2, 0.5, 0.9, 0.6, 0.5, 0.55]})
    m = monotonicity(frame).set_index("behaviour")
    assert m.loc["up", "monotone"] and m.loc["up", "spearman"] == pytest.approx(1.0) and m.loc["up", "rises"]
    assert not m.loc["down", "monotone"] and not m.loc["down", "rises"]


# ------------------------------------------------------------- geometry


def test_role_geometry():
    torch.manual_seed(3)
    v = torch.randn(4, 2, 16)
    roles = {f"r{i}": lr.Direction((0, 5), v[i], {"name": f"r{i}"}) for i in range(4)}
    cos = cosine_matrix(roles)
    assert len(cos) == 4 * 4 * 2
    got = cos.set_index(["role_a", "role_b", "layer"]).value
    direct = torch.nn.functional.cosine_similarity(v[1, 1], v[3, 1], dim=0)
    assert got[("r1", "r3", 5)] == pytest.approx(float(direct), abs=1e-6)
    assert got[("r2", "r2", 0)] == pytest.approx(1.0)
    assert got[("r0", "r2", 0)] == pytest.approx(got[("r2", "r0", 0)])
    centred = cosine_matrix(roles, centre=True).set_index(["role_a", "role_b", "layer"]).value
    u = torch.nn.functional.normalize(v[:, 1], dim=-1)
    c = u - u.mean(0)
    expected = torch.nn.functional.cosine_similarity(c[0], c[2], dim=0)
    assert centred[("r0", "r2", 5)] == pytest.approx(float(expected), abs=1e-6)
    near = nearest_roles(cos)
    assert len(near) == 8 and (near.role != near.nearest).all()
    mean = mean_offdiagonal_cosine(cos)
    assert list(mean.layer) == [0, 5]
    m = role_map(roles, 5, groups={"r0": "x"})
    assert list(m.role) == ["r0", "r1", "r2", "r3"] and m.group[0] == "x" and m.group[1:].isna().all()
    assert 0 < sum(m.attrs["explained_variance"]) <= 1 + 1e-9
    with pytest.raises(DirectionError, match="no layer 3"):
        role_map(roles, 3)
    with pytest.raises(DirectionError, match="at least two"):
        cosine_matrix({"r0": roles["r0"]})


def test_role_figures_build():
    from lens_roles import viz

    torch.manual_seed(3)
    roles = {f"r{i}": lr.Direction((0, 5), torch.randn(2, 16), {"name": f"r{i}"}) for i in range(4)}
    fig = viz.role_cosine_heatmap(cosine_matrix(roles))
    assert len(fig.data) == 2 and fig.layout.sliders[0].active == 1
    assert len(viz.role_map(role_map(roles, 0)).data) >= 1


# -------------------------------------------------------------------- CLI


@pytest.fixture
def tiny_cli(tiny_model):
    """``lens-roles`` with the tiny model as its model loader."""
    from functools import partial

    from lens_roles.cli import main

    return partial(main, load_model=lambda *a, **k: tiny_model)


def test_cli_evaluate(tiny_cli, domain_dir, tmp_path, capsys):
    main = tiny_cli

    out = tmp_path / "eval"
    assert main(["evaluate", "--questions", str(domain_dir), "--out", str(out), "--select-layers", "0,2",
                 "--alphas", "1", "--max-val", "3", "--max-test", "4", "--n-boot", "200"]) == 0
    table = pd.read_csv(out / "table.csv")
    assert set(table.role) == {"economist", "lawyer"}  # --roles domain: the first role of each domain
    assert set(table.domain) == {"econ", "law"} and len(table) == 2 * 2 * 3 * 2
    assert (out / "vectors" / "lawyer.safetensors").exists() and (out / "role_cosine.html").exists()
    assert "in_domain" in capsys.readouterr().out


def test_cli_evaluate_bad_input(tiny_cli, domain_dir, tmp_path, capsys):
    main = tiny_cli

    out = tmp_path / "eval"
    bad = _write(tmp_path / "weird.json", [{"prompt": "Q?", "label": 1}])
    assert main(["evaluate", "--questions", str(bad), "--out", str(out), "--roles", "lawyer"]) == 2
    assert "weird.json item 0: unknown question format" in capsys.readouterr().err
    assert main(["evaluate", "--questions", str(domain_dir), "--out", str(out), "--roles", "wizard"]) == 2
    assert "unknown role(s) 'wizard'" in capsys.readouterr().err
    empty = tmp_path / "empty_role.jsonl"
    empty.write_text("")
    assert main(["evaluate", "--questions", str(domain_dir), "--out", str(out), "--roles", str(empty)]) == 2
    assert "empty_role.jsonl: holds no records" in capsys.readouterr().err
    assert main(["evaluate", "--questions", str(domain_dir), "--out", str(out), "--conditions", "vibes"]) == 2
    assert "unknown condition" in capsys.readouterr().err
    assert not out.exists()


def test_cli_ab_curve(tiny_cli, tmp_path, capsys):
    main = tiny_cli

    records = [{"positive": f"Q{i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n (" + ("A)" if i % 2 else "B)"),
                "negative": f"Q{i}?\n\nChoices:\n (A) Yes\n (B) No\n\nAnswer:\n (" + ("B)" if i % 2 else "A)")}
               for i in range(10)]
    pairs = _write(tmp_path / "toy.json", records)
    out = tmp_path / "ab"
    assert main(["ab-curve", "--pairs", str(pairs), "--layer", "1", "--multipliers=-1,0,1", "--n-train", "5",
                 "--n-test", "5", "--out", str(out)]) == 0
    shown, err = capsys.readouterr()
    assert "A/B curve toy: 100%|" in err and "%|" not in shown  # progress on stderr, the tables on stdout
    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.multiplier) == [-1.0, 0.0, 1.0] and set(curves.behaviour) == {"toy"}
    assert (out / "monotonicity.csv").exists() and (out / "ab_curves.html").exists()
    assert main(["ab-curve", "--pairs", str(pairs), "--layer", "9", "--out", str(out)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_roles_from_role_vectors_files(shared_data):
    from lens_roles.cli.evaluation import resolve_role_sets

    files = [shared_data / "role-vectors" / "splits" / f"target_train_{r}.json" for r in ("chemist", "data scientist")]
    sets = resolve_role_sets(",".join(map(str, files)), None, [], {})
    assert [s.name for s in sets] == ["chemist", "data_scientist"] and all(len(s) == 128 for s in sets)
    domain_sets = resolve_role_sets("domain", None, ["law", "econ"], rs.load_role_domains())
    assert [s.name for s in domain_sets] == ["lawyer", "economist"]


def test_shared_domain_sets_load(shared_data):
    domains = load_domains(shared_data / "role-vectors" / "splits",
                           domains=["econ", "eecs", "law", "math", "medicine", "natural_science", "politics",
                                    "psychology"])
    for name, qs in domains.items():  # every record loads; none is skipped or invalid
        raw = json.loads((shared_data / "role-vectors" / "splits" / f"target_test_{name}.json").read_text())
        assert len(qs) == len(raw) and not qs.skipped
        assert [q.answer for q in qs] == [r["target_score"] for r in raw]


def test_plain_template_scores_the_spaced_letter(tiny_model, domain_dir):
    qs = load_questions(domain_dir / "target_test_econ.json").head(2)
    items = mc.choice_items(tiny_model, qs, template="plain")
    decoded = [tiny_model.tokenizer.decode([t]) for t in items[0].choice_ids]
    assert [d.strip() for d in decoded] == ["A", "B", "C", "D"]
    assert tiny_model.tokenizer.decode(list(items[0].tokens)).rstrip().endswith("Assistant:")


def test_role_study_progress_goes_to_stderr(tiny_model, tiny_study_inputs, capsys):
    """One tqdm bar on stderr counts the evaluations: none per domain, then per role its selection and
    each condition × domain; stdout stays empty and the numbers do not depend on it."""
    roles, domains, role_domains, config = tiny_study_inputs
    config = rs.StudyConfig(**{**config.__dict__, "conditions": ("addition",)})
    study = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config)
    out, err = capsys.readouterr()
    n = len(domains) + len(roles) * (1 + len(domains))
    assert out == "" and "role study: 100%|" in err and f"{n}/{n}" in err
    quiet = rs.run_role_study(tiny_model, roles, domains, role_domains=role_domains, config=config, progress=False)
    assert capsys.readouterr() == ("", "")
    pd.testing.assert_frame_equal(quiet.table, study.table)
