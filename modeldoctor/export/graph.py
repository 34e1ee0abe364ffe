"""Prepare an exported graph for quantization, and check afterwards what the quantizer did.

onnxruntime's quantizers only see MatMuls whose weight is a constant initializer, by node
name. Two exports break that: GPT-2 style Conv1D layers (and OPT's MLP) export as Gemm,
which `quantize_dynamic` renames while turning them into MatMuls (so an exclusion by the
Gemm's name never matches) and MatMulNBits skips; a head tied to the token embedding reads
its weight through a Transpose of the embedding's initializer, so neither quantizer touches
it. `prepare_for_quantization` rewrites both into plain constant-weight MatMuls with stable
names before the quantizer runs; `check_quantized` then reads the quantized graph back and
refuses any linear whose precision is not the one asked for.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modeldoctor.errors import ModelDoctorError
from modeldoctor.export import BLOCK_FORMATS
from modeldoctor.export.mapping import linear_fingerprint, matmul_weights
from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import HEAD

# The ops a quantized MatMul becomes in each format, and the suffix added to that MatMul's name.
QUANTIZED_NODES = {"int8-dynamic": (("MatMulInteger", "DynamicQuantizeMatMul"), "_quant"),
                   **{fmt: (("MatMulNBits",), f"_Q{bits}") for fmt, (bits, _) in BLOCK_FORMATS.items()}}


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unique(name: str, taken: set[str]) -> str:
    candidate, number = name, 0
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    taken.add(candidate)
    return candidate


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def rewrite_gemms(model: onnx.ModelProto) -> int:
    """Replace every Gemm with a constant weight (alpha = beta = 1, A not transposed) by
    MatMul (+ Add for the bias), named "<gemm>_MatMul" / "<gemm>_Add". Returns how many."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    taken = _tensor_names(graph)
    nodes, rewritten = [], 0
    for node in graph.node:
        attrs = _attributes(node) if node.op_type == "Gemm" else {}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(initializers[weight]).T
            weight = _unique(f"{weight}_transposed", taken)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), weight))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = _unique(f"{node.output[0]}_matmul", taken) if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_Add"))
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    return rewritten


def fold_transposed_weights(model: onnx.ModelProto, nodes: set[str]) -> None:
    """Give each named MatMul whose weight is Transpose(initializer) (a tied head) its own
    constant weight, so the quantizer can quantize it; the shared initializer stays for the
    other readers (the embedding's Gather). MatMuls left in fp32 keep reading the shared
    weight, which costs no second copy."""
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    taken = _tensor_names(graph)
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in nodes or len(node.input) < 2:
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        array = numpy_helper.to_array(initializers[source.input[0]])
        if array.ndim != 2 or _attributes(source).get("perm", [1, 0]) != [1, 0]:
            continue
        name = _unique(f"{source.input[0]}_transposed_for_{node.name.strip('/').replace('/', '_')}", taken)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), name))
        node.input[1] = name
    _drop_dead_transposes(graph)


def matmul_weight_source(model: onnx.ModelProto, node: onnx.NodeProto) -> str | None:
    """The initializer a MatMul's weight comes from: its own, or the one a Transpose reads (a tied head)."""
    initializers = {i.name for i in model.graph.initializer}
    if node.input[1] in initializers:
        return node.input[1]
    source = next((n for n in model.graph.node if node.input[1] in n.output), None)
    if source is not None and source.op_type == "Transpose" and source.input[0] in initializers:
        return source.input[0]
    return None


def _drop_dead_transposes(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    if len(keep) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(keep)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove Transposes nothing reads, then initializers nothing reads."""
    _drop_dead_transposes(graph)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)


def check_quantized(model: onnx.ModelProto, anatomy: Anatomy, mapping: dict[str, str],
                    formats: dict[str, str]) -> dict[str, str]:
    """Every linear must be written in exactly its format: an fp32 one a float MatMul holding its
    exact weight, a block format a MatMulNBits of that width and block size, an int8-dynamic one
    an integer matmul; a tied head in a block format must share its table with a block-quantized
    embedding lookup.
    Anything else is an error, so no export goes out with a precision it does not say it has.
    Returns linear -> the node that computes it in the written graph."""
    float_nodes = matmul_weights(model)
    nodes = {n.name: n for n in model.graph.node}
    written, wrong = {}, []
    for name, node in mapping.items():
        wanted = formats.get(name, "fp32")
        if wanted == "fp32":
            ok = node in float_nodes.get(linear_fingerprint(anatomy, name), [])
            written[name] = node
        else:
            ops, suffix = QUANTIZED_NODES[wanted]
            found = nodes.get(node + suffix)
            ok = found is not None and found.op_type in ops and node not in nodes
            if ok and wanted in BLOCK_FORMATS:
                attributes = _attributes(found)
                ok = (attributes.get("bits"), attributes.get("block_size")) == BLOCK_FORMATS[wanted]
            written[name] = node + suffix
        if not ok:
            wrong.append(f"{name} (meant {wanted})")
    head_format = formats.get(HEAD)
    if head_format in BLOCK_FORMATS and anatomy.head_tied and HEAD in mapping:
        head = nodes.get(mapping[HEAD] + QUANTIZED_NODES[head_format][1])
        # The lookup reads the head's packed table through a Reshape (rows instead of blocks).
        rows_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape"}
        lookups = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
        if head is None or not any(rows_of.get(n.input[0], n.input[0]) == head.input[1] for n in lookups):
            wrong.append(f"the tied head and the embedding (meant one shared {head_format} table)")
    if wrong:
        raise ModelDoctorError(f"The quantized model does not write {len(wrong)} linears in the format chosen for "
                               f"them ({', '.join(wrong[:4])}). Nothing was written.")
    return written
