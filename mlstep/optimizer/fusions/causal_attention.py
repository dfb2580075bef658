"""Causal self-attention with optional past state (GPT-2, DistilGPT2) -> com.microsoft MultiHeadAttention.

    Q, K, V = split(q), split(k), split(v)                       split: [B,S,H] -> [B,N,S,d]
    K' = Concat(past_key, K), V' = Concat(past_value, V)          (with past; K', V' are the presents)
    out = merge(softmax(Q K'^T * scale + causal_padding_bias) V')
    ==> MultiHeadAttention(q, k, v, key_padding_mask=int32(mask), past_key, past_value,
                           num_heads=N, unidirectional=1, scale, mask_filter_value=<the export's fill>)
        with outputs (out, present_key, present_value) replacing the Concat presents.
    For a CUDA target (``use_gpu``) the export's own bias goes in as ``attention_bias`` instead of the
    key-padding mask: measured on an H200 (ONNX Runtime 1.31.1, GPT-2 124M), the CUDA kernels given
    ``key_padding_mask`` + ``unidirectional`` differ from the export by up to 6.7 on the logits of left-padded
    positions that see no key (every other row within 1.5e-5); given the bias they match it on every row.

Layouts matched: K^T as Transpose(0,1,3,2) (TorchScript) or the dynamo Reshape -> Transpose(0,2,1) ->
Reshape form; scale on the scores (Div/Mul) or on Q and K (sdpa); TorchScript eager's Cast after Softmax;
sdpa's IsNaN guard. The mask bias is probed (probe.causal_mask_source): it must be exactly causal (offset by
the past length) combined with a 2-D padding mask spanning past + current tokens, so left-padded batches
are exact. The matched nodes are kept (remove_nodes=False) and die once the presents are rewired to the
fused node (``rewire_presents``), because exporters read shapes off the present tensors.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import (MS_DOMAIN, Fusion, FusionContext, attention_scale, const_scalar,
                                             last_axis, shape_tail)
from mlstep.optimizer.probe import causal_mask_source

_FLOAT_MIN = float(np.finfo(np.float32).min)


def _heads(op, value, shape):
    return op.Transpose(op.Reshape(value, shape), perm=[0, 2, 1, 3])


class CausalAttention(pattern.RewriteRuleClassBase):
    def __init__(self, ctx: FusionContext, with_past: bool):
        super().__init__(f"CausalAttention{'WithPast' if with_past else ''}", remove_nodes=False)
        self._ctx = ctx
        self._with_past = with_past
        self._mask_memo: dict[str, tuple[ir.Value | None, float, str]] = {}

    def pattern(self, op, q_in, k_in, v_in, q_shape, k_shape, v_shape, past_key, past_value, mask_bias,
                q_scale, k_scale, s_scale, zero, ctx_shape):
        q = _heads(op, q_in, q_shape)
        k = _heads(op, k_in, k_shape)
        v = _heads(op, v_in, v_shape)
        if self._with_past:
            k = op.Concat(past_key, k, _outputs=["present_key"])
            v = op.Concat(past_value, v, _outputs=["present_value"])
        k_t_forms = [
            op.Transpose(k, perm=[0, 1, 3, 2]),
            op.Reshape(op.Transpose(op.Reshape(k, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
        ]
        if not self._with_past:   # no cache: K may be split straight into [B, N, d, S]
            k_t_forms.append(op.Transpose(op.Reshape(k_in, k_shape), perm=[0, 2, 3, 1]))
        k_t = pattern.OrValue(k_t_forms)
        q = pattern.OrValue([op.Mul(q, q_scale), q], tag_var="q_scaled", tag_values=[True, False])
        k_t = pattern.OrValue([op.Mul(k_t, k_scale), k_t], tag_var="k_scaled", tag_values=[True, False])
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue([op.Div(scores, s_scale), op.Mul(scores, s_scale), scores],
                                 tag_var="s_scaling", tag_values=["div", "mul", "none"])
        scores = pattern.OrValue([op.Add(scores, mask_bias), op.Add(mask_bias, scores)])
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Cast(probs, to=ir.DataType.FLOAT), probs])
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), probs], tag_var="nan_guard",
                                tag_values=[True, False])
        ctx = op.MatMul(probs, v)
        ctx = pattern.OrValue([op.Reshape(ctx, ctx_shape), ctx])   # TorchScript sdpa: a same-shape reshape
        return op.Reshape(op.Transpose(ctx, perm=[0, 2, 1, 3]), pattern.ANY_VALUE, _outputs=["merged"])

    def check(self, context, q_in, q_shape, k_shape, v_shape, probs, q_scaled, k_scaled, s_scaling, mask_bias,
              q_scale=None, k_scale=None, s_scale=None, zero=None, present_key=None, present_value=None,
              ctx_shape=None, **_):
        result = pattern.MatchResult()
        heads, head_size = self._heads(q_shape)
        if not heads:
            return result.fail("cannot tell the number of heads from the head split")
        for shape in (k_shape, v_shape) + ((ctx_shape,) if ctx_shape is not None else ()):
            tail = shape_tail(shape)
            if len(tail) == 2 and tail[-1] not in (None, head_size):
                return result.fail(f"K/V head size {tail[-1]} differs from Q's {head_size}")
        if self._with_past:
            for concat in (present_key, present_value):
                axis = concat.producer().attributes.get_int("axis", 0)
                if axis not in (-2, 2):
                    return result.fail(f"past is concatenated on axis {axis}, not the sequence axis")
        if not last_axis(probs.producer().attributes.get_int("axis", -1), 4):
            return result.fail("Softmax is not over the key axis")
        if zero is not None and const_scalar(zero) != 0.0:
            return result.fail("the NaN guard after Softmax does not write zeros")
        if attention_scale(q_scaled, k_scaled, s_scaling, q_scale, k_scale, s_scale) is None:
            return result.fail("the attention scale is not a constant scalar")
        source, _fill, reason = self._mask(context.model, mask_bias)
        if source is None:
            return result.fail(reason)
        self._opset = context.model.opset_imports.get("", 18)
        return result

    def rewrite(self, op, q_in, k_in, v_in, q_shape, mask_bias, merged, q_scaled, k_scaled, s_scaling, nan_guard,
                q_scale=None, k_scale=None, s_scale=None, past_key=None, past_value=None, **_):
        heads, head_size = self._heads(q_shape)
        source, fill, _ = self._mask_memo[mask_bias.name]
        scale = attention_scale(q_scaled, k_scaled, s_scaling, q_scale, k_scale, s_scale)
        if self._ctx.use_gpu:   # the export's own bias: ONNX Runtime's CUDA kernels then match it on every row
            attrs = {"num_heads": heads}
            inputs = [q_in, k_in, v_in, None, None, mask_bias]
        else:
            attrs = {"num_heads": heads, "unidirectional": 1, "mask_filter_value": max(fill, _FLOAT_MIN)}
            inputs = [q_in, k_in, v_in, None, op.Cast(source, to=ir.DataType.INT32), None]
        if not math.isclose(scale, 1.0 / math.sqrt(head_size), rel_tol=1e-5):
            attrs["scale"] = float(scale)
        if self._with_past:
            inputs += [past_key, past_value]
            out, _present_k, present_v = op.MultiHeadAttention(*inputs, _domain=MS_DOMAIN, _outputs=3, **attrs)
        else:
            while inputs[-1] is None:
                inputs.pop()
            out, present_v = op.MultiHeadAttention(*inputs, _domain=MS_DOMAIN, **attrs), None
        guarded = math.isinf(fill) and nan_guard
        if self._ctx.use_gpu and (guarded or fill <= _FLOAT_MIN / 2):
            # a row that sees no key: with a fill that absorbs the score the export's softmax is uniform (the
            # mean of V), or its NaN guard's zeros; a smaller fill the bias itself reproduces
            seen = op.Cast(_has_visible_key(op, source, q_in), to=ir.DataType.BOOL)
            mean = self._mean_of_values(op, v_in, present_v)
            out = op.Where(seen, out, op.Sub(mean, mean) if guarded else mean)
        elif guarded:
            out = op.Mul(out, _has_visible_key(op, source, q_in))
        return op.Reshape(out, merged.producer().inputs[1])

    def _mean_of_values(self, op, v_in, present_v):
        """[B, 1, hidden]: every head's mean over all keys (past + current), heads merged.

        The bias form needs it in float16: a row whose keys are all masked is uniform in the float32 export
        (score + float32 min == float32 min), but the float16 bias (-65504 or -inf) no longer absorbs the score."""
        def mean(value, axis):
            if self._opset >= 18:
                return op.ReduceMean(value, op.Constant(value_ints=[axis]), keepdims=1)
            return op.ReduceMean(value, axes=[axis], keepdims=1)

        if present_v is None:
            return mean(v_in, 1)
        merged = op.Transpose(mean(present_v, 2), perm=[0, 2, 1, 3])
        return op.Reshape(merged, op.Constant(value_ints=[0, 1, -1]))

    def _heads(self, q_shape) -> tuple[int, int]:
        tail = shape_tail(q_shape)
        if len(tail) == 2 and tail[-1] and tail[-1] > 0:
            if tail[-2] and tail[-2] > 0:
                return tail[-2], tail[-1]
            if self._ctx.hidden_size and self._ctx.hidden_size % tail[-1] == 0:
                return self._ctx.hidden_size // tail[-1], tail[-1]
        if self._ctx.num_heads and self._ctx.hidden_size:
            return self._ctx.num_heads, self._ctx.hidden_size // self._ctx.num_heads
        return 0, 0

    def _mask(self, model, mask_bias):
        if mask_bias.name not in self._mask_memo:
            self._mask_memo[mask_bias.name] = causal_mask_source(model, mask_bias, self._ctx.sequence_lengths)
        return self._mask_memo[mask_bias.name]


def _has_visible_key(op, mask: ir.Value, query: ir.Value) -> ir.Value:
    """[B, S, 1]: 1.0 where query i sees at least one key (mask[b, :past+i+1] has a 1), else 0.0.

    With a -inf mask a query that sees nothing gets NaN from Softmax, which the export's IsNaN guard turns
    into a zero row; the fused op (finite fill) would give the mean of V instead. Multiplying by this keeps
    the original's zeros (left-padded positions of a batched generation)."""
    seen = op.CumSum(op.Cast(mask, to=ir.DataType.FLOAT), op.Constant(value_int=1))
    seq = op.Gather(op.Shape(query), op.Constant(value_ints=[1]), axis=0)   # no Shape(start) below opset 15
    current = op.Slice(seen, op.Neg(seq), op.Constant(value_ints=[2**62]), op.Constant(value_ints=[1]))
    visible = op.Cast(op.Greater(current, op.Constant(value_float=0.0)), to=ir.DataType.FLOAT)
    return op.Unsqueeze(visible, op.Constant(value_ints=[-1]))


def rewire_presents(model: ir.Model) -> None:
    """Graph outputs computed by the old Concat(past, K) now come from the fused node's present outputs."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "MultiHeadAttention" or node.domain != MS_DOMAIN or len(node.outputs) < 3:
            continue
        for past_index, out_index in ((6, 1), (7, 2)):
            past = node.inputs[past_index] if len(node.inputs) > past_index else None
            if past is None:
                continue
            for user, _ in list(past.uses()):
                if user.op_type == "Concat" and user is not node and user.outputs[0].is_graph_output():
                    old = user.outputs[0]
                    new = node.outputs[out_index]
                    index = list(graph.outputs).index(old)
                    name = old.name
                    old.name = f"{name}_unfused"
                    new.name = name
                    new.dtype, new.shape = old.dtype, old.shape
                    graph.outputs[index] = new
                    ir.convenience.replace_all_uses_with(old, new)


FUSION = Fusion("attention", lambda ctx: [CausalAttention.rule(ctx, True), CausalAttention.rule(ctx, False)],
                commute=False, anchor="Softmax", after=rewire_presents, label="causal_attention")
