"""Flattened Dense (TF ``tensordot``) -> 3-D MatMul, so that the other fusions see the PyTorch form.

    Reshape(MatMul(Reshape(x, [-1, K]), W), x.shape[:-1] + [N])  ==>  MatMul(x, W)

Keras' ``Dense`` on a [batch, sequence, K] input is ``tf.tensordot``, which tf2onnx exports as a flatten,
a 2-D MatMul and an unflatten whose target is rebuilt from ``Shape(x)`` (through Casts, GatherV2 and
Concat). Once it is a plain MatMul, the bias Add that follows is the one attention, BiasGelu and
SkipLayerNormalization already absorb. This is the MatMul twin of ``gemm_to_matmul.py`` (GPT-2's Conv1D).
Checked with the symbolic shape inference of shapes.py: x is rank 3 with last dimension K, the weight is a
constant [K, N], the flattening target is [-1, K] and the outer target is exactly x's leading dimensions
followed by N. Anything not shown equal is refused (unknown stays unknown).
"""
from __future__ import annotations

from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, const_shape
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
        if x_dims is None or len(x_dims) != 3 or x_dims[-1] != ws[0] or any(d is None for d in x_dims):
            return result.fail(f"input is not [batch, sequence, {ws[0]}] ({x_dims})")
        flat = infer_content(graph, flat_shape)
        if flat != [-1, ws[0]]:
            return result.fail(f"the flattening reshape is {flat}, not [-1, {ws[0]}]")
        target = infer_content(graph, out_shape)
        if target is None or list(target) != list(x_dims[:-1]) + [ws[1]]:
            return result.fail(f"the outer reshape {target} does not restore {x_dims[:-1] + [ws[1]]}")
        return result

    def rewrite(self, op, x, w, **_):
        return op.MatMul(x, w)


FUSION = Fusion("tensordot", lambda ctx: [UnflattenMatMul.rule()], commute=False, anchor="MatMul")
