"""Pruning: unstructured magnitude and Wanda, 2:4 semi-structured, structured heads and channels."""

from __future__ import annotations

import torch

from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import ModContext, WeightModification, register


def prune_lowest(weight: torch.Tensor, score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Zero exactly round(sparsity * n) weights with the lowest score, per row or per matrix."""
    out = weight.clone()
    if per_row:
        count = round(sparsity * weight.shape[1])
        if count:
            idx = score.argsort(dim=1, stable=True)[:, :count]
            out.scatter_(1, idx, 0.0)
    else:
        count = round(sparsity * weight.numel())
        if count:
            idx = score.flatten().argsort(stable=True)[:count]
            out.view(-1)[idx] = 0.0
    return out


def wanda_score(ctx: ModContext, linear: str, weight: torch.Tensor) -> torch.Tensor:
    norms = ctx.input_norms.get(linear)
    if norms is None:
        raise PlanError(f"Wanda needs calibration activations for {linear}; none were collected.")
    return weight.abs() * norms[None, :]


def n_of_m(weight: torch.Tensor, score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the n highest-scoring weights in every group of m consecutive inputs."""
    rows, cols = weight.shape
    if cols % m:
        raise PlanError(f"{n}:{m} pruning needs an input size divisible by {m} (got {cols}).")
    grouped = score.reshape(rows, cols // m, m)
    drop = grouped.argsort(dim=-1, stable=True)[..., : m - n]
    mask = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, drop, False)
    return weight * mask.reshape(rows, cols)


class UnstructuredPrune(WeightModification):
    family = "prune"

    def __init__(self, name: str, method: str, sparsity: float) -> None:
        super().__init__(name)
        self.method, self.sparsity = method, sparsity
        self.needs_input_norms = method == "wanda"
        self.sweep_strength = sparsity
        self.sweep_group = f"prune-{method}"

    def new_weight(self, ctx, linear, weight):
        if self.method == "wanda":
            return prune_lowest(weight, wanda_score(ctx, linear, weight), self.sparsity, per_row=True)
        return prune_lowest(weight, weight.abs(), self.sparsity, per_row=False)


@register(r"prune-(?P<method>mag|wanda)-(?P<pct>[1-9][0-9]?)",
          "unstructured pruning to the given % sparsity: magnitude, or Wanda (|W|·‖x‖ per row)",
          ("prune-mag-50", "prune-wanda-50"))
def _unstructured(match):
    return UnstructuredPrune(match[0], match["method"], int(match["pct"]) / 100)


class SemiStructured(WeightModification):
    family = "prune"
    needs_input_norms = True

    def new_weight(self, ctx, linear, weight):
        return n_of_m(weight, wanda_score(ctx, linear, weight))


@register(r"prune-2of4", "2:4 semi-structured pruning (Wanda scores)", ("prune-2of4",))
def _two_of_four(match):
    return SemiStructured(match[0])


class StructuredPrune(WeightModification):
    """Removes whole attention heads or MLP channels by zeroing their slice of the output
    projection's inputs: the head or channel then contributes nothing."""

    family = "prune"
    scopes = ("blocks",)

    def __init__(self, name: str, unit: str, ratio: float) -> None:
        super().__init__(name)
        self.unit, self.ratio = unit, ratio
        self.sweep_strength = ratio
        self.sweep_group = f"prune-{unit}"

    def _projection(self, anatomy, block: int) -> str | None:
        part = anatomy.blocks[block]
        return part.attention_out if self.unit == "heads" else part.mlp_down

    def applies_to(self, anatomy, target):
        return "." not in target and self._projection(anatomy, int(target)) is not None

    def lacks(self, anatomy, target):
        if "." in target or self.applies_to(anatomy, target):
            return None
        return "attention heads" if self.unit == "heads" else "MLP"

    def linears_for(self, ctx, target):
        return [f"{target}.{self._projection(ctx.anatomy, int(target))}"]

    def new_weight(self, ctx, linear, weight):
        if self.unit == "heads":
            anatomy = ctx.anatomy
            heads = weight.shape[1] // anatomy.head_dim
            group_norm = weight.reshape(weight.shape[0], heads, anatomy.head_dim).norm(dim=(0, 2))
            count = round(self.ratio * heads)
            drop = group_norm.argsort(stable=True)[:count]
            columns = (drop[:, None] * anatomy.head_dim + torch.arange(anatomy.head_dim)).flatten()
        else:
            count = round(self.ratio * weight.shape[1])
            columns = weight.norm(dim=0).argsort(stable=True)[:count]
        out = weight.clone()
        out[:, columns] = 0.0
        return out


@register(r"prune-(?P<unit>heads|channels)-(?P<pct>[1-9][0-9]?)",
          "structured pruning: the given % of attention heads or MLP channels (lowest norm)",
          ("prune-heads-25", "prune-channels-25"))
def _structured(match):
    return StructuredPrune(match[0], match["unit"], int(match["pct"]) / 100)


def gradient_score(ctx: ModContext, linear: str, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """|W| * (||x_j|| + alpha * G_ij) on the (out, in) weight, the gradient norm rescaled to the
    activation norms' mean so that alpha weighs the two on the same footing (alpha = 0 is Wanda).
    The session stores G in (out, in) orientation for every linear, Conv1D included."""
    norms = ctx.input_norms.get(linear)
    grads = ctx.grad_norms.get(linear)
    if norms is None or grads is None:
        raise PlanError(f"Gradient-aware pruning needs calibration activations and gradients for {linear}.")
    scaled = grads / grads.mean().clamp(min=1e-20) * norms.mean()
    return weight.abs() * (norms[None, :] + alpha * scaled)


class GradientPrune(WeightModification):
    """The study's first mitigation: first-order (gradient) importance combined with Wanda's
    activation norms, pruned per output row, unstructured or 2:4."""

    family = "prune"
    needs_input_norms = True
    needs_gradients = True

    def __init__(self, name: str, sparsity: float | None, alpha: float = 1.0) -> None:
        super().__init__(name)
        self.sparsity, self.alpha = sparsity, alpha
        if sparsity is not None:
            self.sweep_strength = sparsity
            self.sweep_group = f"prune-grad-a{alpha:g}"

    def new_weight(self, ctx, linear, weight):
        score = gradient_score(ctx, linear, weight, self.alpha)
        if self.sparsity is None:
            return n_of_m(weight, score)
        return prune_lowest(weight, score, self.sparsity, per_row=True)


@register(r"prune-grad-(?:(?P<pct>[1-9][0-9]?)|(?P<nm>2of4))(?:-a(?P<alpha>[0-9]+(?:\.[0-9]+)?))?",
          "gradient-aware pruning: |W|·(‖x‖ + α·‖∂L/∂W‖) per row, to % sparsity or 2:4",
          ("prune-grad-50", "prune-grad-2of4", "prune-grad-50-a2"))
def _gradient(match):
    sparsity = int(match["pct"]) / 100 if match["pct"] else None
    return GradientPrune(match[0], sparsity, float(match["alpha"]) if match["alpha"] else 1.0)
