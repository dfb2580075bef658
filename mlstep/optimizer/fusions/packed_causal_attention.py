"""GPT-2 Conv1D attention (packed Q/K/V, stacked past) -> com.microsoft ``Attention`` (unidirectional).

    qkv = x W + b;  q, k, v = Split(qkv, 3, axis=-1)              W: [H, 3H], b: [3H] constants
    Q = heads(q), K = heads(k), V = heads(v)                      heads: [B,S,H] -> [B,N,S,d]
    with past [2, B, N, P, d]:  K' = Concat(past[0], K), V' = Concat(past[1], V)    (sequence axis)
                                present = Concat(Unsqueeze(K'), Unsqueeze(V'), axis=0)
    out = merge(softmax(masking(Q K'^T * scale)) V')
    ==> Attention(x, W, b, mask_index=int32(mask), past, num_heads=N, unidirectional=1,
                  mask_filter_value=<the export's fill>) with outputs (out, present)

This is the layout of GPT-2 as PyTorch 1.4-1.9 exported it (transformers 2.x-4.x ``Conv1D``, ``torch.stack``
presents, Megatron-style exports) and of ONNX Runtime's own GPT-2 test graphs. Layouts matched:
K^T split straight to [B, N, d, S] and concatenated after the transposed past key (PyTorch), or K
concatenated on the sequence axis and transposed after (generator graphs); the past halves read as
``Gather(past, i)`` or ``Squeeze(Split(past)[i])``; scale on the scores (Div/Mul) or on Q and K^T (Div/Mul).

The masking step -- whatever ops sit between the scaled scores and the Softmax (``Where(causal table,
scores, -1e4)``, ``scores * b - 1e4 * (1 - b)``, either plus a padding bias, or a plain additive bias) -- is
not recognised by its spelling: its pattern only says which values it reads, and ``probe.causal_masking``
runs it on random scores at short and long lengths, with and without past and padding, and requires it to
be exactly "keep the score where key j <= past + i and mask[b, j] == 1, a large negative value elsewhere".
A sliding window, a shifted diagonal or a mask read from anything but one 2-D input is refused with the
probe's reason. Where the export replaces future scores and adds the padding bias (``Where(causal, s, -1e4)``
plus ``(1 - mask) * -1e4``), queries that see no key (left-padded positions) get another row from the fused
op: the fusion is taken (unless ``exact_padding``) and its node names the mask input whose zero positions are
unspecified (``UNSPECIFIED_PADDING``); every other row is exact.

Megatron (PyTorch 1.9, opset 12) reads its mask from a float table input ``[B, 1, M, M]`` that the user fills
(causal 0/1 rows times the keys' padding) and the graph slices to ``[.., past:past+S, :past+S]``, masking as
``scores * keep - 10000 * (1 - keep)``. ONNX Runtime's Attention takes no 4-D mask on CPU and no bias with a
past, so that form becomes

    ==> MultiHeadAttention(q, k, v, attention_bias=(1 - keep) * lowest, past[0], past[1], num_heads=N)
        present = Concat(Unsqueeze(present_key), Unsqueeze(present_value)); rows whose keep is all 0 -> mean(V')

with ``keep`` the graph's own slice of the table. ``probe.table_masking`` feeds 0/1 causal + padding tables
(past 0 and > 0, left and right padding) and random scores, and requires the step to be "keep the score or
block it" after Softmax; a table read through anything else, a fill that does not vanish after Softmax, or a
keep that is not 0/1 is refused. A query that keeps no key (left padding) averages every value in the export;
the fused op does so in float32 (``s + lowest == lowest``) but not in float16 (-65504 does not absorb the
score), so those rows are written out with a Where.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import (MS_DOMAIN, UNSPECIFIED_PADDING, Fusion, FusionContext, const_array,
                                             const_scalar, last_axis)
from mlstep.optimizer.probe import ancestry, causal_masking, evaluate, table_masking
from mlstep.optimizer.values import facts


def _heads(op, value, shape, perm):
    return op.Transpose(op.Reshape(value, shape), perm=perm)


def _unsqueeze0(op, value):
    return op.Unsqueeze(value, _allow_other_inputs=True, _allow_other_attributes=True)


class PackedCausalAttention(pattern.RewriteRuleClassBase):
    """Variants: ``past`` (None: no past; "kt": the transposed past key is concatenated to K^T, PyTorch;
    "k": K is concatenated on the sequence axis then transposed, generator graphs)."""

    def __init__(self, ctx: FusionContext, past: str | None):
        super().__init__(f"PackedCausalAttention[{past or 'no past'}]", remove_nodes=False)
        self._ctx = ctx
        self._past = past

    def pattern(self, op, x, w, b, q_shape, k_shape, v_shape, past_k, past_v, q_scale, k_scale, s_scale, cond,
                fill, keep, penalty, bias):
        projected = op.MatMul(x, w)
        qkv = pattern.OrValue([op.Add(projected, b), op.Add(b, projected)], tag_var="qkv_order",
                              tag_values=["xw+b", "b+xw"])
        q, k, v = op.Split(qkv, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["q", "k", "v"])
        q_h = _heads(op, q, q_shape, [0, 2, 1, 3])
        v_all = _heads(op, v, v_shape, [0, 2, 1, 3])
        present_k = None
        if self._past is None:
            k_t = pattern.OrValue([_heads(op, k, k_shape, [0, 2, 3, 1]),
                                   op.Transpose(_heads(op, k, k_shape, [0, 2, 1, 3]), perm=[0, 1, 3, 2])])
        elif self._past == "kt":
            k_t = op.Concat(past_k, _heads(op, k, k_shape, [0, 2, 3, 1]), axis=-1, _outputs=["k_cat"])
            present_k = op.Transpose(k_t, perm=[0, 1, 3, 2])
        else:
            present_k = op.Concat(past_k, _heads(op, k, k_shape, [0, 2, 1, 3]), axis=-2, _outputs=["k_cat"])
            k_t = op.Transpose(present_k, perm=[0, 1, 3, 2])
        if self._past is not None:
            v_all = op.Concat(past_v, v_all, axis=-2, _outputs=["v_cat"])
        q_h = pattern.OrValue([op.Div(q_h, q_scale), op.Mul(q_h, q_scale), q_h], tag_var="q_scaling",
                              tag_values=["div", "mul", "none"])
        k_t = pattern.OrValue([op.Div(k_t, k_scale), op.Mul(k_t, k_scale), k_t], tag_var="k_scaling",
                              tag_values=["div", "mul", "none"])
        scores = op.MatMul(q_h, k_t, _outputs=["raw_scores"])
        scores = pattern.OrValue([op.Div(scores, s_scale), op.Mul(scores, s_scale), scores],
                                 tag_var="s_scaling", tag_values=["div", "mul", "none"])
        # the masking step's forms (which values it reads); what it computes is the probe's to decide
        scores = pattern.OrValue([op.Cast(scores, to=ir.DataType.FLOAT), scores], tag_var="cast",
                                 tag_values=[True, False])
        kept = pattern.OrValue([op.Where(cond, scores, fill), op.Sub(op.Mul(scores, keep), penalty),
                                op.Sub(op.Mul(keep, scores), penalty)], tag_var="keep_form",
                               tag_values=["where", "mul", "mul'"])
        masked = pattern.OrValue([kept, op.Add(kept, bias), op.Add(bias, kept), op.Add(scores, bias),
                                  op.Add(bias, scores)], tag_var="mask_form",
                                 tag_values=["keep", "keep+bias", "bias+keep", "bias", "bias'"])
        probs = op.Softmax(masked, _outputs=["probs"])
        probs = pattern.OrValue([op.Cast(probs, to=ir.DataType.FLOAT), probs])   # Megatron: a no-op .float()
        ctx = op.MatMul(probs, v_all)
        merged = op.Reshape(op.Transpose(ctx, perm=[0, 2, 1, 3]), pattern.ANY_VALUE, _outputs=["merged"])
        if self._past is None:
            return merged
        present = op.Concat(_unsqueeze0(op, present_k), _unsqueeze0(op, v_all), axis=0, _outputs=["present"])
        return merged, present

    def check(self, context, x, w, b, q, q_shape, k_shape, v_shape, probs, raw_scores, q_scaling,
              k_scaling, s_scaling, merged, keep_form=None, mask_form=None, q_scale=None, k_scale=None,
              s_scale=None, past_k=None, past_v=None, present=None, keep=None, **_):
        result = pattern.MatchResult()
        weights, bias = const_array(w), const_array(b)
        if weights is None or weights.ndim != 2 or bias is None or bias.reshape(-1).shape != (weights.shape[1],):
            return result.fail("the Q/K/V projection is not a constant [H, 3H] weight and [3H] bias")
        hidden = weights.shape[1] // 3
        if weights.shape[1] != 3 * hidden or not _splits_in_thirds(q.producer(), hidden):
            return result.fail("Q/K/V are not three equal parts of the projection's last axis")
        known = self._facts(context.graph_or_function)
        heads, head_size = self._heads(known, q_shape, hidden)
        if not heads:
            return result.fail("cannot tell the number of heads from the head split")
        for shape in (k_shape, v_shape):
            if _tail(known, shape) not in ([heads, head_size], [None, head_size], [heads, None], [heads, -1],
                                           [-1, head_size]):
                return result.fail(f"K/V head split {_tail(known, shape)} differs from Q's {[heads, head_size]}")
        if not last_axis(probs.producer().attributes.get_int("axis", -1), 4):
            return result.fail("Softmax is not over the key axis")
        if self._scale(q_scaling, k_scaling, s_scaling, q_scale, k_scale, s_scale) is None:
            return result.fail("the attention scale is not a constant scalar")
        if not _merges_heads(context.model, known, merged, x, heads, head_size):
            return result.fail(f"the heads are not merged back to [batch, sequence, {hidden}]")
        if present is not None:
            past = _past_source(past_k, 0, transposed=self._past == "kt")
            if past is None or _past_source(past_v, 1) is not past:
                return result.fail("the past key/value are not halves 0 and 1 of one stacked past input")
            if not past.is_graph_input() or not present.is_graph_output():
                return result.fail("the past is not a graph input or the present not a graph output")
            for node in present.producer().inputs:
                if _unsqueeze_axes(node.producer()) != [0]:
                    return result.fail("the present is not the key and value stacked on a new first axis")
        scores, masked = masked_input(raw_scores, s_scaling), probs.producer().inputs[0]
        if self._table_mask(context.model, x, scores, masked, raw_scores, heads, head_size, keep, keep_form,
                            mask_form):
            source, reason = self._table(context.model, x, scores, masked, raw_scores, heads, head_size, keep)
        else:
            source, _fill, reason, _note = self._masking(context.model, scores, masked, raw_scores, heads, head_size,
                                                  past_k is not None)
        if reason:
            return result.fail(reason)
        self._opset = context.model.opset_imports.get("", 18)
        return result

    def rewrite(self, op, x, w, b, q_shape, probs, raw_scores, q_scaling, k_scaling, s_scaling, q_scale=None,
                k_scale=None, s_scale=None, past_k=None, keep=None, q=None, k=None, v=None, **_):
        hidden = const_array(w).shape[1] // 3
        heads, head_size = self._heads(self._facts(raw_scores.graph), q_shape, hidden)
        scores, masked = masked_input(raw_scores, s_scaling), probs.producer().inputs[0]
        scale = self._scale(q_scaling, k_scaling, s_scaling, q_scale, k_scale, s_scale)
        bias = b if const_array(b).ndim == 1 else op.initializer(ir.tensor(const_array(b).reshape(-1),
                                                                           name=f"{b.name}_1d"))
        attrs = {"num_heads": heads}
        if not math.isclose(scale, 1.0 / math.sqrt(head_size), rel_tol=1e-5):
            attrs["scale"] = float(scale)
        past = None if past_k is None else _past_source(past_k, 0, transposed=self._past == "kt")
        if self.__dict__.get("_table_memo", {}).get(masked.name, (None, "not probed"))[1] == "":
            result = self._table_rewrite(op, q, k, v, keep, past, attrs)
            first = result[0] if isinstance(result, tuple) else result
            if x.shape is not None:   # [B, S, hidden] like the block's input, whatever the mask's dims
                first.shape = ir.Shape(x.shape)
            return result
        source, fill, _, note = self._masking(None, scores, masked, raw_scores, heads, head_size, past_k is not None)
        attrs.update(unidirectional=1, mask_filter_value=float(fill))
        mask = None if source is None else op.Cast(source, to=ir.DataType.INT32)
        if past is None:
            out = op.Attention(x, w, bias, mask, _domain=MS_DOMAIN, **attrs)
            return _mark_unspecified(out, source if note else None)
        out, present = op.Attention(x, w, bias, mask, past, _domain=MS_DOMAIN, _outputs=2, **attrs)
        return _mark_unspecified(out, source if note else None), present

    def _table_rewrite(self, op, q, k, v, keep, past, attrs):
        """MultiHeadAttention with the table's own 0/1 slice as an additive bias (0 where kept, the lowest float
        where blocked): ONNX Runtime's Attention takes no bias together with a past."""
        lowest = op.Constant(value_float=float(np.finfo(np.float32).min))
        bias = op.Mul(op.Sub(op.Constant(value_float=1.0), keep), lowest)
        if past is None:
            out = op.MultiHeadAttention(q, k, v, None, None, bias, _domain=MS_DOMAIN, **attrs)
            return self._blind_rows(op, out, keep, self._reduce(op, "ReduceMean", v, 1))
        halves = [op.Gather(past, op.Constant(value_int=i), axis=0) for i in (0, 1)]
        out, present_k, present_v = op.MultiHeadAttention(q, k, v, None, None, bias, *halves, _domain=MS_DOMAIN,
                                                          _outputs=3, **attrs)
        stacked = [self._axes(op, "Unsqueeze", t, 0) for t in (present_k, present_v)]
        mean = op.Transpose(self._reduce(op, "ReduceMean", present_v, 2), perm=[0, 2, 1, 3])
        mean = op.Reshape(mean, op.Constant(value_ints=[0, 1, -1]))
        return self._blind_rows(op, out, keep, mean), op.Concat(*stacked, axis=0)

    def _blind_rows(self, op, out, keep, mean):
        """A query whose table row keeps no key gets the export's uniform average of every key's value (the
        mean of V, [B, 1, hidden]). In float32 the lowest-float bias already gives it; in float16 the bias is
        -65504, which no longer absorbs the score (measured: ONNX Runtime 1.32 CPU), so it is written out."""
        seen = self._axes(op, "Squeeze", self._reduce(op, "ReduceMax", keep, -1), 1)     # [B, S, 1]
        return op.Where(op.Greater(seen, op.Constant(value_float=0.0)), out, mean)

    def _reduce(self, op, name, value, axis):
        if self._opset >= 18:
            return getattr(op, name)(value, op.Constant(value_ints=[axis]), keepdims=1)
        return getattr(op, name)(value, axes=[axis], keepdims=1)

    def _axes(self, op, name, value, axis):
        if self._opset >= 13:
            return getattr(op, name)(value, op.Constant(value_ints=[axis]))
        return getattr(op, name)(value, axes=[axis])

    # --- facts the check and the rewrite share ------------------------------------------------------

    def _heads(self, known, q_shape, hidden: int) -> tuple[int, int]:
        tail = _tail(known, q_shape)
        if len(tail) == 2:
            if tail[-1] and tail[-1] > 0 and hidden % tail[-1] == 0:
                return hidden // tail[-1], tail[-1]
            if tail[-2] and tail[-2] > 0 and hidden % tail[-2] == 0:
                return tail[-2], hidden // tail[-2]
        if self._ctx.num_heads and hidden % self._ctx.num_heads == 0:
            return self._ctx.num_heads, hidden // self._ctx.num_heads
        return 0, 0

    def _facts(self, graph):
        """The value analysis, once per pass: what the checks ask (constants, the dims of values no rewrite
        of this pass replaces) stays true while other blocks are fused."""
        if "_pass_facts" not in self.__dict__:
            self.__dict__["_pass_facts"] = facts(graph)
        return self.__dict__["_pass_facts"]

    @staticmethod
    def _scale(q_scaling, k_scaling, s_scaling, q_scale, k_scale, s_scale) -> float | None:
        scale = 1.0
        for how, value in ((q_scaling, q_scale), (k_scaling, k_scale), (s_scaling, s_scale)):
            if how == "none":
                continue
            factor = const_scalar(value)
            if factor is None or factor == 0.0:
                return None
            scale = scale / factor if how == "div" else scale * factor
        return scale

    def _table_mask(self, model, x, scores, masked, raw_scores, heads, head_size, keep, keep_form,
                    mask_form) -> bool:
        """The masking multiplies the scores by a slice of a [B, 1, M, M] table input (Megatron)?"""
        if keep is None or keep_form == "where" or mask_form != "keep":
            return False
        cuts = self._cuts(scores, raw_scores, heads, head_size)
        values = tuple(cuts) + (x,)
        sources = [v for v in ancestry(model.graph, keep, values).data_inputs if all(v is not c for c in values)]
        return len(sources) == 1 and sources[0].shape is not None and len(sources[0].shape) == 4

    def _table(self, model, x, scores, masked, raw_scores, heads, head_size, keep):
        memo = self.__dict__.setdefault("_table_memo", {})
        if masked.name not in memo:
            cuts = self._cuts(scores, raw_scores, heads, head_size)
            cuts[x] = f"BSH:{heads * head_size}"
            memo[masked.name] = table_masking(model, scores, masked, keep, cuts, self._ctx.sequence_lengths)
        return memo[masked.name]

    @staticmethod
    def _cuts(scores, raw_scores, heads, head_size) -> dict:
        """The block's values a masking probe feeds (the scores, Q, K^T) with their layouts."""
        q_h, k_t = raw_scores.producer().inputs[0], raw_scores.producer().inputs[1]
        cuts = {scores: f"BNST:{heads}:{head_size}", q_h: "BNSd", k_t: "BNdT"}
        for value, layout in ((q_h, "BNSd"), (k_t, "BNdT")):   # also before their scaling
            node = value.producer()
            if node is not None and node.op_type in ("Div", "Mul"):
                cuts[node.inputs[0]] = layout
        return cuts

    def _masking(self, model, scores, masked, raw_scores, heads, head_size, with_past):
        """(mask input or None, fill, reason): memoised per masking output (the probe runs once per block).
        The probe feeds the step's scores and the values it may read shapes from: Q, K^T (and K' with past)."""
        memo = self.__dict__.setdefault("_masking_memo", {})
        key = masked.name
        if key not in memo:
            cuts = self._cuts(scores, raw_scores, heads, head_size)
            k_t = raw_scores.producer().inputs[1]
            if with_past:
                concat = k_t.producer()
                concat = concat.inputs[0].producer() if concat.op_type in ("Div", "Mul") else concat
                if concat.op_type == "Transpose":     # K' on the sequence axis, transposed after
                    cuts[concat.inputs[0]] = "BNTd"
            memo[key] = causal_masking(model, scores, masked, cuts, with_past, self._ctx.exact_padding)
        return memo[key]


def _mark_unspecified(out: ir.Value, mask: ir.Value | None) -> ir.Value:
    """Rows that see no key differ from the export (probe.causal_masking's note): the fused node names the mask
    input whose zero positions are therefore unspecified; the pipeline records it on the model."""
    if mask is not None:
        out.producer().metadata_props[UNSPECIFIED_PADDING] = mask.name
    return out


def masked_input(raw_scores: ir.Value, s_scaling: str) -> ir.Value:
    """The scaled scores (what the masking step reads)."""
    if s_scaling == "none":
        return raw_scores
    users = [u for u, _ in raw_scores.uses() if u.op_type in ("Div", "Mul")]
    return users[0].outputs[0]


def _tail(known, shape: ir.Value) -> list[int | None]:
    """The last two entries of a 4-entry head-split target, each an int or None (unknown)."""
    arr = known.constant(shape)
    if arr is not None:
        return [int(v) for v in arr.reshape(-1)][-2:] if arr.size == 4 else []
    node = shape.producer()
    if node is None or node.op_type != "Concat":
        return []
    pieces: list[int | None] = []
    for inp in node.inputs:
        arr = known.constant(inp)
        if arr is None:
            pieces.append(None)
        else:
            pieces += [int(v) for v in arr.reshape(-1)]
    return pieces[-2:] if len(pieces) == 4 else []


def _merges_heads(model: ir.Model, known, merged: ir.Value, x: ir.Value, heads: int, head_size: int) -> bool:
    """The Reshape after the context's Transpose gives [B, S, N * d]: from the value analysis, or else by
    running its target (Conv1D-era exports compute it from Shape(ctx)) for two sizes of the block's input and
    context, fed as [B, S, H] and [B, S, N, d]."""
    dims = known.dims(merged)
    if dims is not None and len(dims) == 3 and dims[-1] == heads * head_size:
        return True
    target = known.constant(merged.producer().inputs[1])
    if target is not None:
        return target.reshape(-1).tolist() in ([0, 0, heads * head_size], [0, 0, -1])
    ctx = merged.producer().inputs[0]
    feeds = []
    for batch, seq in ((2, 3), (3, 7)):
        feeds.append({ctx.name: np.zeros((batch, seq, heads, head_size), np.float32),
                      x.name: np.zeros((batch, seq, 1), np.float32)})
    try:
        outs = evaluate(model, merged.producer().inputs[1], feeds, (ctx, x))
    except Exception:  # noqa: BLE001 - a target that cannot be run on the block's own values is not shown
        return False
    return all(out.reshape(-1).tolist() == [b, s, heads * head_size] for out, (b, s) in zip(outs, ((2, 3), (3, 7))))


def _splits_in_thirds(split: ir.Node, hidden: int) -> bool:
    if len(split.outputs) != 3:
        return False
    axis = split.attributes.get_int("axis", 0)
    if axis not in (-1, 2):
        return False
    sizes = split.attributes.get_ints("split", None)
    if sizes is None and len(split.inputs) > 1 and split.inputs[1] is not None:
        arr = const_array(split.inputs[1])
        sizes = None if arr is None else arr.reshape(-1).tolist()
    return sizes is None or list(sizes) == [hidden] * 3


def _past_source(value: ir.Value | None, index: int, transposed: bool = False) -> ir.Value | None:
    """The stacked past input [2, B, N, P, d] when ``value`` is its half ``index`` (``Gather(past, index)`` or
    ``Squeeze(Split(past)[index], 0)``), transposed to [B, N, d, P] first when ``transposed``."""
    node = value.producer() if value is not None else None
    if transposed:
        if node is None or node.op_type != "Transpose" or list(node.attributes.get_ints("perm", [])) != [0, 1, 3, 2]:
            return None
        node = node.inputs[0].producer()
    if node is None:
        return None
    if node.op_type == "Gather" and node.attributes.get_int("axis", 0) == 0:
        idx = const_array(node.inputs[1])
        if idx is not None and idx.size == 1 and idx.ndim == 0 and int(idx) == index:
            return node.inputs[0]
        return None
    if node.op_type == "Squeeze" and _unsqueeze_axes(node) == [0]:
        split = node.inputs[0].producer()
        if split is None or split.op_type != "Split" or split.attributes.get_int("axis", 0) != 0:
            return None
        out = node.inputs[0]
        sizes = split.attributes.get_ints("split", None)
        if sizes is None and len(split.inputs) > 1 and split.inputs[1] is not None:
            arr = const_array(split.inputs[1])
            sizes = None if arr is None else arr.reshape(-1).tolist()
        if len(split.outputs) == 2 and (sizes is None or list(sizes) == [1, 1]) \
                and list(split.outputs).index(out) == index:
            return split.inputs[0]
    return None


def _unsqueeze_axes(node: ir.Node | None) -> list[int] | None:
    """The axes of an Unsqueeze/Squeeze (attribute, or constant input from opset 13)."""
    if node is None or node.op_type not in ("Unsqueeze", "Squeeze"):
        return None
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        arr = const_array(node.inputs[1])
        axes = None if arr is None else arr.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _rules(ctx: FusionContext):
    # any model type: only a causal masking step passes the probe (an encoder's padding mask is refused)
    return [PackedCausalAttention.rule(ctx, past) for past in ("kt", "k", None)]


FUSION = Fusion("attention", _rules, commute=False, anchor="Softmax", label="packed_causal_attention")
