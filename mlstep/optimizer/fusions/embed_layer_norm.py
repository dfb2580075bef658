"""Embeddings + LayerNorm (BERT, DistilBERT, RoBERTa, ALBERT) -> com.microsoft EmbedLayerNormalization.

    LN(word[ids] + position[arange(S)] (+ token_type[segment_ids])) * gamma + beta
    ==> EmbedLayerNormalization(int32(ids), int32(segment_ids), word, position, token_type, gamma, beta)

Cases handled: the three addends in any order (commuted), with or without token types; position ids that
are ``arange(sequence)`` however the exporter built them (probed, see probe.py), also broadcast to
[batch, sequence] (``Expand(Unsqueeze(Range(0, S)), [B, S])``: every row is arange), or a position_ids graph
input (passed through); token-type ids whose every element is one constant row index ``c`` (BERT and
RoBERTa called without token_type_ids read them from an all-zeros buffer, sliced to the sequence and expanded
to [batch, sequence], RoBERTa gathered at its per-token positions; the value analysis decides it, see
``Facts.uniform``): row ``c`` of the token-type table is then the same addend at every position and is folded
into the position table, which is exact; ELN's segment inputs are optional and are left out.
Position ids computed per token (RoBERTa's padding-aware positions from input_ids) are fed to ELN's
position_ids input as they are. Refused with a reason: ids that are not a 2-D graph input, tables whose
widths differ, token types that are neither an input nor one constant row for every token.

When the embedding sum is used elsewhere too (GPT-2's residual, or a graph output), ELN's third output
(``embedding_sum``) replaces it.

The mask index: when an ORT Attention already in the graph reads ``ReduceSum(Cast(mask, int32), axis 1)``
of a 2-D graph input shaped like the ids, that mask becomes the fused node's ``mask`` input and its
``mask_index`` output (the same per-row count of attended tokens) replaces the ReduceSum (``absorb_mask_index``).
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from mlstep.optimizer.fusions._base import MS_DOMAIN, Fusion, const_array, const_shape
from mlstep.optimizer.probe import _NP, ancestry, evaluate, is_arange
from mlstep.optimizer.shapes import infer_content
from mlstep.optimizer.values import facts


def _graph_input(value: ir.Value, graph_inputs) -> ir.Value | None:
    """The 2-D integer graph input behind ``value`` (directly, through Casts, or through a Reshape to
    [-1, S] of a [B, S] input, which PyTorch's GPT-2 writes and which changes nothing)."""
    reshape_targets = []
    while value is not None and value not in graph_inputs:
        node = value.producer()
        if node is None or node.op_type not in ("Cast", "Reshape"):
            return None
        if node.op_type == "Reshape":
            reshape_targets.append(node)
        value = node.inputs[0]
    if value is None or value.shape is None or len(value.shape) != 2:
        return None
    for node in reshape_targets:
        target = infer_content(node.graph, node.inputs[1])
        last = value.shape[1]
        last = last if isinstance(last, int) else getattr(last, "value", None)
        if target is None or len(target) != 2 or target[0] != -1 or last is None or target[1] != last:
            return None
    return value


class EmbedLayerNorm(pattern.RewriteRuleClassBase):
    def __init__(self, sum_order: str, skip: str = "", const_positions: bool = False, with_sum: bool = False):
        """sum_order: "wp" (no token types), "wp+t" or "wt+p" (which pair is added first).
        skip: "" (the last Add then LayerNormalization), or "first"/"second": the last Add and the LayerNorm
        are an already fused SkipLayerNormalization (no bias) taking the pair as its first/second input."""
        super().__init__(f"EmbedLayerNorm_{sum_order}{'_sln_' + skip if skip else ''}"
                         f"{'_const_positions' if const_positions else ''}{'_with_sum' if with_sum else ''}")
        self._with_sum = with_sum   # the embedding sum is also used elsewhere (GPT-2's residual): ELN's output 2
        self._order = sum_order
        self._skip = skip
        self._const_positions = const_positions   # keras2onnx: the position rows added as one constant [S, H]
        self._with_tt = "t" in sum_order
        self._arange_memo: dict[str, bool] = {}   # per-run memo of the position-ids probe (check -> rewrite)
        self._row_memo: dict[str, int] = {}       # per-run memo: the one token-type row of constant segment ids

    def pattern(self, op, word, ids, position, position_ids, token_type, segment_ids, gamma, beta):
        w = op.Gather(word, ids)
        p = position if self._const_positions else op.Gather(position, position_ids)
        if self._order == "wp":
            pair, last = w, p
        elif self._order == "wp+t":
            pair, last = op.Add(w, p), op.Gather(token_type, segment_ids)
        else:
            pair, last = op.Add(w, op.Gather(token_type, segment_ids)), p
        if self._skip:
            a, b = (pair, last) if self._skip == "first" else (last, pair)
            if self._with_sum:
                normed, _mean, _inv, total = op.SkipLayerNormalization(
                    a, b, gamma, beta, _domain=MS_DOMAIN, _outputs=["normed", "sln_mean", "sln_inv", "total"])
                return normed, total
            return op.SkipLayerNormalization(a, b, gamma, beta, _domain=MS_DOMAIN, _outputs=["normed"])
        total = op.Add(pair, last, _outputs=["total"])
        normed = op.LayerNormalization(total, gamma, beta, _outputs=["normed"])
        return (normed, total) if self._with_sum else normed

    def check(self, context, word, ids, position, gamma, beta, normed, position_ids=None, token_type=None,
              segment_ids=None, **_):
        result = pattern.MatchResult()
        model = context.model
        inputs = model.graph.inputs
        tables = [const_shape(t) for t in (word,) + ((token_type,) if self._with_tt else ())]
        table = _position_table(position) if self._const_positions or len(const_shape(position) or ()) == 2 else None
        tables.insert(1, None if table is None else table.shape)
        if any(t is None or len(t) != 2 for t in tables):
            return result.fail("embedding tables are not constant 2-D matrices")
        if len({t[1] for t in tables}) != 1:
            return result.fail(f"embedding widths differ: {tables}")
        if const_shape(gamma) is None or const_shape(beta) is None:
            return result.fail("LayerNorm scale/shift are not constants")
        if not self._skip and normed.producer().attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNorm is not over the last axis")
        if _graph_input(ids, inputs) is None:
            return result.fail("word ids are not a 2-D graph input")
        if self._const_positions:
            sequence = _graph_input(ids, inputs).shape[1]
            if sequence != table.shape[0]:
                return result.fail(f"constant position rows {table.shape[0]} added to ids of sequence {sequence} "
                                   "(not a static dim equal to it)")
            return self._check_token_types(model, inputs, segment_ids, token_type, result)
        self._arange_memo[position_ids.name] = is_arange(model, position_ids) or _rows_arange(model, position_ids)
        if not self._arange_memo[position_ids.name] and not _position_input(model, position_ids):
            return result.fail("position ids are not arange(sequence) and not a [batch, sequence] integer tensor")
        return self._check_token_types(model, inputs, segment_ids, token_type, result)

    def _check_token_types(self, model, inputs, segment_ids, token_type, result):
        if not self._with_tt or _graph_input(segment_ids, inputs) is not None:
            return result
        row = facts(model.graph, until=[segment_ids]).uniform(segment_ids)
        rows = const_shape(token_type)[0]
        if row is None or not float(row).is_integer() or not -rows <= int(row) < rows:
            return result.fail("token type ids are neither a graph input nor one constant row of the token-type "
                               f"table for every token ({'not shown all equal' if row is None else row})")
        self._row_memo[segment_ids.name] = int(row)
        return result

    def rewrite(self, op, word, ids, position, gamma, beta, normed, position_ids=None, token_type=None,
                segment_ids=None, **kwargs):
        graph_inputs = normed.producer().graph.inputs
        ids_in = _graph_input(ids, graph_inputs)
        position_table = position
        if const_shape(position) is not None and len(const_shape(position)) != 2:   # [1, S, H] -> [S, H]
            position_table = op.initializer(ir.tensor(_position_table(position)), name=f"{position.name}_2d")
        segment = None
        tt_table = None
        if self._with_tt:
            seg_in = _graph_input(segment_ids, graph_inputs)
            if seg_in is not None:
                segment, tt_table = op.Cast(seg_in, to=ir.DataType.INT32), token_type
            else:  # one constant token type c for every token: fold row c into the position table
                rows, row = _position_table(position), self._row_memo[segment_ids.name]
                folded = rows + const_array(token_type)[row][None, :]
                position_table = op.initializer(ir.tensor(folded.astype(rows.dtype)),
                                                name=f"{position.name}_plus_{token_type.name}_row{row}")
        pos_in = None if self._const_positions or self._arange_memo[position_ids.name] else position_ids
        args = [op.Cast(ids_in, to=ir.DataType.INT32), segment, word, position_table, tt_table, gamma, beta]
        if pos_in is not None:
            args += [None, op.Cast(pos_in, to=ir.DataType.INT32)]
        eps = normed.producer().attributes.get_float("epsilon", 1e-12 if self._skip else 1e-5)
        if self._with_sum:
            out, _mask_index, new_total = op.EmbedLayerNormalization(*args, epsilon=eps, _domain=MS_DOMAIN,
                                                                     _outputs=3)
            for new, old in ((out, normed), (new_total, kwargs["total"])):   # what later checks compare
                new.dtype = old.dtype or word.dtype
                new.shape = old.shape
            return out, new_total
        out, _mask_index = op.EmbedLayerNormalization(*args, epsilon=eps, _domain=MS_DOMAIN, _outputs=2)
        return out


def _position_table(position: ir.Value) -> np.ndarray | None:
    """The position rows as a 2-D [rows, H] array: a table, or a constant [S, H] / [1, S, H] added as it is."""
    arr = const_array(position)
    if arr is None:
        return None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    return arr if arr.ndim == 2 else None


def _position_input(model: ir.Model, position_ids: ir.Value) -> bool:
    """Position ids computed per token, such as RoBERTa's padding-aware positions: a [batch, sequence]
    integer tensor, fed to ELN's position_ids input as it is."""
    anc = ancestry(model.graph, position_ids)
    if not anc.data_inputs:
        return False
    try:
        feeds = [{v.name: np.ones((2, 5), dtype=_NP.get(v.dtype, np.int64))   # int32 too (tf2onnx)
                  for v in anc.data_inputs + anc.shape_inputs}]
        (out,) = evaluate(model, position_ids, feeds)
    except Exception:  # noqa: BLE001
        return False
    return out.shape == (2, 5) and out.dtype.kind in "iu"


def _rows_arange(model: ir.Model, position_ids: ir.Value) -> bool:
    """Position ids computed from shapes only whose every row is arange(sequence), e.g.
    ``Expand(Unsqueeze(Range(0, S)), [B, S])``: the same as ELN's own positions, for any batch and sequence."""
    anc = ancestry(model.graph, position_ids)
    if anc.data_inputs or not anc.shape_inputs:
        return False
    sizes = ((2, 5), (3, 11))
    try:
        feeds = [{v.name: np.zeros((b, s) if v.shape is None or len(v.shape) == 2 else
                                   (b, s, *[d if isinstance(d, int) else 1 for d in v.shape[2:]]),
                                   dtype=_NP.get(v.dtype, np.int64)) for v in anc.shape_inputs} for b, s in sizes]
        outs = evaluate(model, position_ids, feeds)
    except Exception:  # noqa: BLE001
        return False
    return all(out.ndim == 2 and out.shape[1] == s and out.shape[0] in (1, b)
               and bool(np.all(out == np.arange(s)[None, :])) for out, (b, s) in zip(outs, sizes))


def absorb_mask_index(model: ir.Model) -> None:
    """ELN's mask_index output for an Attention's ``ReduceSum(Cast(mask, int32), axes=[1], keepdims=0)``. The
    counted tensor becomes ELN's mask input: a 2-D mask graph input shaped like the ids, or a 0/1 tensor computed
    from the ids' shape only (ORT's test graphs build an all-ones mask as ``ConstantOfShape(Shape(ids))``)."""
    graph = model.graph
    for eln in [n for n in graph if n.op_type == "EmbedLayerNormalization" and n.domain == MS_DOMAIN]:
        if len(eln.inputs) > 7 and eln.inputs[7] is not None or len(eln.outputs) < 2:
            continue
        ids = _graph_input(eln.inputs[0], graph.inputs)
        for node in list(graph):
            counted = _mask_count_of(node, graph.inputs, ids) is not None or _shape_only_mask(model, node, ids)
            if not counted or not all(u.op_type == "Attention" and u.domain == MS_DOMAIN and i == 3
                                      for u, i in node.outputs[0].uses()):
                continue
            cast = node.inputs[0]    # the int32 mask the ReduceSum reads
            inputs = list(eln.inputs) + [None] * (7 - len(eln.inputs))
            eln.resize_inputs(8)
            for i, v in enumerate(inputs[:7]):
                eln.replace_input_with(i, v)
            eln.replace_input_with(7, cast)
            ir.convenience.replace_all_uses_with(node.outputs[0], eln.outputs[1])
            graph.remove(node, safe=True)
            break


def _shape_only_mask(model: ir.Model, node: ir.Node, ids: ir.Value | None) -> bool:
    """ReduceSum over axis 1 (no keepdims) of an int32 0/1 tensor computed from the ids' shape only and shaped
    like the ids, for any batch and sequence (probed at two sizes)."""
    if ids is None or node.op_type != "ReduceSum" or node.domain != "" or node.attributes.get_int("keepdims", 1):
        return False
    counted = node.inputs[0]
    cast = counted.producer() if counted is not None else None
    if cast is None or cast.op_type != "Cast" or cast.attributes.get_int("to") != ir.DataType.INT32:
        return False
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else (
        [int(a) for a in const_array(node.inputs[1]).reshape(-1)] if len(node.inputs) > 1
        and const_array(node.inputs[1]) is not None else None)
    anc = ancestry(model.graph, counted)
    if axes not in ([1], [-1]) or anc.data_inputs or any(v is not ids for v in anc.shape_inputs):
        return False
    try:
        outs = evaluate(model, counted, [{ids.name: np.zeros(size, dtype=_NP.get(ids.dtype, np.int64))}
                                          for size in ((2, 5), (3, 11))])
    except Exception:  # noqa: BLE001
        return False
    return all(out.shape == size and bool(np.all((out == 0) | (out == 1)))
               for out, size in zip(outs, ((2, 5), (3, 11))))


def _mask_count_of(node: ir.Node, graph_inputs, ids: ir.Value | None) -> ir.Value | None:
    """The 2-D mask input when ``node`` is ReduceSum(Cast(mask, int32)) over axis 1 without keepdims."""
    if ids is None or node.op_type != "ReduceSum" or node.domain != "" or node.attributes.get_int("keepdims", 1):
        return None
    axes = node.attributes.get("axes")
    axes = list(axes.as_ints()) if axes is not None else (
        [int(a) for a in const_array(node.inputs[1]).reshape(-1)] if len(node.inputs) > 1
        and const_array(node.inputs[1]) is not None else None)
    if axes not in ([1], [-1]):
        return None
    counted = node.inputs[0]
    cast = counted.producer() if counted is not None else None
    if counted in graph_inputs:
        mask = counted if counted.dtype == ir.DataType.INT32 else None
    elif cast is not None and cast.op_type == "Cast" and cast.attributes.get_int("to") == ir.DataType.INT32:
        mask = cast.inputs[0]
    else:
        return None
    if mask is None or mask not in graph_inputs or mask.shape is None or ids.shape is None \
            or len(mask.shape) != 2 or mask.dtype not in (ir.DataType.INT32, ir.DataType.INT64):
        return None
    # ELN checks at run time that the mask is shaped like the ids; refuse only dims shown to differ.
    differ = [a != b for a, b in zip(mask.shape, ids.shape) if isinstance(a, int) and isinstance(b, int)
              or (getattr(a, "value", None) and getattr(b, "value", None))]
    return None if any(differ) else mask


FUSION = Fusion("embed_layer_norm", lambda ctx: [EmbedLayerNorm.rule(order, skip, const)
                                                  for const in (False, True) for order in ("wt+p", "wp+t", "wp")
                                                  for skip in ("", "first", "second")]
                + [EmbedLayerNorm.rule(order, skip, with_sum=True) for order in ("wt+p", "wp+t", "wp")
                   for skip in ("", "first", "second")],
                anchor="Gather", after=absorb_mask_index)
