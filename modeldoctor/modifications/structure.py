"""Structural changes: skip a block, or run it twice (layer expansion, as depth up-scaling does)."""

from __future__ import annotations

import contextlib

from torch import nn

from modeldoctor.modifications.base import Modification, register


class _StandIn(nn.Module):
    """Takes a block's place; attributes the model reads off its layers (such as Qwen2's
    attention_type) are answered by the original block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class SkippedBlock(_StandIn):
    """Stands in for a removed block: passes the hidden state through unchanged."""

    def __init__(self, block: nn.Module, returns_tuple: bool) -> None:
        super().__init__(block)
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self.returns_tuple else hidden


class DuplicatedBlock(_StandIn):
    """Runs the same block twice in a row, sharing its weights."""

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if args:
            return self.block(hidden, *args[1:], **kwargs)
        return self.block(**{**kwargs, "hidden_states": hidden})


class StructureChange(Modification):
    family = "structure"
    scopes = ("blocks",)

    def __init__(self, name: str, action: str) -> None:
        super().__init__(name)
        self.action = action

    def applies_to(self, anatomy, target):
        return "." not in target

    @contextlib.contextmanager
    def applied(self, ctx, targets):
        blocks = ctx.anatomy.block_list
        originals = {int(t): blocks[int(t)] for t in targets}
        try:
            for index, block in originals.items():
                blocks[index] = (SkippedBlock(block, ctx.anatomy.block_returns_tuple) if self.action == "remove"
                                 else DuplicatedBlock(block))
            yield
        finally:
            for index, block in originals.items():
                blocks[index] = block


@register(r"(?P<action>remove|duplicate)", "skip a block, or run it twice", ("remove", "duplicate"))
def _structure(match):
    return StructureChange(match[0], match["action"])
