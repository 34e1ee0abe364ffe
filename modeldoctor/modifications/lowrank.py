"""Low-rank compression: a linear replaced by its best rank-r approximation (truncated SVD),
plain or activation-aware.

Plain SVD keeps the directions of largest weight energy. The activation-aware variant (as
ASVD does) factors W·diag(s), s the per-input L2 norm of the calibration activations, and
divides s back out: the kept directions are those that carry the most output on real inputs,
so for inputs with a few loud features it loses less for the same rank.
"""

from __future__ import annotations

import math

import torch

from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import ModContext, WeightModification, register


def kept_rank(shape: tuple[int, int], percent: float | None, rank: int | None) -> int:
    """The rank kept: `percent` of the full rank (min(out, in)), at least 1, or `rank` capped at it."""
    full = min(shape)
    if rank is not None:
        return max(1, min(rank, full))
    return max(1, min(full, math.ceil(percent / 100 * full)))


def low_rank(weight: torch.Tensor, rank: int, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The rank-`rank` approximation of an (out, in) weight; with `input_scale` (in,), the one
    closest on inputs of that per-feature size: SVD of W·diag(scale), then diag(scale)⁻¹."""
    w = weight.double()
    if input_scale is not None:
        scale = input_scale.double().clamp(min=input_scale.double().max() * 1e-6 + 1e-12)
        w = w * scale[None, :]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    if input_scale is not None:
        approx = approx / scale[None, :]
    return approx.to(weight.dtype)


def stored_fraction(shape: tuple[int, int], rank: int) -> float:
    """Parameters of the two factors (out×r + r×in) over the full matrix's: below 1 only when
    the rank is under out·in / (out + in)."""
    out_features, in_features = shape
    return rank * (out_features + in_features) / (out_features * in_features)


class LowRank(WeightModification):
    family = "lowrank"

    def __init__(self, name: str, percent: float | None, rank: int | None, activation_aware: bool) -> None:
        super().__init__(name)
        self.percent, self.rank, self.activation_aware = percent, rank, activation_aware
        self.needs_input_norms = activation_aware
        self.sweep_strength = float(percent if percent is not None else rank)
        self.sweep_group = ("svd-aw" if activation_aware else "svd") + ("-rank" if rank is not None else "")
        self.sweep_harsher_when_lower = True

    def describe_strength(self, strength):
        return f"rank {strength:g}" if self.rank is not None else f"{strength:g}% of the rank"

    def new_weight(self, ctx: ModContext, linear: str, weight: torch.Tensor) -> torch.Tensor:
        scale = None
        if self.activation_aware:
            scale = ctx.input_norms.get(linear)
            if scale is None:
                raise PlanError(f"Activation-aware SVD needs calibration activations for {linear}; none were collected.")
        return low_rank(weight, kept_rank(tuple(weight.shape), self.percent, self.rank), scale)


@register(r"svd(?P<aware>-aw)?-(?:r(?P<percent>[1-9][0-9]?)|k(?P<rank>[1-9][0-9]*))",
          "low rank: keep N% of a linear's singular values (svd-rN) or rank N (svd-kN); svd-aw-… weighs the "
          "inputs by their calibration size first (activation-aware, as ASVD)",
          ("svd-r50", "svd-k16", "svd-aw-r50"))
def _low_rank(match):
    percent = float(match["percent"]) if match["percent"] else None
    rank = int(match["rank"]) if match["rank"] else None
    return LowRank(match[0], percent, rank, activation_aware=bool(match["aware"]))
