"""Two-operand Einsum (tf2onnx's Dense with 3-D kernels, its attention products) -> MatMul, Transpose, Reshape,
so that the other fusions see the PyTorch form.

    Einsum("abc,cde->abde", x, W[c,d,e])  ==>  Reshape(MatMul(x, W[c, d*e]), [0, 0, d, e])
    Einsum("abcd,cde->abe", y, W[c,d,e])  ==>  MatMul(Reshape(y, [0, 0, c*d]), W[c*d, e])
    Einsum("aecd,abcd->acbe", k, q)       ==>  MatMul(Transpose(q, [0,2,1,3]), Transpose(k, [0,2,3,1]))
    Einsum(eq, Mul(a, s), b)              ==>  Mul(Einsum(eq, a, b), s)       (s a constant scalar: bilinearity)
    Add(Reshape(MatMul(x, W), [0, 0, d, e]), b[d, e])  ==>  Reshape(Add(MatMul(x, W), b[d*e]), [0, 0, d, e])

Indices of an equation fall in four groups: batch (both operands and the result), contracted (both operands,
not the result), left-free and right-free (one operand and the result). Cases handled:
  * a constant right operand and no batch index: the left operand's free indices stay leading (MatMul
    broadcasts them), contracted and right-free indices are flattened in the constant (its dims are known);
  * two computed operands: one index in each of the contracted, left-free and right-free groups (any number of
    batch indices), each operand transposed to batch + [free, contracted] / batch + [contracted, free], the
    product transposed to the result's order; the operand whose free index comes first in the result is the
    MatMul's left side.
Anything else (ellipsis, repeated indices, an index summed within one operand, more than one free or contracted
index between computed operands) is left as it is, with the reason.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, const_array, const_scalar


def parse(equation: str) -> tuple[str, str, str] | None:
    """(left, right, result) index strings of a two-operand explicit equation without ellipsis, else None."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or not all(p.isalpha() for p in parts + [out] if p):
        return None
    left, right = parts
    if any(len(set(s)) != len(s) for s in (left, right, out)) or not set(out) <= set(left) | set(right):
        return None
    if (set(left) ^ set(right)) - set(out):     # an index summed within one operand
        return None
    return left, right, out


def _equation(node: ir.Node) -> str:
    eq = node.attributes.get_string("equation", "")
    return eq.decode() if isinstance(eq, bytes) else eq


def _unscaled(value: ir.Value) -> tuple[ir.Value, ir.Value | None]:
    """(a, s) for ``value = Mul(a, s)`` with a constant scalar s, read only here, else (value, None)."""
    node = value.producer()
    if node is None or node.op_type != "Mul" or node.domain != "" or len(value.uses()) != 1:
        return value, None
    for i in (0, 1):
        scale = node.inputs[1 - i]
        if const_scalar(scale) is not None and const_array(node.inputs[i]) is None:
            return node.inputs[i], scale
    return value, None


def _plan(equation: str, b_const: bool, b_shape) -> tuple[str | None, str]:
    """Which lowering applies ("weight" or "batched"), or None and the reason."""
    parsed = parse(equation)
    if parsed is None:
        return None, f"equation {equation!r} is not a two-operand product without ellipsis or repeats"
    left, right, out = parsed
    batch = [i for i in out if i in left and i in right]
    contracted = [i for i in left if i in right and i not in out]
    if b_const:
        if batch or b_shape is None or len(b_shape) != len(right):
            return None, f"equation {equation!r}: the constant operand shares batch indices"
        if not contracted:
            return None, f"equation {equation!r}: an outer product (nothing contracted)"
        if [i for i in out if i in left] != [i for i in left if i not in contracted] or \
                out[len(out) - sum(i in right for i in out):] != "".join(i for i in right if i not in contracted):
            return None, f"equation {equation!r}: the result does not keep the operands' free index order"
        return "weight", ""
    free_l = [i for i in left if i not in right]
    free_r = [i for i in right if i not in left]
    if len(contracted) != 1 or len(free_l) != 1 or len(free_r) != 1:
        return None, f"equation {equation!r}: not one contracted and one free index per operand"
    return "batched", ""


class EinsumToMatMul(pattern.RewriteRuleClassBase):
    def __init__(self):
        super().__init__("EinsumToMatMul", remove_nodes=True)

    def pattern(self, op, a, b):
        return op.Einsum(a, b, _outputs=["out"])

    def check(self, context, a, b, out, **_):
        result = pattern.MatchResult()
        if const_array(a) is not None:
            return result.fail("the constant operand comes first")
        b_shape = tuple(b.const_value.shape) if b.const_value is not None else None
        plan, reason = _plan(_equation(out.producer()), b_shape is not None, b_shape)
        return result if plan else result.fail(reason)

    def rewrite(self, op, a, b, out, **_):
        equation = _equation(out.producer())
        left, right, result = parse(equation)
        if b.const_value is not None:
            return _weight_product(op, a, b, left, right, result)
        a, a_scale = _unscaled(a)
        b, b_scale = _unscaled(b)
        product = _batched_product(op, a, b, left, right, result)
        for scale in (a_scale, b_scale):
            if scale is not None:
                product = op.Mul(product, scale)
        return product


def _weight_product(op, x, w, left: str, right: str, result: str):
    """x[L..., C...] times a constant w over (C, R): MatMul on flattened C and R, then R unflattened."""
    contracted = [i for i in left if i in right]
    free_r = [i for i in right if i not in left]
    dims = dict(zip(right, w.const_value.shape))
    # w transposed to (C in x's order, R in the result's order), flattened to 2-D
    order = [right.index(i) for i in contracted] + [right.index(i) for i in result if i in free_r]
    k = int(np.prod([dims[i] for i in contracted]))
    n = int(np.prod([dims[i] for i in free_r]))
    matrix = w.const_value.numpy().transpose(order).reshape(k, n)
    w2 = op.initializer(ir.tensor(np.ascontiguousarray(matrix), name=f"{w.name}_matmul"), name=f"{w.name}_matmul")
    free_l = len(left) - len(contracted)
    if left[free_l:] != "".join(contracted) or len(contracted) != 1:     # bring C last and flatten it
        perm = [left.index(i) for i in left if i not in contracted] + [left.index(i) for i in contracted]
        if perm != list(range(len(left))):
            x = op.Transpose(x, perm=perm)
        if len(contracted) != 1:
            x = op.Reshape(x, op.Constant(value_ints=[0] * free_l + [k]))
    y = op.MatMul(x, w2)
    if len(free_r) == 1:
        return y
    return op.Reshape(y, op.Constant(value_ints=[0] * free_l + [dims[i] for i in result if i in free_r]))


def _batched_product(op, a, b, left: str, right: str, result: str):
    """Batched matrix product of two computed operands (one contracted, one free index each)."""
    batch = [i for i in result if i in left and i in right]
    (c,) = [i for i in left if i in right and i not in result]
    (fl,) = [i for i in left if i not in right]
    (fr,) = [i for i in right if i not in left]
    if result.index(fr) < result.index(fl):            # the MatMul's rows are the free index that comes first
        a, b, left, right, fl, fr = b, a, right, left, fr, fl
    lhs = _transposed(op, a, left, batch + [fl, c])
    rhs = _transposed(op, b, right, batch + [c, fr])
    return _transposed(op, op.MatMul(lhs, rhs), "".join(batch + [fl, fr]), list(result))


def _transposed(op, value, have: str, want: list[str]):
    perm = [have.index(i) for i in want]
    return value if perm == list(range(len(perm))) else op.Transpose(value, perm=perm)


class BiasThroughUnflatten(pattern.RewriteRuleClassBase):
    """A bias over the unflattened last dims of a MatMul, added before the unflatten instead (exact: the same
    element gets the same bias), so that the bias Add sits where the linear-layer patterns expect it."""

    def __init__(self):
        super().__init__("BiasThroughUnflatten", remove_nodes=True)

    def pattern(self, op, x, w, shape, bias):
        return op.Add(op.Reshape(op.MatMul(x, w), shape, _outputs=["unflat"]), bias)

    def check(self, context, x, w, shape, bias, unflat, **_):
        result = pattern.MatchResult()
        target, b, ws = const_array(shape), const_array(bias), w.const_value
        if target is None or b is None or ws is None or len(ws.shape) != 2:
            return result.fail("not a constant weight, unflatten target and bias")
        target = [int(t) for t in target.reshape(-1)]
        tail = target[len(target) - b.ndim:] if b.ndim else []
        lead = target[:len(target) - b.ndim]
        if b.ndim < 2 or any(t <= 0 for t in tail) or int(np.prod(tail)) != ws.shape[1] or list(b.shape) != tail \
                or any(t != 0 for t in lead) or x.shape is None or len(x.shape) != len(lead) + 1:
            return result.fail(f"the bias {list(b.shape)} is not the unflattened tail of {target}")
        return result

    def rewrite(self, op, x, w, shape, bias, **_):
        flat = op.initializer(ir.tensor(const_array(bias).reshape(-1), name=f"{bias.name}_flat"),
                              name=f"{bias.name}_flat")
        return op.Reshape(op.Add(op.MatMul(x, w), flat), shape)


def _drop_dead(model: ir.Model) -> None:
    """The scalar Muls taken out of the operands are dead now: remove them, so that no later match sees their
    inputs as having other uses."""
    common.RemoveUnusedNodesPass()(model)


FUSION = Fusion("einsum", lambda ctx: [EinsumToMatMul.rule(), BiasThroughUnflatten.rule()], commute=False,
                anchor="Einsum", after=_drop_dead)
