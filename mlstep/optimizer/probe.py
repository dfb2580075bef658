"""Probe a small subgraph numerically: what does this value compute from the graph inputs?

Fusions use it where a structural match cannot prove semantics: the additive attention mask (is it exactly
a padding mask built from one 2-D input, whatever ops the exporter used to build it?) and position ids
(are they exactly ``arange(sequence)``?). The subgraph of the value's ancestors is cut out, run in ONNX
Runtime on a few crafted inputs, and compared with the semantics the fused operator assumes. Masks are probed
at short and long total lengths (one >= ``LONG_PROBE``) and at the user's own sequence lengths (``lengths``:
the shapes the step validates and benchmarks): a mask that equals the assumed one only on short sequences (a
sliding window of width 10), or everywhere but at the user's length, is refused, not fused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_ir as ir

_NP = {ir.DataType.INT64: np.int64, ir.DataType.INT32: np.int32, ir.DataType.FLOAT: np.float32,
       ir.DataType.BOOL: np.bool_, ir.DataType.FLOAT16: np.float16}


@dataclass(frozen=True)
class Ancestry:
    nodes: list[ir.Node]
    data_inputs: list[ir.Value]     # graph inputs whose values (not only shapes) flow into the value
    shape_inputs: list[ir.Value]    # graph inputs read only through Shape


def ancestry(graph: ir.Graph, value: ir.Value, cuts: tuple[ir.Value, ...] = ()) -> Ancestry:
    """The nodes ``value`` is computed by, back to the graph inputs (and to the ``cuts``: values taken as
    inputs, so that a probe of one step of a block does not run the whole model before it)."""
    order = {id(n): i for i, n in enumerate(graph)}
    graph_inputs = {id(v) for v in graph.inputs} | {id(v) for v in cuts}
    nodes: dict[int, ir.Node] = {}
    data: dict[int, ir.Value] = {}
    shape: dict[int, ir.Value] = {}
    stack = [(value, False)]
    seen: set[tuple[int, bool]] = set()
    while stack:
        v, via_shape = stack.pop()
        if (id(v), via_shape) in seen:
            continue
        seen.add((id(v), via_shape))
        if id(v) in graph_inputs:
            (shape if via_shape else data)[id(v)] = v
            continue
        node = v.producer()
        if node is None:
            continue
        nodes[id(node)] = node
        for inp in node.inputs:
            if inp is not None:
                stack.append((inp, via_shape or node.op_type == "Shape"))
    only_shape = [v for k, v in shape.items() if k not in data]
    return Ancestry(sorted(nodes.values(), key=lambda n: order.get(id(n), 0)), list(data.values()), only_shape)


def evaluate(model: ir.Model, value: ir.Value, feeds_list: list[dict[str, np.ndarray]],
             cuts: tuple[ir.Value, ...] = (), skip_failures: bool = False) -> list[np.ndarray | None]:
    """Run the ancestors of ``value`` on each feed (keyed by graph input name, and by the names of ``cuts``);
    with ``skip_failures`` a feed the subgraph cannot run gives None instead of raising."""
    import onnxruntime as ort

    anc = ancestry(model.graph, value, cuts)
    proto_nodes, initializers, seen_init = [], [], set()
    for node in anc.nodes:
        proto_nodes.append(ir.serde.serialize_node(node))
        for inp in node.inputs:
            if inp is not None and inp.producer() is None and inp.const_value is not None \
                    and inp.name not in seen_init and inp not in model.graph.inputs:
                seen_init.add(inp.name)
                initializers.append(ir.serde.serialize_tensor(ir.tensor(inp.const_value.numpy(), name=inp.name)))
    inputs = anc.data_inputs + anc.shape_inputs
    graph = onnx.helper.make_graph(
        proto_nodes, "probe",
        [onnx.helper.make_tensor_value_info(v.name, int(v.dtype or ir.DataType.FLOAT), None) for v in inputs],
        [onnx.helper.make_value_info(value.name, onnx.TypeProto())], initializers)
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version or 8)
    if value.dtype is not None:
        proto.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(value.name, int(value.dtype), None))
    else:  # exporters leave intermediate types out: let ONNX infer the output's type
        proto = onnx.shape_inference.infer_shapes(proto)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4 if skip_failures else 3   # an expected failure is not an error to log
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {v.name for v in inputs}
    outs = []
    for feeds in feeds_list:
        try:
            outs.append(session.run(None, {k: v for k, v in feeds.items() if k in names})[0])
        except Exception:  # noqa: BLE001 - onnxruntime raises its own classes from C++
            if not skip_failures:
                raise
            outs.append(None)
    return outs


def _masks(batch: int, seq: int) -> np.ndarray:
    """Right-padded, left-padded, full and holed rows: every row keeps at least one token."""
    rows = []
    for b in range(batch):
        row = np.ones(seq, dtype=np.int64)
        kind = b % 4
        if kind == 1:
            row[seq - 1 - b % (seq - 1):] = 0
        elif kind == 2:
            row[: 1 + b % (seq - 1)] = 0
        elif kind == 3:
            row[1::2] = 0
        rows.append(row)
    return np.stack(rows)


# Probe lengths: short ones and at least one >= LONG_PROBE, so that a mask that departs from the assumed one
# only beyond some distance (a sliding window, a chunked or blockwise mask) is seen doing so. (batch, sequence)
LONG_PROBE = 64
PADDING_PROBES = ((3, 6), (4, 9), (3, 70))
# (batch, new tokens, past tokens): with past, past 0 and > 0, one step and several, totals up to 73
CAUSAL_PROBES_WITH_PAST = ((3, 4, 3), (2, 1, 5), (2, 1, 72), (3, 5, 66), (2, 70, 0))
CAUSAL_PROBES = ((3, 5, 0), (2, 7, 0), (3, 70, 0))
# with past, left padding over new tokens too (row 2 of _masks: its first 3 tokens), so that some queries see
# nothing (without past, CAUSAL_PROBES' left-padded rows have such queries)
BLIND_PROBES_WITH_PAST = ((3, 4, 2),)

SOFTMAX_SHIFT_LIMIT = 1e-6   # largest uniform offset a padding mask may add to every score (see below)


def _mask_input(model: ir.Model, bias: ir.Value) -> tuple[Ancestry, ir.Value | None, str]:
    """The one 2-D graph input an additive mask is computed from (its ancestry too), or None and the reason."""
    anc = ancestry(model.graph, bias)
    if len(anc.data_inputs) != 1:
        names = [v.name for v in anc.data_inputs]
        return anc, None, f"the attention mask depends on {names or 'no input'}, not on exactly one mask input"
    source = anc.data_inputs[0]
    if source.shape is None or len(source.shape) != 2 or source.dtype not in _NP:
        return anc, None, f"the attention mask comes from {source.name!r}, which is not a 2-D mask input"
    return anc, source, ""


def _run_mask(model: ir.Model, bias: ir.Value, feeds_list) -> tuple[list[np.ndarray] | None, str]:
    try:
        return evaluate(model, bias, feeds_list), ""
    except Exception as err:  # noqa: BLE001 - a probe that cannot run is a refusal, not a crash
        return None, f"the attention mask could not be probed ({type(err).__name__})"


def _expand_bias(out: np.ndarray, batch: int, seq: int, total: int) -> tuple[np.ndarray | None, str]:
    """The probed bias broadcast to [batch, heads or 1, seq, total] (float64), or None and the reason."""
    if out.ndim != 4:
        return None, f"the attention mask has rank {out.ndim}, expected 4"
    try:
        return np.broadcast_to(out, (batch, out.shape[1], seq, total)).astype(np.float64), ""
    except ValueError:
        return None, f"the attention mask has shape {out.shape}, not a [batch, 1, {seq}, {total}] broadcast"


def padding_probes(lengths: Sequence[int] = ()) -> tuple[tuple[int, int], ...]:
    """(batch, sequence) probes: the fixed short and long ones, plus the user's own sequence lengths (a mask that
    departs from the assumed one only at the user's length is seen doing so)."""
    known = {seq for _, seq in PADDING_PROBES}
    return PADDING_PROBES + tuple((3, int(n)) for n in dict.fromkeys(lengths) if n >= 2 and n not in known)


def padding_mask_source(model: ir.Model, bias: ir.Value, lengths: Sequence[int] = (),
                        ) -> tuple[ir.Value | None, float, str]:
    """If ``bias`` equals ``(1 - mask[:, None, None, :]) * fill`` (fill a large negative value) for a 2-D graph
    input ``mask`` (plus, at most, one uniform offset of magnitude <= SOFTMAX_SHIFT_LIMIT on every position),
    return that input and ``fill`` (the fused op reproduces it, so that even a row with nothing to attend to
    matches). Otherwise (None, 0, reason). ``lengths``: the user's sequence lengths, probed too."""
    anc, source, reason = _mask_input(model, bias)
    if source is None:
        return None, 0.0, reason
    feeds_list, masks = [], []
    for batch, seq in padding_probes(lengths):
        mask = _masks(batch, seq)
        feeds = {}
        for v in anc.data_inputs + anc.shape_inputs:
            dtype = _NP.get(v.dtype, np.int64)
            feeds[v.name] = mask.astype(dtype) if v is source else np.zeros((batch, seq), dtype=dtype)
        feeds_list.append(feeds)
        masks.append(mask)
    outs, reason = _run_mask(model, bias, feeds_list)
    if outs is None:
        return None, 0.0, reason
    fill = 0.0
    for mask, out in zip(masks, outs):
        batch, seq = mask.shape
        full, reason = _expand_bias(out, batch, seq, seq)
        if full is None:
            return None, 0.0, reason
        keep = np.broadcast_to(mask[:, None, None, :].astype(bool), full.shape)
        # A uniform tiny offset on every score (TF's stable_softmax adds 1e-9, which tf2onnx folds into the
        # mask) is exact: softmax is shift-invariant. Anything else on attended tokens is not a padding mask.
        shift = float(full[keep][0]) if full[keep].size else 0.0
        if abs(shift) > SOFTMAX_SHIFT_LIMIT or np.any(full[keep] != shift):
            return None, 0.0, "the attention mask is not zero on attended tokens (not a pure padding mask)"
        if np.any(full[~keep] - shift > -1e4):
            return None, 0.0, "the attention mask does not block padded tokens (causal or custom mask?)"
        if (~keep).any():
            fill = min(fill, float(full[~keep].max()))
    return source, fill, ""


def is_arange(model: ir.Model, value: ir.Value) -> bool:
    """True if ``value`` is ``arange(sequence)`` (shape [sequence] or [1, sequence]) for any input sizes."""
    anc = ancestry(model.graph, value)
    if anc.data_inputs:
        return False
    feeds_list, seqs = [], []
    for batch, seq in ((2, 5), (3, 11)):
        feeds_list.append({v.name: np.zeros((batch, seq) if v.shape is None or len(v.shape) == 2 else
                                            (batch, seq, *[d if isinstance(d, int) else 1 for d in v.shape[2:]]),
                                            dtype=_NP.get(v.dtype, np.int64)) for v in anc.shape_inputs})
        seqs.append(seq)
    try:
        outs = evaluate(model, value, feeds_list)
    except Exception:  # noqa: BLE001
        return False
    return all(out.reshape(-1).tolist() == list(range(seq)) and out.ndim in (1, 2) for out, seq in zip(outs, seqs))


def _shape_feed(value: ir.Value, batch: int, seq: int, past: int, total: int) -> np.ndarray:
    """Zeros shaped like a shape-only input: ids [batch, seq], masks [batch, total], past [batch, .., past, ..]."""
    dtype = _NP.get(value.dtype, np.int64)
    rank = len(value.shape) if value.shape is not None else 2
    if rank == 2:
        return np.zeros((batch, total if "mask" in value.name else seq), dtype=dtype)
    if rank == 4:
        static = [d if isinstance(d, int) else 1 for d in value.shape]
        return np.zeros((batch, static[1], past, static[3]), dtype=dtype)
    if rank == 5:   # stacked past key/value [2, batch, heads, past, head_size]
        static = [d if isinstance(d, int) else 1 for d in value.shape]
        return np.zeros((2, batch, static[2], past, static[4]), dtype=dtype)
    return np.zeros([batch, seq] + [d if isinstance(d, int) else 1 for d in value.shape[2:]], dtype=dtype)


def causal_mask_source(model: ir.Model, bias: ir.Value, lengths: Sequence[int] = (),
                       ) -> tuple[ir.Value | None, float, str]:
    """If ``bias`` is a causal mask combined with the padding mask of one 2-D input spanning past + current
    tokens -- 0 where ``mask[b, j] == 1 and j <= past + i``, a large negative value elsewhere -- return that
    input and the negative fill value (the fused op reproduces it, so that even rows with nothing to attend
    to match the original). Otherwise (None, 0, reason). ``lengths``: the user's sequence lengths, probed too
    (as the whole prompt, and with past as one new token after a prompt of that length)."""
    anc, source, reason = _mask_input(model, bias)
    if source is None:
        return None, 0.0, reason
    has_past = any(v.shape is not None and len(v.shape) == 4 for v in anc.shape_inputs) or any(
        v.name.startswith("past") for v in model.graph.inputs)
    shapes = CAUSAL_PROBES_WITH_PAST + BLIND_PROBES_WITH_PAST if has_past else CAUSAL_PROBES
    users = [(2, int(n), 0) for n in dict.fromkeys(lengths) if n >= 2]
    users += [(2, 1, int(n)) for n in dict.fromkeys(lengths) if n >= 1 and has_past]
    shapes = shapes + tuple(shape for shape in users if shape not in shapes)
    feeds_list, masks = [], []
    for batch, seq, past in shapes:
        mask = _masks(batch, past + seq)
        feeds = {v.name: _shape_feed(v, batch, seq, past, past + seq) for v in anc.shape_inputs}
        feeds[source.name] = mask.astype(_NP[source.dtype])
        feeds_list.append(feeds)
        masks.append((mask, seq, past))
    outs, reason = _run_mask(model, bias, feeds_list)
    if outs is None:
        return None, 0.0, reason
    fill = 0.0
    for (mask, seq, past), out in zip(masks, outs):
        batch, total = mask.shape
        full, reason = _expand_bias(out, batch, seq, total)
        if full is None:
            return None, 0.0, reason
        causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
        allow = np.broadcast_to(mask[:, None, None, :].astype(bool) & causal[None, None], full.shape)
        if np.any(np.abs(full[allow]) > 0.0):
            return None, 0.0, "the attention mask is not zero on visible tokens (not causal + padding)"
        if np.any(full[~allow] > -1e4):
            return None, 0.0, "the attention mask does not block future or padded tokens (not causal)"
        fill = min(fill, float(full[~allow].max())) if (~allow).any() else fill
    rng = np.random.default_rng(0)
    # an infinite fill makes a query that sees nothing NaN in the export: the fusion handles those rows
    # (the export's IsNaN guard) itself; a finite one must give the fused op's row
    for (mask, seq, past), out in zip(masks, outs) if np.isfinite(fill) else ():
        s = (rng.standard_normal((mask.shape[0], 1, seq, mask.shape[1])) * 4).astype(np.float32)
        full, _ = _expand_bias(out, mask.shape[0], seq, mask.shape[1])
        reason = _blind_rows_agree(mask, seq, past, s, (s + full[:, :1]).astype(np.float32), fill)
        if reason:
            return None, 0.0, reason
    return source, fill, ""


def per_key_bias(model: ir.Model, bias: ir.Value, lengths: Sequence[int] = ()) -> str:
    """"" if ``bias`` is an additive bias computed from one 2-D input that is the same for every query and
    every head (probed shape [batch or 1, 1, 1, total]: ORT Attention's ``attention_bias`` once expanded over the
    queries, whatever its values), else the reason. Used where the bias is not a padding mask."""
    anc, source, reason = _mask_input(model, bias)
    if source is None:
        return reason
    feeds_list, shapes = [], []
    for batch, seq in padding_probes(lengths):
        mask = _masks(batch, seq)
        feeds_list.append({v.name: (mask if v is source else np.zeros((batch, seq), np.int64)).astype(
            _NP.get(v.dtype, np.int64)) for v in anc.data_inputs + anc.shape_inputs})
        shapes.append((batch, seq))
    outs, reason = _run_mask(model, bias, feeds_list)
    if outs is None:
        return reason
    for (batch, seq), out in zip(shapes, outs):
        if out.ndim != 4 or out.shape[0] not in (1, batch) or out.shape[1:] != (1, 1, seq):
            return f"the attention bias has shape {out.shape}, not [{batch} or 1, 1, 1, {seq}] (one row per key)"
    return ""


PADDED_QUERY_ROWS_DIFFER = "padded-query rows differ"   # causal_masking's note: see its docstring


def causal_masking(model: ir.Model, scores: ir.Value, masked: ir.Value, cuts: dict[ir.Value, str],
                   with_past: bool, exact_padding: bool = False) -> tuple[ir.Value | None, float, str, str]:
    """Is the masking step ``scores -> masked`` (whatever ops an export spells it with) exactly causal
    attention with an optional 2-D padding mask: ``masked = scores`` where key ``j <= past + i`` and
    ``mask[b, j] == 1``, and a large negative value (<= -5000, gone after Softmax) elsewhere?

    ``cuts`` are the block's values the step may read shapes from (the scores themselves, Q, K^T), each with
    its layout over B (batch), N (heads), S (new tokens), T (past + new) and their size (d, the head size,
    and N, are taken from the letters' values given as ``"BNSd:4:16"``); they are fed, so the probe runs only
    the step itself. Scores are random, at the lengths of CAUSAL_PROBES(_WITH_PAST) (past 0 and > 0, totals up
    to 73, left and right padding). Returns (the mask input or None when there is none, the fill to give the
    fused op, "", note) or (None, 0, reason, "").

    Rows that see no key (under left padding: the padded queries themselves) are the one place where a fused op
    with an additive fill can differ from an export that *replaces* future scores by its fill and *adds* the
    padding bias (older GPT-2: ``Where(causal, s, -1e4) + (1 - mask) * -1e4``): its softmax mixes ``s_j - 1e4``
    with ``-1e4``, which no score-independent bias reproduces. Every other row is checked exactly as before. When
    those blind rows are the only disagreement, the masking is accepted with the note PADDED_QUERY_ROWS_DIFFER
    (the fusion records the mask input as one whose zero positions are unspecified, and parity leaves those
    positions out); with ``exact_padding`` it is refused with the blind-row reason."""
    values = tuple(cuts)
    anc = ancestry(model.graph, masked, values)
    sources = [v for v in anc.data_inputs if all(v is not c for c in values)]
    if len(sources) > 1:
        return None, 0.0, f"the attention masking reads {[v.name for v in sources]}, not one mask input", ""
    source = sources[0] if sources else None
    if source is not None and (source.shape is None or len(source.shape) != 2 or source.dtype not in _NP):
        return None, 0.0, f"the attention masking reads {source.name!r}, which is not a 2-D mask input", ""
    rng = np.random.default_rng(0)
    feeds_list, cases = [], []
    for batch, seq, past in CAUSAL_PROBES_WITH_PAST + BLIND_PROBES_WITH_PAST if with_past else CAUSAL_PROBES:
        total = past + seq
        mask = _masks(batch, total) if source is not None else np.ones((batch, total), dtype=np.int64)
        feeds = {v.name: _shape_feed(v, batch, seq, past, total) for v in anc.shape_inputs
                 if all(v is not c for c in values)}
        sizes = {"B": batch, "S": seq, "T": total}
        for value, layout in cuts.items():
            letters, *dims = layout.split(":")
            sizes.update({"N": int(dims[0]), "d": int(dims[1])} if dims else {})
            shape = tuple(sizes[c] for c in letters)
            feeds[value.name] = (rng.standard_normal(shape) * 4).astype(np.float32) if value is scores \
                else np.zeros(shape, dtype=np.float32)
        if source is not None:
            feeds[source.name] = mask.astype(_NP[source.dtype])
        feeds_list.append(feeds)
        cases.append((mask, seq, past, feeds[scores.name]))
    try:   # a length the step itself cannot run (a causal table of n_ctx rows) is one no input can have
        outs = evaluate(model, masked, feeds_list, values, skip_failures=True)
    except Exception as err:  # noqa: BLE001 - a probe that cannot run is a refusal, not a crash
        return None, 0.0, f"the attention masking could not be probed ({type(err).__name__})", ""
    ran = [(case, out) for case, out in zip(cases, outs) if out is not None]
    if len(ran) < 2 or (with_past and not any(past > 0 for (_, _, past, _), _ in ran)):
        return None, 0.0, "the attention masking could not be probed (it fails on the probe lengths)", ""
    fills = []
    for (mask, seq, past, s), out in ran:
        if out.shape != s.shape:
            return None, 0.0, f"the attention masking gives shape {out.shape}, not the scores' {s.shape}", ""
        total = past + seq
        causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
        allow = np.broadcast_to(mask[:, None, None, :].astype(bool) & causal[None, None], s.shape)
        if not np.allclose(out[allow], s[allow], rtol=1e-6, atol=0.0):
            return None, 0.0, "the attention masking changes visible scores (not causal + padding)", ""
        if np.any(out[~allow] > -5000.0):
            return None, 0.0, "the attention masking does not block future or padded keys (not causal)", ""
        # the fill the fused op adds to padded keys: the export's on past/current padded keys (future keys
        # are dropped by the fused op whatever their fill)
        padded = ~allow & ~np.broadcast_to((np.arange(total)[None, :] > (past + np.arange(seq))[:, None]), s.shape)
        where = padded if padded.any() else ~allow
        fills += [float(np.median(out[where].astype(np.float64) - s[where]))] if where.any() else []
    fill = max(min(fills, default=-10000.0), float(np.finfo(np.float32).min))
    fill = round(fill, 0) if abs(fill) < 1e30 else fill
    note = ""
    for (mask, seq, past, s), out in ran:
        reason = _blind_rows_agree(mask, seq, past, s, out, fill)
        if reason and exact_padding:
            return None, 0.0, reason, ""
        note = PADDED_QUERY_ROWS_DIFFER if reason else note
    return source, fill, "", note


def _blind_rows_agree(mask: np.ndarray, seq: int, past: int, s: np.ndarray, out: np.ndarray, fill: float) -> str:
    """A query that sees no key (a padded token under left padding) gets softmax over blocked scores only.
    ONNX Runtime's Attention and MultiHeadAttention (CPU, measured on 1.32 with fills -1e4 and the lowest
    float) set future keys to the lowest float and add ``fill`` to padded ones (in float32: ``s + lowest`` is
    ``lowest``); the export's row must be the same, or the fusion would change those positions' outputs.
    "" when they agree."""
    total = past + seq
    future = (np.arange(total)[None, :] > (past + np.arange(seq))[:, None])[None, None]
    padded = (mask[:, None, None, :] == 0)
    blind = ~np.any(~future & ~padded, axis=-1)              # [B, 1, S]: nothing visible
    if not blind.any():
        return ""
    lowest = np.finfo(np.float32).min
    fused = np.where(future, lowest, s.astype(np.float32) + np.float32(fill) * padded).astype(np.float32)
    rows = np.broadcast_to(blind[..., None], s.shape)

    def softmax(x):
        x = x.astype(np.float64)
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    if not np.allclose(softmax(out)[rows], softmax(fused)[rows], rtol=1e-5, atol=1e-6):
        return ("the attention masking's fill is not additive: queries that see nothing (left padding) would "
                "get other outputs from the fused op")
    return ""


# (batch, new tokens, past tokens) for a mask input that is a [B, 1, M, M] table: totals up to M (the table's
# size bounds every length the model can run at), past 0 and > 0, left-padded rows that see nothing
TABLE_PROBES = ((4, 5, 0), (4, 9, 3), (2, 1, 6), (4, 4, 2))


def table_masks(batch: int, size: int, total: int) -> np.ndarray:
    """[batch, 1, size, size] float 0/1 masks as a user builds Megatron's: the lower triangle (query i sees keys
    j <= i) times the keys' padding over ``total`` tokens (right-padded, left-padded, full, holed rows)."""
    keys = np.zeros((batch, size), dtype=np.float32)
    keys[:, :total] = _masks(batch, total) if total > 1 else 1
    return (np.tril(np.ones((size, size), np.float32))[None] * keys[:, None, :])[:, None]


def table_masking(model: ir.Model, scores: ir.Value, masked: ir.Value, keep: ir.Value,
                  cuts: dict[ir.Value, str], lengths: Sequence[int] = ()) -> tuple[ir.Value | None, str]:
    """Is the masking step ``scores -> masked`` that of a 4-D float mask input [B, 1, M, M] (Megatron: the table
    sliced to the current queries and all keys, ``masked = scores * keep - penalty``) exactly ``scores + bias``
    after Softmax, with ``bias`` = 0 where ``keep`` is 1 and the lowest float where it is 0? In float32 the
    score is absorbed by that bias (``s + lowest == lowest``), so a query that sees no key is uniform over every
    key, as the export's ``-penalty`` row is. Probed with the 0/1 causal + padding tables a user gives (past 0
    and > 0, left and right padding, the user's lengths) and random scores. (mask input, "") or (None, reason).
    ``cuts``: as for ``causal_masking``, with an extra ``BSH:<hidden>`` layout for the block's input."""
    values = tuple(cuts)
    anc = ancestry(model.graph, masked, values)
    sources = [v for v in ancestry(model.graph, keep, values).data_inputs + anc.data_inputs
               if all(v is not c for c in values)]
    if len({id(v) for v in sources}) != 1:
        return None, f"the attention masking reads {sorted({v.name for v in sources})}, not one mask input"
    source = sources[0]
    shape = source.shape
    if shape is None or len(shape) != 4 or shape[1] != 1 or not isinstance(shape[2], int) \
            or shape[2] != shape[3] or source.dtype != ir.DataType.FLOAT:
        return None, f"the attention masking reads {source.name!r}, which is neither a 2-D mask nor a [B, 1, M, M] " \
                     f"float table"
    size = shape[2]
    rng = np.random.default_rng(0)
    probes = TABLE_PROBES + tuple((2, n, 0) for n in lengths if 1 < n <= size) + ((2, size, 0),)
    feeds_list, cases = [], []
    for batch, seq, past in probes:
        total = past + seq
        if total > size:
            continue
        sizes = {"B": batch, "S": seq, "T": total}
        feeds = {v.name: _shape_feed(v, batch, seq, past, total) for v in anc.shape_inputs
                 if all(v is not c for c in values)}
        for value, layout in cuts.items():
            letters, *dims = layout.split(":")
            if letters == "BSH":
                sizes["H"] = int(dims[0])
            elif dims:
                sizes.update({"N": int(dims[0]), "d": int(dims[1])})
            feeds[value.name] = (rng.standard_normal(tuple(sizes[c] for c in letters)) * 4).astype(np.float32) \
                if value is scores else np.zeros(tuple(sizes[c] for c in letters), dtype=np.float32)
        feeds[source.name] = table_masks(batch, size, total)
        feeds_list.append(feeds)
        cases.append(feeds[scores.name])
    try:
        outs = evaluate(model, masked, feeds_list, values)
        keeps = evaluate(model, keep, feeds_list, values)
    except Exception as err:  # noqa: BLE001 - a probe that cannot run is a refusal, not a crash
        return None, f"the attention masking could not be probed ({type(err).__name__})"
    lowest = np.finfo(np.float32).min
    for s, out, kept in zip(cases, outs, keeps):
        if out.shape != s.shape:
            return None, f"the attention masking gives shape {out.shape}, not the scores' {s.shape}"
        if kept.ndim != 4 or kept.shape[1] != 1 or kept.shape[2:] != s.shape[2:] \
                or kept.shape[0] not in (1, s.shape[0]):
            return None, f"the mask the scores are multiplied by has shape {kept.shape}, not [B, 1, S, T]"
        if not np.isin(kept, (0.0, 1.0)).all():
            return None, "the mask the scores are multiplied by is not 0/1 on 0/1 tables"
        fused = np.where(np.broadcast_to(kept, s.shape) > 0, s, lowest).astype(np.float32)
        if not np.array_equal(out[fused > lowest], s[fused > lowest]):
            return None, "the attention masking changes the scores it keeps"
        if not np.allclose(_softmax(out), _softmax(fused), rtol=1e-6, atol=1e-7):
            return None, "the attention masking is not 'keep or block' (a blocked score still counts after Softmax)"
    return source, ""


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
