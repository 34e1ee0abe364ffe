"""onnxruntime quantization of an exported model, one format per linear, checked after.

Formats a linear can be written in:

- ``fp32``: the exported MatMul as it is.
- ``int8`` / ``int4`` (blocks of 32 inputs), ``int8-b64``, ``int8-b128``, ``int4-b128``:
  ``MatMulNBits`` with 8 or 4 bits, an fp32 scale and a zero point per block (asymmetric), at
  accuracy level 4: the CPU kernel quantizes each row's activations to int8 per block of the
  same size and multiplies integers, which is what makes it fast (on this AVX2 machine,
  without it 8-bit decode runs about 20× slower than fp32). The blocks are packed by
  onnxruntime's own kernels (the ones its MatMulNBitsQuantizer calls), so the file computes
  what the ``int8-b32`` … ``int4-b128`` probes simulate. Formats can be mixed freely.
- ``int8-dynamic``: W8A8 through ``quantize_dynamic`` (``MatMulInteger``, int8 weights with one
  scale per tensor, uint8 activations per call), for runtimes that want integer matmuls. It
  cannot be mixed with the block formats in one export. (Per-channel scales there are a
  collapse mode of the AVX2 kernel without VNNI, so they are never written.)

A head tied to the token embedding written in a block format becomes one shared table: the
embedding lookup reads it through ``GatherBlockQuantized`` and the head through
``MatMulNBits``, so the 28 M-parameter table of a small model is stored once, in 8 or 4 bits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modeldoctor.errors import ModelDoctorError
from modeldoctor.export import BLOCK_FORMATS, FORMATS, PRECISIONS
from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import HEAD

ACCURACY_LEVEL = 4  # int8 activations per block: the fast CPU path (simulated by quantize_activation_blocks)
EXTERNAL_DATA_BYTES = 1_800_000_000  # a protobuf file holds at most 2 GB


def _quiet_quantizer_logs() -> None:
    # onnxruntime's quantizers log advice at WARNING and, once imported, every node at INFO
    # (importing MatMulNBitsQuantizer calls logging.basicConfig(level=INFO)).
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)


def block_quantize(weight_in_out: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed [N, blocks, block·bits/8], scales [N, blocks], zero points [N, blocks·bits/8]) of a
    (K=in, N=out) fp32 weight, by onnxruntime's block quantization kernels (asymmetric)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight_in_out.shape
    blocks = -(-rows // block)
    per_byte = 8 // bits
    weight = np.ascontiguousarray(np.pad(weight_in_out, ((0, blocks * block - rows), (0, 0))), dtype=np.float32)
    packed = np.zeros((cols, blocks, block // per_byte), dtype=np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    kernel = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    kernel(packed, weight, scales, zero_points, block, cols, rows, False)
    return packed, scales, zero_points


def _nbits_node(inputs: list[str], outputs: list[str], name: str, rows: int, cols: int, fmt: str) -> onnx.NodeProto:
    bits, block = BLOCK_FORMATS[fmt]
    return helper.make_node("MatMulNBits", inputs, outputs, name=f"{name}_Q{bits}", domain="com.microsoft", K=rows,
                            N=cols, bits=bits, block_size=block, accuracy_level=ACCURACY_LEVEL)


def _matmul_nbits(node: onnx.NodeProto, weight_in_out: np.ndarray, fmt: str, weight_name: str,
                  graph: onnx.GraphProto) -> onnx.NodeProto:
    bits, block = BLOCK_FORMATS[fmt]
    packed, scales, zero_points = block_quantize(weight_in_out, bits, block)
    names = [f"{weight_name}_Q{bits}", f"{weight_name}_scales", f"{weight_name}_zero_points"]
    for array, name in zip((packed, scales, zero_points), names):
        graph.initializer.append(numpy_helper.from_array(array, name))
    return _nbits_node([node.input[0], *names], list(node.output), node.name, *weight_in_out.shape, fmt)


def _shared_table(head: onnx.NodeProto, gather: onnx.NodeProto, table: np.ndarray, fmt: str, graph: onnx.GraphProto,
                  ) -> tuple[onnx.NodeProto, list[onnx.NodeProto]]:
    """One block-quantized table (V, H) read by the head's MatMulNBits and the embedding's
    gather. The file stores MatMulNBits' layout once: packed weights [V, blocks, block·bits/8],
    scales [V, blocks], zero points [V, blocks·bits/8]. The lookup reads the packed weights as
    rows [V, blocks·block·bits/8] (a Reshape in the graph, not a second copy in the file), which
    GatherBlockQuantized takes with MatMulNBits' own scales and packed zero points; a last
    block padded past H is sliced off."""
    bits, block = BLOCK_FORMATS[fmt]
    vocab, hidden = table.shape
    packed, scales, zero_points = block_quantize(np.ascontiguousarray(table.T), bits, block)
    prefix = f"shared_embedding_Q{bits}"
    names = {"table": prefix, "scales": f"{prefix}_scales", "zero_points": f"{prefix}_zero_points",
             "row_shape": f"{prefix}_row_shape", "rows": f"{prefix}_rows"}
    for key, array in (("table", packed), ("scales", scales), ("zero_points", zero_points),
                       ("row_shape", np.array([vocab, packed.shape[1] * packed.shape[2]], dtype=np.int64))):
        graph.initializer.append(numpy_helper.from_array(array, names[key]))
    matmul = _nbits_node([head.input[0], names["table"], names["scales"], names["zero_points"]], list(head.output),
                         head.name, hidden, vocab, fmt)
    padded = packed.shape[1] * block != hidden
    looked_up = f"{gather.output[0]}_padded" if padded else gather.output[0]
    lookup = [helper.make_node("Reshape", [names["table"], names["row_shape"]], [names["rows"]],
                               name=f"{gather.name}_table_rows"),
              helper.make_node("GatherBlockQuantized", [names["rows"], gather.input[1], names["scales"],
                                                        names["zero_points"]], [looked_up],
                               name=f"{gather.name}_Q{bits}", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                               block_size=block, bits=bits)]
    if padded:
        slice_args = {"starts": [0], "ends": [hidden], "axes": [-1]}
        for key, values in slice_args.items():
            graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), f"{prefix}_{key}"))
        lookup.append(helper.make_node("Slice", [looked_up, *(f"{prefix}_{k}" for k in slice_args)],
                                       list(gather.output), name=f"{gather.name}_unpadded"))
    return matmul, lookup


def embedding_gather(model: onnx.ModelProto, table: str) -> onnx.NodeProto | None:
    """The Gather that looks token ids up in the initializer `table`."""
    return next((n for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] == table), None)


def write_block_formats(model: onnx.ModelProto, anatomy: Anatomy, mapping: dict[str, str],
                        formats: dict[str, str]) -> None:
    """Replace each linear's MatMul by MatMulNBits at its block format ('fp32' stays). A tied
    head in a block format shares one table, in that format, with the embedding lookup."""
    from modeldoctor.export.graph import fold_transposed_weights, matmul_weight_source

    graph = model.graph
    shared = anatomy.head_tied and formats.get(HEAD) in BLOCK_FORMATS
    copied = {mapping[n] for n, f in formats.items() if f in BLOCK_FORMATS and not (n == HEAD and shared)}
    fold_transposed_weights(model, copied)
    initializers = {i.name: i for i in graph.initializer}
    by_node = {node: name for name, node in mapping.items()}
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        name = by_node.get(node.name)
        if node.op_type != "MatMul" or name is None or formats.get(name) not in BLOCK_FORMATS:
            continue
        if name == HEAD and shared:
            table_name = matmul_weight_source(model, node)
            gather = embedding_gather(model, table_name) if table_name else None
            if gather is None:
                raise ModelDoctorError("The tied head's table has no embedding lookup in the exported graph; it "
                                       "cannot be shared. Keep the head in fp32.")
            matmul, lookup = _shared_table(node, gather, numpy_helper.to_array(initializers[table_name]),
                                           formats[name], graph)
            replaced[node.name] = [matmul]
            replaced[gather.name] = lookup
            continue
        weight = node.input[1]
        if weight not in initializers:
            raise ModelDoctorError(f"The MatMul computing {name} has no constant weight; it cannot be quantized.")
        replaced[node.name] = [_matmul_nbits(node, numpy_helper.to_array(initializers[weight]), formats[name],
                                             weight, graph)]
    nodes = [new for node in graph.node for new in replaced.get(node.name, [node])]
    graph.ClearField("node")
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    from modeldoctor.export.graph import drop_unused_initializers

    drop_unused_initializers(graph)


def quantize_dynamic_int8(source: Path, target: Path, exclude_nodes: list[str], external_data: bool,
                          only_nodes: list[str] | None = None) -> None:
    """onnxruntime's quantize_dynamic as the export runs it (every MatMul but `exclude_nodes`, or
    only `only_nodes`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_quantizer_logs()
    # reduce_range: 7-bit weights, so the u8×s8 kernel of CPUs without VNNI cannot saturate.
    quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude_nodes), nodes_to_quantize=only_nodes,
                     use_external_data_format=external_data, extra_options={"MatMulConstBOnly": True})


def preset_formats(anatomy: Anatomy, precision: str) -> dict[str, str]:
    """Each linear's format in a precision before any choice: every block linear in that format;
    the head too, except that an int4 export writes the head at 8 bits (a 4-bit head is known to
    make small models repeat themselves), and an int8-dynamic export keeps a tied head fp32
    (it would add an int8 copy beside the fp32 table the lookup reads)."""
    if precision not in PRECISIONS:
        raise ModelDoctorError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    formats = {name: precision for name in anatomy.linear_names()}
    if precision == "int4":
        formats[HEAD] = "int8"
    elif precision == "int8-dynamic" and anatomy.head_tied:
        formats[HEAD] = "fp32"
    else:
        formats[HEAD] = precision
    return formats


def quantize_export(fp32_path: Path, target: Path, formats: dict[str, str], anatomy: Anatomy,
                    work: Path) -> dict[str, str]:
    """Write the fp32 export quantized into `target`, each linear in its format (a linear left
    out of `formats` stays fp32), then check the written graph does exactly that. Returns
    linear -> the ONNX node that computes it in the written graph. `work` is a scratch folder."""
    from modeldoctor.export.graph import check_quantized, fold_transposed_weights, rewrite_gemms
    from modeldoctor.export.mapping import map_linears

    known = set(anatomy.linear_targets())
    unknown = [n for n in formats if n not in known]
    if unknown:
        raise ModelDoctorError(f"No linear named {', '.join(unknown[:5])} in this model; linears are named like "
                               f"{anatomy.linear_targets()[0]}, and the LM head is 'head'.")
    bad = sorted({f for f in formats.values() if f not in FORMATS})
    if bad:
        raise ModelDoctorError(f"Unknown format {', '.join(bad)}; a linear is one of {', '.join(FORMATS)}.")
    formats = {name: formats.get(name, "fp32") for name in anatomy.linear_targets()}
    used = set(formats.values())
    if "int8-dynamic" in used and used & set(BLOCK_FORMATS):
        raise ModelDoctorError("int8-dynamic (MatMulInteger) cannot be mixed with the int8/int4 block formats in "
                               "one export.")
    model = onnx.load(str(fp32_path))
    rewrite_gemms(model)
    mapping, missing = map_linears(model, anatomy)
    if missing:
        raise ModelDoctorError(f"No ONNX MatMul computes {', '.join(missing[:5])}; the export cannot set or check "
                               "its precision.")
    external = sum(p.stat().st_size for p in fp32_path.parent.glob("*.onnx*")) > EXTERNAL_DATA_BYTES
    if "int8-dynamic" in used:
        fold_transposed_weights(model, {mapping[n] for n, f in formats.items() if f == "int8-dynamic"})
        work.mkdir(parents=True, exist_ok=True)
        prepared = work / fp32_path.name
        onnx.save_model(model, str(prepared), save_as_external_data=external, location=f"{prepared.name}_data")
        del model
        quantize_dynamic_int8(prepared, target, [mapping[n] for n, f in formats.items() if f == "fp32"], external)
        refuse_collapse_modes(target)
        model = onnx.load(str(target))
    else:
        write_block_formats(model, anatomy, mapping, formats)
        onnx.save_model(model, str(target), save_as_external_data=external, location=f"{target.name}_data")
    return check_quantized(model, anatomy, mapping, formats)


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
