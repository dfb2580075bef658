"""Encoder self-attention (BERT, DistilBERT, RoBERTa, ALBERT) -> com.microsoft Attention.

    Q = split(x Wq + bq); K = split(x Wk + bk); V = split(x Wv + bv)          split: [B,S,H] -> [B,N,S,d]
    out = merge(softmax(Q K^T * scale + mask_bias) V)                          merge: [B,N,S,d] -> [B,S,H]
    ==> Attention(x, [Wq|Wk|Wv], [bq|bk|bv], int32(mask), num_heads=N, scale=scale)

Layouts matched (one pattern, alternatives as OrValue):
  * K^T as Transpose(0,2,3,1) of the split (TorchScript), Transpose(0,1,3,2) of Q-style split, or the
    dynamo Reshape -> Transpose(0,2,1) -> Reshape form;
  * the scale as Div/Mul on the scores (eager; keras2onnx writes Mul(scale, scores)) or a Mul on Q and K
    each (sdpa's sqrt split);
  * the mask bias Add (either operand order) or none; sdpa's IsNaN -> Where(0) guard after Softmax.
The mask is fed raw (2-D, int32) so that any padding, left or right, gives the original's output. The mask
bias is *probed* (see probe.py): whatever ops built it, it must equal a padding mask of one 2-D input; else, if
it is one additive row per key (the same for every query and head, e.g. tf2onnx's generator graph adding
``(1 - mask) * 0.125``), it goes in as it is, as ``attention_bias`` expanded over the queries.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import (MS_DOMAIN, Fusion, FusionContext, attention_scale, const_scalar,
                                             const_shape, last_axis, shape_tail)
from mlstep.optimizer.probe import padding_mask_source, per_key_bias

_FLOAT_MIN = float(np.finfo(np.float32).min)


def _packed(op, parts, axis: int, suffix: str) -> ir.Value:
    """Q|K|V concatenated once; layers that share weights (ALBERT) share the packed initializer too."""
    name = f"{parts[0].name}_{suffix}"
    graph = parts[0].graph
    if graph is not None and name in graph.initializers:
        return graph.initializers[name]
    tensors = [p.const_value for p in parts]
    shape = list(tensors[0].shape)
    shape[axis] = sum(t.shape[axis] for t in tensors)
    # Lazy: the concatenation happens when the model is saved (or run), one layer at a time, so that
    # packing 48 layers never holds 48 packed copies in memory at once.
    packed = ir.LazyTensor(lambda: ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=axis)),
                           dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name)
    return op.initializer(packed, name=name)


def _linear(op, x, w, b):
    mm = op.MatMul(x, w)
    return pattern.OrValue([op.Add(mm, b), op.Add(b, mm)])


def _split(op, projected, shape):
    return op.Transpose(op.Reshape(projected, shape), perm=[0, 2, 1, 3])


class EncoderAttention(pattern.RewriteRuleClassBase):
    def __init__(self, ctx: FusionContext):
        super().__init__("EncoderAttention", remove_nodes=True)
        self._ctx = ctx
        self._mask_memo: dict[str, tuple[ir.Value | None, str]] = {}   # per-run memo of mask probes
        self._bias_memo: dict[str, str] = {}                            # and of per-key bias probes

    def pattern(self, op, x, wq, bq, wk, bk, wv, bv, q_shape, k_shape, v_shape, mask_bias,
                q_scale, k_scale, s_scale, zero, ctx_shape):
        q = _split(op, _linear(op, x, wq, bq), q_shape)
        k4 = op.Reshape(_linear(op, x, wk, bk), k_shape)
        k_bhsd = op.Transpose(k4, perm=[0, 2, 1, 3])
        k_t = pattern.OrValue([
            op.Transpose(k4, perm=[0, 2, 3, 1]),
            op.Transpose(k_bhsd, perm=[0, 1, 3, 2]),
            op.Reshape(op.Transpose(op.Reshape(k_bhsd, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
        ])
        q = pattern.OrValue([op.Mul(q, q_scale), q], tag_var="q_scaled", tag_values=[True, False])
        k_t = pattern.OrValue([op.Mul(k_t, k_scale), k_t], tag_var="k_scaled", tag_values=[True, False])
        scores = op.MatMul(q, k_t)
        scores = pattern.OrValue(
            [op.Div(scores, s_scale), op.Mul(scores, s_scale), op.Mul(s_scale, scores), scores],
            tag_var="s_scaling", tag_values=["div", "mul", "mul", "none"])
        scores = pattern.OrValue([op.Add(scores, mask_bias), op.Add(mask_bias, scores), scores],
                                 tag_var="masked", tag_values=[True, True, False])
        probs = op.Softmax(scores, _outputs=["probs"])
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), probs], tag_var="nan_guard",
                                tag_values=[True, False])
        ctx = op.MatMul(probs, _split(op, _linear(op, x, wv, bv), v_shape))
        ctx = pattern.OrValue([op.Reshape(ctx, ctx_shape), ctx])   # TorchScript sdpa: a same-shape reshape
        return op.Reshape(op.Transpose(ctx, perm=[0, 2, 1, 3]), pattern.ANY_VALUE)

    def check(self, context, x, wq, bq, wk, bk, wv, bv, q_shape, k_shape, v_shape, probs, q_scaled, k_scaled,
              s_scaling, masked, nan_guard, q_scale=None, k_scale=None, s_scale=None, mask_bias=None, zero=None,
              ctx_shape=None, **_):
        result = pattern.MatchResult()
        weights = [const_shape(w) for w in (wq, wk, wv)]   # shapes only: weights stay on disk until saved
        biases = [const_shape(b) for b in (bq, bk, bv)]
        if any(w is None or len(w) != 2 for w in weights):
            return result.fail("Q/K/V weights are not constant 2-D matrices")
        hidden_in, hidden = weights[0]
        if weights[1] != (hidden_in, hidden) or weights[2][0] != hidden_in:
            return result.fail(f"Q/K/V weights differ in shape: {weights}")
        if any(b != (w[1],) for b, w in zip(biases, weights)):
            return result.fail("Q/K/V biases are not constant vectors of their projection's width")
        heads, head_size = self._heads(q_shape, hidden)
        if not heads:
            return result.fail(f"cannot tell the number of heads from the head split (hidden {hidden})")
        v_heads, v_head_size = _split_heads(v_shape, weights[2][1])
        if v_heads != heads:
            return result.fail(f"V is split into {v_heads or 'an unknown number of'} heads, Q into {heads}")
        for shape, size in ((k_shape, head_size), (ctx_shape, v_head_size)):
            tail = shape_tail(shape) if shape is not None else []
            if len(tail) == 2 and tail[-1] not in (None, size):
                return result.fail(f"K/V head size {tail[-1]} differs from Q's {head_size}")
        axis = probs.producer().attributes.get_int("axis", -1)
        if not last_axis(axis, 4):
            return result.fail(f"Softmax over axis {axis}, not the key axis")
        if zero is not None and const_scalar(zero) != 0.0:
            return result.fail("the NaN guard after Softmax does not write zeros")
        if attention_scale(q_scaled, k_scaled, s_scaling, q_scale, k_scale, s_scale) is None:
            return result.fail("the attention scale is not a constant scalar")
        if masked:
            source, _fill, reason = self._mask_source(context.model, mask_bias)
            why_not_bias = self._bias_reason(context.model, mask_bias) if source is None else ""
            if why_not_bias:
                return result.fail(f"{reason}; nor is it a per-key bias ({why_not_bias})")
            if source is None and nan_guard:   # a row the bias fully blocks: NaN -> 0 there, not the kernel's
                return result.fail(f"{reason}; a per-key bias behind a NaN guard is not fused")
        return result

    def rewrite(self, op, x, wq, bq, wk, bk, wv, bv, q_shape, q_scaled, k_scaled, s_scaling, masked, nan_guard,
                q_scale=None, k_scale=None, s_scale=None, mask_bias=None, **_):
        hidden = const_shape(wq)[1]
        heads, head_size = self._heads(q_shape, hidden)
        inputs = [x, _packed(op, (wq, wk, wv), axis=1, suffix="qkv_weight"),
                  _packed(op, (bq, bk, bv), axis=0, suffix="qkv_bias")]
        attrs = {"num_heads": heads}
        v_hidden = const_shape(wv)[1]
        if v_hidden != hidden:   # pruned heads: V narrower (or wider) than Q and K
            attrs["qkv_hidden_sizes"] = [hidden, hidden, v_hidden]
        scale = attention_scale(q_scaled, k_scaled, s_scaling, q_scale, k_scale, s_scale)
        if not math.isclose(scale, 1.0 / math.sqrt(head_size), rel_tol=1e-5):
            attrs["scale"] = float(scale)
        if not masked:
            return op.Attention(*inputs, _domain=MS_DOMAIN, **attrs)
        source, fill, _ = self._mask_memo[mask_bias.name]
        if source is None:   # a per-key additive bias, not a padding mask: added as it is, over every query
            queries = op.Slice(op.Shape(x), op.Constant(value_ints=[1]), op.Constant(value_ints=[2]))
            target = op.Concat(op.Constant(value_ints=[1, 1]), queries, op.Constant(value_ints=[1]), axis=0)
            return op.Attention(*inputs, None, None, op.Expand(mask_bias, target), _domain=MS_DOMAIN, **attrs)
        # The export's own fill value, so that even a row with nothing to attend to matches the original.
        attrs["mask_filter_value"] = max(fill, _FLOAT_MIN)
        out = op.Attention(*inputs, op.Cast(source, to=ir.DataType.INT32), _domain=MS_DOMAIN, **attrs)
        if math.isinf(fill) and nan_guard:   # -inf + sdpa's IsNaN guard: an all-padding row outputs zeros
            visible = op.ReduceSum(op.Cast(source, to=ir.DataType.FLOAT), op.Constant(value_ints=[1]), keepdims=1)
            out = op.Mul(out, op.Unsqueeze(op.Min(visible, op.Constant(value_float=1.0)),
                                            op.Constant(value_ints=[-1])))
        return out

    # -- helpers (pure functions of the match; no state kept between check and rewrite but the memo) --

    def _heads(self, q_shape, hidden: int) -> tuple[int, int]:
        """(heads, head size) of Q: the head split says it (a fact of the graph: the fused op must split the
        same way, whatever count was detected or given); else the detected/given head count."""
        heads, head_size = _split_heads(q_shape, hidden)
        if heads:
            return heads, head_size
        if self._ctx.num_heads and hidden % self._ctx.num_heads == 0:
            return self._ctx.num_heads, hidden // self._ctx.num_heads
        return 0, 0

    def _bias_reason(self, model, mask_bias) -> str:
        if mask_bias.name not in self._bias_memo:
            self._bias_memo[mask_bias.name] = per_key_bias(model, mask_bias, self._ctx.sequence_lengths)
        return self._bias_memo[mask_bias.name]

    def _mask_source(self, model, mask_bias):
        if mask_bias.name not in self._mask_memo:
            self._mask_memo[mask_bias.name] = padding_mask_source(model, mask_bias, self._ctx.sequence_lengths)
        return self._mask_memo[mask_bias.name]


def _split_heads(shape: ir.Value, width: int) -> tuple[int, int]:
    """(heads, head size) of a [B, S, heads, head_size] split of a projection ``width`` wide, (0, 0) if the split's
    tail does not show it."""
    tail = shape_tail(shape)
    if len(tail) == 2 and tail[-1] and tail[-1] > 0 and width % tail[-1] == 0:
        heads = width // tail[-1]
        if tail[-2] in (heads, -1, None):
            return heads, tail[-1]
    return 0, 0


FUSION = Fusion("attention", lambda ctx: [EncoderAttention.rule(ctx)], commute=False, anchor="Softmax")
