"""Flattened Linear (Conv1D) -> 3-D MatMul + bias Add, so that the other fusions see one form.

    Reshape(Gemm(Reshape(x, [-1, K]), W, b), x.shape[:-1] + [N])  ==>  Add(MatMul(x, W), b)
    (x may also be [B, S, heads, head_size] with heads * head_size = K: its heads are merged first)

GPT-2's Conv1D (and any Linear on 3-D input that an exporter flattens) arrives as Reshape -> Gemm ->
Reshape. Rewriting it as MatMul + Add lets SkipLayerNormalization and FastGelu absorb the bias and keeps
one projection pattern for attention. Checked: Gemm without transposes, alpha = beta = 1, a constant 2-D
weight and 1-D bias, and an outer reshape that restores exactly x's leading dimensions (symbolic shape
inference, see shapes.py).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, const_shape
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
        target = infer_content(context.graph_or_function, out_shape)
        if x_dims is not None and len(x_dims) == 4 and isinstance(x_dims[-1], int) and \
                isinstance(x_dims[-2], int) and x_dims[-2] * x_dims[-1] == ws[0]:
            x_dims = x_dims[:2] + [ws[0]]      # [batch, sequence, heads, head_size]: merged heads
        elif x_dims is None or len(x_dims) != 3 or x_dims[-1] != ws[0]:
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


FUSION = Fusion("gemm_to_matmul", lambda ctx: [UnflattenGemm.rule()], commute=False, anchor="Gemm")
