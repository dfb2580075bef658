"""Which normalizations float16 cannot feed, measured on the float32 model (not decided by op names).

A normalization (LayerNormalization and its fused forms) divides each row's deviation from the row mean by
the row's spread. float16 keeps 11 significant bits: a value ``x`` is stored with an error of up to
``|x| * 2**-11``. Rounding the normalization's input therefore moves its normalized output by up to
``|x| * 2**-11 / std``, while the row's normalized output peaks at ``max|x - mean| / std``. Relative to that
peak the error of the row is

    r = max|x| * 2**-11 / max|x - mean|          (the std cancels)

A row centred near zero gives ``r`` of about 2**-11..2**-10 (5e-4..1e-3): the error float16 makes on any value.
A row that sits on a large common offset with a small spread gives ``r`` of 0.1-0.3: the float16 model cannot
represent what the normalization normalizes, and no fusion or kernel can give it back. Measured on ONNX
Runtime's ``gpt2_embedlayer`` test graph: the residual sum before its last SkipLayerNormalization reaches 850
with rows whose largest deviation from their mean is down to 1.96 (std ~0.47; float16's step at 850 is 0.5),
``r`` = 0.21; on bert-base every LayerNorm input gives ``r`` = 4.9e-4 (2**-11).

Rule: a normalization whose measured ``r`` exceeds ``THRESHOLD`` (2e-3, a tenth of the float16 parity budget
of 2e-2 * max|reference|: one rounding may cost at most a tenth of what the whole variant may differ) stays
float32, with the chain that produces its input: walking up from its data inputs, every producer whose output
float16 would round by more than ``THRESHOLD`` of the row peak (``max|v| * 2**-11 > THRESHOLD * peak``, the
smallest row peak of the normalization) stays float32 too (the Adds and MatMuls that build the large sum);
the walk stops at values float16 represents well enough, at graph inputs, initializers and the outputs of
other normalizations. Initializers read only by kept ops stay float32 (:mod:`mlstep.precision`).

Normalizations of the main graph are measured (If/Loop bodies are not); a LayerNorm still decomposed into
ReduceMean/Sub/Pow/... is not recognised as one (mlstep's optimizer fuses those before the conversion).

Measured once: the float32 model runs in ONNX Runtime (CPU, graph optimizations off) on the parity inputs
(:func:`mlstep.validate.parity.parity_cases` at the long sequence: batch 2, no/right/left padding, and one
left-padded step on a past of 17 for decoders) with the normalizations' inputs added as outputs; only when a
normalization is flagged does a second run read the values on its input chain. A model that cannot be measured (inputs not synthesizable, ONNX
Runtime refuses it) is converted without the rule and the reason is returned as a note.

    decision = measure(model)          # Decision(kept=[Kept(...)], note=None)
    decision.nodes                     # the nodes to keep in float32
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

THRESHOLD = 2e-3
FP16_HALF_STEP = 2.0 ** -11          # float16 rounding error relative to the value (11 significant bits)
_INLINE_BYTES = 1024                 # smaller initializers stay in the probe's protobuf
_ABSENT = "mlstep-probe-weights-passed-in-memory"   # a location never read: add_external_initializers supplies it
MAX_CHAIN_VALUES = 256               # values read by the second run (a transformer block is ~30)
_CENTRED = {"LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"}
_UNCENTRED = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization"}
NORMALIZATIONS = frozenset(_CENTRED | _UNCENTRED)


@dataclass(frozen=True)
class Kept:
    """One normalization kept in float32, with the ops of its input chain and the numbers that decided it."""

    node: ir.Node
    chain: tuple[ir.Node, ...]          # producers of its input kept in float32 (the normalization excluded)
    max_abs: float                      # max |x| of its normalized input
    peak: float                         # smallest row peak max|x - mean| (the spread it must resolve; the
                                        # report calls it the row spread)
    ratio: float                        # r above (largest over rows)

    def as_dict(self) -> dict:
        return {"op": self.node.op_type, "node": self.node.name, "ops": [n.name or n.op_type for n in self.chain],
                "max_abs_input": round(self.max_abs, 4), "min_row_spread": round(self.peak, 6),
                "fp16_error_ratio": round(self.ratio, 6), "threshold": THRESHOLD}

    def line(self) -> str:
        ops = ", ".join(sorted({n.op_type for n in self.chain}))
        return (f"{self.node.op_type} '{self.node.name}'" + (f" and its input chain ({len(self.chain)} ops: {ops})"
                                                            if self.chain else "")
                + f": input up to {self.max_abs:.4g} with a row spread down to {self.peak:.3g}, so float16's "
                  f"rounding there is {self.ratio:.3g} of the normalized peak (threshold {THRESHOLD:g})")


@dataclass
class Decision:
    kept: list[Kept] = field(default_factory=list)
    note: str | None = None             # why nothing was measured, when so

    @property
    def nodes(self) -> set[ir.Node]:
        return {n for k in self.kept for n in (k.node, *k.chain)}


def measure(model: ir.Model) -> Decision:
    """The normalizations of ``model`` (and their input chains) that must stay float32; see the module doc."""
    norms = [n for n in model.graph if n.op_type in NORMALIZATIONS and _float_output(n)]
    if not norms:
        return Decision()
    try:
        from mlstep.validate.parity import LONG_SEQUENCE, parity_cases

        every = parity_cases(model)
        # the long sequence's padding cases (and one step on a past): the rows the parity cases hold, at a
        # bounded cost (a bert-base measurement runs 3 cases, not 6; a decoder 4, not 14)
        cases = [c for c in every if c.name.startswith(f"s{LONG_SEQUENCE}/") or c.name == "past17+1/left-padded"]
        cases = cases or every
    except Exception as err:  # noqa: BLE001  (a signature we cannot feed: convert without the rule, say why)
        return Decision(note=f"float16 ranges not measured: no inputs could be synthesized ({_first_line(err)})")
    wanted = {v.name for n in norms for v in _measured_inputs(n)}
    try:
        values = _run(model, cases, wanted)
    except Exception as err:  # noqa: BLE001
        return Decision(note=f"float16 ranges not measured: ONNX Runtime could not run the float32 model "
                             f"({_first_line(err)})")
    flagged = []
    for node in norms:
        stats = _row_stats(node, values, len(cases))
        if stats is not None and stats[2] > THRESHOLD:
            flagged.append((node, *stats))
    if not flagged:
        return Decision()
    regions = {node: _region(node) for node, *_ in flagged}
    names = {v.name for region in regions.values() for v in region}
    try:
        chain_values = _run(model, cases, names) if names else {}
    except Exception as err:  # noqa: BLE001
        chain_values, note = {}, f"float16 input chains not measured ({_first_line(err)}): normalizations only"
    else:
        note = None
    kept = [Kept(node, _chain(node, peak, chain_values), max_abs, peak, ratio)
            for node, max_abs, peak, ratio in flagged]
    return Decision(kept, note)


# -- what is measured -------------------------------------------------------------------------------------
def _float_output(node: ir.Node) -> bool:
    out = node.outputs[0] if node.outputs else None
    return out is not None and out.dtype in (None, ir.DataType.FLOAT)


def _measured_inputs(node: ir.Node) -> list[ir.Value]:
    """The graph values from which the normalized input is computed."""
    if node.op_type == "EmbedLayerNormalization":
        idx = (0, 1, 8)                           # input_ids, segment_ids, position_ids (tables are constants)
    elif node.op_type.startswith("Skip"):
        idx = (0, 1, 4) if node.op_type == "SkipLayerNormalization" else (0, 1, 3)
    else:
        idx = (0,)
    return [node.inputs[i] for i in idx if i < len(node.inputs) and node.inputs[i] is not None
            and node.inputs[i].const_value is None and node.inputs[i].name]


def _array(value: ir.Value | None, values: dict[str, list[np.ndarray]], case: int) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    runs = values.get(value.name)
    return None if runs is None else runs[case]


def _normalized_input(node: ir.Node, values: dict, case: int) -> np.ndarray | None:
    ins = list(node.inputs) + [None] * (9 - len(node.inputs))
    if node.op_type == "EmbedLayerNormalization":
        ids, seg, word, pos, segt = (_array(ins[i], values, case) for i in (0, 1, 2, 3, 4))
        if ids is None or word is None or pos is None:
            return None
        positions = _array(ins[8], values, case)
        if positions is None:
            positions = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
        x = word[ids.astype(np.int64)] + pos[positions.astype(np.int64)]
        if segt is not None and seg is not None:
            x = x + segt[seg.astype(np.int64)]
        return x.astype(np.float32)
    if node.op_type.startswith("Skip"):
        parts = [_array(ins[i], values, case) for i in ((0, 1, 4) if node.op_type == "SkipLayerNormalization"
                                                           else (0, 1, 3))]
        if parts[0] is None or parts[1] is None:
            return None
        return sum(p.astype(np.float32) for p in parts if p is not None)
    x = _array(ins[0], values, case)
    if x is None:
        return None
    axis = node.attributes["axis"].value if "axis" in node.attributes else -1
    axis = axis % x.ndim
    return x.reshape(int(np.prod(x.shape[:axis])), -1).astype(np.float32)


def _row_stats(node: ir.Node, values: dict, n_cases: int) -> tuple[float, float, float] | None:
    """(max |x|, smallest row peak, largest r) over every row of every case; None when not measurable."""
    max_abs, peak, ratio, seen = 0.0, np.inf, 0.0, False
    for case in range(n_cases):
        x = _normalized_input(node, values, case)
        if x is None or x.size == 0:
            continue
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        centre = rows.mean(axis=1, keepdims=True) if node.op_type in _CENTRED else 0.0
        peaks = np.abs(rows - centre).max(axis=1)
        mags = np.abs(rows).max(axis=1)
        live = peaks > 0                          # a constant row normalizes to beta: nothing to resolve
        if not live.any():
            continue
        seen = True
        max_abs = max(max_abs, float(mags[live].max()))
        peak = min(peak, float(peaks[live].min()))
        ratio = max(ratio, float((mags[live] * FP16_HALF_STEP / peaks[live]).max()))
    return (max_abs, peak, ratio) if seen else None


# -- the input chain ----------------------------------------------------------------------------------------
def _region(node: ir.Node) -> list[ir.Value]:
    """Float values upstream of ``node`` up to graph inputs, constants and other normalizations (bounded)."""
    out: list[ir.Value] = []
    seen: set[ir.Value] = set()
    stack = list(_data_inputs(node))
    while stack and len(out) < MAX_CHAIN_VALUES:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is None or value.const_value is not None or producer.op_type in NORMALIZATIONS \
                or producer.op_type == "Constant" or not value.name:
            continue
        out.append(value)
        stack += [v for v in producer.inputs if v is not None]
    return out


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """Computed float inputs whose sum is normalized (an EmbedLayerNormalization sums constant tables: none)."""
    return [] if node.op_type == "EmbedLayerNormalization" else _measured_inputs(node)


def _chain(node: ir.Node, peak: float, values: dict) -> tuple[ir.Node, ...]:
    """Producers whose float32 output float16 would round by more than THRESHOLD * peak, connected to
    ``node`` through such producers."""
    kept: list[ir.Node] = []
    seen: set[ir.Value] = set()
    stack = list(_data_inputs(node))
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = value.producer()
        runs = values.get(value.name)
        if producer is None or runs is None or producer.op_type in NORMALIZATIONS:
            continue
        if not all(np.issubdtype(r.dtype, np.floating) for r in runs):
            continue
        biggest = max((float(np.abs(r).max()) for r in runs if r.size), default=0.0)
        if biggest * FP16_HALF_STEP <= THRESHOLD * peak:
            continue
        if producer not in kept:
            kept.append(producer)
        stack += [v for v in producer.inputs if v is not None]
    return tuple(kept)


def _run(model: ir.Model, cases, names: set[str]) -> dict[str, list[np.ndarray]]:
    """``names`` -> one array per case, from the float32 model in ONNX Runtime (CPU, no graph rewrites)."""
    import onnxruntime as ort

    from mlstep import runtime

    probe = model.clone()
    by_name = {v.name: v for v in _values(probe)}
    present = {v.name for v in probe.graph.outputs}
    inputs = {v.name for v in probe.graph.inputs}
    for name in sorted(names):
        if name in by_name and name not in present and name not in inputs:
            probe.graph.outputs.append(by_name[name])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    # Weights go to ONNX Runtime as arrays, not through a serialized copy (bert-base: 4 s of protobuf saved).
    names_, arrays = [], []
    for name, value in probe.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= _INLINE_BYTES:
            arrays.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor.numpy())))
            names_.append(name)
            value.const_value = ir.ExternalTensor(_ABSENT, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=name, base_dir="")
    if names_:
        options.add_external_initializers(names_, arrays)
    session = ort.InferenceSession(ir.to_proto(probe).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs() if o.name in names]   # the model's own outputs not asked
    result: dict[str, list[np.ndarray]] = {n: [] for n in names if n in out_names or n in inputs}
    for case in cases:
        feeds = runtime.adapt_feeds(session, case.feeds, strict=False)
        outputs = dict(zip(out_names, session.run(out_names, feeds)))
        for name in result:
            result[name].append(np.asarray(outputs[name] if name in outputs else feeds[name]))
    return result


def _values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs)
    for node in model.graph:
        values += [v for v in node.outputs if v.name]
    return values


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__
