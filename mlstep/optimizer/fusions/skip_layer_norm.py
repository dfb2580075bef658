"""Residual Add + LayerNorm -> com.microsoft ``SkipLayerNormalization``.

    sum = input + skip [+ bias];   y = LayerNorm(sum) * gamma + beta      (last axis)

Handles: ``LayerNormalization(Add(a, b))`` with two non-constant activations of the same shape; an addend
``Add(MatMul(..), bias)`` with a 1-D constant bias of hidden length has that bias absorbed into the 5th
input; when the residual sum has users besides the LayerNorm (pre-LN blocks, GPT-2), they read output 3
(input_skip_bias_sum). Refused: a constant or broadcasting addend (the embedding sum with its [1, S, H]
position table), shapes that the value analysis (values.py) cannot show equal, a LayerNorm over another axis.
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import MS_DOMAIN, Fusion, FusionContext, const_array, vector_input, \
    vector_of
from mlstep.optimizer.values import facts



class SkipLayerNormFusion(pattern.RewriteRuleClassBase):
    """Variants: ``bias`` (one addend is MatMul + constant bias), ``sum_output`` (the sum has other users)."""

    def __init__(self, name: str, *, bias: bool, sum_output: bool):
        super().__init__(name)
        self._bias, self._sum_output = bias, sum_output

    def pattern(self, op, a, b, matmul, bias):
        if self._bias:
            a = op.Add(matmul, bias, _outputs=["biased"])
        total = op.Add(a, b, _outputs=["total"])
        out = op.LayerNormalization(total, _allow_other_inputs=True, _allow_other_attributes=True,
                                    _outputs=["normed"])
        return (out, total) if self._sum_output else out

    def check(self, context, b, matmul, bias, total, normed, a=None, biased=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        ln = normed.producer()
        first = biased if self._bias else a
        if ln.attributes.get_int("axis", -1) != -1 and not _is_last(ln.attributes.get_int("axis", -1), total):
            return result.fail(f"LayerNorm over axis {ln.attributes.get_int('axis', -1)}, not the last axis")
        if len(ln.outputs) > 1 and any(o.uses() for o in ln.outputs[1:]):
            return result.fail("LayerNorm mean / inv_std_var outputs are used")
        gamma = ln.inputs[1]
        beta = ln.inputs[2] if len(ln.inputs) > 2 else None
        scale = vector_of(gamma)
        if scale is None:
            return result.fail("LayerNorm scale is not a 1-D constant")
        hidden = scale.shape[0]
        if beta is not None and vector_of(beta, hidden) is None:
            return result.fail(f"LayerNorm bias is not a 1-D constant of length {hidden}")
        for name, value in (("first addend", first), ("second addend", b)):
            if const_array(value) is not None:
                return result.fail(f"{name} is a constant, not an activation")
        if self._bias:
            if const_array(matmul) is not None or matmul.producer() is None or matmul.producer().op_type != "MatMul":
                return result.fail("biased addend is not MatMul output + bias")
            if vector_of(bias, hidden) is None:
                return result.fail(f"addend bias is not a 1-D constant of hidden length {hidden}")
        known = facts(context.graph_or_function, excluding=total.producer())   # equal dims, whatever their names
        da, db = known.dims(first), known.dims(b)
        if da is None or db is None:
            return result.fail(f"cannot show the addends have the same shape ({da} vs {db})")
        if len(da) not in (2, 3) or not known.same_shape(first, b):
            return result.fail(f"addend shapes differ or broadcast ({da} vs {db})")
        if not known.same_dim(da[-1], hidden):
            return result.fail(f"hidden size {da[-1]} differs from the LayerNorm scale length {hidden}")
        if self._sum_output:
            if not [u for u, _ in total.uses() if u is not ln] and not total.is_graph_output():
                return result.fail("residual sum has no other users (the plain form applies)")
        return result

    def rewrite(self, op, b, matmul, bias, normed, a=None, **_):
        ln = normed.producer()
        gamma = ln.inputs[1]
        beta = ln.inputs[2] if len(ln.inputs) > 2 else None
        inputs = [matmul if self._bias else a, b, vector_input(op, gamma), None if beta is None else vector_input(op, beta)]
        if self._bias:
            inputs.append(vector_input(op, bias))
        while inputs[-1] is None:
            inputs.pop()
        epsilon = ln.attributes.get_float("epsilon", 1e-5)
        y, _mean, _inv, total = op.SkipLayerNormalization(*inputs, epsilon=epsilon, _domain=MS_DOMAIN, _outputs=4)
        return (y, total) if self._sum_output else y


def _is_last(axis: int, value: ir.Value) -> bool:
    return value.shape is not None and axis == len(value.shape) - 1


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    # Absorbing the bias first (the plain form would match too, leaving the bias Add outside); the plain
    # output first (a sum with other users fails the matcher's "other uses" test and falls to sum_output).
    return [SkipLayerNormFusion.rule(f"SkipLayerNorm[{'bias,' if bias else ''}{'sum' if s else 'plain'}]",
                                     bias=bias, sum_output=s)
            for bias in (True, False) for s in (False, True)]


FUSION = Fusion("skip_layer_norm", _rules, anchor="LayerNormalization")
