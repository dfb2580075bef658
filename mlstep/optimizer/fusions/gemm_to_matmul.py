"""Flattened Linear (Conv1D) -> 3-D MatMul + bias Add, so that the other fusions see one form.

    Reshape(Gemm(Reshape(x, [-1, K]), W, b), x.shape[:-1] + [N])  ==>  Add(MatMul(x, W), b)
    (x may also be [B, S, heads, head_size] with heads * head_size = K: its heads are merged first)

GPT-2's Conv1D (and any Linear on 3-D input that an exporter flattens) arrives as Reshape -> Gemm ->
Reshape. Rewriting it as MatMul + Add lets SkipLayerNormalization and FastGelu absorb the bias and keeps
one projection pattern for attention. Checked: Gemm without transposes, alpha = beta = 1, a constant 2-D
weight and 1-D bias, and an outer reshape that restores exactly x's leading dimensions: shown by the
symbolic shape inference (shapes.py), or, where x's dims are unknown (behind an attention the inference
cannot follow, PyTorch 1.4-1.6), by the target itself being ``Concat(Shape(x)[0], .., Shape(x)[r-2], N)``
for an x of known rank r (Conv1D's ``x.size()[:-1] + (nf,)``). A target of x's rank of entries whose last
is N then restores x's leading dims whatever they are; and since the flattened Gemm would fail unless x's
last dim is K, the rewrite agrees with the original wherever the original runs.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, const_array, const_shape
from mlstep.optimizer.shapes import infer_content, infer_dims


class UnflattenGemm(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("UnflattenGemm", remove_nodes=False)

    def pattern(self, op, x, flat_shape, w, b, out_shape):
        return op.Reshape(op.Gemm(op.Reshape(x, flat_shape), w, b, _outputs=["gemm"]), out_shape)

    def check(self, context, x, flat_shape, w, b, out_shape, gemm, **_):
        result = pattern.MatchResult()
        node = gemm.producer()
        attrs = node.attributes
        if attrs.get_int("transA", 0) or attrs.get_int("transB", 0):
            return result.fail("Gemm with transposed operands")
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return result.fail("Gemm with alpha/beta other than 1")
        ws, bs = const_shape(w), const_shape(b)
        if ws is None or len(ws) != 2 or bs is None or bs not in ((ws[1],), (1, ws[1])):
            return result.fail("Gemm weight/bias are not a constant matrix and vector")
        (x_dims,) = infer_dims(context.graph_or_function, [x])
        flat = infer_content(context.graph_or_function, flat_shape)
        if (x_dims is None or None in x_dims) and (flat == [-1, ws[0]] or _flattens_last_dim(flat_shape, x)) \
                and _leading_dims_of(out_shape, x, ws[1]):
            return result    # the outer target is built from Shape(x) itself (see the module docstring)
        target = infer_content(context.graph_or_function, out_shape)
        if x_dims is not None and len(x_dims) == 4 and isinstance(x_dims[-1], int) and \
                isinstance(x_dims[-2], int) and x_dims[-2] * x_dims[-1] == ws[0]:
            x_dims = x_dims[:2] + [ws[0]]      # [batch, sequence, heads, head_size]: merged heads
        elif x_dims is None:
            return result.fail(f"input dims unknown, and the reshapes are not [-1, x.size(-1)] and "
                               f"Concat(x.size()[:-1], [{ws[1]}]) of that same x")
        elif len(x_dims) != 3 or x_dims[-1] != ws[0]:
            return result.fail(f"input is not [batch, sequence, {ws[0]}] ({x_dims})")
        if flat != [-1, ws[0]]:
            return result.fail(f"the flattening reshape is {flat}, not [-1, {ws[0]}]")
        if target is None or list(target) != list(x_dims[:-1]) + [ws[1]]:
            return result.fail(f"the outer reshape {target} does not restore {x_dims[:-1] + [ws[1]]}")
        return result

    def rewrite(self, op, x, w, b, **_):
        if x.shape is not None and len(x.shape) == 4:   # merge the heads first (a free reshape)
            x = op.Reshape(x, op.Constant(value=ir.tensor(np.array([0, 0, -1], dtype=np.int64))))
        return op.Add(op.MatMul(x, w), b)


def _leading_dims_of(target: ir.Value, x: ir.Value, width: int) -> bool:
    """True when ``target`` is Concat(Unsqueeze(Gather(Shape(x), i)) for i in 0..r-2, [width]) with r the rank
    of x (from a Reshape whose own target has r one-entry pieces when x has no shape)."""
    node = _skip_casts(target)
    rank = _rank(x)
    if node is None or node.op_type != "Concat" or rank is None or len(node.inputs) != rank:
        return False
    last = const_array(node.inputs[-1])
    if last is None or last.reshape(-1).tolist() != [width]:
        return False
    for i, piece in enumerate(node.inputs[:-1]):
        unsq = _skip_casts(piece)
        gather = _skip_casts(unsq.inputs[0]) if unsq is not None and unsq.op_type == "Unsqueeze" else None
        if gather is None or gather.op_type != "Gather" or const_array(gather.inputs[1]) is None:
            return False
        shape = _skip_casts(gather.inputs[0])
        index = int(const_array(gather.inputs[1]).reshape(-1)[0]) if const_array(gather.inputs[1]).size == 1 else None
        if shape is None or shape.op_type != "Shape" or shape.inputs[0] is not x or index not in (i, i - rank) \
                or shape.attributes.get_int("start", 0) != 0:
            return False
    return True


def _flattens_last_dim(target: ir.Value, x: ir.Value) -> bool:
    """``Concat([-1], Unsqueeze(x.size(-1)))``: Conv1D's ``x.view(-1, x.size(-1))``, the size read as
    ``Gather(Shape(x), last)`` or ``Squeeze(Slice(Shape(x), [last], [end]))``."""
    node = _skip_casts(target)
    rank = _rank(x)
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or rank is None:
        return False
    first = const_array(node.inputs[0])
    unsq = _skip_casts(node.inputs[1])
    size = _skip_casts(unsq.inputs[0]) if unsq is not None and unsq.op_type == "Unsqueeze" else None
    if first is None or first.reshape(-1).tolist() != [-1] or size is None:
        return False
    if size.op_type == "Gather":
        index, shape = const_array(size.inputs[1]), _skip_casts(size.inputs[0])
        ok = index is not None and index.size == 1 and int(index.reshape(-1)[0]) in (-1, rank - 1)
    elif size.op_type == "Squeeze" and _skip_casts(size.inputs[0]) is not None \
            and _skip_casts(size.inputs[0]).op_type == "Slice":
        sl = _skip_casts(size.inputs[0])
        starts, ends = const_array(sl.inputs[1]), const_array(sl.inputs[2])
        steps = const_array(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4] is not None else None
        ok = starts is not None and ends is not None and starts.size == 1 and ends.size == 1 \
            and int(starts.reshape(-1)[0]) in (-1, rank - 1) and int(ends.reshape(-1)[0]) >= rank \
            and (steps is None or steps.reshape(-1).tolist() == [1])
        shape = _skip_casts(sl.inputs[0])
    else:
        return False
    return ok and shape is not None and shape.op_type == "Shape" and shape.inputs[0] is x \
        and shape.attributes.get_int("start", 0) == 0


def _skip_casts(value: ir.Value | None) -> ir.Node | None:
    node = value.producer() if value is not None else None
    while node is not None and node.op_type == "Cast" and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Tanh", "Erf", "Sqrt", "Cast", "Relu", "Neg", "Where"}


def _rank(value: ir.Value, depth: int = 0, memo: dict | None = None) -> int | None:
    """x's rank: from its shape, else from the Reshape that made it (a Concat of one-entry pieces), else the
    largest rank among the inputs of the elementwise op (broadcasting) or MatMul that made it."""
    memo = {} if memo is None else memo
    if id(value) not in memo:
        memo[id(value)] = _rank_of(value, depth, memo)
    return memo[id(value)]


def _rank_of(value: ir.Value, depth: int, memo: dict) -> int | None:
    if value.shape is not None:
        return len(value.shape)
    if value.const_value is not None:
        return len(value.const_value.shape)
    node = value.producer()
    if node is None or depth > 120:
        return None
    if node.op_type in ("Transpose", "Softmax", "LayerNormalization") or (
            node.op_type in ("ReduceMean", "ReduceSum") and node.attributes.get_int("keepdims", 1) == 1):
        return _rank(node.inputs[0], depth + 1, memo)
    if node.op_type in _ELEMENTWISE or node.op_type == "MatMul":
        ranks = [_rank(v, depth + 1, memo) for v in node.inputs if v is not None]
        if node.op_type == "Where":
            ranks = ranks[1:] + ranks[:1]
        return None if not ranks or any(r is None for r in ranks) else max(ranks)
    if node.op_type == "Gather":   # an embedding lookup: rank(table) - 1 + rank(ids)
        ranks = [_rank(v, depth + 1, memo) for v in node.inputs[:2]]
        return None if None in ranks else ranks[0] - 1 + ranks[1]
    if node.op_type != "Reshape":
        return None
    target = _skip_casts(node.inputs[1])
    const = const_array(node.inputs[1])
    if const is not None:
        return int(const.size)
    if target is None or target.op_type != "Concat":
        return None
    entries = 0
    for piece in target.inputs:
        arr = const_array(piece)
        producer = piece.producer() if piece is not None else None
        if arr is not None:
            entries += int(arr.size)
        elif producer is not None and producer.op_type == "Unsqueeze" and _unsqueezes_scalar(producer):
            entries += 1
        else:
            return None
    return entries


def _unsqueezes_scalar(node: ir.Node) -> bool:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    axes = [int(a) for a in axes.reshape(-1)] if axes is not None else list(node.attributes.get_ints("axes", []))
    src = node.inputs[0]
    scalar = src is not None and ((src.shape is not None and len(src.shape) == 0) or
                                  (src.producer() is not None and src.producer().op_type in ("Gather", "Mul", "Div")
                                   and _scalar_op(src.producer())))
    return axes == [0] and scalar


def _scalar_op(node: ir.Node) -> bool:
    """A scalar made from scalars: Gather(Shape(.), scalar index), or Mul/Div of such."""
    if node.op_type == "Gather":
        idx = const_array(node.inputs[1])
        return idx is not None and idx.ndim == 0 and _skip_casts(node.inputs[0]) is not None \
            and _skip_casts(node.inputs[0]).op_type == "Shape"
    return all(v is not None and ((const_array(v) is not None and const_array(v).ndim == 0) or
                                  (v.producer() is not None
                                   and v.producer().op_type in ("Gather", "Mul", "Div", "Squeeze")
                                   and (v.producer().op_type == "Squeeze" or _scalar_op(v.producer()))))
               for v in node.inputs)


FUSION = Fusion("gemm_to_matmul", lambda ctx: [UnflattenGemm.rule()], commute=False, anchor="Gemm")
