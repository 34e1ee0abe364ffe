"""Map each torch linear (the LM head too) to the ONNX MatMul (or Gemm) node that computes it.

Matched by content, not by name: the exporter stores a linear's weight (transposed) as the
MatMul's initializer, so a fingerprint of the weight finds the node whatever the family's
naming. A head tied to the token embedding reads the embedding's initializer through a
Transpose, which is followed. The node's name scope is used only to break ties between
identical weights.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modeldoctor.model import Anatomy
from modeldoctor.model.anatomy import weight_matrix


def _fingerprint(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return f"{array.shape}:{hashlib.sha1(array.tobytes()).hexdigest()}"


def linear_fingerprint(anatomy: Anatomy, name: str) -> str:
    """The fingerprint of a linear's weight as ONNX stores it, (in, out)."""
    return _fingerprint(weight_matrix(anatomy.linear(name)).detach().float().t().numpy())


def matmul_weights(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Fingerprint of each float MatMul / Gemm's constant weight, as (in, out) -> nodes that use it.
    (GPT-2 style Conv1D layers export as Gemm; a tied head as MatMul(x, Transpose(embedding)).)"""
    initializers = {i.name: i for i in model.graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input and n.input[0] in initializers
                  and [list(a.ints) for a in n.attribute if a.name == "perm"] in ([], [[1, 0]])}
    found: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.input[1] in initializers:
            array = numpy_helper.to_array(initializers[node.input[1]])
            flip = any(a.name == "transB" and helper.get_attribute_value(a) == 1 for a in node.attribute)
        elif node.input[1] in transposed:
            array, flip = numpy_helper.to_array(initializers[transposed[node.input[1]]]), True
        else:
            continue
        if array.ndim == 2 and array.dtype.kind == "f":
            found.setdefault(_fingerprint(array.T if flip else array), []).append(node.name)
    return found


def map_linears(model: onnx.ModelProto, anatomy: Anatomy) -> tuple[dict[str, str], list[str]]:
    """(linear name -> MatMul node name, linears that could not be found), for every linear
    target: the block linears and the head."""
    by_weight = matmul_weights(model)
    mapping, missing = {}, []
    for name in anatomy.linear_targets():
        nodes = by_weight.get(linear_fingerprint(anatomy, name), [])
        if len(nodes) > 1:  # identical weights: prefer the node in this module's name scope
            scope = "/" + anatomy.qualified_name(name).replace(".", "/") + "/"
            nodes = [n for n in nodes if scope in n] or nodes[:1]
        if nodes:
            mapping[name] = nodes[0]
        else:
            missing.append(name)
    return mapping, missing
