"""Changes to a mixture of experts' routing: noise on the router's logits, one expert more or
fewer per token, an expert dropped. Weight changes to a router or an expert (quantize, prune)
are the weight modifications on the router linear or the expert target.

Each works through a forward hook on the router (its logits) or the MoE module's k attribute,
both undone on exit. On a dense model they apply to nothing, and the plan says so.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from modeldoctor.errors import PlanError
from modeldoctor.model.anatomy import is_block_target, split_linear_name
from modeldoctor.modifications.base import ModContext, Modification, register, temporary_hooks
from modeldoctor.modifications.quantize import RoundToNearest


def _moe(anatomy, target: str):
    return anatomy.blocks[int(target)].moe if is_block_target(target) else None


def _require(mod: Modification, anatomy, targets: list[str]) -> None:
    wrong = [t for t in targets if not mod.applies_to(anatomy, t)]
    if wrong:
        raise PlanError(f"{mod.name} does not apply to {', '.join(wrong)}: it needs a mixture-of-experts block "
                        f"({'an expert' if mod.scopes == ('experts',) else 'a block index'}) with room for the change.")


class RouterModification(Modification):
    """Rewrites a MoE block's router logits (per block target) with `new_logits`."""

    family = "routing"
    scopes = ("blocks",)

    def applies_to(self, anatomy, target: str) -> bool:
        return _moe(anatomy, target) is not None

    def new_logits(self, ctx: ModContext, block: int, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, ctx: ModContext, targets: list[str]) -> None:
        """Fits what the change needs before any hook is installed."""

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        _require(self, ctx.anatomy, targets)
        self.prepare(ctx, targets)
        with temporary_hooks() as hooks:
            for block in dict.fromkeys(self._block(ctx, t) for t in targets):
                router = ctx.anatomy.blocks[block].linears[ctx.anatomy.blocks[block].moe.router]
                hooks.append(router.register_forward_hook(
                    lambda module, args, output, block=block: self.new_logits(ctx, block, output)))
            yield

    def _block(self, ctx: ModContext, target: str) -> int:
        return int(target)


class RouterNoise(RouterModification):
    """Gaussian noise on the router logits, `scale` times each token's own logit spread: how
    close to a tie the routing decisions are. The noise is drawn from a generator seeded on
    entry, so a probe is reproducible."""

    def __init__(self, name: str, scale: float) -> None:
        super().__init__(name)
        self.scale = scale

    def prepare(self, ctx, targets):
        self._generator = torch.Generator().manual_seed(0)

    def new_logits(self, ctx, block, logits):
        noise = torch.randn(logits.shape, generator=self._generator).to(logits.device, logits.dtype)
        return logits + self.scale * logits.std(dim=-1, keepdim=True) * noise


class TopK(Modification):
    """k experts per token changed by `delta` (k-1 saves compute; k+1 costs some)."""

    family = "routing"
    scopes = ("blocks",)

    def __init__(self, name: str, delta: int) -> None:
        super().__init__(name)
        self.delta = delta

    def applies_to(self, anatomy, target):
        moe = _moe(anatomy, target)
        return moe is not None and moe.top_k_attribute is not None and 1 <= moe.top_k + self.delta <= moe.num_experts

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        _require(self, ctx.anatomy, targets)
        saved = []
        try:
            for target in targets:
                moe = _moe(ctx.anatomy, target)
                saved.append((moe, moe.top_k))
                setattr(moe.module, moe.top_k_attribute, moe.top_k + self.delta)
            yield
        finally:
            for moe, k in saved:
                setattr(moe.module, moe.top_k_attribute, k)


class DropExperts(RouterModification):
    """Experts no token is sent to: their router logit set to -inf, so the top-k picks among the
    others. `drop-least-used` drops, per block, the expert that received the fewest tokens on
    the calibration split; `drop-expert` the expert it is given (experts scope)."""

    def __init__(self, name: str, least_used: bool) -> None:
        super().__init__(name)
        self.least_used = least_used
        self.scopes = ("blocks",) if least_used else ("experts",)
        self._dropped: dict[int, list[int]] = {}

    def applies_to(self, anatomy, target):
        if self.least_used:
            moe = _moe(anatomy, target)
            return moe is not None and moe.num_experts > moe.top_k
        experts = anatomy.expert_linears(target)
        if experts is None or is_block_target(target):
            return False
        block, rel = split_linear_name(target)
        moe = anatomy.blocks[block].moe
        return rel in moe.experts and moe.num_experts > moe.top_k

    def _block(self, ctx, target):
        return int(target) if is_block_target(target) else split_linear_name(target)[0]

    def prepare(self, ctx, targets):
        self._dropped = {}
        if self.least_used:
            if ctx.expert_usage is None:
                raise PlanError(f"{self.name} needs the experts' usage on calibration text; none was given.")
            usage = ctx.expert_usage()
        for target in targets:
            block = self._block(ctx, target)
            if self.least_used:
                expert = int(usage[block].argmin())
            else:
                expert = ctx.anatomy.blocks[block].moe.expert_index(split_linear_name(target)[1])
            self._dropped.setdefault(block, []).append(expert)

    def dropped(self, ctx: ModContext, targets: list[str]) -> dict[int, list[int]]:
        """Block -> the expert indices this drops for `targets` (the least-used ones fitted now)."""
        self.prepare(ctx, targets)
        return dict(self._dropped)

    def new_logits(self, ctx, block, logits):
        out = logits.clone()
        out[..., self._dropped[block]] = float("-inf")
        return out


class RouterQuantize(RoundToNearest):
    """Weight-only round-to-nearest of each MoE block's router alone (per block target): how
    close the routing decisions are to ties under the export's quantization of a tiny linear."""

    scopes = ("blocks",)

    def __init__(self, name: str, bits: int) -> None:
        super().__init__(name, bits, None, True)
        self.sweep_strength = self.sweep_group = None  # one point; the bits sweeps are of whole blocks

    def applies_to(self, anatomy, target):
        return _moe(anatomy, target) is not None

    def linears_for(self, ctx, target):
        _require(self, ctx.anatomy, [target])
        return [f"{target}.{_moe(ctx.anatomy, target).router}"]


@register(r"router-int(?P<bits>[2-8])", "weight-only quantization of each MoE block's router alone, per channel",
          ("router-int8", "router-int4"))
def _router_quantize(match):
    return RouterQuantize(match[0], int(match["bits"]))


@register(r"router-noise-(?P<scale>[0-9]+(?:\.[0-9]+)?)",
          "noise on each MoE router's logits: the scale times each token's logit spread (MoE blocks)",
          ("router-noise-0.5",))
def _router_noise(match):
    scale = float(match["scale"])
    if not scale > 0:
        raise PlanError(f"{match[0]}: the noise scale must be above zero.")
    return RouterNoise(match[0], scale)


@register(r"topk-(?P<way>minus|plus)1", "one expert fewer / more per token in a MoE block",
          ("topk-minus1", "topk-plus1"))
def _topk(match):
    return TopK(match[0], -1 if match["way"] == "minus" else 1)


@register(r"drop-(?P<which>least-used|expert)",
          "no token routed to an expert: per block the least used on calibration text, or each expert "
          "(experts scope)", ("drop-least-used", "drop-expert"))
def _drop(match):
    return DropExperts(match[0], match["which"] == "least-used")
