"""Unit tests of lens_roles.inputs.prompts: loaders, value types and chat rendering."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import tomllib

from lens_roles.errors import DataError
from lens_roles.inputs.prompts import (
    ContrastPair,
    PairSet,
    Prompt,
    PromptSet,
    available_roles,
    common_prefix_len,
    data_dir,
    load_baseline,
    load_pairs,
    load_prompt_set,
    load_role,
    render,
    resolve_roles,
    shipped_or_path,
    template_name,
)
from lens_roles.inputs.sets import fingerprint

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "lens_roles" / "data"
CHAT_EOI = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(autouse=True)
def _repository_data(monkeypatch):
    """The loaders read the package's lens_roles/data unless LENS_ROLES_DATA says otherwise."""
    monkeypatch.delenv("LENS_ROLES_DATA", raising=False)


def _jsonl_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ loaders: real files


def test_data_dir_is_the_package_data(monkeypatch, tmp_path):
    assert data_dir() == DATA
    assert data_dir() == Path(str(importlib.resources.files("lens_roles") / "data"))
    monkeypatch.setenv("LENS_ROLES_DATA", str(tmp_path))
    assert data_dir() == tmp_path


def test_package_data_declares_every_shipped_file():
    """pyproject's package-data globs match every file under lens_roles/data, so a wheel carries them all."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lens_roles"]
    shipped = [p.relative_to(REPO / "lens_roles") for p in DATA.rglob("*") if p.is_file()]
    assert shipped and [p for p in shipped if not any(p.match(g) for g in globs)] == []


def test_loaders_take_the_short_name_of_a_shipped_set(monkeypatch, tmp_path):
    assert shipped_or_path("librarian", "personas") == DATA / "personas" / "librarian.jsonl"
    assert load_pairs("librarian") == load_pairs(DATA / "personas" / "librarian.jsonl")
    assert load_prompt_set("chemist") == load_prompt_set(DATA / "roles" / "chemist.jsonl")
    assert shipped_or_path("no_such_set", "personas") == Path("no_such_set")
    assert shipped_or_path("sub/librarian", "personas") == Path("sub/librarian")
    with pytest.raises(DataError, match="no_such_set: no such file"):
        load_pairs("no_such_set")
    monkeypatch.chdir(tmp_path)  # an existing file of that name wins over the shipped set
    _write(tmp_path / "librarian", '{"user": "u", "positive": "p", "negative": "n"}\n')
    assert len(load_pairs("librarian")) == 1


def test_load_prompt_set_project_jsonl():
    path = DATA / "roles" / "chemist.jsonl"
    records = _jsonl_records(path)
    ps = load_prompt_set(path)
    assert ps.name == "chemist"
    assert ps.source == "lens_roles/data/roles/chemist.jsonl"  # a shipped file: the same in every checkout
    assert len(ps) == len(records)
    assert [p.user for p in ps.prompts] == [r["instruction"] for r in records]
    assert [p.system for p in ps.prompts] == [r.get("system") for r in records]
    assert all(p.reply is None for p in ps.prompts)
    assert load_prompt_set(path, name="other").name == "other"


def test_a_shipped_set_names_its_file_the_same_in_every_checkout(tmp_path):
    # figure metadata records the source: an absolute path made a rerun in another clone rewrite 8 figure files
    from lens_roles.inputs.prompts import load_pairs, load_role

    assert load_pairs("librarian").source == "lens_roles/data/personas/librarian.jsonl"
    assert load_role("chemist").source == "lens_roles/data/roles/chemist.jsonl"
    own = tmp_path / "mine.jsonl"
    own.write_text((DATA / "roles" / "chemist.jsonl").read_text())
    assert load_prompt_set(own).source == str(own)  # any other file: as given


def test_load_prompt_set_role_vectors_json(shared_data):
    path = shared_data / "role-vectors" / "splits" / "target_train_chemist.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    ps = load_prompt_set(path)
    assert ps.name == "target_train_chemist"
    assert len(ps) == len(records) == 128
    assert [p.user for p in ps.prompts] == [r["instruction"] for r in records]
    assert all(p.system is None and p.reply is None for p in ps.prompts)


def test_load_pairs_project_jsonl():
    path = DATA / "personas" / "librarian.jsonl"
    records = _jsonl_records(path)
    pairs = load_pairs(path)
    assert pairs.name == "librarian"
    assert len(pairs) == len(records)
    for pair, rec in zip(pairs.pairs, records):
        assert pair == ContrastPair(rec["user"], rec["positive"], rec["negative"], rec.get("system"))
        assert pair.positive != pair.negative


def test_load_pairs_caa_json(shared_data):
    path = shared_data / "caa" / "refusal.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    pairs = load_pairs(path)
    assert len(pairs) == len(records) == 458
    for pair, rec in zip(pairs.pairs, records):
        # the shared question becomes the user turn ...
        assert rec["positive"].startswith(pair.user) and rec["negative"].startswith(pair.user)
        assert pair.user == pair.user.rstrip() and pair.user.startswith(rec["positive"][:10])
        # ... and the replies are the differing "(A)" / "(B)" tails
        assert {pair.positive, pair.negative} == {"(A)", "(B)"}
        assert rec["positive"][-3:] == pair.positive and rec["negative"][-3:] == pair.negative
        assert rec["positive"][:-3].rstrip() == pair.user
        assert pair.system is None
        pos, neg = pair.as_prompts()
        assert pos.user == neg.user == pair.user
        assert (pos.reply, neg.reply) == (pair.positive, pair.negative)


def test_available_roles_sizes():
    roles = available_roles()
    assert "baseline" not in roles
    assert roles == sorted(roles)
    assert len(roles) >= 29
    for role in roles:
        assert len(load_role(role)) >= 24, role
    assert len(load_baseline()) >= 240
    assert len(load_pairs(DATA / "personas" / "librarian.jsonl")) >= 60


def test_resolve_roles():
    everything = resolve_roles("all")
    assert len(everything) >= 29
    assert everything == available_roles()
    assert resolve_roles("chemist, lawyer") == ["chemist", "lawyer"]
    assert resolve_roles(["lawyer", "chemist"]) == ["lawyer", "chemist"]
    # spaces stand for underscores in file names
    assert resolve_roles(["data scientist"]) == ["data scientist"]
    assert load_role("data scientist").name == "data scientist"
    assert len(load_role("data scientist")) == len(load_role("data_scientist"))


def test_unknown_role_lists_known_roles():
    with pytest.raises(DataError) as err:
        load_role("astronaut")
    msg = str(err.value)
    assert "astronaut" in msg
    for known in ("chemist", "lawyer", "teacher"):
        assert known in msg
    with pytest.raises(DataError) as err:
        resolve_roles("chemist,astronaut")
    msg = str(err.value)
    assert "'astronaut'" in msg and "chemist" in msg and "web_developer" in msg
    with pytest.raises(DataError):
        resolve_roles([])


# -------------------------------------------------------------- loaders: broken files


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", '{"instruction": "ok"}\n\n{"instruction": "broken"\n')
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    assert f"{path}:3" in str(err.value)
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert f"{path}:3" in str(err.value)


def test_malformed_json_names_file(tmp_path):
    path = _write(tmp_path / "bad.json", '[{"instruction": "ok"},')
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    assert str(path) in str(err.value)


def test_json_must_be_list_of_objects(tmp_path):
    path = _write(tmp_path / "obj.json", '{"instruction": "x"}')
    with pytest.raises(DataError, match="list"):
        load_prompt_set(path)
    path = _write(tmp_path / "items.json", '[{"instruction": "x"}, "y"]')
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    assert str(path) in str(err.value) and "item 1" in str(err.value)
    path = _write(tmp_path / "lines.jsonl", '{"instruction": "x"}\n[1, 2]\n')
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n   \n", "[]"])
def test_empty_file(tmp_path, content):
    path = _write(tmp_path / ("empty.json" if content == "[]" else "empty.jsonl"), content)
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    assert str(path) in str(err.value)
    with pytest.raises(DataError):
        load_pairs(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_prompt_set(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "nope.json")


def test_missing_field(tmp_path):
    path = _write(tmp_path / "p.jsonl", '{"instruction": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError) as err:
        load_prompt_set(path)
    msg = str(err.value)
    assert str(path) in msg and "2" in msg and "'instruction'" in msg

    path = _write(
        tmp_path / "pairs.jsonl",
        '{"user": "u", "positive": "p", "negative": "n"}\n{"user": "u", "positive": "p"}\n',
    )
    with pytest.raises(DataError) as err:
        load_pairs(path)
    msg = str(err.value)
    assert str(path) in msg and "line/item 2" in msg and "'negative'" in msg

    path = _write(tmp_path / "blank.jsonl", '{"instruction": "   "}\n')
    with pytest.raises(DataError, match="non-empty"):
        load_prompt_set(path)


def test_optional_system_and_user_key(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl",
        '{"instruction": "a", "system": "sys"}\n{"user": "b"}\n',
    )
    ps = load_prompt_set(path)
    assert ps.prompts == (Prompt("a", "sys"), Prompt("b"))


def test_identical_positive_negative(tmp_path):
    path = _write(tmp_path / "same.jsonl", '{"user": "u", "positive": "same", "negative": "same"}\n')
    with pytest.raises(DataError, match="identical"):
        load_pairs(path)
    path = _write(tmp_path / "same.json", json.dumps([{"positive": "Q?\n(A)", "negative": "Q?\n(A)"}]))
    with pytest.raises(DataError, match="identical"):
        load_pairs(path)


def test_caa_split_rules(tmp_path):
    path = _write(
        tmp_path / "caa.json",
        json.dumps(
            [
                {"positive": "Is it?\n(A) yes\n(B) no\n(A)", "negative": "Is it?\n(A) yes\n(B) no\n(B)"},
                {"positive": "Answer: yes", "negative": "Answer: no"},
            ]
        ),
    )
    pairs = load_pairs(path)
    assert pairs.pairs == (
        ContrastPair("Is it?\n(A) yes\n(B) no", "(A)", "(B)"),
        ContrastPair("Answer:", "yes", "no"),
    )
    path = _write(tmp_path / "noshare.json", json.dumps([{"positive": "yes", "negative": "no"}]))
    with pytest.raises(DataError, match="share no question"):
        load_pairs(path)


# ----------------------------------------------------------------------- value types


def test_empty_sets_raise():
    with pytest.raises(DataError):
        PromptSet("x", ())
    with pytest.raises(DataError):
        PairSet("x", ())


def test_pairset_halves_disjoint_and_covering():
    pairs = load_pairs(DATA / "personas" / "librarian.jsonl")
    first, second = pairs.halves()
    assert first.pairs == pairs.pairs[0::2]
    assert second.pairs == pairs.pairs[1::2]
    assert len(first) + len(second) == len(pairs)
    assert abs(len(first) - len(second)) <= 1
    ids_first = {id(p) for p in first.pairs}
    ids_second = {id(p) for p in second.pairs}
    assert not ids_first & ids_second
    assert ids_first | ids_second == {id(p) for p in pairs.pairs}
    with pytest.raises(DataError):
        PairSet("one", pairs.pairs[:1]).halves()


def test_pairset_positives_negatives():
    pairs = PairSet("p", (ContrastPair("u1", "a", "b", "s"), ContrastPair("u2", "c", "d")))
    assert pairs.positives().prompts == (Prompt("u1", "s", "a"), Prompt("u2", None, "c"))
    assert pairs.negatives().prompts == (Prompt("u1", "s", "b"), Prompt("u2", None, "d"))
    assert pairs.positives().name == "p+" and pairs.negatives().name == "p-"


def test_split_is_deterministic_prefix():
    ps = PromptSet("x", tuple(Prompt(str(i)) for i in range(8)))
    train, held = ps.split(0.75)
    assert train.prompts == ps.prompts[:6] and held.prompts == ps.prompts[6:]
    train, held = PromptSet("y", ps.prompts[:2]).split(0.99)
    assert len(train) == 1 and len(held) == 1
    with pytest.raises(DataError):
        PromptSet("z", ps.prompts[:1]).split(0.75)
    with pytest.raises(DataError):
        ps.split(1.0)
    pairs = PairSet("p", tuple(ContrastPair(str(i), "a", "b") for i in range(4)))
    a, b = pairs.split(0.5)
    assert a.pairs == pairs.pairs[:2] and b.pairs == pairs.pairs[2:]


def test_fingerprint_depends_on_content():
    a = PromptSet("a", (Prompt("x"), Prompt("y")))
    b = PromptSet("b", (Prompt("x"), Prompt("y")))
    c = PromptSet("a", (Prompt("y"), Prompt("x")))
    assert a.fingerprint() == b.fingerprint()  # the name is not content
    assert a.fingerprint() != c.fingerprint()
    assert len(a.fingerprint()) == 16
    assert fingerprint([1, 2]) != fingerprint([2, 1])
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len("abc", "abc") == 3


# ------------------------------------------------------------------------- rendering


def _check_spans(r, prompt):
    assert r.text[slice(*r.user_span)] == prompt.user
    assert r.user_span[1] == r.eoi_span[0]
    if prompt.reply is None:
        assert r.reply_span is None
        assert r.eoi_span[1] == len(r.text)
    else:
        assert r.text[slice(*r.reply_span)] == prompt.reply
        assert r.eoi_span[1] <= r.reply_span[0]
        assert r.reply_span[1] == len(r.text)


@pytest.mark.parametrize(
    "prompt",
    [
        Prompt("How do I cite a website?"),
        Prompt("How do I cite a website?", reply="Happy to help!"),
        Prompt("Tell me more.", system="You are a librarian.", reply="Of course."),
    ],
)
def test_render_chat_spans(tiny_tokenizer, prompt):
    assert template_name(tiny_tokenizer) == "chat"
    r = render(tiny_tokenizer, prompt)
    assert r.template == "chat"
    _check_spans(r, prompt)
    assert r.text[slice(*r.eoi_span)] == CHAT_EOI
    head = (f"<|im_start|>system\n{prompt.system}<|im_end|>\n" if prompt.system else "") + (
        f"<|im_start|>user\n{prompt.user}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.text == head + (prompt.reply or "")
    if prompt.reply is not None:
        assert r.eoi_span[1] == r.reply_span[0]


@pytest.mark.parametrize(
    "prompt",
    [
        Prompt("How do I cite a website?"),
        Prompt("How do I cite a website?", reply="Happy to help!"),
        Prompt("Tell me more.", system="You are a librarian.", reply="Of course."),
    ],
)
def test_render_plain_spans(tiny_tokenizer, prompt):
    r = render(tiny_tokenizer, prompt, template="plain")
    assert r.template == "plain"
    _check_spans(r, prompt)
    assert r.text[slice(*r.eoi_span)] == "\n\nAssistant:"
    expected = (
        f"System: {prompt.system}\n\n" if prompt.system else ""
    ) + f"User: {prompt.user}\n\nAssistant:"
    if prompt.reply is not None:
        expected += " " + prompt.reply
        assert r.reply_span[0] == r.eoi_span[1] + 1  # the single separating space
    assert r.text == expected


def test_template_name_plain_without_chat_template():
    class NoChat:
        chat_template = None

    assert template_name(NoChat()) == "plain"
    assert template_name(object()) == "plain"


def test_render_unknown_template(tiny_tokenizer):
    with pytest.raises(DataError, match="unknown template"):
        render(tiny_tokenizer, Prompt("x"), template="markdown")


@pytest.mark.parametrize("user", ["assistant", "ant"])
def test_render_chat_user_text_inside_template(tiny_tokenizer, user):
    r = render(tiny_tokenizer, Prompt(user, reply="ok"))
    start = len("<|im_start|>user\n")
    assert r.user_span == (start, start + len(user))
    assert r.text[slice(*r.eoi_span)] == CHAT_EOI
