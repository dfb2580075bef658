"""TensorFlow's LayerNorm (Keras ``LayerNormalization`` via tf2onnx) -> ``LayerNormalization``.

    mean = mean(x);  var = mean((x - mean)^2);  s = gamma / sqrt(var + eps)          (means: last axis)
    y = x * s + (beta - mean * s)          ==  (x - mean) / sqrt(var + eps) * gamma + beta

TF writes LayerNorm as ``tf.nn.moments`` + ``tf.nn.batch_normalization``: the normalisation is folded into
a per-token scale ``s`` applied to x, and the mean enters through the shift. That has no PyTorch twin
(``layer_norm.py`` matches ``(x - mean) / std``), hence this file. Cases handled: the means as
``ReduceMean`` over the last axis (keepdims) or tf2onnx's ``GlobalAveragePool`` on a rank-3 input (which
averages exactly the last axis); ``SquaredDifference`` as ``Mul(d, d)`` or ``Pow(d, 2)`` with
d = ``x - mean`` or ``mean - x`` (keras2onnx at opset 10; the square is the same); ``Rsqrt`` as
``Reciprocal(Sqrt(.))`` or ``Div(1, Sqrt(.))``; operand order via the rule set's commutation. Refused with a
reason: a GlobalAveragePool input that is not (provably) rank 3, a reduction over another axis, a scale or
shift that is not a constant vector of the hidden size, a negative or non-constant epsilon.
"""
from __future__ import annotations

from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import Fusion, FusionContext, const_scalar, is_scalar_close, last_axis, \
    vector_input, vector_of
from mlstep.optimizer.fusions.layer_norm import _reduce_axes
from mlstep.optimizer.shapes import infer_dims


def _mean(op, x, name: str):
    return pattern.OrValue([op.GlobalAveragePool(x), op.ReduceMean(x, _allow_other_inputs=True,
                                                                     _allow_other_attributes=True)],
                           tag_var=f"{name}_op", tag_values=["pool", "reduce"])


class TfLayerNormFusion(pattern.RewriteRuleClassBase):
    def __init__(self, name: str, *, square: str, diff: str = "x-mean"):
        super().__init__(name)
        self._square = square
        self._diff = diff

    def pattern(self, op, x, two, eps, one, gamma, beta):
        mean = _mean(op, x, "mean")
        d = op.Sub(x, mean, _outputs=["diff"]) if self._diff == "x-mean" else op.Sub(mean, x, _outputs=["diff"])
        sq = op.Mul(d, d) if self._square == "mul" else op.Pow(d, two)
        var = _mean(op, sq, "var")
        std = op.Sqrt(op.Add(var, eps, _outputs=["var_eps"]))
        inv = pattern.OrValue([op.Reciprocal(std), op.Div(one, std)], tag_var="inverse", tag_values=["rcp", "div"])
        s = op.Mul(inv, gamma)
        return op.Add(op.Mul(x, s), op.Sub(beta, op.Mul(mean, s)))

    def check(self, context, x, two, eps, gamma, beta, mean_op, var_op, inverse, diff, var_eps, one=None, **_):
        result = pattern.MatchResult()
        (dims,) = infer_dims(context.graph_or_function, [x])
        rank = None if dims is None else len(dims)
        for what, kind in (("mean", mean_op), ("variance", var_op)):
            if kind == "pool" and rank != 3:
                return result.fail(f"{what} is a GlobalAveragePool on a rank-{rank} input, not [batch, sequence, "
                                   "hidden]")
        mean_of_diff = diff.producer().inputs[1 if self._diff == "x-mean" else 0].producer()
        means = [mean_of_diff] + [v.producer() for v in var_eps.producer().inputs
                                                           if v is not None and v is not eps]
        for node in (n for n in means if n is not None and n.op_type == "ReduceMean"):
            axes = _reduce_axes(node)
            if not last_axis(axes, rank) or node.attributes.get_int("keepdims", 1) != 1:
                return result.fail(f"ReduceMean over axes {axes} (keepdims "
                                   f"{node.attributes.get_int('keepdims', 1)}), not the last axis")
        if self._square == "pow" and not is_scalar_close(two, 2.0, rtol=0.0):
            return result.fail(f"square is Pow(d, {const_scalar(two)}), not Pow(d, 2)")
        if inverse == "div" and not is_scalar_close(one, 1.0, rtol=0.0):
            return result.fail(f"inverse is Div({const_scalar(one)}, std), not 1 / std")
        epsilon = const_scalar(eps)
        if epsilon is None or epsilon < 0:
            return result.fail(f"epsilon is not a non-negative scalar constant ({epsilon})")
        hidden = dims[-1] if dims and isinstance(dims[-1], int) else None
        if hidden is None:
            return result.fail(f"the input's hidden size is unknown ({dims})")
        for name, value in (("scale", gamma), ("shift", beta)):
            vec = vector_of(value, hidden)
            if vec is None:
                return result.fail(f"{name} is not a 1-D constant of hidden length {hidden}")
            if x.dtype is not None and value.dtype is not None and value.dtype != x.dtype:
                return result.fail(f"{name} dtype {value.dtype} differs from input dtype {x.dtype}")
        return result

    def rewrite(self, op, x, eps, gamma, beta, **_):
        tag = x.name or "x"
        return op.LayerNormalization(x, vector_input(op, gamma, f"{tag}_ln_scale"),
                                     vector_input(op, beta, f"{tag}_ln_shift"), axis=-1, epsilon=const_scalar(eps))


def _rules(ctx: FusionContext) -> list[pattern.RewriteRule]:
    return [TfLayerNormFusion.rule(f"TfLayerNorm[{square},{diff}]", square=square, diff=diff)
            for square in ("mul", "pow") for diff in ("x-mean", "mean-x")]


FUSION = Fusion("layer_norm_tf", _rules, anchor="Sqrt")
