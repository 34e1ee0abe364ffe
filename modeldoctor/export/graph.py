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
from modeldoctor.export.mapping import linear_fingerprint, matmul_weights
from modeldoctor.model import Anatomy

# The op onnxruntime writes for a quantized MatMul, and the suffix it adds to that MatMul's name.
QUANTIZED_NODES = {"int8": (("MatMulInteger", "DynamicQuantizeMatMul"), "_quant"),
                   "int4": (("MatMulNBits",), "_Q4")}


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
    _drop_unused_initializers(graph)
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
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
    if len(keep) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(keep)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]
    for initializer in unused:
        graph.initializer.remove(initializer)


def check_quantized(model: onnx.ModelProto, anatomy: Anatomy, mapping: dict[str, str], kept: list[str],
                    precision: str) -> None:
    """Every kept linear must still be a float MatMul holding its exact weight, and every other
    linear a quantized node; anything else is an error, so no export goes out with a
    precision it does not say it has."""
    ops, suffix = QUANTIZED_NODES[precision]
    float_nodes = matmul_weights(model)
    quantized = {n.name for n in model.graph.node if n.op_type in ops}
    kept_set = set(kept)
    left_fp32, lost_fp32 = [], []
    for name, node in mapping.items():
        is_float = node in float_nodes.get(linear_fingerprint(anatomy, name), [])
        is_quantized = node + suffix in quantized
        if name in kept_set and (not is_float or is_quantized):
            lost_fp32.append(name)
        elif name not in kept_set and (is_float or not is_quantized):
            left_fp32.append(name)
    problems = []
    if lost_fp32:
        problems.append(f"{len(lost_fp32)} linears meant to stay fp32 are not ({', '.join(lost_fp32[:4])})")
    if left_fp32:
        problems.append(f"{len(left_fp32)} linears meant for {precision} are not quantized "
                        f"({', '.join(left_fp32[:4])})")
    if problems:
        raise ModelDoctorError("The quantized model does not match the fp32 keep list: " + "; ".join(problems)
                               + ". Nothing was written.")
