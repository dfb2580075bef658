"""Decomposed LayerNorm -> ``LayerNormalization`` (default domain).

    y = (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) * gamma + beta      (means over the last axis)

Handles the forms exporters write below opset 17 (TorchScript): the square as ``Pow(d, 2)`` or
``Mul(d, d)``; the division as ``Div(d, std)`` or ``Mul(d, Reciprocal(std))``; ``ReduceMean`` axes as an
attribute (opset < 18) or an input (18+); the scale and/or the shift may be missing (ones / zeros).
Operand order of Add/Mul is covered by the rule set's commutation. Megatron's export (PyTorch 1.9) writes
``x - mean`` twice (one Sub for the square, one for the division: ``twin``) and a Cast to the input's
float type around the division (``cast``, checked to be a no-op Cast). GPT-2 with past as PyTorch 1.5
exported it casts ``x - mean`` before the square (``cast_square``, ``d.float().pow(2)``; also a no-op Cast).

ONNX Runtime registers LayerNormalization in the default domain for every opset, so the fused node is
valid in an opset-14 model too.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import (FusionContext, Fusion, const_array, const_scalar, is_scalar_close,
                                            last_axis, vector_input, vector_of)


def _reduce_axes(node: ir.Node) -> list[int] | None:
    """The axes of a ReduceMean node (attribute before opset 18, input from 18), None when not constant."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.as_ints())
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        return None if axes is None else [int(a) for a in axes.reshape(-1)]
    return None


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


class LayerNormFusion(pattern.RewriteRuleClassBase):
    """One decomposed form; variants by flags (square, inverse, scale, shift)."""

    def __init__(self, name: str, *, square: str, inverse: str, scale: bool, shift: bool, twin: bool = False,
                 cast: bool = False, cast_square: bool = False):
        super().__init__(name)
        self._square, self._inverse, self._scale, self._shift = square, inverse, scale, shift
        self._twin, self._cast, self._cast_square = twin, cast, cast_square

    def pattern(self, op, x, two, eps, gamma, beta):
        mean = op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"])
        d = op.Sub(x, mean)
        d_sq = op.Cast(d, _outputs=["sq_cast"]) if self._cast_square else d
        sq = op.Pow(d_sq, two) if self._square == "pow" else op.Mul(d_sq, d_sq)
        var = op.ReduceMean(sq, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["var"])
        std = op.Sqrt(op.Add(var, eps))
        d2 = op.Sub(x, mean) if self._twin else d
        y = op.Div(d2, std) if self._inverse == "div" else op.Mul(d2, op.Reciprocal(std))
        if self._cast:
            y = op.Cast(y, _outputs=["cast_out"])
        if self._scale:
            y = op.Mul(y, gamma)
        if self._shift:
            y = op.Add(y, beta)
        return y

    def check(self, context, x, two, eps, gamma, beta, mean, var, cast_out=None, sq_cast=None,
              **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self._cast_square and sq_cast.producer().attributes.get_int("to") != (x.dtype or _float_type(context, x)):
            return result.fail(f"the Cast before the square is not to the input's type ({x.dtype})")
        if self._cast and (x.dtype is None or cast_out.producer().attributes.get_int("to") != x.dtype):
            return result.fail(f"the Cast around the division is not to the input's type ({x.dtype})")
        rank = _rank(x)
        for name, value in (("mean", mean), ("variance", var)):
            node = value.producer()
            if not last_axis(_reduce_axes(node), rank):
                return result.fail(f"{name} ReduceMean is not over the last axis (axes={_reduce_axes(node)})")
            if node.attributes.get_int("keepdims", 1) != 1:
                return result.fail(f"{name} ReduceMean drops the reduced axis (keepdims=0)")
        if self._square == "pow" and not is_scalar_close(two, 2.0, rtol=0.0):
            return result.fail(f"square is Pow(d, {const_scalar(two)}), not Pow(d, 2)")
        epsilon = const_scalar(eps)
        if epsilon is None or epsilon < 0:
            return result.fail(f"epsilon is not a non-negative scalar constant ({epsilon})")
        hidden = _hidden(x, gamma if self._scale else None, beta if self._shift else None)
        for name, value, present in (("scale", gamma, self._scale), ("shift", beta, self._shift)):
            if not present:
                continue
            vec = vector_of(value, hidden)
            if vec is None:
                return result.fail(f"{name} is not a 1-D constant of hidden length {hidden}")
            if x.dtype is not None and value.dtype is not None and value.dtype != x.dtype:
                return result.fail(f"{name} dtype {value.dtype} differs from input dtype {x.dtype}")
        if hidden is None:
            return result.fail("hidden size unknown (no shape on the input, no scale/shift to read it from)")
        follower = _affine_follower(context.root.outputs[0])
        if follower == "Add" and not self._shift or follower == "Mul" and not (self._scale or self._shift):
            return result.fail(f"an affine {follower} by a constant vector follows; the longer form fuses there")
        return result

    def rewrite(self, op, x, eps, gamma, beta, **_):
        hidden = _hidden(x, gamma if self._scale else None, beta if self._shift else None)
        dtype = (gamma.dtype if self._scale else beta.dtype if self._shift else x.dtype) or ir.DataType.FLOAT
        np_dtype = dtype.numpy()
        tag = x.name or "x"
        if self._scale:
            scale = vector_input(op, gamma, f"{tag}_ln_scale")
        else:
            scale = op.initializer(ir.tensor(np.ones(hidden, dtype=np_dtype), name=f"{tag}_ln_ones"))
        inputs = [x, scale]
        if self._shift:
            inputs.append(vector_input(op, beta, f"{tag}_ln_shift"))
        return op.LayerNormalization(*inputs, axis=-1, epsilon=const_scalar(eps))


def _hidden(x: ir.Value, gamma: ir.Value | None, beta: ir.Value | None) -> int | None:
    if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int):
        return x.shape[-1]
    for value in (gamma, beta):
        vec = vector_of(value)
        if vec is not None:
            return int(vec.shape[0])
    return None


def _affine_follower(out: ir.Value) -> str | None:
    """'Mul'/'Add' when the only user of ``out`` multiplies/adds a constant vector (a scale/shift)."""
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    user = uses[0].node
    other = [v for v in user.inputs if v is not out]
    if user.domain == "" and user.op_type in ("Mul", "Add") and len(other) == 1 and vector_of(other[0]) is not None:
        return user.op_type
    return None


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    # Longest forms first: a rule rooted at the Div would otherwise fuse before the scale/shift are seen
    # (the root is tried in graph order), so shorter forms also refuse when a scale/shift follows.
    rules = []
    for scale, shift in ((True, True), (True, False), (False, True), (False, False)):
        for square, inverse in itertools.product(("pow", "mul"), ("div", "reciprocal")):
            name = f"LayerNorm[{square},{inverse}{',scale' if scale else ''}{',shift' if shift else ''}]"
            rules.append(LayerNormFusion.rule(name, square=square, inverse=inverse, scale=scale, shift=shift))
    for square, twin, cast in itertools.product(("pow", "mul"), (True, False), (True, False)):
        if twin or cast:   # Megatron's forms, with its scale and shift
            name = f"LayerNorm[{square},div,scale,shift{',twin' if twin else ''}{',cast' if cast else ''}]"
            rules.append(LayerNormFusion.rule(name, square=square, inverse="div", scale=True, shift=True, twin=twin,
                                              cast=cast))
    for square in ("pow", "mul"):   # PyTorch 1.5 GPT-2: a Cast before the square
        rules.append(LayerNormFusion.rule(f"LayerNorm[{square},div,scale,shift,cast_square]", square=square,
                                          inverse="div", scale=True, shift=True, cast_square=True))
    return rules


def _float_type(context, x: ir.Value) -> int | None:
    """x's element type from the value analysis' view of its producer when the export left it untyped: the
    type of a constant scale or shift applied to x's sum (an Add of typed operands), else None."""
    node = x.producer()
    while node is not None and x.dtype is None and node.op_type in ("Add", "Sub", "Mul"):
        typed = [v for v in node.inputs if v is not None and v.dtype is not None]
        if typed:
            return typed[0].dtype
        node = node.inputs[0].producer() if node.inputs[0] is not None else None
    return None


FUSION = Fusion("layer_norm", _rules, anchor="ReduceMean")
