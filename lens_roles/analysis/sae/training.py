"""Training residual-stream SAEs with ``sae_lens`` and saving them in its folder format."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor

from lens_roles._version import __version__
from lens_roles.config import Config
from lens_roles.errors import ConfigError, OutputError, SAEError
from lens_roles.runtime.models import resid_hook


@dataclass(frozen=True)
class SAETrainConfig(Config):
    """How an SAE is trained (``k`` for TopK or BatchTopK, ``l1`` for a ReLU SAE with an L1 penalty).

    ``architecture`` is ``"topk"`` (exactly ``k`` features per token) or ``"batchtopk"``
    (``k`` per token on average over a batch; saved for inference as a JumpReLU SAE with
    the learnt global threshold) when ``k`` is given; ``"standard"`` with ``l1``.
    ``samples`` activations are drawn, in seeded shuffled epochs over the harvested tokens.
    Dead features (no firing over ``dead_feature_window`` steps) are revived by the TopK
    family's auxiliary loss (``sae_lens``'s AuxK, coefficient 1).
    """

    d_sae: int = 2304
    k: int | None = 32
    l1: float | None = None
    samples: int = 1_000_000
    batch_size: int = 1024
    lr: float = 5e-4
    seed: int = 0
    architecture: str = "topk"

    @property
    def label(self) -> str:
        """A short name for tables: ``topk k=32``, ``batchtopk k=64``, ``l1 0.5``."""
        return f"{self.architecture} k={self.k}" if self.k is not None else f"l1 {self.l1}"

    def __post_init__(self):
        if (self.k is None) == (self.l1 is None):
            raise ConfigError(f"SAETrainConfig: give exactly one of k (TopK SAE) and l1 (L1-penalised ReLU SAE), "
                              f"got k={self.k!r} and l1={self.l1!r}")
        wanted = ("topk", "batchtopk") if self.k is not None else ("standard",)
        if self.l1 is not None and self.architecture == "topk":  # the default, for l1 read as standard
            object.__setattr__(self, "architecture", "standard")
        if self.architecture not in wanted:
            raise ConfigError(f"SAETrainConfig: architecture {self.architecture!r} does not go with "
                              f"{'k' if self.k is not None else 'l1'}; use one of {', '.join(wanted)}")
        if self.k is not None and not 0 < self.k < self.d_sae:
            raise ConfigError(f"SAETrainConfig: k must be in 1..d_sae-1, got k={self.k!r} with d_sae={self.d_sae!r}")
        if self.l1 is not None and not self.l1 > 0:
            raise ConfigError(f"SAETrainConfig: l1 must be > 0, got {self.l1!r}")
        for name in ("d_sae", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SAETrainConfig: {name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"SAETrainConfig: lr must be > 0, got {self.lr!r}")


def _shuffled_batches(acts: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield acts[order[start:start + batch_size]]


def train_sae(acts: Float[Tensor, "token d_model"], *, layer: int, model_name: str,
              config: SAETrainConfig = SAETrainConfig(), provenance: dict | None = None,
              progress: bool = False):
    """Train an SAE on ``acts`` (from :func:`harvest`) with ``sae_lens``'s ``SAETrainer``.

    Activations are scaled to a mean norm of ``sqrt(d_model)`` while training and the
    scale is folded back into the weights; decoder rows are then folded to unit norm,
    so ``decoder_directions`` equals ``W_dec``. Returns the inference SAE (float32,
    CPU), its metadata naming the hook, the model and ``provenance``.
    """
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    if acts.ndim != 2 or len(acts) < config.batch_size:
        raise SAEError(f"training needs [token, d_model] activations with at least batch_size={config.batch_size} "
                       f"tokens, got shape {tuple(acts.shape)}")
    torch.manual_seed(config.seed)
    metadata = SAEMetadata(model_name=model_name, hook_name=resid_hook(layer), hook_head_index=None,
                           prepend_bos=True, context_size=None, lens_roles_version=__version__,
                           lens_roles_training=dict(config.to_dict(), **(provenance or {})))
    common = dict(d_in=acts.shape[1], d_sae=config.d_sae, normalize_activations="expected_average_only_in",
                  metadata=metadata)
    steps = config.samples // config.batch_size
    if config.architecture == "batchtopk":
        # The inference threshold is an EMA of each batch's smallest kept activation, started at 0
        # with rate 0.01: after 117 steps it is still 31 % short, far too many features pass, and the
        # saved JumpReLU SAE reconstructed worse than the mean (EV -0.7 on held-out text). A rate of
        # at least 5 / steps leaves under 1 % of that start-up bias however short the run.
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=config.k, topk_threshold_lr=max(0.01, 5 / steps),
                                                              **common))
    elif config.k is not None:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=config.k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=config.l1,
                                                            l1_warm_up_steps=max(1, config.samples // config.batch_size
                                                                                 // 20), **common))
    steps = config.samples // config.batch_size
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * config.batch_size,
                                   train_batch_size_samples=config.batch_size, lr=config.lr,
                                   lr_scheduler_name="constant", lr_warm_up_steps=max(1, steps // 20),
                                   lr_decay_steps=max(1, steps // 5), lr_end=config.lr / 10,
                                   dead_feature_window=max(50, steps // 10),
                                   feature_sampling_window=max(50, steps // 10),
                                   n_batches_for_norm_estimate=min(50, max(1, len(acts) // config.batch_size)))
    data = _shuffled_batches(acts, config.batch_size, config.seed)
    trainer = SAETrainer(trainer_cfg, sae, data)
    if not progress:
        trainer._update_pbar = lambda *a, **k: None  # noqa: SLF001 (tqdm bar off outside terminals)
    trainer.fit()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)
        return SAE.load_from_disk(tmp, device="cpu", dtype="float32", fold_W_dec_norm=True)


def save_sae(sae, path: str | Path, *, dtype: torch.dtype = torch.float16, extra: dict | None = None,
             tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``sae`` in ``sae_lens``'s folder format (``cfg.json``, ``sae_weights.safetensors``)
    with weights in ``dtype``, plus ``extra`` as ``lens_roles.json`` and each ``tensors`` entry
    (file name → tensors, e.g. the feature frequencies) as a safetensors file; the folder appears
    whole or not at all."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write the SAE folder {path}: a file of that name is in the way")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-sae-", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the SAE folder {path} ({exc.strerror or exc})") from None
    old = None
    try:
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sae.state_dict().items()}
        save_file(state, str(tmp / "sae_weights.safetensors"))
        cfg = sae.cfg.to_dict()
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        cfg["device"] = "cpu"
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=1, default=str))
        for name, content in (tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in content.items()}, str(tmp / name))
        if extra is not None:
            (tmp / "lens_roles.json").write_text(json.dumps(extra, indent=2, default=str))
        # mkdtemp makes the folder private (0700) and safetensors writes 0600; like the files of
        # lens_roles.io, the SAE is made readable by others (a shared SAE is read by other users)
        for item in tmp.iterdir():
            os.chmod(item, 0o644)
        os.chmod(tmp, 0o755)
        if path.exists():  # an older SAE is moved aside, and put back if the new one cannot take its place
            old = Path(tempfile.mkdtemp(prefix=".old-sae-", dir=path.parent))
            os.replace(path, old / "sae")
        os.replace(tmp, path)
    except OSError as exc:
        if old is not None and (old / "sae").exists() and not path.exists():
            os.replace(old / "sae", path)
        raise OutputError(f"cannot write the SAE folder {path} ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover)
    return path
