"""The value analysis fusions ask for facts: is this value a constant, what is its shape, are two dims equal.

A fusion never reads a dim's spelling or requires a literal initializer; it asks ``facts(graph)``:

* ``constant(v)`` / ``scalar(v)``: initializers and Constants, and what folds from them and from the static
  dims of symbolic shapes. transformers 4.x (Optimum) calls sdpa without ``scale``, so the export computes it at
  run time, ``Cast(Div(1, Sqrt(Cast(Slice(Shape(Q), -1:)))))``; with Q's head size known (8) it is the number
  ``1 / sqrt(8)``, whatever the batch and sequence dims are.
* ``dims(v)``: each dim an int or a canonical symbol; ``same_dim`` / ``same_shape``: equal by the graph's own
  semantics. Dims met by elementwise broadcasting, a MatMul contraction, the non-concatenated axes of a
  Concat, and a value's recorded shape against the inferred one are unified (union-find), so separate
  exporter symbols (dynamo's ``s33`` / ``s6`` for the batch of two inputs), tf2onnx's ``unk__N``,
  onnxslim's invented names, unnamed dims and ``-1`` all meet the graph inputs' dims. Sums are spelled one
  way (``"past + sequence"`` is ``past+sequence``); ``Range(past, past + sequence)`` has ``sequence`` entries.
  A broadcast unifies two symbols on the assumption that neither is 1 at run time where the other is not: a
  graph whose addends broadcast on a size-1 symbolic dim is not one a fused op could take anyway.

Why our own (measured Nov 2026 on TorchScript BERT opset 17 and GPT-2-with-past opset 14 exports whose sdpa
scale is computed at run time, see tests/optimizer/test_values.py): onnxscript's ``fold_constants`` (with
and without ONNX shape inference), onnx_ir's ``ShapeInferencePass`` + fold and ONNX Runtime's symbolic shape
inference (``auto_merge``) + fold all leave every one of the runtime scale chains unfolded (6 of 6 Sqrt
for BERT, 11 of 11 for GPT-2 stay). ONNX shape inference invents ``unk__N`` for every Reshape fed a computed
shape, so it cannot show two such tensors have the same shape; ORT's symbolic inference names dims well but
costs ~4 s on a 2-layer model (seconds per layer on bert-base) and does not relate the mask's
``total_sequence`` to ``past_sequence + sequence``. So the pipeline keeps onnxscript's folding for plain
constant subgraphs (``passes.prepare``) and this module (on the small symbolic inference of shapes.py)
decides what they miss, in one forward pass over the graph (milliseconds per layer).

Where symbolic reasoning cannot decide, the answer is "unknown" (None), and the fusion refuses with a reason
or decides numerically with a probe (probe.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from mlstep.optimizer.fusions._base import const_array
from mlstep.optimizer.shapes import Dim, Dims, _content, _infer, _input_dims, _numeric, _spelling


# Ops whose every output element is an element of their first (data) input.
_SELECTING = frozenset({"Identity", "Reshape", "Flatten", "Unsqueeze", "Squeeze", "Transpose", "Expand", "Tile",
                        "Slice", "Gather", "GatherElements", "GatherND"})


@dataclass
class DimEq:
    """Union-find over dims: ints are their own roots; a symbol may be bound to an int or to another symbol.
    Graph inputs' dim names are preferred as roots (they are what a reader recognises)."""

    preferred: set[str] = field(default_factory=set)
    parent: dict[str, Dim] = field(default_factory=dict)
    conflicts: list[tuple[int, int]] = field(default_factory=list)

    def find(self, dim: Dim) -> Dim:
        if dim is None or isinstance(dim, (int, float)):
            return dim
        root = dim
        while isinstance(root, str) and root in self.parent:
            root = self.parent[root]
        while isinstance(dim, str) and dim in self.parent and self.parent[dim] != root:   # path compression
            self.parent[dim], dim = root, self.parent[dim]
        if isinstance(root, str) and "+" in root:   # a sum of terms each of which may have a root of its own
            from mlstep.optimizer.shapes import _dim_sum
            terms = [self.find(t) if not t.lstrip("-").isdigit() else int(t) for t in root.split("+")]
            summed = _dim_sum(terms)
            if summed is not None and summed != root:
                return self.find(summed) if summed in self.parent else summed
        return root

    def union(self, a: Dim, b: Dim) -> None:
        a, b = self.find(a), self.find(b)
        if a is None or b is None or a == b:
            return
        if isinstance(a, int) and isinstance(b, int):
            self.conflicts.append((a, b))
            return
        if isinstance(a, int) or (isinstance(b, str) and a in self.preferred and b not in self.preferred):
            a, b = b, a     # a: the symbol that gets a parent; b: the better root
        self.parent[a] = b


def merge_recorded(value: ir.Value, dims: dict, eq: DimEq) -> None:
    """A value's recorded shape (the exporter's annotation) against the inferred one: unknown inferred dims
    take the recorded ones, known ones are unified with them (``unk__N`` meets ``batch``); a dim recorded
    without a name becomes a symbol of its own, so that later semantics can still unify it."""
    if value.shape is None:
        return
    recorded = [d if isinstance(d, int) else (_spelling(d.value) or f"{value.name}:{j}")
                for j, d in enumerate(value.shape)]
    inferred = dims.get(id(value))
    if inferred is None or len(inferred) != len(recorded):
        dims[id(value)] = recorded if inferred is None else inferred
        return
    for j, (a, b) in enumerate(zip(inferred, recorded)):
        if a is None:
            inferred[j] = b
        else:
            eq.union(a, b)


class Facts:
    """What one forward pass over the graph decided. Build it with ``facts(graph)`` when a check needs it;
    it is a snapshot (a rewrite afterwards invalidates it)."""

    def __init__(self, graph: ir.Graph, until: list[ir.Value | None] | None = None,
                 excluding: ir.Node | frozenset[ir.Node] | None = None):
        self.graph = graph
        excluded = {id(excluding)} if isinstance(excluding, ir.Node) else {id(n) for n in excluding or ()}
        self._kept: list[ir.Value] = []   # values aliased by ``alias`` (kept alive: their ids stay theirs)
        self._dims: dict[int, Dims] = _input_dims(graph)
        self._vals: dict[int, list] = {}
        preferred = {d for v in self._dims.values() for d in v or [] if isinstance(d, str)}
        self.eq = DimEq(preferred)
        wanted = {id(v) for v in until or [] if v is not None and v.producer() is not None}
        for node in graph:
            if id(node) in excluded:   # its dims still flow on, but what it would imply is not evidence
                _infer(node, self._dims, self._vals, None)
                continue
            _infer(node, self._dims, self._vals, self.eq)
            for value in node.outputs:
                merge_recorded(value, self._dims, self.eq)
                wanted.discard(id(value))
            if until is not None and not wanted:
                break   # facts about a value need only what precedes it in topological order

    # --- facts ------------------------------------------------------------------------------------

    def alias(self, new: ir.Value, old: ir.Value) -> None:
        """A rewrite replaced ``old`` by ``new`` (same dims): the snapshot answers for ``new`` as for ``old``,
        so that one snapshot can serve a whole fusion pass."""
        if id(old) in self._dims:
            self._dims[id(new)] = self._dims[id(old)]
            self._kept += [old, new]

    def knows(self, value: ir.Value | None) -> bool:
        """True when the snapshot saw ``value`` (it existed, or was aliased, when the facts were built)."""
        return value is not None and (id(value) in self._dims or value.const_value is not None)

    def dims(self, value: ir.Value | None) -> Dims:
        """Each dim an int or a canonical symbol (None where unknown); None when even the rank is unknown."""
        if value is None:
            return None
        got = self._dims.get(id(value))
        if got is None and value.const_value is not None:
            return list(value.const_value.shape)
        return None if got is None else [self.eq.find(d) for d in got]

    def same_dim(self, a: Dim, b: Dim) -> bool:
        a, b = self.eq.find(a), self.eq.find(b)
        return a is not None and a == b

    def same_shape(self, a: ir.Value, b: ir.Value) -> bool:
        da, db = self.dims(a), self.dims(b)
        return da is not None and db is not None and len(da) == len(db) and \
            all(self.same_dim(x, y) for x, y in zip(da, db))

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The value's content when it is the same for every input: a constant, or what folds from
        constants and static dims (small 1-D tensors: shapes, scales)."""
        if value is None:
            return None
        arr = const_array(value)
        if arr is not None:
            return arr
        content = _content(value, self._vals)
        if not _numeric(content):
            return None
        return np.array(content, dtype=np.float64 if any(isinstance(c, float) for c in content) else np.int64)

    def scalar(self, value: ir.Value | None) -> float | None:
        arr = self.constant(value)
        if arr is None or arr.size != 1:
            return None
        return float(arr.reshape(-1)[0])

    def uniform(self, value: ir.Value | None) -> int | float | None:
        """The number ``c`` when every element of ``value`` equals ``c`` for every input, else None.

        Decided from a constant whose elements are all equal (an initializer, a Constant, ``ConstantOfShape``,
        or what ``constant`` folds), carried through ops that only move, repeat or select elements of their
        data input: Identity, Reshape, Flatten, Unsqueeze, Squeeze, Transpose, Expand, Tile, Slice, Gather,
        GatherElements, GatherND, and Cast (which converts ``c``); ``Where`` of two equal uniform branches.
        The index inputs of the gathers may depend on the model's inputs (RoBERTa picks its all-zeros
        token-type buffer at its per-token positions): whatever they select is ``c``. transformers reads
        token types from such a buffer (sliced to the sequence, expanded to [batch, sequence]) when the
        model is called without them."""
        seen: set[int] = set()
        while value is not None and id(value) not in seen:
            seen.add(id(value))
            arr = self.constant(value)
            if arr is not None:
                flat = np.asarray(arr).reshape(-1)
                return flat[0].item() if flat.size and bool(np.all(flat == flat[0])) else None
            node = value.producer()
            if node is None:
                return None
            if node.op_type == "ConstantOfShape" and node.domain == "":
                attr = node.attributes.get("value")
                return 0 if attr is None else np.asarray(attr.as_tensor().numpy()).reshape(-1)[0].item()
            if node.op_type == "Cast" and node.domain == "":
                c = self.uniform(node.inputs[0])
                to = ir.DataType(node.attributes.get_int("to"))
                return None if c is None else np.asarray(c).astype(to.numpy()).item()
            if node.op_type == "Where" and node.domain == "" and len(node.inputs) == 3:
                a, b = self.uniform(node.inputs[1]), self.uniform(node.inputs[2])
                return a if a is not None and a == b else None
            if node.op_type not in _SELECTING or node.domain != "" or not node.inputs:
                return None
            value = node.inputs[0]
        return None


def facts(graph: ir.Graph | ir.Function, until: list[ir.Value | None] | None = None,
          excluding: ir.Node | frozenset[ir.Node] | None = None) -> Facts:
    """The facts of ``graph``. With ``until``, the forward pass stops once those values are reached (enough for
    constants: they depend only on ancestors). With ``excluding``, that node's own semantics are not taken as
    evidence: a fusion replacing an elementwise op must not prove its operands equal by that very op (a
    size-1 dim would broadcast there), but every other op in the graph counts, before or after it (GPT-2's
    mask broadcast against the scores shows ``total_sequence`` = ``sequence`` after the embedding sum). A set of
    nodes may be excluded at once (one snapshot for every candidate of a fusion pass)."""
    return Facts(graph if isinstance(graph, ir.Graph) else graph.graph, until, excluding)
