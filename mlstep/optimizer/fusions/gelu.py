"""Erf GELU -> com.microsoft ``Gelu`` (``BiasGelu`` when a MatMul bias precedes it).

    gelu(x) = x * 0.5 * (1 + erf(x / sqrt(2)))

Handles the exporter forms: ``Div(x, 1.4142..)`` or ``Mul(x, 0.7071..)``; the 0.5 multiply on x, on the
erf term, or on the product (``forms``); operand order via the rule set's commutation. When
x = ``Add(MatMul(..), bias)`` with a 1-D constant bias of the MatMul's output width the bias is absorbed:
``BiasGelu(matmul_out, bias)``. Every constant is checked numerically (relative tolerance 1e-3) and a
wrong one is refused with its value.
"""
from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import MS_DOMAIN, Fusion, FusionContext, const_array, const_scalar, \
    is_scalar_close, vector_input, vector_of

SQRT2 = math.sqrt(2.0)


class ErfGeluFusion(pattern.RewriteRuleClassBase):
    """``half``: where the 0.5 multiplies ('product' | 'x' | 'erf'); ``scale``: 'div' | 'mul'; ``bias``."""

    def __init__(self, name: str, *, half: str, scale: str, bias: bool):
        super().__init__(name)
        self._half, self._scale, self._bias = half, scale, bias

    def pattern(self, op, x, matmul, bias, c_scale, c_one, c_half):
        if self._bias:
            x = op.Add(matmul, bias)
        t = op.Div(x, c_scale) if self._scale == "div" else op.Mul(x, c_scale)
        one_plus = op.Add(op.Erf(t), c_one)
        if self._half == "product":
            return op.Mul(op.Mul(x, one_plus), c_half)
        if self._half == "x":
            return op.Mul(op.Mul(x, c_half), one_plus)
        return op.Mul(x, op.Mul(one_plus, c_half))

    def check(self, context, matmul, bias, c_scale, c_one, c_half, x=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        expected = SQRT2 if self._scale == "div" else 1.0 / SQRT2
        if not is_scalar_close(c_scale, expected):
            op_name = "Div" if self._scale == "div" else "Mul"
            return result.fail(f"erf argument is {op_name}(x, {const_scalar(c_scale)}), expected {expected:.6f}")
        if not is_scalar_close(c_one, 1.0):
            return result.fail(f"erf term adds {const_scalar(c_one)}, expected 1")
        if not is_scalar_close(c_half, 0.5):
            return result.fail(f"scale factor is {const_scalar(c_half)}, expected 0.5")
        reason = input_reason(self._bias, matmul, bias, x)
        return result.fail(reason) if reason else result

    def rewrite(self, op, matmul, bias, x=None, **_):
        if self._bias:
            return op.BiasGelu(matmul, vector_input(op, bias), _domain=MS_DOMAIN)
        return op.Gelu(x, _domain=MS_DOMAIN)


def input_reason(biased: bool, matmul: ir.Value | None, bias: ir.Value | None, x: ir.Value | None) -> str | None:
    """Why the activation's input cannot be taken (None when it can): a biased form needs a MatMul output plus
    an absorbable 1-D bias; a plain form needs a non-constant input."""
    if biased:
        return bias_reason(matmul, bias)
    return "input is a constant" if const_array(x) is not None else None


def bias_reason(matmul: ir.Value, bias: ir.Value) -> str | None:
    """Why ``Add(matmul, bias)`` cannot be absorbed into a fused op's 1-D bias input (None when it can)."""
    producer = matmul.producer()
    if producer is None or producer.op_type != "MatMul" or producer.domain != "":
        return "biased input is not a MatMul output"
    width = _last_dim(matmul)
    vec = vector_of(bias)
    if vec is None:
        return "bias is not a 1-D constant"
    if width is None:
        return "cannot tell the MatMul output width"
    if vec.shape[0] != width:
        return f"bias length {vec.shape[0]} differs from the MatMul output width {width}"
    return None


def _last_dim(matmul: ir.Value) -> int | None:
    if matmul.shape is not None and len(matmul.shape) and isinstance(matmul.shape[-1], int):
        return matmul.shape[-1]
    weight = const_array(matmul.producer().inputs[1])
    return int(weight.shape[-1]) if weight is not None and weight.ndim >= 2 else None


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    return [ErfGeluFusion.rule(f"{'BiasGelu' if bias else 'Gelu'}[{half},{scale}]", half=half, scale=scale, bias=bias)
            for bias in (True, False) for half in ("product", "x", "erf") for scale in ("div", "mul")]


FUSION = Fusion("gelu", _rules, anchor="Erf")
