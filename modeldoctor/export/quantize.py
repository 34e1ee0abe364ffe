"""onnxruntime quantization of an exported model, with per-linear exclusions, checked after.

Only configurations known to work are produced: int8 dynamic with one scale per weight
tensor (per-channel int8 on MatMul collapses models: SmolLM2's perplexity goes from 17.5
to about 10 million), and int4 weight-only MatMulNBits with small blocks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx import numpy_helper

from modeldoctor.errors import ModelDoctorError
from modeldoctor.model import Anatomy

PRECISIONS = ("fp32", "int8", "int4")
INT4_BLOCK = 32
EXTERNAL_DATA_BYTES = 1_800_000_000  # a protobuf file holds at most 2 GB


def _quiet_quantizer_logs() -> None:
    # onnxruntime's quantizers log advice at WARNING and, once imported, every node at INFO
    # (importing MatMulNBitsQuantizer calls logging.basicConfig(level=INFO)).
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def quantize_model(source: Path, target: Path, precision: str, exclude_nodes: list[str],
                   external_data: bool = False) -> None:
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        _quiet_quantizer_logs()
        quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                         use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        _quiet_quantizer_logs()
        quantizer = MatMulNBitsQuantizer(str(source), bits=4, block_size=INT4_BLOCK, is_symmetric=False,
                                         nodes_to_exclude=list(exclude_nodes), op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=external_data)
    else:
        raise ModelDoctorError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")


def quantize_export(fp32_path: Path, target: Path, precision: str, anatomy: Anatomy, keep: list[str],
                    work: Path) -> list[str]:
    """Quantize the fp32 export into `target`, every linear (the head too) to `precision` except
    the `keep` linears, which stay fp32; then check the written graph does exactly that.
    Returns the ONNX names of the MatMuls kept in fp32. `work` is a scratch folder."""
    from modeldoctor.export.graph import check_quantized, fold_transposed_weights, rewrite_gemms
    from modeldoctor.export.mapping import map_linears

    known = set(anatomy.linear_targets())
    unknown = [n for n in keep if n not in known]
    if unknown:
        raise ModelDoctorError(f"No linear named {', '.join(unknown[:5])} in this model; linears are named like "
                               f"{anatomy.linear_targets()[0]}, and the LM head is 'head'.")
    model = onnx.load(str(fp32_path))
    rewrite_gemms(model)
    mapping, missing = map_linears(model, anatomy)
    if missing:
        raise ModelDoctorError(f"No ONNX MatMul computes {', '.join(missing[:5])}; the export cannot set or check "
                               "its precision.")
    kept = set(keep)
    fold_transposed_weights(model, {node for name, node in mapping.items() if name not in kept})
    external = sum(p.stat().st_size for p in fp32_path.parent.glob("*.onnx*")) > EXTERNAL_DATA_BYTES
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / fp32_path.name
    onnx.save_model(model, str(prepared), save_as_external_data=external, location=f"{prepared.name}_data")
    del model
    kept_nodes = [mapping[n] for n in keep]
    quantize_model(prepared, target, precision, kept_nodes, external)
    refuse_collapse_modes(target)
    check_quantized(onnx.load(str(target)), anatomy, mapping, list(keep), precision)
    return kept_nodes


def refuse_collapse_modes(path: Path) -> None:
    """Refuse a model whose int8 MatMul weights carry per-channel scales."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul"):
            scale_name = node.input[2] if node.op_type == "DynamicQuantizeMatMul" else None
            zero_name = node.input[3] if node.op_type == "MatMulInteger" and len(node.input) > 3 else None
            for name in (scale_name, zero_name):
                if name and name in initializers and numpy_helper.to_array(initializers[name]).size > 1:
                    raise ModelDoctorError(
                        f"Refusing to produce {node.name}: per-channel int8 on MatMul is a known collapse "
                        "mode of onnxruntime's dynamic quantization.")
