"""RoPE scaling changes: stretch the rotary position embedding the way long-context deployments
do (linear position interpolation, NTK-aware base scaling, YaRN), to see what they cost on
text the model could already read.

The rotary embedding is computed once per forward pass before any block runs, so these probes
run the whole model (they cannot replay recorded block inputs).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import ModContext, Modification, register

METHODS = {"linear": "position interpolation (positions divided by the factor)",
           "ntk": "NTK-aware scaling (the rotary base raised so the lowest frequency stretches by the factor)",
           "yarn": "YaRN (frequencies interpolated by band, attention temperature adjusted)"}


def scaled_frequencies(rotary: torch.nn.Module, method: str, factor: float) -> tuple[torch.Tensor, float]:
    """The rotary module's inverse frequencies and cos/sin scaling under `method` with `factor`."""
    inv_freq = rotary.inv_freq.float()
    if method == "linear":
        return inv_freq / factor, rotary.attention_scaling
    if method == "ntk":
        # base' = base · factor^(d / (d - 2)): frequency i (of d / 2) shrinks by factor^(2i / (d - 2)).
        dim = 2 * inv_freq.numel()
        exponents = torch.arange(inv_freq.numel(), dtype=torch.float32) * 2 / max(dim - 2, 1)
        return inv_freq * factor ** -exponents, rotary.attention_scaling
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = copy.copy(rotary.config)
    config.rope_scaling = {"rope_type": "yarn", "factor": factor,
                           "original_max_position_embeddings": config.max_position_embeddings}
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["yarn"](config, inv_freq.device)
    return inv_freq.to(rotary.inv_freq.dtype), scaling


class RopeScaling(Modification):
    family = "context"
    scopes = ("model",)
    replays = False

    def __init__(self, name: str, method: str, factor: float) -> None:
        super().__init__(name)
        self.method, self.factor = method, factor

    def applies_to(self, anatomy, target):
        return bool(anatomy.rotaries) and (self.method != "yarn" or all(
            hasattr(r, "config") and getattr(r.config, "rope_theta", None) for r in anatomy.rotaries))

    def not_applicable_reason(self, anatomy) -> str:
        if not anatomy.rotaries:
            return "the model has no rotary position embedding (its positions are learned or absent)"
        return "YaRN needs the rotary settings (rope_theta) in the model's config"

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        saved = [(r, r.inv_freq, r.attention_scaling) for r in ctx.anatomy.rotaries]
        try:
            for rotary, _, _ in saved:
                inv_freq, scaling = scaled_frequencies(rotary, self.method, self.factor)
                rotary.inv_freq = inv_freq.to(rotary.inv_freq.dtype)  # a buffer: assignment keeps it one
                rotary.attention_scaling = scaling
            yield
        finally:
            for rotary, inv_freq, scaling in saved:
                rotary.inv_freq = inv_freq
                rotary.attention_scaling = scaling


@register(r"rope-(?P<method>linear|ntk|yarn)-(?P<factor>[0-9]+(?:\.[0-9]+)?)",
          "RoPE scaling for longer contexts, whole model: linear interpolation, NTK-aware or YaRN by a factor",
          ("rope-linear-2", "rope-ntk-2", "rope-yarn-2"))
def _rope(match):
    factor = float(match["factor"])
    if factor < 1:
        raise PlanError(f"{match[0]}: a RoPE scaling factor stretches the positions, so it is 1 or more "
                        f"(got {factor:g}).")
    return RopeScaling(match[0], match["method"], factor)
