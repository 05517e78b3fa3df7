"""Shared fixtures: a tiny random HookedTransformer with a real (tiny) tokenizer,
the real default model for integration tests, and a guard that no test leaves a
hook on any model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# The suite needs no browser: figures are written as HTML only (set LENS_ROLES_PNG=1 to
# exercise PNG export too). Notebook kernels inherit this.
os.environ.setdefault("LENS_ROLES_PNG", "0")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_MODELS: list = []


def _corpus() -> list[str]:
    texts = []
    # a fixed corpus (the librarian pairs and the first 11 role files), so that data added elsewhere
    # under lens_roles/data does not change the tiny tokenizer and every test built on its lengths
    data = REPO / "lens_roles" / "data"
    for path in [data / "personas" / "librarian.jsonl", *sorted((data / "roles").glob("*.jsonl"))[:11]]:
        for line in path.read_text().splitlines():
            texts.extend(v for v in json.loads(line).values() if isinstance(v, str))
    return texts


def make_tokenizer(chat: bool = True):
    """A byte-level BPE tokenizer (vocab 512) trained in memory on the project's prompts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    if chat:
        fast.chat_template = CHATML
    # TransformerLens reloads tokenizers by path, so give it one.
    import tempfile

    folder = tempfile.mkdtemp(prefix="lens-roles-tok-")
    fast.save_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def make_tiny_model(tokenizer, *, n_layers: int = 3, seed: int = 0, name: str = "tiny-test",
                    n_key_value_heads: int | None = None):
    """A random 3-layer rotary, RMS-normed HookedTransformer (d_model 32, 4 heads; grouped-query
    attention with ``n_key_value_heads`` key/value heads when given)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_ctx=256,
        d_vocab=len(tokenizer),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        model_name=name,
        seed=seed,
        n_key_value_heads=n_key_value_heads,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    _MODELS.append(model)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_tiny_model(tiny_tokenizer)


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per session."""
    from lens_roles import load_model

    model = load_model()
    _MODELS.append(model)
    return model


def hooks_left(model) -> list[str]:
    return [
        name
        for name, hp in model.hook_dict.items()
        if hp._forward_hooks or hp._backward_hooks or getattr(hp, "fwd_hooks", None) or getattr(hp, "bwd_hooks", None)
    ]


@pytest.fixture(autouse=True)
def no_hook_leaks():
    """Every test must leave every model it touched without hooks."""
    yield
    for model in _MODELS:
        left = hooks_left(model)
        assert not left, f"hooks left on {model.cfg.model_name}: {left}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data expected at {SHARED_DATA} (../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """The tiny model's ops are far too small for two threads: on a shared machine one is ~30x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
