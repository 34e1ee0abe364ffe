"""onnxruntime quantization of an exported model, with per-node exclusions.

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

PRECISIONS = ("fp32", "int8", "int4")
INT4_BLOCK = 32


def quantize_model(source: Path, target: Path, precision: str, exclude_nodes: list[str]) -> None:
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs advice at WARNING
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
                         weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes),
                         extra_options={"MatMulConstBOnly": True})
    elif precision == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(str(source), bits=4, block_size=INT4_BLOCK, is_symmetric=False,
                                         nodes_to_exclude=list(exclude_nodes), op_types_to_quantize=("MatMul",))
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    else:
        raise ModelDoctorError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")


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
