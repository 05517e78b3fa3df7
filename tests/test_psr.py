"""Prompt Steering Replacement on the tiny model: algebra, training, I/O, bad input, CLI."""

from __future__ import annotations

import functools
import math

import pandas as pd
import pytest
import torch

import lens_roles as lr
from lens_roles import cli
from lens_roles.errors import ConfigError, PlotError, PSRError
from lens_roles.inputs.prompts import Prompt
from lens_roles.interventions.psr.align import align, prompt_pairs, prompt_steering
from lens_roles.interventions.psr.evaluate import activation_distance, token_coefficients
from lens_roles.interventions.psr.model import PSR
from lens_roles.interventions.psr.train import TrainConfig, forward_batch, make_psr, prepare, psr_loss, train_psr
from lens_roles.interventions.steering import steer
from lens_roles.runtime.batching import pad_batch, pad_id
from lens_roles.studies.psr_compare import CompareConfig, compare_at_matched_coherence

SYSTEM = "You are a warm, knowledgeable public librarian."


@pytest.fixture(scope="module")
def pairs():
    return lr.load_pairs(lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl")


@pytest.fixture(scope="module")
def prompts(pairs):
    return [Prompt(p.user, None, p.positive) for p in pairs.pairs[:6]]


@pytest.fixture
def direction(tiny_model):
    torch.manual_seed(3)
    n = tiny_model.cfg.n_layers
    return lr.Direction(tuple(range(n)), torch.randn(n, tiny_model.cfg.d_model),
                        {"model": tiny_model.cfg.model_name, "name": "random"})


def _tokens(model, prompts):
    items = lr.encode(model, prompts)
    tokens, _ = pad_batch([it.tokens for it in items], pad_id(model))
    return tokens


@pytest.mark.parametrize("layers", [[1], [0, 1, 2]])
def test_lambda_one_is_constant_steering_bit_for_bit(tiny_model, direction, prompts, layers):
    tokens = _tokens(tiny_model, prompts)
    with torch.no_grad(), steer(tiny_model, direction, 1.7, layers=layers):
        ref = tiny_model(tokens)
    for psr in (PSR(direction, layers, 1.7, constant=True), PSR(direction, layers, 1.7)):  # constant; w=0, b=1
        with torch.no_grad(), psr.applied(tiny_model):
            out = tiny_model(tokens)
        assert torch.equal(out, ref)
    with torch.no_grad():
        plain = tiny_model(tokens)
    assert not torch.equal(plain, ref)


def test_sink_is_never_steered(tiny_model, direction, prompts):
    """make_psr's PSR leaves the first token (the attention sink) alone; λ ≡ 1 is then constant steering of
    every other token, bit for bit, and so is its constant twin."""
    psr = make_psr(tiny_model, direction, prompts, SYSTEM, layers=[1, 2], alpha=1.7)
    assert psr.has_sink
    with torch.no_grad():
        psr.b.fill_(1.0)  # λ ≡ 1 (make_psr starts a several-layer PSR at 1/L per layer)
    lam = token_coefficients(tiny_model, psr, prompts[:2])
    assert (lam[lam.position == 0].lam == 0).all() and (lam[lam.position > 0].lam == 1).all()
    tokens = _tokens(tiny_model, prompts)
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    with torch.no_grad():
        with steer(tiny_model, direction, 1.7, layers=[1, 2], positions=mask):
            ref = tiny_model(tokens)
        for p in (psr, psr.constant_twin(1.7)):
            with p.applied(tiny_model):
                assert torch.equal(tiny_model(tokens), ref)
        with steer(tiny_model, direction, 1.7, layers=[1, 2]):
            assert not torch.equal(tiny_model(tokens), ref)  # steering the sink does change the run

def test_sink_survives_save_and_load(tiny_model, direction, prompts, tmp_path):
    psr = make_psr(tiny_model, direction, prompts, SYSTEM, layers=[1], alpha=1.0)
    back = PSR.load(psr.save(tmp_path / "s.safetensors"), tiny_model)
    assert back.has_sink and torch.equal(back.sink, psr.sink)
    assert not PSR.load(PSR(direction, [1], 1.0).save(tmp_path / "n.safetensors"), tiny_model).has_sink


def test_sink_is_found_under_left_padding_and_kv_cache(tiny_model, direction, prompts):
    from lens_roles.runtime.generation import generate

    psr = make_psr(tiny_model, direction, prompts, SYSTEM, layers=[1], alpha=1.0)
    with torch.no_grad():
        psr.w.normal_(std=0.3)
    batch = [Prompt(p.user) for p in prompts[:3]]
    lengths = [len(it) for it in lr.encode(tiny_model, batch)]
    assert len(set(lengths)) > 1  # left padding differs per row
    record: list = []
    with psr.applied(tiny_model, record=record):
        cached = generate(tiny_model, batch, max_new_tokens=3)
    first = record[0][1]  # the prompt forward: [batch, width]
    width = first.shape[1]
    for r, n in enumerate(lengths):
        assert first[r, width - n] == 0  # each row's first real token
    with psr.applied(tiny_model):
        plain = generate(tiny_model, batch, max_new_tokens=3, use_kv_cache=False)
    assert [o.tokens for o in cached] == [o.tokens for o in plain]


def test_coefficient_is_relu_of_affine_map(tiny_model, direction):
    psr = PSR(direction, [1], 1.0)
    with torch.no_grad():
        psr.w.normal_()
        psr.b.fill_(-0.1)
    acts = torch.randn(2, 5, 32)
    unit = acts / acts.norm(dim=-1, keepdim=True)
    expected = torch.relu(unit @ psr.w[0] - 0.1)
    assert torch.allclose(psr.coefficient(acts, 0), expected)
    assert (psr.coefficient(acts, 0) == 0).any()  # the ReLU switches some tokens off


def test_alignment_from_the_user_turn(tiny_model, prompts):
    prompted, unprompted = prompt_pairs(prompts, SYSTEM)
    runs = align(tiny_model, prompted, unprompted)
    for run in runs:
        assert run.p_start > run.u_start  # the system prompt adds leading tokens
        assert run.prompted.tokens[run.p_start:] == run.unprompted.tokens[run.u_start:]
        assert run.length == len(run.unprompted) - run.u_start
        first_reply = run.unprompted.tokens[run.u_start + run.reply]
        assert first_reply == run.unprompted.tokens[run.unprompted.reply[0]]


def test_prompt_steering_frame(tiny_model, direction, prompts):
    frame = prompt_steering(tiny_model, direction, prompts[:2], SYSTEM, layers=[0, 2])
    assert list(frame.columns) == ["prompt", "position", "token", "part", "layer", "projection", "norm", "strength"]
    assert set(frame.layer) == {0, 2} and set(frame.part) == {"user", "template", "reply"}
    runs = align(tiny_model, *prompt_pairs(prompts[:2], SYSTEM))
    assert len(frame) == 2 * sum(r.length for r in runs)
    assert (frame.norm >= frame.projection.abs() - 1e-4).all()
    norms = direction.norms()
    row = frame.iloc[0]
    assert row.strength == pytest.approx(row.projection / norms[int(row.layer)], rel=1e-5)


def test_start_at_layer_forward_matches_hooked_run(tiny_model, direction, prompts):
    psr = PSR(direction, [1, 2], 0.8)
    with torch.no_grad():
        psr.w.normal_(std=0.5)
    data = prepare(tiny_model, psr, prompts[:3], SYSTEM, batch_size=3)
    batch = data.batches[0]
    with torch.no_grad():
        _, final = forward_batch(tiny_model, psr, batch, data)
        with psr.applied(tiny_model):
            ref = tiny_model(batch.tokens, stop_at_layer=tiny_model.cfg.n_layers)
    for r, run in enumerate(data.runs):  # real tokens only: padding differs and cannot matter
        n = len(run.unprompted)
        assert torch.allclose(final[r, :n], ref[r, :n], atol=1e-5)


@pytest.mark.parametrize("objective,layers", [("mse", "one"), ("kl", "one"), ("mse", "all")])
def test_training_reduces_loss_and_touches_only_psr(tiny_model, direction, prompts, objective, layers):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_model.named_parameters()}
    psr = make_psr(tiny_model, direction, prompts, SYSTEM, layers=layers, layer=1, alpha=1.0)
    history = train_psr(tiny_model, psr, prompts, SYSTEM, TrainConfig(objective=objective, epochs=6, lr=0.05,
                                                                       batch_size=3))
    assert list(history.columns) == ["epoch", "step", "objective", "loss", "seconds"]
    assert history.loss.iloc[-1] < history.loss.iloc[0]
    assert psr.w.grad is not None and psr.w.grad.abs().sum() > 0 and psr.b.grad is not None
    assert all(p.grad is None for p in tiny_model.parameters())
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in tiny_model.named_parameters()} == flags
    assert psr.meta["objective"] == objective and psr.meta["train_prompts"] == len(prompts)


class _SinkOnly(PSR):
    """λ = 1 at absolute position 0 (the first token, the attention sink) and 0 elsewhere."""

    def coefficient(self, acts, k):
        lam = torch.zeros(acts.shape[:-1], dtype=acts.dtype, device=acts.device)
        lam[:, 0] = 1.0
        return lam


def test_shared_prefix_is_compared(tiny_model, direction, prompts):
    runs = align(tiny_model, *prompt_pairs(prompts[:3], SYSTEM))
    assert all(0 < r.prefix <= r.u_start for r in runs)  # position 0 at least
    for r in runs:
        assert r.prompted.tokens[: r.prefix] == r.unprompted.tokens[: r.prefix]
        assert r.compared()[0][: r.prefix] == list(range(r.prefix)) == r.compared_kl()[0][: r.prefix]
    psr = PSR(direction, [1], 1.0)
    data = prepare(tiny_model, psr, prompts[:3], SYSTEM)
    for i, r in enumerate(runs):
        # causal model: the prompt cannot change the shared prefix, so there the target is the unprompted run
        assert torch.allclose(data.targets[1][i][: r.prefix], data.base[1][i][: r.prefix], atol=1e-5)
        assert data.targets[1][i].shape[0] == r.prefix + r.length


def test_loss_sees_steering_of_position_0(tiny_model, direction, prompts):
    """Steering only the attention sink (position 0) is an error the objectives see (it used to be invisible:
    read at the steered layer, the loss was exactly that of not steering)."""
    sink = _SinkOnly(direction, [1], 3.0)
    data = prepare(tiny_model, sink, prompts[:3], SYSTEM, read_layers=[1])
    unsteered = psr_loss(tiny_model, sink, data, constant_alpha=0.0)
    assert unsteered == pytest.approx(1.0, rel=1e-5)
    assert psr_loss(tiny_model, sink, data) > unsteered + 1e-3
    kl_data = prepare(tiny_model, sink, prompts[:3], SYSTEM)
    assert psr_loss(tiny_model, sink, kl_data, "kl") > psr_loss(tiny_model, sink, kl_data, "kl", constant_alpha=0.0)


def test_psr_loss_of_constant_matches_constant_psr(tiny_model, direction, prompts):
    psr = PSR(direction, [1], 1.3)
    data = prepare(tiny_model, psr, prompts[:3], SYSTEM)
    assert psr_loss(tiny_model, psr, data) == pytest.approx(psr_loss(tiny_model, psr, data, constant_alpha=1.3))
    assert psr_loss(tiny_model, psr, data, constant_alpha=0.0) == pytest.approx(1.0, rel=1e-5)


def test_activation_distance_and_coefficients(tiny_model, direction, prompts):
    psr = PSR(direction, [1], 1.0)
    with torch.no_grad():
        psr.w.normal_(std=0.3)
    data = prepare(tiny_model, psr, prompts[:3], SYSTEM)
    frame = activation_distance(tiny_model, psr, data)
    assert set(frame.method) == {"none", "constant", "psr"}
    assert (frame[frame.method == "none"].relative_mse == 1.0).all()
    assert frame[frame.method == "psr"].alpha.iloc[0] == frame[frame.method == "constant"].alpha.iloc[0] > 0
    lam = token_coefficients(tiny_model, PSR(direction, [0, 2], 2.0, constant=True), prompts[:1])
    assert set(lam.layer) == {0, 2} and (lam.lam == 1.0).all() and (lam.strength == 2.0).all()
    assert len(lam) == 2 * len(lr.encode(tiny_model, prompts[:1])[0])


def test_save_load_round_trip(tiny_model, direction, prompts, tmp_path):
    psr = PSR(direction, [0, 2], 0.7, meta={"system": SYSTEM})
    with torch.no_grad():
        psr.w.normal_()
        psr.b.uniform_()
    path = psr.save(tmp_path / "p.safetensors")
    assert path.with_suffix(".json").is_file()
    back = PSR.load(path, tiny_model)
    assert back.layers == (0, 2) and float(back.alpha) == pytest.approx(0.7) and back.meta["system"] == SYSTEM
    assert back.model_name == tiny_model.cfg.model_name
    tokens = _tokens(tiny_model, prompts[:2])
    with torch.no_grad():
        with psr.applied(tiny_model):
            a = tiny_model(tokens)
        with back.applied(tiny_model):
            b = tiny_model(tokens)
    assert torch.equal(a, b)
    assert not list(tmp_path.glob(".tmp-*"))


def test_bad_inputs(tiny_model, direction, prompts, tmp_path):
    with pytest.raises(PSRError, match="would change nothing"):
        prompt_steering(tiny_model, direction, prompts, "  ")
    # a template that drops the system message: the system prompt changes nothing
    tok = tiny_model.tokenizer
    saved = tok.chat_template
    tok.chat_template = saved.replace("{% for message in messages %}",
                                      "{% for message in messages if message['role'] != 'system' %}")
    try:
        with pytest.raises(PSRError, match="changes nothing"):
            prompt_steering(tiny_model, direction, prompts, SYSTEM)
    finally:
        tok.chat_template = saved
    other = lr.Direction(direction.layers, direction.vectors, {"model": "someone-else"})
    with pytest.raises(PSRError, match="made from 'someone-else'"):
        prompt_steering(tiny_model, other, prompts, SYSTEM)
    with pytest.raises(PSRError, match="someone-else"):
        make_psr(tiny_model, other, prompts, SYSTEM, alpha=1.0)
    path = PSR(other, [1], 1.0).save(tmp_path / "o.safetensors")
    with pytest.raises(PSRError, match="trained on 'someone-else'"):
        PSR.load(path, tiny_model)
    prompted, unprompted = prompt_pairs(prompts, SYSTEM)
    with pytest.raises(PSRError, match="6 prompted and 5 unprompted"):
        align(tiny_model, prompted, unprompted[:5])
    with pytest.raises(PSRError, match="different user turns"):
        align(tiny_model, prompted, unprompted[1:] + unprompted[:1])
    with pytest.raises(PSRError, match="different replies"):
        align(tiny_model, prompted, [Prompt(p.user, None, "Something else.") for p in unprompted])
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="l1")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(PSRError, match="nothing to train"):
        train_psr(tiny_model, PSR(direction, [1], 1.0, constant=True), prompts, SYSTEM)
    with pytest.raises(PSRError, match="needs prompts with replies"):
        train_psr(tiny_model, PSR(direction, [1], 1.0), [Prompt(p.user) for p in prompts[:2]], SYSTEM,
                  TrainConfig(objective="kl", epochs=1))
    deep = PSR(lr.Direction((7,), torch.ones(1, 32), {"model": tiny_model.cfg.model_name}), [7], 1.0)
    with pytest.raises(lr.ModelError, match="out of range"):
        deep.hooks(tiny_model)


def test_compare_at_matched_coherence(tiny_model, direction, pairs):
    held = lr.PairSet("held", pairs.pairs[:2])
    psr = PSR(direction, [1], 1.0)
    result = compare_at_matched_coherence(tiny_model, direction, psr, held, SYSTEM,
                                          config=CompareConfig(max_new_tokens=4, steps=2, alpha_hi=1.0))
    assert list(result.table.method) == ["none", "prompting", "constant", "psr"]
    assert {"alpha", "perplexity", "target_perplexity", "margin", "margin_gain", "matched"} <= set(result.table.columns)
    t = result.table
    assert list(t.matched) == [abs(math.log(p / q)) <= 0.05 for p, q in zip(t.perplexity, t.target_perplexity)]
    assert set(result.curve.method) == {"none", "prompting", "constant", "psr"}
    # λ ≡ 1 at init: PSR and constant steering see the same points
    c = result.curve[result.curve.method == "constant"].reset_index(drop=True)
    p = result.curve[result.curve.method == "psr"].reset_index(drop=True)
    pd.testing.assert_frame_equal(c.drop(columns="method"), p.drop(columns="method"))
    assert result.meta["model"] == tiny_model.cfg.model_name
    with pytest.raises(PSRError, match="different direction"):
        compare_at_matched_coherence(tiny_model, direction * 2.0, psr, held, SYSTEM)


@pytest.mark.filterwarnings("ignore:.*did not reach the target perplexity:UserWarning")  # one bisection step
def test_compare_for_a_role_without_pairs(tiny_model, direction, pairs):
    """A role has instructions, not contrast pairs: coherence on its prompts, behaviour = the MC effect."""
    from lens_roles.inputs.questions import Question, QuestionSet

    held = lr.PromptSet("role", tuple(Prompt(p.user) for p in pairs.pairs[:2]))
    psr = PSR(direction, [1], 1.0)
    config = CompareConfig(max_new_tokens=4, steps=1, alpha_hi=1.0)
    with pytest.raises(PSRError, match="pass questions"):
        compare_at_matched_coherence(tiny_model, direction, psr, held, SYSTEM, config=config)
    qs = QuestionSet("q", tuple(Question(f"Which letter is {a}?\n A. a\n B. b\n Answer:", ("A", "B"), a, f"q:{i}")
                                for i, a in enumerate("AB")))
    result = compare_at_matched_coherence(tiny_model, direction, psr, held, SYSTEM, questions=qs, config=config)
    assert list(result.table.method) == ["none", "prompting", "constant", "psr"]
    assert result.table.margin.isna().all() and result.table.mc_effect.notna().all()
    assert result.table.mc_effect.iloc[0] == 0.0 and result.meta["pairs_kind"] == "prompts"
    assert {"mean_strength"} <= set(result.curve.columns)


def test_plots(tiny_model, direction, prompts):
    from lens_roles.viz import psr_coherence_curve, token_heatmap

    curve = pd.DataFrame({"method": ["none", "prompting", "constant", "constant", "psr"], "alpha": [0, 0, 1, 2, 1],
                          "perplexity": [2.0, 3.0, 2.5, 4.0, 3.1], "margin": [0.0, 0.5, 0.2, 0.3, 0.4]})
    table = curve.drop_duplicates("method", keep="last").assign(target_perplexity=3.0)
    assert len(psr_coherence_curve(curve, table).data) == 4 + len(table) + 1  # lines, matched stars, target line
    strength = curve.assign(mean_strength=[None, None, 1.0, 2.0, 1.0])
    fig = psr_coherence_curve(strength, strength.drop_duplicates("method", keep="last").assign(target_perplexity=3.0),
                              y="mean_strength")
    assert "strength" in fig.layout.yaxis.title.text
    with pytest.raises(PlotError, match="unknown y"):
        psr_coherence_curve(curve, y="accuracy")
    lam = token_coefficients(tiny_model, PSR(direction, [0, 2], 1.0), prompts[:1])
    fig = token_heatmap(lam)
    assert fig.data[0].z.shape == (2, lam.position.nunique())
    steering = prompt_steering(tiny_model, direction, prompts[:1], SYSTEM, layers=[0, 1])
    assert token_heatmap(steering, value="projection").data[0].zmid == 0


@pytest.fixture
def main(tiny_model):
    """``lens-roles`` with the tiny model as its model loader."""
    return functools.partial(cli.main, load_model=lambda *a, **k: tiny_model)


@pytest.fixture
def cli_files(direction, tmp_path):
    return direction.save(tmp_path / "v.safetensors"), lr.inputs.prompts.data_dir() / "personas" / "librarian.jsonl"


@pytest.mark.filterwarnings("ignore:.*did not reach the target perplexity:UserWarning")  # one bisection step
def test_cli_train_and_compare(main, cli_files, tmp_path, capsys):
    vector, pairs = cli_files
    out = tmp_path / "psr"
    assert main(["psr", "train", "--vector", str(vector), "--system-prompt", SYSTEM, "--prompts", str(pairs),
                 "--layers", "one", "--layer", "1", "--alpha", "1", "--objective", "kl", "--epochs", "1",
                 "--max-prompts", "4", "--max-held-out", "2", "--out", str(out)]) == 0
    assert (out / "psr.safetensors").is_file() and (out / "history.csv").is_file()
    dist = pd.read_csv(out / "distance.csv")
    assert set(dist.method) == {"none", "constant", "constant_all_tokens", "psr"}  # make_psr skips the sink
    assert (out / "lambda_tokens.html").is_file()
    assert "relative" in capsys.readouterr().out
    cmp_out = tmp_path / "cmp"
    assert main(["psr", "compare", "--vector", str(vector), "--psr", str(out / "psr.safetensors"), "--pairs",
                 str(pairs), "--system-prompt", SYSTEM, "--max-pairs", "2", "--max-new-tokens", "4", "--steps", "1",
                 "--out", str(cmp_out)]) == 0
    table = pd.read_csv(cmp_out / "matched.csv")
    assert list(table.method) == ["none", "prompting", "constant", "psr"]
    assert (cmp_out / "curve.csv").is_file() and (cmp_out / "matched_coherence.html").is_file()


@pytest.mark.filterwarnings("ignore:.*did not reach the target perplexity:UserWarning")  # one bisection step
def test_cli_compare_for_a_role(main, cli_files, tmp_path, capsys):
    import json

    vector, pairs = cli_files
    out = tmp_path / "psr"
    role = tmp_path / "role.jsonl"
    role.write_text("".join(json.dumps({"instruction": p.user}) + "\n" for p in lr.load_pairs(pairs).pairs[:8]))
    assert main(["psr", "train", "--vector", str(vector), "--system-prompt", "You are a chemist.", "--prompts",
                 str(role), "--layer", "1", "--alpha", "1", "--epochs", "1", "--out", str(out)]) == 0
    qdir = tmp_path / "q"
    qdir.mkdir()
    items = [{"instruction": f"Pick {a}.\n A. a\n B. b\n C. c\n D. d\n Answer:", "target_score": a} for a in "AB"]
    (qdir / "target_test_chem.json").write_text(json.dumps(items))
    args = ["psr", "compare", "--vector", str(vector), "--psr", str(out / "psr.safetensors"), "--pairs", str(role),
            "--max-pairs", "2", "--max-new-tokens", "4", "--steps", "1", "--out", str(tmp_path / "cmp")]
    assert main(args) == 2  # instructions without questions: no behaviour to measure
    assert "positive" in capsys.readouterr().err
    assert main(args + ["--questions", str(qdir), "--domains", "chem"]) == 0
    table = pd.read_csv(tmp_path / "cmp" / "matched.csv")
    assert table.margin.isna().all() and table.mc_accuracy.notna().all()


def test_cli_bad_input(main, cli_files, tmp_path, capsys):
    vector, pairs = cli_files
    other = lr.Direction((1,), torch.ones(1, 32), {"model": "someone-else"}).save(tmp_path / "other.safetensors")
    out = tmp_path / "o"
    assert main(["psr", "train", "--vector", str(other), "--system-prompt", SYSTEM, "--prompts", str(pairs),
                 "--out", str(out)]) == 2
    assert "someone-else" in capsys.readouterr().err
    assert main(["psr", "train", "--vector", str(vector), "--system-prompt", "", "--prompts", str(pairs),
                 "--out", str(out)]) == 2
    assert "change nothing" in capsys.readouterr().err
    assert not out.exists()


def test_training_progress_goes_to_stderr(tiny_model, direction, prompts, capsys):
    """train_psr is quiet by default; with progress a tqdm bar on stderr counts the steps and shows the loss."""
    config = TrainConfig(objective="mse", epochs=2, lr=0.05, batch_size=3)
    quiet = train_psr(tiny_model, make_psr(tiny_model, direction, prompts, SYSTEM, layer=1, alpha=1.0), prompts,
                      SYSTEM, config)
    assert capsys.readouterr() == ("", "")
    history = train_psr(tiny_model, make_psr(tiny_model, direction, prompts, SYSTEM, layer=1, alpha=1.0), prompts,
                        SYSTEM, config, progress=True)
    out, err = capsys.readouterr()
    steps = int(history.step.iloc[-1])
    assert out == "" and "PSR training: 100%|" in err and f"{steps}/{steps}" in err
    assert f"epoch 2: mse loss {history.loss.iloc[-1]:.4f}" in err
    pd.testing.assert_frame_equal(history.drop(columns="seconds"), quiet.drop(columns="seconds"))


def test_compare_warns_when_a_method_misses_the_target(tiny_model, direction, pairs, capsys):
    """The closest point is reported either way; a missed target is a warning, the points a bar on stderr."""
    held = lr.PairSet("held", pairs.pairs[:2])
    psr = PSR(direction, [1], 1.0)
    config = CompareConfig(max_new_tokens=2, steps=1, alpha_hi=1.0, target_perplexity=1e12)
    with pytest.warns(UserWarning, match="did not reach the target perplexity 1000000000000.000") as caught:
        result = compare_at_matched_coherence(tiny_model, direction, psr, held, SYSTEM, config=config)
    assert {str(w.message).split()[0] for w in caught} == {"constant", "psr"}
    assert not result.table.matched.iloc[2:].any()
    out, err = capsys.readouterr()
    n = len(result.curve)
    assert out == "" and "matched coherence: 100%|" in err and f"{n}/{n}" in err


def test_bisection_brackets_then_returns_the_closest_point():
    from lens_roles.studies.psr_compare import bisect_to_target

    calls = []

    def evaluate(alpha):  # perplexity grows linearly: 1 + alpha
        calls.append(alpha)
        return {"alpha": alpha, "perplexity": 1.0 + alpha}

    best = bisect_to_target(evaluate, hi=1.0, target=5.0, steps=6)
    assert calls[:4] == [1.0, 2.0, 4.0, 3.0]  # doubled until 1 + hi >= 5, then bisected on [2, 4]
    assert abs(best["perplexity"] - 5.0) <= 4.0 / 2 ** 6  # within one bisection step of the target
    out_of_reach = bisect_to_target(lambda a: {"perplexity": 2.0}, hi=1.0, target=5.0, steps=2, max_brackets=3)
    assert out_of_reach["perplexity"] == 2.0
