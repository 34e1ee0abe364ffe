"""KV-cache quantization: the keys and values a block's attention caches, stored in fewer bits.

Runtimes quantize what they cache, after the rotary embedding: llama.cpp's `-ctk q8_0`
(symmetric int8 per block of 32 values of one token), vLLM's fp8 e4m3 (scale 1 unless
calibrated). The probe wraps the model's own attention function (sdpa or eager, through
transformers' AttentionInterface) so the targeted blocks attend to quantized keys and values.

Per channel (`-channel`), each (head, channel) of a block's keys or values has one static scale,
its largest size over the calibration split (as runtimes with calibrated KV scales do); values
past it saturate. Either way a token's stored key and value depend only on that token, so what
a one-pass prefill computes here is exactly what generation reading the cache back computes (a
test compares the two). Caches whose scales span groups of tokens (KIVI) are not probed: a
prefill would see scales that generation meets only once a group is full.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

from modeldoctor.errors import PlanError
from modeldoctor.modifications.base import ModContext, Modification, register

TOKEN_BLOCK = 32  # quantization blocks along a token's head dimension (llama.cpp's q8_0 / q4_0)
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
WRAPPER_PREFIX = "modeldoctor_kv:"
WRAPPABLE = ("sdpa", "eager")  # the attention implementations a cache probe can wrap


def quantize_per_token(x: torch.Tensor, bits: int, block: int = TOKEN_BLOCK) -> torch.Tensor:
    """(…, T, D) symmetric int quantization per token, per block of `block` values of D."""
    size = x.shape[-1]
    width = min(block, size)
    pad = (-size) % width
    xf = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    blocks = xf.reshape(*xf.shape[:-1], -1, width)
    qmax = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(-1, keepdim=True) / qmax
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    deq = torch.clamp(torch.round(blocks / safe), -qmax - 1, qmax) * scale
    return deq.reshape(*xf.shape)[..., :size].to(x.dtype)


def quantize_with_scale(x: torch.Tensor, bits: int, largest: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, D) symmetric int quantization with a fixed largest size per (head, channel),
    `largest` (heads, D): values past it saturate."""
    qmax = 2 ** (bits - 1) - 1
    scale = (largest.float() / qmax)[None, :, None, :]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(x.float() / safe), -qmax - 1, qmax) * scale).to(x.dtype)


def quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to float8 e4m3 and back, scale 1 (vLLM's default without calibration), saturating."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


class KVCacheQuantization(Modification):
    family = "kvcache"
    scopes = ("blocks",)
    measures_cached_generation = True

    def __init__(self, name: str, which: str, bits: int | None, per_channel: bool = False) -> None:
        super().__init__(name)
        self.which, self.bits, self.per_channel = which, bits, per_channel
        if bits is not None:
            self.sweep_strength = float(bits)
            self.sweep_group = f"{which}-int" + ("-channel" if per_channel else "")
            self.sweep_harsher_when_lower = True

    def describe_strength(self, strength):
        return f"{strength:g}-bit cache"

    def applies_to(self, anatomy, target):
        return target.isdigit() and _attention_of(anatomy, int(target)) is not None

    def lacks(self, anatomy, target):
        if self.applies_to(anatomy, target):
            return None
        return "attention (no keys or values to cache)"

    @contextlib.contextmanager
    def applied(self, ctx: ModContext, targets: list[str]) -> Iterator[None]:
        ranges = None
        if self.per_channel:
            if ctx.kv_ranges is None:
                raise PlanError(f"{self.name} takes its scales from the calibration split; none was given.")
            ranges = ctx.kv_ranges()
        stores = {}
        for target in targets:
            largest = ranges[int(target)] if ranges is not None else None
            stores[_attention_of(ctx.anatomy, int(target))] = _CacheStore(self, largest)
        with attention_wrapped(ctx.model, stores):
            yield


class _CacheStore:
    """What one block's cache gives back for the keys and values it is handed."""

    def __init__(self, mod: KVCacheQuantization, largest: dict[str, torch.Tensor] | None) -> None:
        self.mod, self.largest = mod, largest

    def __call__(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = {"key": key, "value": value}
        for part in ("key", "value"):
            if self.mod.which in ("kv", part[0]):
                tensor = parts[part]
                if self.mod.bits is None:
                    parts[part] = quantize_fp8(tensor)
                elif self.largest is not None:
                    parts[part] = quantize_with_scale(tensor, self.mod.bits, self.largest[part])
                else:
                    parts[part] = quantize_per_token(tensor, self.mod.bits)
        return parts["key"], parts["value"]


class _RangeRecorder:
    """Passes keys and values through unchanged, keeping each (head, channel)'s largest size."""

    def __init__(self) -> None:
        self.largest: dict[str, torch.Tensor] = {}

    def __call__(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for part, tensor in (("key", key), ("value", value)):
            size = tensor.detach().abs().float().amax(dim=(0, 2))  # (heads, D)
            self.largest[part] = torch.maximum(self.largest[part], size) if part in self.largest else size
        return key, value


def cache_ranges(model, anatomy, sequences, checkpoint=lambda: None) -> dict[int, dict[str, torch.Tensor]]:
    """Block -> the largest size of each (head, channel) of its cached keys and values over
    `sequences` (1-D token tensors, each run on its own so no padding enters the ranges)."""
    recorders = {}
    for block in anatomy.blocks:
        module = _attention_of(anatomy, block.index)
        if module is not None:
            recorders[block.index] = (module, _RangeRecorder())
    with attention_wrapped(model, {module: recorder for module, recorder in recorders.values()}), \
            torch.inference_mode():
        for ids in sequences:
            checkpoint()
            model(input_ids=ids[None], use_cache=False)
    return {index: recorder.largest for index, (_, recorder) in recorders.items()}


@contextlib.contextmanager
def attention_wrapped(model, stores: dict) -> Iterator[None]:
    """Inside, each attention module in `stores` attends to what `stores[module](key, value)`
    gives back (the others run as they are); the model's attention setting is put back on exit."""
    from modeldoctor.metrics.attention import attention_implementation

    wrapped = attention_implementation(model, lambda original: _wrapper_name(original) if original in WRAPPABLE
                                       else None)
    try:
        with wrapped:
            for module, store in stores.items():
                module._modeldoctor_kv_cache = store
            yield
    finally:
        for module in stores:
            module.__dict__.pop("_modeldoctor_kv_cache", None)


def _attention_of(anatomy, index: int):
    """Block `index`'s attention module, if it computes attention through transformers'
    attention functions (it has a config that names one); None otherwise (an SSM mixer)."""
    block = anatomy.blocks[index]
    if block.attention_name is None:
        return None
    module = block.module.get_submodule(block.attention_name)
    config = getattr(module, "config", None)
    return module if getattr(config, "_attn_implementation", None) in WRAPPABLE else None


def _wrapper_name(original: str) -> str:
    """The registered attention function that runs `original` on the cache-quantized keys and
    values of the blocks a probe targets (the others run `original` untouched)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = WRAPPER_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        def attention(module, query, key, value, attention_mask, **kwargs):
            store = getattr(module, "_modeldoctor_kv_cache", None)
            if store is not None:
                key, value = store(key, value)
            return _original_function(module, original)(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(name, attention)
        # The model builds its masks for the implementation it names: the original's.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _original_function(module, original: str):
    if original == "eager":  # each family's own eager attention, in its modeling file
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[original]


@register(r"(?P<which>kv|k|v)-(?:int(?P<bits>[2-8])(?P<channel>-channel)?|fp8)",
          "KV-cache quantization of a block's attention: keys and values (kv-), keys only (k-) or values only "
          "(v-); int per token in blocks of 32 (as llama.cpp's q8_0), per channel with static scales from the "
          "calibration split (-channel), or fp8 e4m3 (as vLLM's, scale 1)",
          ("kv-int8", "kv-int4", "k-int4", "v-int4", "kv-int4-channel", "kv-fp8"))
def _kv_cache(match):
    return KVCacheQuantization(match[0], match["which"], int(match["bits"]) if match["bits"] else None,
                               per_channel=bool(match["channel"]))
