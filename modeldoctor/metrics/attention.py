"""Attention disruption: how a structural change alters the attention maps of each layer."""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import stop_before


@contextlib.contextmanager
def attention_implementation(model, rename):
    """For a while, every config in the model that names an attention implementation names
    rename(that name) instead (left alone where rename gives None); put back on exit."""
    configs = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(config, "_attn_implementation") and not any(config is c for c in configs):
            configs.append(config)
    saved = [(config, config._attn_implementation) for config in configs]
    try:
        for config, original in saved:
            chosen = rename(original)
            if chosen is not None:
                config._attn_implementation = chosen
        yield
    finally:
        for config, original in saved:
            config._attn_implementation = original


def eager_attention(model):
    """Attention weights exist only in the eager implementation; switch to it for a while."""
    return attention_implementation(model, lambda original: "eager")


def attention_maps(model, anatomy: Anatomy, input_ids: torch.Tensor,
                   run: Callable[[], object] | None = None) -> dict[int, torch.Tensor]:
    """Attention probabilities (heads, T, T) of each block's last call, for one sequence. The
    forward pass stops after the last block (the head would be a quarter of its work). With
    `run`, which runs some of the blocks on the sequence instead (a replay from a block onward,
    a traced pass), the maps of the blocks it ran; should an attention that ran give none
    without being asked, the whole model's maps instead."""
    maps: dict[int, torch.Tensor] = {}
    called: set[int] = set()  # blocks whose attention ran (a removed block's does not)
    handles = []
    for part in anatomy.blocks:
        if part.attention_name is None:
            continue
        module = part.module.get_submodule(part.attention_name)

        def hook(m, args, output, index=part.index):
            called.add(index)
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if isinstance(weights, torch.Tensor) and weights.dim() == 4:
                maps[index] = weights[0].float()
        handles.append(module.register_forward_hook(hook))

    def forward(**extra) -> None:
        with stop_before(model, anatomy.after_blocks):  # the maps are in; the logits are not needed
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False, **extra)

    try:
        with eager_attention(model), torch.inference_mode():
            (run or forward)()
            if called - set(maps):
                # Older-style attention classes (Jamba's) return weights only when asked: the whole
                # model's pass, asking (a replay cannot ask; asking every model would break others:
                # Bamba's Mamba layers have none to give).
                with contextlib.suppress(RuntimeError, IndexError, TypeError, ValueError):
                    forward(output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp(min=1e-12).log()).sum(-1)


def disruption(ref: dict[int, torch.Tensor], mod: dict[int, torch.Tensor], num_blocks: int) -> dict[str, list[float]]:
    """Per block: change in mean attention entropy (nats) and mean Jensen-Shannon divergence.
    NaN where a block has no attention map in either model (e.g. the removed block)."""
    entropy_change = np.full(num_blocks, np.nan)
    js = np.full(num_blocks, np.nan)
    for j in range(num_blocks):
        if j not in ref or j not in mod:
            continue
        p, q = ref[j], mod[j]
        entropy_change[j] = float(_entropy(q).mean() - _entropy(p).mean())
        m = 0.5 * (p + q)
        js[j] = float((0.5 * (_entropy(m) * 2 - _entropy(p) - _entropy(q))).mean())
    return {"entropy_change": entropy_change.tolist(), "js": js.tolist()}
