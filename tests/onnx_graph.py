"""Reading an exported ONNX graph back in tests: which linears still run in float."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modeldoctor.model.anatomy import weight_matrix


def weight_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array, dtype=np.float32)
    return f"{array.shape}:{hashlib.sha1(array.tobytes()).hexdigest()}"


def float_matmul_weights(path) -> set[str]:
    """Digests of the float constant (in, out) weights, or transposes of them, of every
    MatMul/Gemm in an ONNX file."""
    model = onnx.load(str(path))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in constants and constants[node.input[0]].ndim == 2:
            constants[node.output[0]] = constants[node.input[0]].T
    found = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.input[1] in constants:
            weight = constants[node.input[1]]
            if any(a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute):
                weight = weight.T
            if weight.dtype.kind == "f":
                found.add(weight_digest(weight))
    return found


def linear_digest(linear) -> str:
    """A torch linear's weight as the exporter stores it, (in, out)."""
    return weight_digest(weight_matrix(linear).detach().t().numpy())


def float_linears(path, session) -> set[str]:
    """The linears (by weight content) that some float MatMul/Gemm of the graph computes."""
    found = float_matmul_weights(path)
    anatomy = session.anatomy
    return {n for n in anatomy.linear_targets() if linear_digest(anatomy.linear(n)) in found}
