"""Weight quantization (round-to-nearest) and int8 dynamic quantization as onnxruntime does it."""

from __future__ import annotations

import torch

from modeldoctor.errors import UnsupportedModelError
from modeldoctor.modifications.base import ModContext, WeightModification, register


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round sends them to the even neighbour)."""
    truncated = x.trunc()
    return torch.where((x - truncated).abs() == 0.5, truncated + x.sign(), torch.round(x))


# Rows quantized at a time hold at most this many values: the rounding's temporaries (several
# copies of what is quantized) stay tens of MB even for a 100 M-parameter LM head.
CHUNK_VALUES = 1 << 22


def by_row_chunks(weight: torch.Tensor, rows_function, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows_function applied to the rows of an (out, in) weight a chunk at a time (it must treat
    each row on its own), into one result: the same values, a fraction of the peak memory. With
    `out` (which may be `weight` itself: each chunk is read before it is written), into that."""
    rows = max(1, CHUNK_VALUES // max(weight.shape[1], 1))
    if weight.shape[0] <= rows and out is None:
        return rows_function(weight)
    result = torch.empty_like(weight) if out is None else out
    for start in range(0, weight.shape[0], rows):
        result[start:start + rows] = rows_function(weight[start:start + rows])
    return result


def quantize_rtn(weight: torch.Tensor, bits: int, group: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Fake-quantize an (out, in) weight: per output channel, or per group of `group` inputs
    (rows a chunk at a time: each row is quantized on its own).

    The asymmetric path is onnxruntime's MatMulNBits block quantizer (MLAS range2scalezp),
    what the int4 export writes: the range widened to hold 0, scale = range / (2^bits - 1),
    zero point = roundf(-min / scale), q = roundf(w · (1 / scale) + zero point), all in
    float32 with C rounding (halves away from zero)."""
    return by_row_chunks(weight, lambda rows: _quantize_rows(rows, bits, group, symmetric))


def _quantize_rows(weight: torch.Tensor, bits: int, group: int | None, symmetric: bool) -> torch.Tensor:
    out_features, in_features = weight.shape
    w = weight.float()
    if group:
        pad = (-in_features) % group
        if pad:
            w = torch.nn.functional.pad(w, (0, pad))
        w = w.reshape(out_features, -1, group)
    else:
        w = w.reshape(out_features, 1, in_features)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
        q = torch.clamp(torch.round(w / scale), -qmax - 1, qmax)
        deq = q * scale
    else:
        qmax = 2 ** bits - 1
        low = w.amin(-1, keepdim=True).clamp(max=0)
        high = w.amax(-1, keepdim=True).clamp(min=0)
        scale = (high - low) / qmax
        nonzero = scale != 0
        safe = torch.where(nonzero, scale, torch.ones_like(scale))
        zero = torch.where(nonzero, _round_half_away(torch.clamp(-low / safe, 0, qmax)), torch.zeros_like(scale))
        reciprocal = torch.where(nonzero, 1.0 / safe, torch.zeros_like(scale))
        q = torch.clamp(_round_half_away(w * reciprocal + zero), 0, qmax)
        deq = (q - zero) * scale
    deq = deq.reshape(out_features, -1)[:, :in_features]
    return deq.to(weight.dtype)


class RoundToNearest(WeightModification):
    family = "quantize"

    def __init__(self, name: str, bits: int, group: int | None, symmetric: bool) -> None:
        super().__init__(name)
        self.bits, self.group, self.symmetric = bits, group, symmetric
        self.sweep_strength = float(bits)
        self.sweep_group = f"int-{'g' + str(group) if group else 'channel'}-{'sym' if symmetric else 'asym'}"
        self.sweep_harsher_when_lower = True

    def describe_strength(self, strength):
        return f"{strength:g}-bit"

    def new_weight(self, ctx, linear, weight):
        return quantize_rtn(weight, self.bits, self.group, self.symmetric)

    def rewrite(self, ctx, linear, view):
        if type(self).new_weight is not RoundToNearest.new_weight:  # a subclass's own rule
            return super().rewrite(ctx, linear, view)
        # Row by row into the weight itself: no second full-size matrix (the head's is the largest).
        by_row_chunks(view, lambda rows: _quantize_rows(rows, self.bits, self.group, self.symmetric), out=view)


@register(r"int(?P<bits>[2-8])(?:-g(?P<group>32|64|128))?(?P<asym>-asym)?",
          "weight-only round-to-nearest quantization, per channel or per group",
          ("int8", "int6", "int4", "int3", "int2", "int4-g32", "int8-g32-asym", "int4-g32-asym"))
def _rtn(match):
    group = int(match["group"]) if match["group"] else None
    return RoundToNearest(match[0], int(match["bits"]), group, symmetric=not match["asym"])


def quantize_activation_blocks(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """MatMulNBits' accuracy_level 4 on CPU: each row's input quantized to int8 per block of
    `block` values along the input, symmetric (scale = max|x| / 127, round to nearest), before
    the integer dot products. Matches onnxruntime's output to float accumulation (~1e-6)."""
    features = x.shape[-1]
    pad = (-features) % block
    xf = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    blocks = xf.reshape(*xf.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127.0
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    deq = torch.clamp(torch.round(blocks / safe), -127, 127) * scale
    return deq.reshape(*xf.shape)[..., :features].to(x.dtype)


class BlockQuantizedMatMul(RoundToNearest):
    """What the exporter's MatMulNBits computes: weights in asymmetric blocks of `block` inputs
    (as the group asymmetric rounding above), activations in int8 per block of the same size
    (accuracy level 4, the fast CPU path). A head tied to the embedding is one shared table,
    which the lookup reads too."""

    def __init__(self, name: str, bits: int, block: int) -> None:
        super().__init__(name, bits, block, symmetric=False)
        self.sweep_group = f"int-b{block}"
        self.shares_tied_table = True

    def extra_hooks(self, ctx: ModContext, linear: str, module: torch.nn.Module) -> list:
        def quantize_input(mod, args):
            return (quantize_activation_blocks(args[0], self.group),) + tuple(args[1:])
        return [module.register_forward_pre_hook(quantize_input)]


@register(r"int(?P<bits>[48])-b(?P<block>32|64|128)", "int8 / int4 as the export's MatMulNBits runs them: weights in "
          "asymmetric blocks of 32, 64 or 128 inputs, activations int8 per block of the same size",
          ("int8-b32", "int4-b32", "int8-b64", "int8-b128", "int4-b128"))
def _block_matmul(match):
    return BlockQuantizedMatMul(match[0], int(match["bits"]), int(match["block"]))


def _dequantized_uint8(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """DynamicQuantizeLinear's arithmetic, then DequantizeLinear: the range is widened to hold
    0, scale = range / 255, zero point rounded (half to even, as onnxruntime does)."""
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = (high - low) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
    return (q - zero) * scale


def ort_dynamic_quantize_activation(x: torch.Tensor, valid: torch.Tensor | None = None,
                                    per_token: bool = False) -> torch.Tensor:
    """onnxruntime's DynamicQuantizeLinear then dequantize: uint8, asymmetric, one range per
    runtime call over everything that call's input holds. Which values share a call:

    - `per_token`: each token alone (one-token decode calls).
    - `valid`, a (B, T) mask of real tokens: each sequence's real tokens (its batch-1 prefill
      call); padded positions are quantized with their sequence's range, and nothing reads them.
    - neither: each sequence of a (B, T, F) input, all its positions (B calls of batch 1,
      unpadded); a 2-D input is one call.
    """
    xf = x.float()
    real = None
    if per_token:
        calls = xf.reshape(-1, 1, x.shape[-1])
    elif valid is not None:
        batch, tokens = valid.shape
        if tuple(x.shape[:-1]) != (batch, tokens) and not (x.dim() == 2 and x.shape[0] == batch * tokens):
            raise UnsupportedModelError(
                f"A linear's input {tuple(x.shape)} does not line up with the batch's tokens "
                f"({batch} × {tokens}); its int8 dynamic activation ranges cannot be simulated.")
        calls = xf.reshape(batch, tokens, -1)
        real = valid.to(device=x.device, dtype=torch.bool)[..., None]
    else:
        calls = xf.reshape(x.shape[0], 1, -1) if x.dim() > 2 else xf.reshape(1, 1, -1)
    low = (calls if real is None else calls.masked_fill(~real, float("inf"))).amin(dim=(1, 2), keepdim=True)
    high = (calls if real is None else calls.masked_fill(~real, float("-inf"))).amax(dim=(1, 2), keepdim=True)
    return _dequantized_uint8(calls, low, high).reshape(x.shape).to(x.dtype)


# The export quantizes int8-dynamic weights with reduce_range: 7-bit levels in [-64, 64]. On
# x86 CPUs without VNNI, onnxruntime's u8×s8 kernel adds products in pairs with int16
# saturation; 255·64·2 stays below 32767, 255·127·2 does not.
INT8_DYNAMIC_LEVEL = 64


def ort_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The export's weight quantization for quantize_dynamic: int8 symmetric per tensor with
    reduce_range (scale = max|w| / 64, levels in [-64, 64])."""
    scale = torch.maximum(weight.max(), -weight.min()).clamp(min=1e-12) / INT8_DYNAMIC_LEVEL  # max|w|, no copy
    return by_row_chunks(weight, lambda rows: torch.clamp(torch.round(rows / scale), -INT8_DYNAMIC_LEVEL,
                                                          INT8_DYNAMIC_LEVEL) * scale)


class Int8Dynamic(WeightModification):
    """What onnxruntime's quantize_dynamic (int8 weights per tensor, uint8 activations with one
    range per call) does to a linear in a prefill call: a sequence of N tokens processed at
    once, its activation range taken over those N real tokens. That is how export validation
    and a prompt's prefill run. The batch's padding is kept out of each sequence's range
    through the mask that the code running the batch sets with `token_mask`; without one,
    each sequence of the call's input is taken as all real (generation runs batch 1)."""

    family = "quantize"
    per_token = False

    def new_weight(self, ctx, linear, weight):
        return ort_int8_weight(weight)

    def extra_hooks(self, ctx: ModContext, linear: str, module: torch.nn.Module) -> list:
        # An expert of a mixture sees only the rows routed to it, which do not line up with the
        # batch's tokens: its range is taken over all of them at once, as in one batch-1 call when
        # the batch is one sequence (with several, an approximation: a range at least as wide).
        routed = ctx.anatomy.routed_expert_linear(linear)

        def quantize_input(mod, args):
            mask = None if self.per_token or routed else ctx.token_mask
            x = ort_dynamic_quantize_activation(args[0], mask, self.per_token)
            return (x,) + tuple(args[1:])
        return [module.register_forward_pre_hook(quantize_input)]


class Int8DynamicDecode(Int8Dynamic):
    """The same int8 dynamic model in one-token decode calls: each token's activations get
    their own range. With a KV cache every token's keys and values come from the call that
    processed it, so per-token ranges in one full forward pass are exact for pure decoding
    (every token fed alone); a real generation prefills its prompt (`int8-dynamic`) first."""

    per_token = True


@register(r"int8-dynamic", "int8 weights + uint8 activations, one range per sequence (a prefill call), "
          "as onnxruntime quantize_dynamic", ("int8-dynamic",))
def _int8_dynamic(match):
    return Int8Dynamic(match[0])


@register(r"int8-dynamic-decode", "int8 dynamic as in one-token decode calls: one activation range per token",
          ("int8-dynamic-decode",))
def _int8_dynamic_decode(match):
    return Int8DynamicDecode(match[0])
