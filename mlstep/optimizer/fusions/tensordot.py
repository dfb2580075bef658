"""Flattened Dense (TF ``tensordot``) -> 3-D MatMul, so that the other fusions see the PyTorch form.

    Reshape(MatMul(Reshape(x, [-1, K]), W), x.shape[:-1] + [N])  ==>  MatMul(x, W)
    (x may also be [B, S, heads, head_size] with heads * head_size = K: its heads are merged first)

Keras' ``Dense`` on a [batch, sequence, K] input is ``tf.tensordot``, which tf2onnx exports as a flatten,
a 2-D MatMul and an unflatten whose target is rebuilt from ``Shape(x)`` (through Casts, GatherV2 and
Concat). Once it is a plain MatMul, the bias Add that follows is the one attention, BiasGelu and
SkipLayerNormalization already absorb. This is the MatMul twin of ``gemm_to_matmul.py`` (GPT-2's Conv1D).
Checked with the symbolic shape inference of shapes.py: x is rank 3 with last dimension K (or rank 4 with
its last two dims multiplying to K), the weight is a constant [K, N], the flattening target has two entries
the last of which is K, and the outer target is exactly x's leading dimensions followed by N. Anything not
shown equal is refused (unknown stays unknown).

The flattening target may be computed at run time (keras2onnx:
``Cast(Concat(Unsqueeze(ReduceProd(Gather(Shape(x), [0, 1]))), Unsqueeze(ReduceProd(...))))``): its first
entry need not be known, since a two-entry reshape of x whose last entry is K succeeds only as [B*S, K],
which is what [-1, K] gives.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, const_array, const_shape
from mlstep.optimizer.shapes import infer_content, infer_dims


class UnflattenMatMul(pattern.RewriteRuleClassBase):
    def __init__(self):
        # remove_nodes=False: the flattening Reshape is shared by Q, K and V; dead nodes go in cleanup.
        super().__init__("UnflattenMatMul", remove_nodes=False)

    def pattern(self, op, x, flat_shape, w, out_shape):
        return op.Reshape(op.MatMul(op.Reshape(x, flat_shape), w), out_shape)

    def check(self, context, x, flat_shape, w, out_shape, **_):
        result = pattern.MatchResult()
        ws = const_shape(w)
        if ws is None or len(ws) != 2:
            return result.fail("MatMul weight is not a constant matrix")
        graph = context.graph_or_function
        (x_dims,) = infer_dims(graph, [x])
        if x_dims is not None and len(x_dims) == 4 and isinstance(x_dims[-1], int) and \
                isinstance(x_dims[-2], int) and x_dims[-2] * x_dims[-1] == ws[0]:
            x_dims = x_dims[:2] + [ws[0]]      # [batch, sequence, heads, head_size]: merged heads
        if x_dims is None or len(x_dims) != 3 or x_dims[-1] != ws[0] or any(d is None for d in x_dims):
            return result.fail(f"input is not [batch, sequence, {ws[0]}] ({x_dims})")
        flat = flat_target(graph, flat_shape)
        if flat is None or len(flat) != 2 or flat[1] != ws[0]:
            return result.fail(f"the flattening reshape is {flat}, not [-1, {ws[0]}]")
        target = infer_content(graph, out_shape)
        if target is None or list(target) != list(x_dims[:-1]) + [ws[1]]:
            return result.fail(f"the outer reshape {target} does not restore {x_dims[:-1] + [ws[1]]}")
        return result

    def rewrite(self, op, x, w, **_):
        if x.shape is not None and len(x.shape) == 4:   # merge the heads first (a free reshape)
            x = op.Reshape(x, op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64))))
        return op.MatMul(x, w)


FUSION = Fusion("tensordot", lambda ctx: [UnflattenMatMul.rule()], commute=False, anchor="MatMul")


def flat_target(graph, shape: ir.Value) -> list | None:
    """The entries of a reshape target (None for an entry computed at run time and not known), or None when
    even its length is unknown."""
    content = infer_content(graph, shape)
    if content is not None and all(c is not None for c in content):
        return list(content)
    node = shape.producer()
    while node is not None and node.op_type == "Cast" and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Concat":
        return None if content is None else list(content)
    entries: list = []
    for piece in node.inputs:
        reduced = _reduced_entry(graph, piece)
        known = infer_content(graph, piece) if piece is not None and reduced is False else None
        if reduced is not False:
            entries.append(reduced)
        elif known is not None:
            entries += list(known)
        else:
            return None
    return entries


def _reduced_entry(graph, value: ir.Value | None):
    """For ``Unsqueeze(ReduceProd(v, keepdims=0), [0])`` of a 1-D shape slice v: the product of v's entries when
    they are all known ints, else None (one entry, unknown). False when ``value`` is not that form."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Unsqueeze":
        return False
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = [int(a) for a in axes.reshape(-1)] if axes is not None else list(node.attributes.get_ints("axes", []))
    inner = node.inputs[0].producer() if node.inputs[0] is not None else None
    if axes != [0] or inner is None or inner.op_type != "ReduceProd" or inner.attributes.get_int("keepdims", 1) != 0:
        return False
    gather = inner.inputs[0].producer() if inner.inputs[0] is not None else None
    idx = const_array(gather.inputs[1]) if gather is not None and gather.op_type == "Gather" else None
    if idx is None or idx.ndim != 1:
        return False      # not a slice of a shape vector
    entries = infer_content(graph, inner.inputs[0])
    if entries is None or any(not isinstance(e, int) for e in entries):
        return None
    return int(np.prod(entries))
