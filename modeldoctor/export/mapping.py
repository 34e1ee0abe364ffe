"""Map each torch linear to the ONNX MatMul (or Gemm) node that computes it.

Matched by content, not by name: the exporter stores a linear's weight (transposed) as the
MatMul's initializer, so a fingerprint of the weight finds the node whatever the family's
naming. The node's name scope is used only to break ties between identical weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import weight_matrix


def _fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return f"{array.shape}:{hashlib.sha1(array.tobytes()).hexdigest()}"


def matmul_weights(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Fingerprint of each constant MatMul / Gemm weight, as (in, out) -> nodes that use it.
    (GPT-2 style Conv1D layers export as Gemm.)"""
    initializers = {i.name: i for i in model.graph.initializer}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2 and node.input[1] in initializers:
            array = numpy_helper.to_array(initializers[node.input[1]])
            transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
            if array.ndim == 2:
                found.setdefault(_fingerprint(array.T if transposed else array), []).append(node.name)
    return found


def map_linears(model: onnx.ModelProto, anatomy: Anatomy) -> tuple[dict[str, str], list[str]]:
    """(linear name -> MatMul node name, linears that could not be found)."""
    by_weight = matmul_weights(model)
    mapping, missing = {}, []
    for name in anatomy.linear_names():
        weight = weight_matrix(anatomy.linear(name)).detach().t().numpy()  # ONNX stores (in, out)
        nodes = by_weight.get(_fingerprint(weight), [])
        if len(nodes) > 1:  # identical weights: prefer the node in this module's name scope
            scope = "/" + anatomy.qualified_name(name).replace(".", "/") + "/"
            nodes = [n for n in nodes if scope in n] or nodes[:1]
        if nodes:
            mapping[name] = nodes[0]
        else:
            missing.append(name)
    return mapping, missing
