"""Tanh GELU ('gelu_new', GPT-2, ALBERT) -> com.microsoft ``FastGelu(x[, bias])``.

    fast_gelu(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))

Handles: x^3 as ``Pow(x, 3)`` or ``x * x * x`` (``cube``), or the factored form Megatron writes,
``0.5 * x * (1 + tanh(sqrt(2 / pi) * x * (1 + 0.044715 * x * x)))`` (``cube="factored"``, 0.5 on x); the 0.5 multiply on x, on the product or on the
tanh term (``half``); operand order via the rule set's commutation. A preceding ``Add(y, bias)`` with a
1-D constant bias of y's (MatMul output) width is absorbed into FastGelu's bias input. Constants are
checked numerically (relative tolerance 1e-3); a wrong one is refused with its value (the 0.5, part of
the pattern itself, simply does not match).
"""
from __future__ import annotations

import math

from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import MS_DOMAIN, Fusion, FusionContext, const_scalar, \
    is_scalar_close, vector_input
from mlstep.optimizer.fusions.gelu import input_reason

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
COEFF = 0.044715
HALF = pattern.Constant(0.5, rel_tol=1e-3)  # in the pattern: it orients its Mul (see ``pattern``)


class FastGeluFusion(pattern.RewriteRuleClassBase):
    """``cube``: 'pow' | 'mul'; ``half``: 'x' | 'product' | 'tanh'; ``bias``: absorb a constant bias Add."""

    def __init__(self, name: str, *, cube: str, half: str, bias: str, flip: bool):
        super().__init__(name)
        self._cube, self._half, self._bias, self._flip = cube, half, bias, flip

    def pattern(self, op, x, matmul, bias, c_three, c_coeff, c_scale, c_one, c_one_inner):
        # Operand order is spelled out (``_either``) instead of left to the engine's commutation, which
        # would make 2^9 patterns of this one; each alternative fails at its own node when it is the wrong
        # one (a node pattern or a constant sits on one side), so the first-match Or is exact.
        mul = lambda a, b: _either(op.Mul, a, b)  # noqa: E731
        if self._bias != "none":
            x = op.Add(matmul, bias) if self._bias == "second" else op.Add(bias, matmul)
        if self._cube == "factored":      # sqrt(2/pi) * x * (1 + 0.044715 * x * x)
            inner = mul(mul(x, c_scale), _either(op.Add, mul(mul(x, c_coeff), x), c_one_inner))
        else:
            cubed = op.Pow(x, c_three) if self._cube == "pow" else mul(op.Mul(x, x), x)
            inner = mul(_either(op.Add, x, mul(cubed, c_coeff)), c_scale)
        one_plus = _either(op.Add, op.Tanh(inner), c_one)
        if self._half == "x":
            a, b = mul(x, HALF), one_plus
        elif self._half == "product":
            a, b = mul(x, one_plus), HALF
        else:
            a, b = x, mul(one_plus, HALF)
        return op.Mul(b, a) if self._flip else op.Mul(a, b)

    def check(self, context, matmul, bias, c_three, c_coeff, c_scale, c_one, x=None, c_one_inner=None,
              **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        expected = [("cube exponent", c_three, 3.0), ("cubic coefficient", c_coeff, COEFF),
                    ("tanh scale", c_scale, SQRT_2_OVER_PI), ("tanh term offset", c_one, 1.0)]
        if self._cube == "factored":
            expected.append(("inner offset", c_one_inner, 1.0))
        for what, value, want in expected:
            if what == "cube exponent" and self._cube != "pow":
                continue
            if not is_scalar_close(value, want):
                return result.fail(f"{what} is {const_scalar(value)}, expected {want:.6g}")
        reason = input_reason(self._bias != "none", matmul, bias, x)
        return result.fail(reason) if reason else result

    def rewrite(self, op, matmul, bias, x=None, **_):
        if self._bias != "none":
            return op.FastGelu(matmul, vector_input(op, bias), _domain=MS_DOMAIN)
        return op.FastGelu(x, _domain=MS_DOMAIN)


def _either(make, a, b):
    return pattern.OrValue([make(a, b), make(b, a)])


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    return [FastGeluFusion.rule(f"FastGelu[{bias},{cube},{half}{',flip' if flip else ''}]", cube=cube, half=half,
                                bias=bias, flip=flip)
            for bias in ("second", "first", "none") for cube in ("pow", "mul") for half in ("x", "product", "tanh")
            for flip in (False, True)] + [
        FastGeluFusion.rule(f"FastGelu[{bias},factored,x{',flip' if flip else ''}]", cube="factored", half="x",
                            bias=bias, flip=flip)
        for bias in ("second", "first", "none") for flip in (False, True)]


FUSION = Fusion("fast_gelu", _rules, commute=False, anchor="Tanh")
