"""Lining up a prompted and an unprompted run, and measuring how a system prompt steers (prompt steering)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from lens_roles.directions.direction import Direction
from lens_roles.errors import DirectionError, PSRError
from lens_roles.inputs.positions import Encoded, encode
from lens_roles.inputs.prompts import Prompt, as_prompts, common_prefix_len
from lens_roles.runtime.activations import residual_rows
from lens_roles.runtime.models import validate_layers


@dataclass(frozen=True)
class Aligned:
    """A prompted and an unprompted run of one prompt, and where they line up.

    ``prompted.tokens[p_start + i] == unprompted.tokens[u_start + i]`` for
    ``0 <= i < length``; ``reply`` is the aligned index where the reply starts
    (None without a reply). ``prefix``: the leading tokens both runs share before
    the system prompts differ (e.g. the first ``<|im_start|>system``), at the same
    positions in both; a causal model computes the same activations there in both
    runs, so the prompt does not change them (position 0, the attention sink,
    among them).
    """

    prompted: Encoded
    unprompted: Encoded
    p_start: int
    u_start: int
    length: int
    reply: int | None
    prefix: int = 0

    def unprompted_positions(self) -> list[int]:
        return list(range(self.u_start, self.u_start + self.length))

    def prompted_positions(self) -> list[int]:
        return list(range(self.p_start, self.p_start + self.length))

    def predicting_reply(self) -> list[int]:
        """Unprompted positions whose next token is a reply token."""
        if self.reply is None:
            return []
        return list(range(self.u_start + self.reply - 1, self.u_start + self.length - 1))

    def compared(self) -> tuple[list[int], list[int]]:
        """``(unprompted, prompted)`` positions the MSE objective compares: the shared prefix, then the aligned tail."""
        head = list(range(self.prefix))
        return head + self.unprompted_positions(), head + self.prompted_positions()

    def compared_kl(self) -> tuple[list[int], list[int]]:
        """``(unprompted, prompted)`` positions the KL objective compares: the shared prefix (whose next-token
        distributions the prompt cannot change), then the positions predicting reply tokens."""
        head = list(range(self.prefix))
        shift = self.p_start - self.u_start
        return head + self.predicting_reply(), head + [q + shift for q in self.predicting_reply()]


def prompt_pairs(prompts, system: str) -> tuple[list[Prompt], list[Prompt]]:
    """``(prompted, unprompted)``: each prompt with ``system`` as its system prompt, and without one."""
    if not isinstance(system, str) or not system.strip():
        raise PSRError(f"the system prompt must be a non-empty string, got {system!r}: it would change nothing")
    plist = as_prompts(prompts)
    return [Prompt(p.user, system, p.reply) for p in plist], [Prompt(p.user, None, p.reply) for p in plist]


def align(model, prompted: Sequence[Prompt], unprompted: Sequence[Prompt], *,
          template: str | None = None) -> list[Aligned]:
    """Encode both runs and line them up from the start of the user turn.

    Raises:
        PSRError: different numbers of prompts; a pair whose user turns or replies
            differ, or whose tokens from the user turn on differ; or a pair whose
            two runs are token for token the same (the system prompt changes nothing).
    """
    prompted, unprompted = as_prompts(prompted), as_prompts(unprompted)
    if len(prompted) != len(unprompted):
        raise PSRError(f"mismatched prompt sets: {len(prompted)} prompted and {len(unprompted)} unprompted prompts")
    for i, (p, u) in enumerate(zip(prompted, unprompted)):
        if p.user != u.user or p.reply != u.reply:
            what = "user turns" if p.user != u.user else "replies"
            raise PSRError(f"mismatched prompt sets: prompt {i} has different {what} in the prompted "
                           f"({(p.user if what == 'user turns' else p.reply)[:40]!r}) and unprompted "
                           f"({(u.user if what == 'user turns' else u.reply)[:40]!r}) runs")
    enc_p = encode(model, prompted, template=template)
    enc_u = encode(model, unprompted, template=template)
    out = []
    for i, (ep, eu) in enumerate(zip(enc_p, enc_u)):
        if ep.tokens == eu.tokens:
            raise PSRError(f"the system prompt changes nothing: prompt {i}'s prompted and unprompted runs have "
                           f"identical tokens ({prompted[i].system!r} is not rendered by the template)")
        tail_p, tail_u = ep.tokens[ep.user[0]:], eu.tokens[eu.user[0]:]
        if tail_p != tail_u:
            raise PSRError(f"prompt {i}: the tokens from the user turn on differ between the prompted "
                           f"({len(tail_p)} tokens) and unprompted ({len(tail_u)} tokens) runs, so they cannot "
                           "be aligned")
        reply = None if eu.reply is None else eu.reply[0] - eu.user[0]
        prefix = min(common_prefix_len(ep.tokens, eu.tokens), ep.user[0], eu.user[0])
        out.append(Aligned(ep, eu, ep.user[0], eu.user[0], len(tail_u), reply, prefix))
    return out


def check_direction(model, direction: Direction) -> None:
    """Refuse a direction made from another model, or of another width, before anything runs.

    Raises:
        PSRError: naming both models (or widths).
    """
    owner = direction.meta.get("model")
    if owner is not None and owner != model.cfg.model_name:
        raise PSRError(f"the direction {direction.meta.get('name', '')!r} was made from {owner!r}, but the model is "
                       f"{model.cfg.model_name!r}")
    if direction.d_model != model.cfg.d_model:
        raise PSRError(f"the direction has width {direction.d_model}, but {model.cfg.model_name} has d_model "
                       f"{model.cfg.d_model}")


def token_text(model, token: int) -> str:
    """One token id as the text the tokenizer decodes it to."""
    return model.tokenizer.decode([token])


def prompt_steering(model, direction: Direction, prompts, system: str, *, layers=None,
                    template: str | None = None, batch_size: int = 8, progress: bool = False) -> pd.DataFrame:
    """How strongly, and on which tokens, ``system`` steers the residual stream.

    Returns one row per prompt × aligned token × layer: ``prompt, position``
    (aligned index from the start of the user turn), ``token, part`` (``user``,
    ``template`` or ``reply``), ``layer, projection`` (``Δ·v̂_l``), ``norm``
    (``‖Δ‖``) and ``strength`` (``Δ·v̂_l / ‖v_l‖``: the α of constant steering
    with the raw vector that would give the same projection). ``progress`` shows a
    bar over the two runs' forwards.

    Raises:
        PSRError: mismatched runs, a foreign direction, or a system prompt that
            leaves every aligned activation unchanged.
    """
    check_direction(model, direction)
    layers = validate_layers(model, direction.layers if layers is None else layers)
    missing = [layer for layer in layers if layer not in direction]
    if missing:
        raise DirectionError(f"direction has no vector for layer(s) {missing} (it has {list(direction.layers)})")
    prompted, unprompted = prompt_pairs(prompts, system)
    runs = align(model, prompted, unprompted, template=template)
    acts_p = residual_rows(model, [r.prompted.tokens for r in runs], layers, batch_size=batch_size,
                           progress=progress, desc="prompted runs")
    acts_u = residual_rows(model, [r.unprompted.tokens for r in runs], layers, batch_size=batch_size,
                           progress=progress, desc="unprompted runs")
    units = torch.stack([direction.unit(layer) for layer in layers])  # [layer, d_model]
    norms = torch.tensor([direction.norms()[layer] for layer in layers])
    rows, changed = [], False
    for i, (run, ap, au) in enumerate(zip(runs, acts_p, acts_u)):
        delta = ap[:, run.p_start : run.p_start + run.length] - au[:, run.u_start : run.u_start + run.length]
        changed |= bool(delta.abs().max() > 0)
        proj = torch.einsum("lpd,ld->lp", delta, units)
        dnorm = delta.norm(dim=-1)
        eu = run.unprompted
        for k in range(run.length):
            pos = run.u_start + k
            part = "reply" if run.reply is not None and k >= run.reply else "user" if pos < eu.user[1] else "template"
            token = token_text(model, eu.tokens[pos])
            for j, layer in enumerate(layers):
                rows.append({"prompt": i, "position": k, "token": token, "part": part, "layer": layer,
                             "projection": float(proj[j, k]), "norm": float(dnorm[j, k]),
                             "strength": float(proj[j, k] / norms[j]) if norms[j] > 0 else 0.0})
    if not changed:
        raise PSRError(f"the system prompt {system!r} changes nothing: the prompted and unprompted residual streams "
                       f"are identical at every aligned position of layers {list(layers)}")
    return pd.DataFrame(rows)
