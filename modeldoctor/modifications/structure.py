"""Structural changes: skip a block, or run it twice (layer expansion, as depth up-scaling does)."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from modeldoctor.modifications.base import Modification, register

if TYPE_CHECKING:
    from transformers.cache_utils import Cache


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

    @property
    def __class__(self):
        # isinstance(stand_in, BlockClass) holds, as for the block itself: a hybrid model (Jamba)
        # picks each layer's mask by its class. type() still tells the stand-in apart.
        return type(self._modules["block"])


def cache_slot(block: nn.Module, position: int) -> int:
    """The KV-cache index the block's attention writes: the layer_idx transformers gave it
    when building the model, else its position in the block list."""
    found = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    return found.pop() if len(found) == 1 else position


def caches_in(args: tuple, kwargs: dict) -> list[Cache]:
    """The KV caches a block call carries, whatever the family names the argument
    (past_key_values, layer_past, positional)."""
    from transformers.cache_utils import Cache  # here, so listing modifications never pays for transformers

    caches: list[Cache] = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            value = getattr(value, "self_attention_cache", value)  # EncoderDecoderCache
            if not any(value is c for c in caches):
                caches.append(value)
    return caches


# The per-layer entries of a state-space or hybrid model's cache (MambaCache, Mamba2Cache,
# HybridMambaAttentionDynamicCache): lists, or tensors stacked on a first layer axis, indexed by
# the mixer's layer_idx. They are not transformers Cache objects, so they are handled apart.
STATE_ENTRIES = ("conv_states", "ssm_states", "key_cache", "value_cache")


def state_caches_in(args: tuple, kwargs: dict) -> list:
    """The recurrent-state caches a block call carries (cache_params, past_key_values)."""
    caches: list = []
    for value in (*args, *kwargs.values()):
        if hasattr(value, "ssm_states") and not any(value is c for c in caches):
            caches.append(value)
    return caches


class SkippedBlock(_StandIn):
    """Stands in for a removed block: passes the hidden state through unchanged. With a KV
    cache it still records one placeholder position per token in the block's slot: the model
    sizes its attention masks from a layer's cached length (layer 0's, or the first sliding
    layer's), and an empty slot there would mask out everything generated so far."""

    def __init__(self, block: nn.Module, returns_tuple: bool, slot: int) -> None:
        super().__init__(block)
        self.returns_tuple, self.slot = returns_tuple, slot

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        caches = caches_in(args, kwargs)
        if caches:
            # (batch, 1 head, tokens, 1): a non-empty tensor, since an empty one reads as length 0.
            placeholder = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 1)
            for cache in caches:
                cache.update(placeholder, placeholder, self.slot, {"cache_position": kwargs.get("cache_position")})
        return (hidden,) if self.returns_tuple else hidden


class DuplicatedBlock(_StandIn):
    """Runs the same block twice in a row, sharing its weights. The second run keeps its keys
    and values in a cache slot of its own past the model's last layer (`extra_slot`): in the
    block's own slot it would attend to its first run's keys as if they were earlier tokens.
    The slots are swapped for the second run, so the attention writes "its" index unchanged
    and every cache operation (beam reordering, cropping) sees the extra slot as a layer."""

    def __init__(self, block: nn.Module, slot: int, extra_slot: int) -> None:
        super().__init__(block)
        self.slot, self.extra_slot = slot, extra_slot

    def forward(self, *args, **kwargs):
        caches = caches_in(args, kwargs)
        for cache in caches:
            self._reserve_extra_slot(cache)
        state_caches = state_caches_in(args, kwargs)
        for cache in state_caches:
            self._reserve_extra_state(cache)
        out = self.block(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        with _slots_swapped(caches, state_caches, self.slot, self.extra_slot):
            if args:
                return self.block(hidden, *args[1:], **kwargs)
            return self.block(**{**kwargs, "hidden_states": hidden})

    def _reserve_extra_slot(self, cache: Cache) -> None:
        """Append cache layers up to the extra slot, made like the block's own slot (sliding
        window and all). Called before the block's first run, while its own slot is still
        empty when the cache is new."""
        layers = cache.layers
        if len(layers) > self.extra_slot:
            return
        make = cache.layer_class_to_replicate
        if make is None:
            template = layers[self.slot]
            if template.is_initialized:
                raise RuntimeError("A KV cache filled before a block was duplicated cannot be continued "
                                   "with the duplicate: it has no keys for the block's second run.")
            make = lambda: copy.deepcopy(template)  # noqa: E731
        while len(layers) <= self.extra_slot:
            layers.append(make())

    def _reserve_extra_state(self, cache) -> None:
        """Grow every per-layer entry of a state cache up to the extra slot with fresh (zero or
        empty) states, like the block's own slot before its first token; the lists are grown
        together, since the cache's reordering walks them in step."""
        for name in STATE_ENTRIES:
            entries = getattr(cache, name, None)
            if entries is None or len(entries) > self.extra_slot:
                continue
            own = entries[self.slot]
            if own.numel() and bool(own.any()):
                raise RuntimeError("A state cache filled before a block was duplicated cannot be continued "
                                   "with the duplicate: it has no state for the block's second run.")
            missing = self.extra_slot + 1 - len(entries)
            if isinstance(entries, torch.Tensor):
                setattr(cache, name, torch.cat([entries, entries.new_zeros(missing, *entries.shape[1:])]))
            else:
                entries.extend(torch.zeros_like(own) for _ in range(missing))


@contextlib.contextmanager
def _slots_swapped(caches: list[Cache], state_caches: list, slot: int, other: int) -> Iterator[None]:
    """The KV caches' layers and the state caches' entries (list items, or rows of a stacked
    tensor swapped in place) of `slot` and `other` exchanged for a while."""
    def swap():
        for cache in caches:
            cache.layers[slot], cache.layers[other] = cache.layers[other], cache.layers[slot]
        for cache in state_caches:
            for name in STATE_ENTRIES:
                entries = getattr(cache, name, None)
                if entries is None:
                    continue
                if isinstance(entries, torch.Tensor):
                    entries[[slot, other]] = entries[[other, slot]]
                else:
                    entries[slot], entries[other] = entries[other], entries[slot]
    swap()
    try:
        yield
    finally:
        swap()


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
            # Extra cache slots in block order, after the model's own layers, so a cache
            # grows them one by one as the duplicates first run.
            for extra, (index, block) in enumerate(sorted(originals.items())):
                slot = cache_slot(block, index)
                blocks[index] = (SkippedBlock(block, ctx.anatomy.block_returns_tuple, slot)
                                 if self.action == "remove" else DuplicatedBlock(block, slot, len(blocks) + extra))
            yield
        finally:
            for index, block in originals.items():
                blocks[index] = block


@register(r"(?P<action>remove|duplicate)", "skip a block, or run it twice", ("remove", "duplicate"))
def _structure(match):
    return StructureChange(match[0], match["action"])
