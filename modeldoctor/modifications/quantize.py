"""Weight quantization (round-to-nearest) and int8 dynamic quantization as onnxruntime does it."""

from __future__ import annotations

import torch

from modeldoctor.modifications.base import ModContext, WeightModification, register


def quantize_rtn(weight: torch.Tensor, bits: int, group: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Fake-quantize an (out, in) weight: per output channel, or per group of `group` inputs."""
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
        scale = ((high - low) / qmax).clamp(min=1e-12)
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
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

    def new_weight(self, ctx, linear, weight):
        return quantize_rtn(weight, self.bits, self.group, self.symmetric)


@register(r"int(?P<bits>[2-8])(?:-g(?P<group>32|64|128))?(?P<asym>-asym)?",
          "weight-only round-to-nearest quantization, per channel or per group",
          ("int8", "int6", "int4", "int3", "int2", "int4-g32", "int4-g128-asym"))
def _rtn(match):
    group = int(match["group"]) if match["group"] else None
    return RoundToNearest(match[0], int(match["bits"]), group, symmetric=not match["asym"])


def ort_dynamic_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """onnxruntime's DynamicQuantizeLinear then dequantize: uint8, asymmetric, one scale per
    tensor. Each sequence of the batch gets its own scale, as when onnxruntime runs one
    sequence per call."""
    flat = x.reshape(x.shape[0], -1) if x.dim() > 2 else x.reshape(1, -1)
    low = flat.amin(-1, keepdim=True).clamp(max=0)
    high = flat.amax(-1, keepdim=True).clamp(min=0)
    scale = (high - low) / 255.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    q = torch.clamp(torch.round(flat / scale) + zero, 0, 255)
    return ((q - zero) * scale).reshape(x.shape).to(x.dtype)


def ort_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """onnxruntime's default weight quantization for quantize_dynamic: int8 symmetric
    per tensor in [-127, 127]."""
    scale = weight.abs().max().clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


class Int8Dynamic(WeightModification):
    """Predicts what onnxruntime's quantize_dynamic (per-tensor int8) does to a linear."""

    family = "quantize"

    def new_weight(self, ctx, linear, weight):
        return ort_int8_weight(weight)

    def extra_hooks(self, ctx: ModContext, linear: str, module: torch.nn.Module) -> list:
        def quantize_input(mod, args):
            return (ort_dynamic_quantize_activation(args[0]),) + tuple(args[1:])
        return [module.register_forward_pre_hook(quantize_input)]


@register(r"int8-dynamic", "int8 weights + per-call uint8 activations, as onnxruntime quantize_dynamic",
          ("int8-dynamic",))
def _int8_dynamic(match):
    return Int8Dynamic(match[0])
