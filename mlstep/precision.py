"""fp16 conversion on onnx_ir: weights and compute in float16, graph signature kept in float32.

``to_fp16(model)`` returns a new model (``model.clone()``: nodes and values are new, tensors shared until
converted) in which every float32 value is float16 except where a rule below keeps it float32. The input
model is never modified, so the fp32 variant can be saved from the same object.

Cases handled:
- float32 initializers -> float16 tensors (finite values clipped to +-65504, non-zero values kept non-zero
  by clipping magnitudes below 2**-24 up to it so epsilons survive; +-inf and NaN kept: they carry meaning.
  A fully masked attention row filled with -inf gives NaN after Softmax, which exports guard with
  ``IsNaN -> 0``; clipping -inf to -65504 would turn that row into a uniform average instead. A *finite*
  float32 fill such as ``finfo(float32).min`` becomes -65504, still the most negative finite value).
  An initializer read only by blocked ops stays float32.
- ``Constant`` nodes (``value`` tensor, ``value_float``, ``value_floats``), ``ConstantOfShape`` (``value``,
  absent value = float 0), ``Cast``/``EyeLike``/``Random*``/``Bernoulli`` with ``to``/``dtype`` = FLOAT become
  FLOAT16. A ``Cast``/``Constant`` whose float32 result only feeds blocked ops stays float32.
- com.microsoft fused ops (Attention, SkipLayerNormalization, EmbedLayerNormalization, LayerNormalization,
  BiasGelu, FastGelu, Gelu, ...) run in float16 like any other op: their weight inputs are initializers and
  are converted by the rule above. Statistics outputs that the schemas fix to float32 (``Mean`` and
  ``InvStdDev`` of the LayerNormalization family) stay float32.
- Ops in ``op_block_list`` run in float32: float16 inputs get a ``Cast`` to float32 in front, their float32
  results get a ``Cast`` to float16 for float16 consumers. Casts are shared per value, placed right after the
  value's producer, and a value flowing from one blocked op to another is never cast at all.
- ``keep_io_types=True``: float32 graph inputs stay float32 and are cast once to float16; float16 results
  that are graph outputs are cast back to float32 under the original output name (the float16 value is
  renamed ``<name>_fp16``). ``keep_io_types=False``: float32 inputs and outputs become float16.
- Nodes measured to need float32 (:mod:`mlstep.precision_ranges`: a normalization whose input sits on an
  offset float16 cannot resolve, and the chain producing that input) are treated like blocked ops; the
  model's metadata ``mlstep.fp16.kept_float32`` says which and why, with the numbers.
- Integer, bool and double tensors are untouched.
- Cleanup: a ``Cast`` whose input already has the target type (``Cast(x16, to=FLOAT16)`` after conversion, or
  ``Cast(x32, to=FLOAT)``) is removed. Rounding pairs such as ``Cast(Cast(x32, FLOAT16), FLOAT)`` written by
  the exporter are not removed: they are not no-ops.
- Subgraphs (If/Loop/Scan bodies) are converted with the same rules; their formal inputs and outputs follow
  the float16 compute (a blocked op's result that is a subgraph output is cast to float16). Model-local
  functions are not converted.
- Values without type information get a dtype inferred from their producer (first typed input for most
  ops) only to decide where casts go; their (absent) type annotation is left for ONNX Runtime to infer.
"""
from __future__ import annotations

import json
from typing import Iterable

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT
FLOAT16 = ir.DataType.FLOAT16
FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive subnormal float16
KEPT_KEY = "mlstep.fp16.kept_float32"  # metadata: the measured float32 islands (json)

# Ops that stay float32: no float16 in the ONNX schema (Range, the ai.onnx.ml classic-ML ops), or a float
# input the schema fixes to float32 (Resize/Upsample scales), or index-exact results that fp16 would break
# (NonMaxSuppression, RoiAlign, TopK ties). None of the com.microsoft fused ops: their fp16 kernels
# accumulate in float32 (measured parity in tests/test_precision.py). Softmax is not blocked: on the tiny
# BERT exports blocking it did not change the fp16 max difference measurably.
DEFAULT_BLOCK_LIST: frozenset[str] = frozenset({
    "Range", "Resize", "Upsample", "NonMaxSuppression", "RoiAlign", "TopK", "RandomUniformLike",
    "ArrayFeatureExtractor", "Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "FeatureVectorizer",
    "Imputer", "LabelEncoder", "LinearClassifier", "LinearRegressor", "Normalizer", "OneHotEncoder",
    "SVMClassifier", "SVMRegressor", "Scaler", "TreeEnsembleClassifier", "TreeEnsembleRegressor", "ZipMap",
})

# Outputs whose type the schema fixes to float32 (stash type), by (domain, op_type) -> output indices.
_FP32_OUTPUTS: dict[tuple[str, str], frozenset[int]] = {
    ("", "LayerNormalization"): frozenset({1, 2}),
    ("com.microsoft", "LayerNormalization"): frozenset({1, 2}),
    ("com.microsoft", "SimplifiedLayerNormalization"): frozenset({1}),
    ("com.microsoft", "SkipLayerNormalization"): frozenset({1, 2}),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): frozenset({1, 2}),
}
_DTYPE_ATTR_OPS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                   "RandomNormalLike": "dtype", "Bernoulli": "dtype"}
_BOOL_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN",
             "IsInf"}
_INT64_OPS = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}


def to_fp16(model: ir.Model, keep_io_types: bool = True,
            op_block_list: Iterable[str] = DEFAULT_BLOCK_LIST, measure_ranges: bool = True) -> ir.Model:
    """A float16 copy of ``model`` (see the module docstring for the cases handled).

    ``measure_ranges``: run the float32 model once on parity inputs and keep in float32 the normalizations
    whose input float16 cannot represent to the precision they need, with their input chains
    (:mod:`mlstep.precision_ranges`); what was kept, with the numbers, is recorded in the model's metadata
    (:func:`kept_float32` reads it back).
    """
    from mlstep import precision_ranges

    out = model.clone()
    decision = precision_ranges.measure(out) if measure_ranges else precision_ranges.Decision()
    _Converter(out, keep_io_types, frozenset(op_block_list), frozenset(decision.nodes)).run()
    if decision.kept or decision.note:
        out.metadata_props[KEPT_KEY] = json.dumps({"kept_float32": [k.as_dict() for k in decision.kept],
                                                   "lines": [k.line() for k in decision.kept],
                                                   "note": decision.note})
    return out


def kept_float32(model: ir.Model) -> dict:
    """What :func:`to_fp16` kept in float32 by measurement: ``{"kept_float32": [...], "lines": [...],
    "note": str | None}`` (empty lists when nothing was kept)."""
    return read_kept(model.metadata_props.get(KEPT_KEY))


def read_kept(text: str | None) -> dict:
    """The ``KEPT_KEY`` metadata value (json, or None when nothing was kept) as :func:`kept_float32` returns it."""
    return json.loads(text) if text else {"kept_float32": [], "lines": [], "note": None}


def fp16_array(array: np.ndarray) -> np.ndarray:
    """float32 -> float16: finite values clipped to the float16 range, non-zero values stay non-zero,
    +-inf and NaN kept as they are."""
    a = np.asarray(array, dtype=np.float32)
    mag = np.abs(a)
    small = (mag > 0) & (mag < FP16_TINY)
    a = np.where(small, np.copysign(FP16_TINY, a), a)
    a = np.where(np.isfinite(a), np.clip(a, -FP16_MAX, FP16_MAX), a)
    return a.astype(np.float16)


class _Converter:
    def __init__(self, model: ir.Model, keep_io_types: bool, blocked: frozenset[str],
                 kept: frozenset[ir.Node] = frozenset()):
        self.model = model
        self.keep_io = keep_io_types
        self.blocked = blocked
        self.kept = kept
        self.graphs = [model.graph, *model.graph.subgraphs()]
        self.inferred: dict[ir.Value, ir.DataType] = {}
        self.names = {v.name for g in self.graphs for v in _graph_values(g) if v.name}
        self.casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self.wide = _beyond_fp16_nodes(self.graphs)

    # -- facts ---------------------------------------------------------------------------------------
    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        return value.dtype if value.dtype is not None else self.inferred.get(value)

    def is_blocked(self, node: ir.Node) -> bool:
        return node.op_type in self.blocked or node in self.wide or node in self.kept

    def stays_fp32(self, value: ir.Value) -> bool:
        """A float32 value that keeps its type (before conversion)."""
        if value.is_graph_input() and value.graph is self.model.graph:
            return self.keep_io
        node = value.producer()
        if node is None:  # initializer (or subgraph formal input)
            return value.is_initializer() and bool(value.uses()) and all(
                self.is_blocked(n) for n, _ in value.uses())
        if self.is_blocked(node):
            return True
        if value.index() in _FP32_OUTPUTS.get((node.domain or "", node.op_type), ()):
            return True
        if node.op_type in ("Cast", "Constant") and (node.domain or "") == "":
            uses = value.uses()
            feeds_fp16 = any(not self.is_blocked(n) for n, _ in uses)
            out_fp16 = value.is_graph_output() and not self.keep_io
            return bool(uses or value.is_graph_output()) and not feeds_fp16 and not out_fp16
        return False

    # -- passes --------------------------------------------------------------------------------------
    def run(self) -> None:
        for graph in self.graphs:
            for node in graph:
                self._infer(node)
        all_values = [v for g in self.graphs for v in _graph_values(g)]
        fp32_floats = [v for v in all_values if self.dtype(v) == FLOAT]
        keep = {v for v in fp32_floats if self.stays_fp32(v)}
        # Uses, graph-output roles and producers are read before anything changes.
        plan = [(v, list(v.uses()), v.is_graph_output()) for v in fp32_floats]
        for value in fp32_floats:
            if value not in keep:
                self._retype(value)
        for graph in self.graphs:
            for node in list(graph):
                self._convert_attributes(node, keep)
        for value, uses, is_output in plan:
            is_fp32 = value in keep
            for node, index in uses:
                wants_fp32 = self.is_blocked(node)
                if wants_fp32 != is_fp32:
                    node.replace_input_with(index, self._cast(value, FLOAT if wants_fp32 else FLOAT16))
            if is_output:  # subgraph outputs follow the float16 compute, the model's follow keep_io_types
                want = FLOAT if self.keep_io and value.graph is self.model.graph else FLOAT16
                if (FLOAT if is_fp32 else FLOAT16) != want:
                    self._cast_output(value, want)
        for graph in self.graphs:
            _remove_noop_casts(graph, self.dtype)

    def _infer(self, node: ir.Node) -> None:
        ins = [self.dtype(v) for v in node.inputs]
        for i, value in enumerate(node.outputs):
            if value.dtype is None:
                dt = _infer_output_dtype(node, i, ins)
                if dt is not None:
                    self.inferred[value] = dt

    def _retype(self, value: ir.Value) -> None:
        if value.const_value is not None and value.is_initializer():
            value.const_value = ir.tensor(fp16_array(value.const_value.numpy()), name=value.name)
        if value.dtype is not None:
            value.type = ir.TensorType(FLOAT16)  # a new type: clone() shares type objects with the input
        else:
            self.inferred[value] = FLOAT16

    def _convert_attributes(self, node: ir.Node, keep: set[ir.Value]) -> None:
        if (node.domain or "") != "" or not node.outputs:
            return
        out = node.outputs[0]
        if out in keep or self.dtype(out) != FLOAT16:
            return
        attrs = node.attributes
        if node.op_type == "Constant":
            if "value" in attrs:
                attrs["value"] = ir.AttrTensor("value", ir.tensor(fp16_array(attrs["value"].value.numpy())))
            for name in ("value_float", "value_floats"):
                if name in attrs:
                    data = fp16_array(np.asarray(attrs.pop(name).value, dtype=np.float32))
                    attrs["value"] = ir.AttrTensor("value", ir.tensor(data))
        elif node.op_type == "ConstantOfShape":
            fill = attrs["value"].value.numpy() if "value" in attrs else np.zeros(1, np.float32)
            attrs["value"] = ir.AttrTensor("value", ir.tensor(fp16_array(fill)))
        elif node.op_type in _DTYPE_ATTR_OPS:
            name = _DTYPE_ATTR_OPS[node.op_type]
            # Without the attribute, RandomNormal/RandomUniform default to FLOAT; the others follow an input.
            default = FLOAT if node.op_type in ("RandomNormal", "RandomUniform") else None
            current = attrs[name].value if name in attrs else default
            if current is not None and ir.DataType(current) == FLOAT:
                attrs[name] = ir.AttrInt64(name, int(FLOAT16))

    def _cast(self, value: ir.Value, to: ir.DataType) -> ir.Value:
        """One shared Cast of ``value`` to ``to``, placed right after its producer."""
        key = (value, to)
        if key not in self.casts:
            suffix = "fp32" if to == FLOAT else "fp16"
            out = ir.Value(name=self._unique(f"{value.name}_{suffix}"), type=ir.TensorType(to),
                           shape=value.shape)
            self._insert_after(value, ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(to))], outputs=[out]))
            self.casts[key] = out
        return self.casts[key]

    def _cast_output(self, value: ir.Value, to: ir.DataType) -> None:
        graph = value.graph
        name = value.name
        value.name = self._unique(f"{name}_fp16" if to == FLOAT else f"{name}_fp32")
        out = ir.Value(name=name, type=ir.TensorType(to), shape=value.shape)
        self._insert_after(value, ir.Node("", "Cast", [value], [ir.AttrInt64("to", int(to))], outputs=[out]))
        for i, v in enumerate(graph.outputs):
            if v is value:
                graph.outputs[i] = out

    def _insert_after(self, value: ir.Value, node: ir.Node) -> None:
        producer = value.producer()
        if producer is not None:
            producer.graph.insert_after(producer, node)
        else:
            graph = value.graph or self.model.graph
            if len(graph):
                graph.insert_before(graph.node(0), node)
            else:
                graph.append(node)

    def _unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate


# Ops through which a value beyond the float16 range (a mask fill such as finfo(float32).min) is carried
# unchanged in magnitude to the Softmax that normalizes it.
_CARRIERS = frozenset({"Where", "Add", "Sub", "Mul", "Neg", "Min", "Max", "Expand", "Reshape", "Unsqueeze",
                       "Squeeze", "Concat", "Slice", "Transpose", "Identity", "Cast", "Tile", "Gather"})
_NORMALIZERS = frozenset({"Softmax", "LogSoftmax"})


def _beyond_fp16_nodes(graphs: list[ir.Graph]) -> set[ir.Node]:
    """Nodes that must compute in float32 to keep the source's semantics: those that carry a finite float
    constant beyond +-65504 (a mask fill such as ``finfo(float32).min``) to a Softmax, and that Softmax.

    In float32, ``scores + finfo.min`` is the same number for every key of a fully masked row, so Softmax
    gives a uniform row; in float16 the fill clips to -65504 and ``-65504 + score`` rounds to -65504, -65472
    or -inf depending on the score: a different, non-uniform row. Constants are found among initializers
    and ``Constant`` nodes; the walk follows ``_CARRIERS`` and stops at any other op (a fill that never
    reaches a Softmax is clipped as usual).
    """
    frontier: list[ir.Value] = []
    for graph in graphs:
        candidates = list(graph.initializers.values())
        candidates += [n.outputs[0] for n in graph if n.op_type == "Constant" and n.outputs]
        for value in candidates:
            data = _constant_array(value)
            if data is not None and data.dtype == np.float32 and data.size:
                finite = data[np.isfinite(data)]
                if finite.size and float(np.abs(finite).max()) > FP16_MAX:
                    frontier.append(value)
    chain: set[ir.Node] = set()
    reaches: set[ir.Node] = set()
    seen: set[ir.Value] = set()
    parents: dict[ir.Node, set[ir.Node]] = {}
    stack = [(v, None) for v in frontier]
    while stack:
        value, via = stack.pop()
        for node, _ in value.uses():
            if via is not None:
                parents.setdefault(node, set()).add(via)
            if node.op_type in _NORMALIZERS:
                reaches.add(node)
            elif node.op_type in _CARRIERS and node not in chain:
                chain.add(node)
                stack += [(out, node) for out in node.outputs if out not in seen]
                seen.update(node.outputs)
    # Keep only the carriers on a path to a Softmax (and the Softmax itself).
    keep: set[ir.Node] = set(reaches)
    todo = list(reaches)
    while todo:
        node = todo.pop()
        for parent in parents.get(node, ()):
            if parent in chain and parent not in keep:
                keep.add(parent)
                todo.append(parent)
    return keep


def _constant_array(value: ir.Value) -> np.ndarray | None:
    if value.const_value is not None and value.is_initializer():
        try:
            return value.const_value.numpy()
        except Exception:  # external data that cannot be read here: not a mask fill
            return None
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].value.numpy()
    if node is not None and node.op_type == "Constant" and "value_float" in node.attributes:
        return np.asarray([node.attributes["value_float"].value], np.float32)
    return None


def _graph_values(graph: ir.Graph) -> list[ir.Value]:
    values: dict[ir.Value, None] = dict.fromkeys(graph.inputs)
    values.update(dict.fromkeys(graph.initializers.values()))
    for node in graph:
        values.update(dict.fromkeys(node.outputs))
    return list(values)


def _infer_output_dtype(node: ir.Node, index: int, ins: list[ir.DataType | None]) -> ir.DataType | None:
    op, attrs = node.op_type, node.attributes
    if (node.domain or "", op) in _FP32_OUTPUTS and index in _FP32_OUTPUTS[(node.domain or "", op)]:
        return FLOAT
    if op in _DTYPE_ATTR_OPS and _DTYPE_ATTR_OPS[op] in attrs:
        return ir.DataType(attrs[_DTYPE_ATTR_OPS[op]].value)
    if op == "Constant":
        if "value" in attrs:
            return attrs["value"].value.dtype
        if "value_float" in attrs or "value_floats" in attrs:
            return FLOAT
        return ir.DataType.INT64 if ("value_int" in attrs or "value_ints" in attrs) else None
    if op == "ConstantOfShape":
        return attrs["value"].value.dtype if "value" in attrs else FLOAT
    if op in _INT64_OPS or (op == "TopK" and index == 1):
        return ir.DataType.INT64
    if op in _BOOL_OPS or (op == "Dropout" and index == 1):
        return ir.DataType.BOOL
    if op == "EmbedLayerNormalization":
        return ir.DataType.INT32 if index == 1 else (ins[2] if len(ins) > 2 else None)
    if op in ("Where", "CastLike"):
        return ins[1] if len(ins) > 1 else None
    if op == "OneHot":
        return ins[2] if len(ins) > 2 else None
    if op.startswith("Random"):
        return FLOAT if not op.endswith("Like") else (ins[0] if ins else None)
    return next((d for d in ins if d is not None), None)


def _remove_noop_casts(graph: ir.Graph, dtype_of) -> None:
    for node in list(graph):
        if node.op_type != "Cast" or (node.domain or "") != "" or "to" not in node.attributes:
            continue
        src, dst = node.inputs[0], node.outputs[0]
        if src is None or dtype_of(src) != ir.DataType(node.attributes["to"].value):
            continue
        if dst.is_graph_output():
            continue
        dst.replace_all_uses_with(src)
        graph.remove(node, safe=True)
