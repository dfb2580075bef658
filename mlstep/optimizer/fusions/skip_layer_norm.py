"""Residual Add + LayerNorm -> com.microsoft ``SkipLayerNormalization``.

    sum = input + skip [+ bias];   y = LayerNorm(sum) * gamma + beta      (last axis)

Handles: ``LayerNormalization(Add(a, b))`` with two non-constant activations of the same shape; an addend
``Add(MatMul(..), bias)`` with a 1-D constant bias of hidden length has that bias absorbed into the 5th
input; when the residual sum has users besides the LayerNorm (pre-LN blocks, GPT-2), they read output 3
(input_skip_bias_sum). Refused: a constant or broadcasting addend (the embedding sum with its [1, S, H]
position table), shapes that the value analysis (values.py) cannot show equal, a LayerNorm over another axis.

The value analysis runs once per pass (``PassFacts``): one snapshot of the graph in which no candidate residual
Add (an Add read by a LayerNormalization) counts as evidence, kept current by aliasing each rewrite's outputs to
the values they replace. Only where that snapshot cannot show the addends equal is the graph analysed again for
that match alone (every node but its own Add counts), so the answer is the same as a per-match analysis,
at the cost of one analysis per pass on the graphs the exporters write (bert-base, GPT-2 with 12 layers).
"""
from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import MS_DOMAIN, Fusion, FusionContext, const_array, vector_input, \
    vector_of
from mlstep.optimizer.values import facts



class SkipLayerNormFusion(pattern.RewriteRuleClassBase):
    """Variants: ``bias`` (one addend is MatMul + constant bias), ``sum_output`` (the sum has other users)."""

    def __init__(self, name: str, *, bias: bool, sum_output: bool, shared: "PassFacts"):
        super().__init__(name)
        self._bias, self._sum_output = bias, sum_output
        self._shared = shared

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
        reason = _same_shapes(self._shared.get(context.graph_or_function), first, b, hidden)
        if reason:   # the pass snapshot excludes every residual Add; this match's own analysis excludes only its own
            reason = _same_shapes(facts(context.graph_or_function, excluding=total.producer()), first, b, hidden)
        if reason:
            return result.fail(reason)
        if self._sum_output:
            if not [u for u, _ in total.uses() if u is not ln] and not total.is_graph_output():
                return result.fail("residual sum has no other users (the plain form applies)")
        return result

    def rewrite(self, op, b, matmul, bias, normed, total, a=None, **_):
        ln = normed.producer()
        gamma = ln.inputs[1]
        beta = ln.inputs[2] if len(ln.inputs) > 2 else None
        inputs = [matmul if self._bias else a, b, vector_input(op, gamma), None if beta is None else vector_input(op, beta)]
        if self._bias:
            inputs.append(vector_input(op, bias))
        while inputs[-1] is None:
            inputs.pop()
        epsilon = ln.attributes.get_float("epsilon", 1e-5)
        y, _mean, _inv, new_total = op.SkipLayerNormalization(*inputs, epsilon=epsilon, _domain=MS_DOMAIN,
                                                              _outputs=4)
        self._shared.alias(y, normed)
        self._shared.alias(new_total, total)
        return (y, new_total) if self._sum_output else y


class PassFacts:
    """The value analysis of one fusion pass, built at its first question: every candidate residual Add excluded
    as evidence (a fusion must not prove its operands equal by the very Add it replaces)."""

    def __init__(self):
        self._facts = None

    def get(self, graph):
        if self._facts is None:
            graph = graph if isinstance(graph, ir.Graph) else graph.graph
            residuals = frozenset(n for n in graph if n.op_type == "Add" and n.domain == "" and any(
                u.op_type == "LayerNormalization" for out in n.outputs for u, _ in out.uses()))
            self._facts = facts(graph, excluding=residuals)
        return self._facts

    def alias(self, new: ir.Value, old: ir.Value) -> None:
        if self._facts is not None:
            self._facts.alias(new, old)


def _same_shapes(known, first: ir.Value, b: ir.Value, hidden: int) -> str:
    """"" when the analysis shows both addends [.., hidden] of one shape, else the reason."""
    da, db = known.dims(first), known.dims(b)
    if da is None or db is None:
        return f"cannot show the addends have the same shape ({da} vs {db})"
    if len(da) not in (2, 3) or not known.same_shape(first, b):
        return f"addend shapes differ or broadcast ({da} vs {db})"
    if not known.same_dim(da[-1], hidden):
        return f"hidden size {da[-1]} differs from the LayerNorm scale length {hidden}"
    return ""


def _is_last(axis: int, value: ir.Value) -> bool:
    return value.shape is not None and axis == len(value.shape) - 1


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    # Absorbing the bias first (the plain form would match too, leaving the bias Add outside); the plain
    # output first (a sum with other users fails the matcher's "other uses" test and falls to sum_output).
    shared = PassFacts()
    return [SkipLayerNormFusion.rule(f"SkipLayerNorm[{'bias,' if bias else ''}{'sum' if s else 'plain'}]",
                                     bias=bias, sum_output=s, shared=shared)
            for bias in (True, False) for s in (False, True)]


FUSION = Fusion("skip_layer_norm", _rules, anchor="LayerNormalization")
