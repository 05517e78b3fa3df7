"""Unit tests of lens_roles.inputs.positions: token spans and position rules on the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lens_roles.errors import DataError
from lens_roles.inputs.positions import (
    NAMED_RULES,
    _char_span_to_tokens,
    _token_starts,
    default_prepend_bos,
    encode,
    rule_name,
    select_positions,
)
from lens_roles.inputs.prompts import Prompt

CHAT_EOI = "<|im_end|>\n<|im_start|>assistant\n"

PROMPTS = [
    Prompt("How do I cite a website in APA style?", reply="Happy to help! You need the author and date."),
    Prompt(
        "I'm looking for books on beekeeping for beginners.",
        system="You are a librarian.",
        reply="Wonderful hobby! Our beekeeping guides are in the 638 section.",
    ),
    Prompt("Can you renew my library card?", reply="Sure."),
]


def _decode(tok, ids):
    return tok.decode(list(ids))


@pytest.fixture
def items(tiny_model):
    return encode(tiny_model, PROMPTS)


def test_chat_spans_decode_back(tiny_model, tiny_tokenizer, items):
    for prompt, item in zip(PROMPTS, items):
        assert item.user[1] == item.eoi[0]
        assert item.eoi[1] == item.reply[0]
        assert item.reply[1] == len(item)
        assert _decode(tiny_tokenizer, item.tokens[slice(*item.user)]) == prompt.user
        assert _decode(tiny_tokenizer, item.tokens[slice(*item.reply)]).lstrip() == prompt.reply.lstrip()
        assert _decode(tiny_tokenizer, item.tokens[slice(*item.eoi)]) == CHAT_EOI
        # the tokens are exactly the tokenised rendered text (no BOS for the chat template)
        assert _decode(tiny_tokenizer, item.tokens).startswith("<|im_start|>")


def test_eoi_picks_template_tokens(tiny_tokenizer, items):
    eoi_ids = tiny_tokenizer(CHAT_EOI, add_special_tokens=False)["input_ids"]
    pos = select_positions(items, "eoi")
    for item, p in zip(items, pos):
        assert p == list(range(*item.eoi))
        assert [item.tokens[j] for j in p] == eoi_ids
        assert tiny_tokenizer.convert_ids_to_tokens([item.tokens[p[0]]]) == ["<|im_end|>"]


def test_named_rules(items):
    assert select_positions(items, "last") == [[len(it) - 1] for it in items]
    assert select_positions(items, "all") == [list(range(len(it))) for it in items]
    assert select_positions(items, "reply") == [list(range(*it.reply)) for it in items]
    assert select_positions(items, "user") == [list(range(*it.user)) for it in items]
    assert set(NAMED_RULES) == {"last", "eoi", "reply", "user", "all"}
    assert rule_name("eoi") == "eoi" and rule_name([[0]]) == "explicit"


def test_last_without_reply_is_last_template_token(tiny_model, tiny_tokenizer):
    item = encode(tiny_model, [Prompt("Hello there")])[0]
    assert item.reply is None
    assert select_positions([item], "last") == [[len(item) - 1]]
    assert item.eoi[1] == len(item)
    assert _decode(tiny_tokenizer, item.tokens[-1:]) == "\n"


def test_explicit_indices(items):
    _, n1, n2 = (len(it) for it in items)
    pos = select_positions(items, [[2, 0, 2], [-1], [0, -n2, n2 - 1]])
    assert pos == [[0, 2], [n1 - 1], [0, n2 - 1]]
    # a tensor of indices works like a list
    assert select_positions(items, [torch.tensor([1, 3]), [0], [-2]]) == [[1, 3], [0], [n2 - 2]]


def test_boolean_masks(items):
    masks = []
    expected = []
    for k, item in enumerate(items):
        m = torch.zeros(len(item), dtype=torch.bool)
        m[k::3] = True
        masks.append(m)
        expected.append(list(range(k, len(item), 3)))
    assert select_positions(items, masks) == expected


def test_boolean_mask_as_python_list(items):
    item = items[0]
    mask = [False] * len(item)
    mask[-1] = True
    mask[-2] = True
    assert select_positions([item], [mask]) == [[len(item) - 2, len(item) - 1]]


def test_errors(tiny_model, items):
    with pytest.raises(DataError, match="unknown position rule"):
        select_positions(items, "middle")
    no_reply = encode(tiny_model, [Prompt("a question"), Prompt("another one")])
    with pytest.raises(DataError, match="prompt 0 has no reply"):
        select_positions(no_reply, "reply")
    n0 = len(items[0])
    with pytest.raises(DataError) as err:
        select_positions(items, [[n0], [0], [0]])
    assert str(n0) in str(err.value) and "prompt 0" in str(err.value)
    with pytest.raises(DataError):
        select_positions(items, [[0], [-len(items[1]) - 1], [0]])
    with pytest.raises(DataError, match="shape"):
        select_positions(items, [torch.ones(n0 + 1, dtype=torch.bool), [0], [0]])
    with pytest.raises(DataError, match="select no token"):
        select_positions(items, [torch.zeros(n0, dtype=torch.bool), [0], [0]])
    with pytest.raises(DataError, match="select no token"):
        select_positions(items, [[], [0], [0]])
    with pytest.raises(DataError, match="2 entries for 3 prompts"):
        select_positions(items, [[0], [0]])


def test_prepend_bos_plain_template(tiny_model, tiny_tokenizer):
    bos = tiny_tokenizer.bos_token_id
    prompt = [Prompt("How do I cite a website?", reply="Happy to help!")]
    assert tiny_model.cfg.default_prepend_bos
    assert default_prepend_bos(tiny_model, "plain") is True
    assert default_prepend_bos(tiny_model, "chat") is False
    without = encode(tiny_model, prompt, template="plain", prepend_bos=False)[0]
    with_bos = encode(tiny_model, prompt, template="plain", prepend_bos=True)[0]
    default = encode(tiny_model, prompt, template="plain")[0]
    assert default == with_bos
    assert without.tokens[0] != bos
    assert with_bos.tokens == (bos,) + without.tokens
    assert with_bos.tokens.count(bos) == without.tokens.count(bos) + 1
    for span in ("user", "eoi", "reply"):
        a, b = getattr(without, span)
        assert getattr(with_bos, span) == (a + 1, b + 1)
    assert _decode(tiny_tokenizer, with_bos.tokens[slice(*with_bos.eoi)]) == "\n\nAssistant:"
    # the chat template brings its own start token: no BOS by default
    chat = encode(tiny_model, prompt)[0]
    assert chat.tokens[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert bos not in chat.tokens


def test_plain_spans_decode_back_without_merges(tiny_model, tiny_tokenizer):
    # "How" and "Sure" are not merged with the preceding space by the tiny tokenizer
    prompt = Prompt("How do I cite it?", reply="Sure, here it is.")
    item = encode(tiny_model, [prompt], template="plain")[0]
    assert _decode(tiny_tokenizer, item.tokens[slice(*item.user)]).lstrip() == prompt.user
    assert _decode(tiny_tokenizer, item.tokens[slice(*item.reply)]).lstrip() == prompt.reply


def test_plain_spans_keep_first_word(tiny_model, tiny_tokenizer):
    prompt = Prompt("to help you", reply="to help you")
    item = encode(tiny_model, [prompt], template="plain", prepend_bos=False)[0]
    assert _decode(tiny_tokenizer, item.tokens[slice(*item.user)]).strip() == prompt.user
    assert _decode(tiny_tokenizer, item.tokens[slice(*item.reply)]).strip() == prompt.reply


def test_char_span_to_tokens():
    text = "abc defg."
    offsets = [(0, 0), (0, 3), (3, 4), (4, 8), (8, 9)]
    starts = _token_starts(text, offsets)
    assert starts == [None, 0, 3, 4, 8]  # the lone space token keeps its own start
    assert _char_span_to_tokens(starts, (3, 8)) == (2, 4)
    assert _char_span_to_tokens(starts, (0, 3)) == (1, 2)  # empty (special) offsets are skipped
    assert _char_span_to_tokens(starts, (9, 12)) == (0, 0)
    # a token that glues the separating space to a word belongs to the word's span
    glued = _token_starts("ab cd", [(0, 2), (2, 5)])
    assert glued == [0, 3]
    assert _char_span_to_tokens(glued, (3, 5)) == (1, 2)


def test_encode_needs_tokenizer():
    model = SimpleNamespace(tokenizer=None, cfg=SimpleNamespace(default_prepend_bos=True))
    with pytest.raises(DataError, match="no tokenizer"):
        encode(model, [Prompt("x")])
