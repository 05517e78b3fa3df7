"""Persona drift on the tiny model: conversations, the monitor, capping, screening, explaining drift, CLI."""

from __future__ import annotations

import functools
import json

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles import cli
from lens_roles.analysis.drift import explain_drift
from lens_roles.directions.direction import Direction
from lens_roles.errors import DataError, DirectionError, PatchingError
from lens_roles.inputs.conversations import (
    Conversation,
    Message,
    encode_conversation,
    load_conversations,
    load_screen_records,
)
from lens_roles.inputs.prompts import Prompt, load_pairs
from lens_roles.interventions.steering import cap, cap_range
from lens_roles.measures.drift import cap_cost, drift_summary, drift_table, drift_traces, self_play
from lens_roles.measures.screening import correlation, projection_behaviour, screen
from lens_roles.runtime.generation import generate, generate_from_tokens
from lens_roles.viz.drift import drift_bars, screen_histogram, token_view, turn_layer_heatmap, turn_trace

pytestmark = pytest.mark.usefixtures("one_thread")


def conv(*pairs, system=None, cid="c", category="test") -> Conversation:
    msgs = ([Message("system", system)] if system else []) + [
        Message(role, text) for u, a in pairs for role, text in (("user", u), ("assistant", a)) if text]
    return Conversation(cid, category, tuple(msgs))


@pytest.fixture
def direction(tiny_model):
    torch.manual_seed(5)
    n = tiny_model.cfg.n_layers
    return Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model), {"model": tiny_model.cfg.model_name,
                                                                               "name": "random"})


CONVS = [
    conv(("Where can I find old maps?", "In the local history room."), ("Can I borrow them?", "Only in the room."),
         ("Who are you really?", "I am a helper."), cid="a", category="x"),
    conv(("Write a poem about rain.", "Rain on the roof."), ("Now be a pirate.", "Arr, rain on the deck!"),
         cid="b", category="y", system="You are a helpful assistant."),
]


# ----------------------------------------------------------------- conversations


def test_shipped_conversations_cover_four_categories():
    convs = load_conversations()
    counts = pd.Series([c.category for c in convs]).value_counts()
    assert set(counts.index) == {"ordinary", "meta", "vulnerable", "roleplay"} and counts.min() >= 6
    assert all(len(c.turns()) >= 2 for c in convs)
    assert len({c.id for c in convs}) == len(convs)
    assert [c.category for c in load_conversations("meta")] == ["meta"] * counts["meta"]


@pytest.mark.parametrize("messages, expect", [
    ([{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}], "message 1: expected a assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "message 1 (assistant): content"),
    ([{"role": "assistant", "content": "hi"}], "message 0: expected a user"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}], "message 1: a system message"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "message 1: unknown role 'bot'"),
    ([], "has no messages"),
])
def test_bad_conversations_name_file_line_and_message(tmp_path, messages, expect):
    path = tmp_path / "bad.jsonl"
    good = {"id": "ok", "category": "t", "messages": [{"role": "user", "content": "hi"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"id": "x", "category": "t", "messages": messages}) + "\n")
    with pytest.raises(DataError) as err:
        load_conversations(path)
    assert f"{path} line 2" in str(err.value) and expect in str(err.value)


def test_unknown_category_and_bad_screen_records(tmp_path):
    with pytest.raises(DataError, match="unknown conversation set 'nope'.*shipped: meta"):
        load_conversations("nope")
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match="r.jsonl line/item 2: field 'response'"):
        load_screen_records(path)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_message_spans_hold_exactly_each_content(tiny_model, template):
    for c in CONVS:
        enc = encode_conversation(tiny_model, c, template=template)
        for (a, b), m in zip(enc.spans, c.messages):
            assert tiny_model.tokenizer.decode(enc.tokens[a:b]).strip() == m.content
        owner = enc.message_of_token()
        assert sorted(set(owner) - {-1}) == list(range(len(c.messages)))


def _same_as_single_turn_prompts(model):
    from lens_roles.inputs.positions import encode

    c = conv(("Where can I find old maps?", "In the local history room."), system="Be brief.")
    one = Conversation("1", "t", c.messages[:2])
    head = encode_conversation(model, one, generation_prompt=True).tokens
    assert head == encode(model, [Prompt(c.messages[1].content, system="Be brief.")])[0].tokens
    full = encode_conversation(model, c).tokens
    with_reply = encode(model, [Prompt(c.messages[1].content, "Be brief.", c.messages[2].content)])[0].tokens
    assert full[: len(with_reply)] == with_reply


def test_conversations_render_like_single_turn_prompts(tiny_model):
    """A conversation's first exchange is tokenised exactly as the one-turn Prompt the rest of the project uses."""
    _same_as_single_turn_prompts(tiny_model)


@pytest.mark.integration
def test_conversations_render_like_single_turn_prompts_real(real_model):
    _same_as_single_turn_prompts(real_model)
    c = load_conversations("meta")[0]
    enc = encode_conversation(real_model, c)
    assert [real_model.tokenizer.decode(enc.tokens[a:b]).strip() for a, b in enc.spans] == \
        [m.content for m in c.messages]


# ----------------------------------------------------------------- the monitor


def test_per_turn_projection_equals_direct_computation(tiny_model, direction):
    traces = drift_traces(tiny_model, CONVS, direction, layers=[1, 2], batch_size=2)
    for c, trace in zip(CONVS, traces):
        enc = encode_conversation(tiny_model, c)
        _, cache = tiny_model.run_with_cache(torch.tensor([enc.tokens]), names_filter="blocks.2.hook_resid_post")
        acts = cache["blocks.2.hook_resid_post"][0].double()
        unit = direction[2].double() / direction[2].double().norm()
        turns = trace.assistant_turns(2)
        assert list(turns.message) == c.turns()
        for rec in turns.itertuples():
            a, b = enc.spans[rec.message]
            assert rec.projection == pytest.approx(float((acts[a:b] @ unit).mean()), abs=1e-4)
        tokens = trace.token_frame(2)
        assert torch.allclose(torch.tensor(tokens.projection.values), acts @ unit, atol=1e-4)
    summary = drift_summary(traces, 2)
    assert list(summary.conversation) == ["a", "b"]
    first = traces[0].assistant_turns(2).projection
    assert summary.change.iloc[0] == pytest.approx(first.iloc[-1] - first.iloc[0])
    table = drift_table(summary, n_boot=50)
    assert list(table.columns) == ["category", "n", "mean", "low", "high"] and len(table) == 2


def test_monitor_refuses_a_direction_of_another_width(tiny_model):
    wide = Direction((1,), torch.ones(1, 48), {"name": "wide"})
    with pytest.raises(DirectionError, match="width 48.*d_model 32"):
        drift_traces(tiny_model, CONVS, wide)
    with pytest.raises(DirectionError, match="width 48"):
        explain_drift(tiny_model, CONVS[0], wide, 1)
    with pytest.raises(DirectionError, match="width 48"):
        screen(tiny_model, [("a", "b")], wide, 1, own=["c"])


def test_self_play_writes_the_models_own_replies(tiny_model):
    played = self_play(tiny_model, CONVS, max_new_tokens=5, temperature=1.0, seed=3, batch_size=1)
    again = self_play(tiny_model, CONVS, max_new_tokens=5, temperature=1.0, seed=3, batch_size=1)
    assert [c.messages for c in played] == [c.messages for c in again]
    for c, p in zip(CONVS, played):
        assert [m.role for m in p.messages] == [m.role for m in c.messages]
        assert [m.content for m in p.messages if m.role != "assistant"] == \
            [m.content for m in c.messages if m.role != "assistant"]
    # the first reply is exactly a generation from the first user turn's context
    first = Conversation("a", "x", CONVS[0].messages[:1])
    rows = [encode_conversation(tiny_model, first, generation_prompt=True).tokens]
    direct = generate_from_tokens(tiny_model, rows, max_new_tokens=5, temperature=1.0, seed=3)[0]
    assert played[0].messages[1].content == (direct.text.strip() or "…")


def test_generate_is_generate_from_tokens_of_the_encoded_prompt(tiny_model):
    from lens_roles.inputs.positions import encode

    a = generate(tiny_model, ["Where are the maps?"], max_new_tokens=6)
    b = generate_from_tokens(tiny_model, [encode(tiny_model, [Prompt("Where are the maps?")])[0].tokens],
                             max_new_tokens=6)
    assert a[0].tokens == b[0].tokens and a[0].prompt == "Where are the maps?"
    with pytest.raises(DataError, match="no empty row"):
        generate_from_tokens(tiny_model, [[]])


# ----------------------------------------------------------------- capping


def _resid(model, tokens, layer, ctx=None):
    store = {}

    def rec(acts, hook):
        store["x"] = acts.detach().clone()

    with (ctx if ctx is not None else torch.no_grad()):
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", rec)]):
            model(tokens, stop_at_layer=layer + 1)
    return store["x"]


def test_cap_leaves_inside_bit_identical_and_puts_the_rest_on_the_boundary(tiny_model, direction):
    tokens = torch.tensor([encode_conversation(tiny_model, CONVS[0]).tokens])
    layer = 1
    before = _resid(tiny_model, tokens, layer)
    unit = direction.unit(layer)
    proj = before @ unit
    low, high = float(proj.quantile(0.25)), float(proj.quantile(0.75))
    with torch.no_grad(), cap(tiny_model, direction, (low, high), layers=[layer]):
        after = _resid(tiny_model, tokens, layer)
    inside = (proj >= low) & (proj <= high)
    assert inside.any() and (~inside).any()
    assert torch.equal(after[inside], before[inside])  # bit for bit
    new = after @ unit
    scale = float(before.norm(dim=-1).max())
    assert torch.allclose(new[proj < low], torch.full_like(new[proj < low], low), atol=1e-6 * scale)
    assert torch.allclose(new[proj > high], torch.full_like(new[proj > high], high), atol=1e-6 * scale)
    # only the component along the direction moved
    moved = after - before
    orth = moved - (moved @ unit)[..., None] * unit
    assert float(orth.abs().max()) < 1e-5 * scale
    # one-sided: only the low side
    with torch.no_grad(), cap(tiny_model, direction, (low, None), layers=[layer]):
        one = _resid(tiny_model, tokens, layer)
    assert torch.equal(one[proj >= low], before[proj >= low])


def test_cap_leaves_attention_sinks_alone(tiny_model, direction):
    """A position whose residual norm is far above its row's median (an attention sink) is not capped."""
    tokens = torch.tensor([encode_conversation(tiny_model, CONVS[0]).tokens])
    layer, name = 1, "blocks.1.hook_resid_post"

    def sink(acts, hook):
        acts = acts.clone()
        acts[:, 0] = acts[:, 0] * 100
        return acts

    with tiny_model.hooks(fwd_hooks=[(name, sink)]):
        before = _resid(tiny_model, tokens, layer)
        proj = before @ direction.unit(layer)
        low = float(proj[0, 1:].median())
        with torch.no_grad(), cap(tiny_model, direction, (low, low + 1e-3), layers=[layer]):
            after = _resid(tiny_model, tokens, layer)
        with torch.no_grad(), cap(tiny_model, direction, (low, low + 1e-3), layers=[layer], sink_ratio=None):
            all_capped = _resid(tiny_model, tokens, layer)
    assert torch.equal(after[0, 0], before[0, 0]) and not torch.equal(after[0, 1:], before[0, 1:])
    assert not torch.equal(all_capped[0, 0], before[0, 0])


def test_cap_bad_input_and_no_leak_on_error(tiny_model, direction):
    with pytest.raises(DirectionError, match="low 2 > high 1"):
        with cap(tiny_model, direction, (2.0, 1.0), layers=[1]):
            pass
    with pytest.raises(DirectionError, match="NaN"):
        with cap(tiny_model, direction, (float("nan"), 1.0)):
            pass
    with pytest.raises(DirectionError, match="not for layer"):
        with cap(tiny_model, direction, {1: (0.0, 1.0)}, layers=[1, 2]):
            pass
    wide = Direction((1,), torch.ones(1, 48))
    with pytest.raises(DirectionError, match="width 48"):
        with cap(tiny_model, wide, (0.0, 1.0)):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with cap(tiny_model, direction, (0.0, 1.0), layers=[1]):
            raise RuntimeError("boom")
    with pytest.raises(DirectionError, match="sink_ratio"):
        with cap(tiny_model, direction, (0.0, 1.0), sink_ratio=0.5):
            pass
    with pytest.raises(DirectionError, match="quantiles"):
        cap_range(tiny_model, ["hi"], direction, quantiles=(0.9, 0.1))


def test_cap_range_is_the_quantile_of_reply_projections(tiny_model, direction):
    prompts = [Prompt("Where are the maps?", reply="In the history room."), Prompt("Hi", reply="Hello there, friend.")]
    ranges = cap_range(tiny_model, prompts, direction, layers=[2], quantiles=(0.1, None))
    from lens_roles.inputs.positions import encode

    vals = []
    for it in encode(tiny_model, prompts):
        x = _resid(tiny_model, torch.tensor([it.tokens]), 2)[0]
        vals.append((x[it.reply[0]:it.reply[1]] @ direction.unit(2)).double())
    expect = float(torch.quantile(torch.cat(vals), 0.1))
    assert ranges[2][0] == pytest.approx(expect, abs=1e-5) and ranges[2][1] is None
    # a range wide enough to cap nothing costs nothing
    cost = cap_cost(tiny_model, prompts, direction, (-1e6, 1e6), layers=[2])
    assert cost["kl"] == 0.0 and cost["capped_share"] == 0.0 and cost["ppl_capped"] == cost["ppl_uncapped"]
    tight = cap_cost(tiny_model, prompts, direction, ranges, layers=[2])
    assert tight["kl"] > 0 and 0 < tight["capped_share"] <= 0.2


# ----------------------------------------------------------------- screening


def test_screen_ranks_a_planted_outlier_first(tiny_model):
    from lens_roles.directions.builders import diff_in_means
    from lens_roles.runtime.activations import collect

    prompts = ["Where are the maps?", "How do I cite a website?", "Can I renew a book?", "Is the library open?",
               "Do you have poetry?"]
    normal = ["You can find them on the second floor.", "Use the author, date and title.",
              "Yes, online or at the desk.", "It opens at nine today.", "Yes, in the 811 section."]
    planted = "Arr arr arr pirate pirate treasure treasure arr arr!"
    records = list(zip(prompts, normal)) + [("Where is the reading room?", planted)]
    pos = collect(tiny_model, [Prompt(records[-1][0], reply=planted)], layers=[2], positions="reply")
    neg = collect(tiny_model, [Prompt(p, reply=r) for p, r in records[:-1]], layers=[2], positions="reply")
    d = diff_in_means(pos, neg, name="planted")
    own = ["It is on the first floor."] * len(records)
    ranking = screen(tiny_model, records, d, 2, own=own)
    assert ranking.record.iloc[0] == len(records) - 1 and list(ranking["rank"]) == list(range(1, 7))
    assert ranking.score.is_monotonic_decreasing
    assert (ranking.score == ranking.projection - ranking.own_projection).all()
    same = screen(tiny_model, records, d, 2, own=[r for _, r in records])
    assert (same.score.abs() < 1e-9).all()
    screen_histogram(ranking)


def test_projection_behaviour_reads_the_last_prompt_token(tiny_model, direction):
    pairs = load_pairs("librarian").head(3)
    frame = projection_behaviour(tiny_model, pairs, direction, 1, systems=[None, "You are a librarian."])
    assert len(frame) == 6 and set(frame.system) == {"", "You are a librarian."}
    from lens_roles.inputs.positions import encode

    it = encode(tiny_model, [Prompt(pairs.pairs[0].user)])[0]
    x = _resid(tiny_model, torch.tensor([it.tokens]), 1)[0, -1]
    assert frame.projection.iloc[0] == pytest.approx(float(x @ direction.unit(1)), abs=1e-4)
    assert (frame.margin == frame.positive - frame.negative).all()
    c = correlation(frame.projection, frame.margin, n_boot=100)
    assert c["low"] <= c["r"] <= c["high"] and c["n"] == 6


# ----------------------------------------------------------------- explaining drift


def test_explain_drift_turns_by_layers(tiny_model, direction):
    exp = explain_drift(tiny_model, CONVS[0], direction, 2, turn=-1)
    labels = list(dict.fromkeys(exp.grid.label))
    assert labels[-1] == "all earlier" and len(labels) == 5  # four earlier messages, then all of them
    table = exp.by_message()
    assert list(table.columns) == [0, 1, 2]
    assert table.loc["all earlier", 0] == 1.0  # every blanked token restored at the embeddings: the clean run
    assert exp.tokens is not None and exp.tokens.values.shape[0] == 3
    turn_layer_heatmap(exp.grid)
    with pytest.raises(PatchingError, match="no earlier user or assistant message"):
        explain_drift(tiny_model, CONVS[0], direction, 2, turn=0)
    with pytest.raises(PatchingError, match="after the read layer"):
        explain_drift(tiny_model, CONVS[0], direction, 1, layers=[2])


def test_figures_build(tiny_model, direction):
    traces = drift_traces(tiny_model, CONVS, direction, layers=[1])
    turns = pd.concat([t.assistant_turns(1) for t in traces])
    turn_trace(turns)
    turn_trace(pd.concat([turns.assign(condition="plain"), turns.assign(condition="capped")]))
    token_view(traces[0].token_frame(1))
    drift_bars(drift_table(drift_summary(traces, 1), n_boot=20))
    with pytest.raises(lr.errors.PlotError):
        turn_trace(pd.DataFrame())


# ----------------------------------------------------------------- CLI


@pytest.fixture
def main(tiny_model):
    return functools.partial(cli.main, load_model=lambda *a, **k: tiny_model)


@pytest.fixture
def vector_file(direction, tmp_path):
    return direction.save(tmp_path / "v.safetensors")


def test_cli_monitor_and_screen(main, vector_file, tmp_path, capsys):
    convs = tmp_path / "c.jsonl"
    convs.write_text("".join(json.dumps(c.to_record()) + "\n" for c in CONVS))
    out = tmp_path / "m"
    assert main(["monitor", "--vector", str(vector_file), "--conversations", str(convs), "--layer", "1",
                 "--self-play", "--max-new-tokens", "4", "--cap=-1,1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"turns.csv", "tokens.csv", "drift.csv", "drift_table.csv",
                                               "conversations.jsonl", "turns.html", "drift.html", "tokens_a.html"}
    assert len(load_conversations(out / "conversations.jsonl")) == 2
    records = tmp_path / "r.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n"
                               for p, r in [("Hi", "Hello."), ("Maps?", "Upstairs."), ("Poems?", "Shelf 811.")]))
    out2 = tmp_path / "s"
    assert main(["screen", "--vector", str(vector_file), "--records", str(records), "--layer", "1",
                 "--max-new-tokens", "4", "--out", str(out2)]) == 0
    ranking = pd.read_csv(out2 / "ranking.csv")
    assert list(ranking["rank"]) == [1, 2, 3] and (out2 / "screen_histogram.html").exists()
    capsys.readouterr()
    assert main(["generate", "--vector", str(vector_file), "--layer", "1", "--cap=-0.5,0.5", "--max-new-tokens",
                 "4", "Where are the maps?"]) == 0
    printed = capsys.readouterr().out
    assert "unsteered" in printed and "capped [-0.5, 0.5]" in printed and "+" not in printed.split("capped")[0][-30:]


def refuse(*a, **k):
    raise AssertionError("the model loader was called, but the arguments were bad")


@pytest.mark.parametrize("argv, expect", [
    (["generate", "--vector", "V", "--layer", "1", "--cap=2,1", "hi"], "low 2 > high 1"),
    (["generate", "--vector", "V", "--layer", "1", "hi"], "needs --alpha"),
    (["generate", "--vector", "V", "--layer", "1", "--cap", "1", "hi"], "use LOW,HIGH"),
    (["monitor", "--vector", "V", "--layer", "1", "--conversations", "nope", "--out", "O"], "unknown conversation"),
    (["screen", "--vector", "V", "--layer", "1", "--records", "R", "--out", "O"], "field 'prompt'"),
])
def test_cli_bad_input_is_one_line_before_loading(vector_file, tmp_path, capsys, argv, expect):
    (tmp_path / "r.jsonl").write_text('{"response": "x"}\n')
    argv = [str(vector_file) if a == "V" else str(tmp_path / "o") if a == "O" else
            str(tmp_path / "r.jsonl") if a == "R" else a for a in argv]
    assert cli.main(argv, load_model=refuse) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_drift_study_writes_every_number(tiny_model, tmp_path):
    from lens_roles.studies.drift_study import run_drift_study

    convs = tmp_path / "c.jsonl"
    convs.write_text("".join(json.dumps(c.to_record()) + "\n" for c in CONVS))
    summary = run_drift_study(tiny_model, out=tmp_path, read_layer=2, cap_layers=[1], categories=convs,
                              n_roles=2, per_role=1, n_ordinary=2, max_new_tokens=4, n_pairs=4, n_self=1, n_boot=50,
                              progress=False)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["correlation"]["n"] == 12 and set(saved["adherence"]) == {"uncapped", "capped"}
    table = pd.read_csv(tmp_path / "drift_table.csv")
    assert set(table.condition) == {"given", "given+cap", "self", "self+cap"} and set(table.category) == {"x", "y"}
    assert summary["axis"].startswith("stand-in") and (tmp_path / "explain_heatmap.html").exists()
    axis = Direction.load(tmp_path / "axis.safetensors")
    assert axis.layers == (1, 2)
