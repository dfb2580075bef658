"""Small graph edits shared by the attention near-miss tests (made from real exports)."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


def has_matmul_ancestor(value: ir.Value) -> bool:
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "MatMul":
            return True
        stack.extend(node.inputs)
    return False


def softmax_adds(model: ir.Model) -> list[tuple[ir.Node, int]]:
    """(Add feeding a Softmax, index of its mask-bias input): the operand with no MatMul behind it."""
    found = []
    for softmax in [n for n in model.graph if n.op_type == "Softmax"]:
        add = softmax.inputs[0].producer()
        assert add is not None and add.op_type == "Add"
        masks = [i for i, v in enumerate(add.inputs) if not has_matmul_ancestor(v)]
        assert len(masks) == 1, "expected one mask-bias operand"
        found.append((add, masks[0]))
    assert len(found) == 2
    return found


def const_node(value: np.ndarray) -> ir.Node:
    tensor = ir.tensor(value)
    node = ir.node("Constant", [], attributes={"value": tensor})
    node.outputs[0].const_value = tensor
    return node
