"""ONNX's own fused operators, expanded to their definitions so that the fusions see one form, and put back
where no fusion took them.

Newer opsets name some transformer blocks as single standard ops, and torch's dynamo exporter emits them:

* ``Gelu`` (opset 20): ``approximate="none"`` is ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (then ``gelu.py`` makes
  it ``Gelu``/``BiasGelu``); ``"tanh"`` is ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))``
  (``fast_gelu.py``: ``FastGelu`` with its bias).
* ``Attention`` (opset 23) on 4-D ``Q, K, V`` ``[B, N, S, d]`` with an optional ``attn_mask``:
  ``softmax(Q K^T * scale + bias) V`` with ``bias = Where(mask, 0, -inf)`` for a boolean mask or the mask
  itself when it is a float, and the rows that see no key written as zeros (ONNX Runtime's kernel gives 0
  there: the expansion keeps sdpa's ``Where(IsNaN(p), 0, p)`` guard). That is the form of torch's opset-18
  sdpa exports, which ``attention.py`` / ``causal_attention.py`` already take (the mask probed numerically,
  the past concatenated outside the op as dynamo writes it).

An op is expanded only where the expansion is its exact definition: Attention with 4-D Q/K/V of one head count
(the value analysis says so), no past inputs, no ``softcap``, ``is_causal=0``, only its first output used and a
scale that is known (the attribute, or ``1/sqrt(d)`` with d a known dim); Gelu with a known ``approximate``.
Any other is left as it is, with its reason (coverage says it). After the fusions, an expansion no fusion took
is put back as the original op (``restore``): the standard kernel is faster than its decomposition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mlstep.optimizer.fusions._base import FusionLog

STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass
class Original:
    """A standard op taken out of the graph (not a node: a detached node would still count as its inputs' user)."""
    op_type: str
    domain: str
    version: int | None
    name: str | None
    inputs: tuple[ir.Value | None, ...]
    attributes: dict

    def node(self) -> ir.Node:
        return ir.node(self.op_type, list(self.inputs), attributes=dict(self.attributes), domain=self.domain,
                       name=self.name, version=self.version)


@dataclass
class Expansion:
    original: Original         # the standard op, out of the graph while expanded
    anchor: ir.Node            # the expansion's Erf / Tanh / Softmax: alive after the fusions = nobody took it
    output: ir.Value           # the expansion's result (what the original's output was)


def is_standard(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in STANDARD_DOMAINS


def expand(model: ir.Model) -> tuple[list[Expansion], list[FusionLog]]:
    """Expand every standard Gelu and Attention of the main graph that can be (see the module docstring).
    Returns the expansions (for ``restore``) and, per kind with an op left as it is, a log of the reasons."""
    from mlstep.optimizer.values import facts

    graph = model.graph
    known = None
    done: list[Expansion] = []
    refused = {"onnx_attention": [], "onnx_gelu": []}
    for node in list(graph):
        if is_standard(node, "Gelu"):
            reason = _gelu_reason(node)
            if reason:
                refused["onnx_gelu"].append(f"{node.name or 'Gelu'}: {reason}")
            else:
                done.append(_expand_gelu(graph, node))
        elif is_standard(node, "Attention"):
            known = known or facts(graph)
            reason = _attention_reason(node, known)
            if reason:
                refused["onnx_attention"].append(f"{node.name or 'Attention'}: ONNX Attention kept as it is: {reason}")
            else:
                done.append(_expand_attention(graph, node, known))
    logs = [FusionLog(name, refused=lines) for name, lines in refused.items() if lines]
    return done, logs


def restore(model: ir.Model, expansions: list[Expansion]) -> int:
    """Put back the original op of every expansion whose anchor is still in the graph (no fusion took it); the
    expansion's nodes die with the next unused-node clean-up. Returns how many were put back."""
    graph = model.graph
    alive = {id(n) for n in graph}
    count = 0
    for exp in expansions:
        if id(exp.anchor) not in alive or any(v is not None and v.producer() is not None and id(v.producer()) not in
                                              alive for v in exp.original.inputs):
            continue
        again = exp.original.node()
        producer = exp.output.producer()
        graph.insert_before(producer, again)
        result = again.outputs[0]
        result.dtype, result.shape = exp.output.dtype, exp.output.shape
        name, exp.output.name = exp.output.name, f"{exp.output.name}_expanded"
        result.name = name
        _replace(graph, exp.output, result)
        count += 1
    return count


# ------------------------------------------------------------------------------------------------ Gelu

def _gelu_reason(node: ir.Node) -> str | None:
    if node.attributes.get_string("approximate", "none") not in ("none", "tanh"):
        return f"approximate={node.attributes.get_string('approximate')!r} is not a GELU form ONNX defines"
    if node.inputs[0] is None or _gelu_type(node) is None:
        return "input type unknown or not float"
    return None


def _expand_gelu(graph: ir.Graph, node: ir.Node) -> Expansion:
    x = node.inputs[0]
    dtype = _gelu_type(node)
    c = lambda value, name: _constant(graph, node, name, value, dtype)  # noqa: E731
    nodes = []

    def add(op_type, *inputs, **attrs):
        made = ir.node(op_type, list(inputs), attributes=attrs or None,
                       name=f"{node.name or 'gelu'}/{op_type}_{len(nodes)}")
        made.outputs[0].dtype, made.outputs[0].shape = dtype, x.shape
        nodes.append(made)
        return made

    if node.attributes.get_string("approximate", "none") == "tanh":
        cube = add("Mul", x, add("Mul", x, x).outputs[0])
        inner = add("Add", x, add("Mul", cube.outputs[0], c(0.044715, "coeff")).outputs[0])
        anchor = add("Tanh", add("Mul", inner.outputs[0], c(math.sqrt(2.0 / math.pi), "scale")).outputs[0])
    else:
        anchor = add("Erf", add("Div", x, c(math.sqrt(2.0), "sqrt2")).outputs[0])
    one_plus = add("Add", anchor.outputs[0], c(1.0, "one"))
    out = add("Mul", add("Mul", x, c(0.5, "half")).outputs[0], one_plus.outputs[0])
    return _swap(graph, node, nodes, anchor, out.outputs[0])


def _gelu_type(node: ir.Node) -> ir.DataType | None:
    return _float_type(node.inputs[0]) or _float_type(node.outputs[0])     # Gelu keeps its input's type


# ------------------------------------------------------------------------------------------- Attention

def _attention_reason(node: ir.Node, known) -> str | None:
    inputs = list(node.inputs) + [None] * (7 - len(node.inputs))
    q, k, v, mask = inputs[:4]
    if any(x is not None for x in inputs[4:]):
        return "past_key/past_value or nonpad_kv_seqlen inputs (not expanded)"
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        return "its present or qk outputs are used (not expanded)"
    if node.attributes.get_int("is_causal", 0):
        return "is_causal=1 (not expanded)"
    if node.attributes.get_float("softcap", 0.0):
        return "softcap is set (no fused op takes it)"
    if _float_type(q) is None or _float_type(k) != _float_type(q) or _float_type(v) != _float_type(q):
        return "Q/K/V types unknown or not one float type"
    dims = [known.dims(x) for x in (q, k, v)]
    if any(d is None or len(d) != 4 for d in dims):
        return "Q/K/V are not known to be 4-D [batch, heads, sequence, head size]"
    if not (known.same_dim(dims[0][1], dims[1][1]) and known.same_dim(dims[1][1], dims[2][1])):
        return "Q, K and V are not known to have one head count (grouped-query attention is not expanded)"
    if mask is not None and mask.dtype != ir.DataType.BOOL and mask.dtype != _float_type(q):
        return f"attn_mask of type {mask.dtype} (expected bool or the scores' float type)"
    if _scale(node, dims[0]) is None:
        return "no scale attribute and the head size is not a known number"
    return None


def _scale(node: ir.Node, q_dims) -> float | None:
    attr = node.attributes.get("scale")
    if attr is not None:
        return float(attr.as_float())
    head = q_dims[3]
    return 1.0 / math.sqrt(head) if isinstance(head, int) and head > 0 else None


def _expand_attention(graph: ir.Graph, node: ir.Node, known) -> Expansion:
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    dtype = _float_type(q)
    c = lambda value, name: _constant(graph, node, name, value, dtype)  # noqa: E731
    nodes = []

    def add(op_type, *inputs, **attrs):
        made = ir.node(op_type, list(inputs), attributes=attrs or None,
                       name=f"{node.name or 'attention'}/{op_type}_{len(nodes)}")
        made.outputs[0].dtype = dtype
        nodes.append(made)
        return made.outputs[0]

    scores = add("MatMul", q, add("Transpose", k, perm=[0, 1, 3, 2]))
    scores = add("Mul", scores, c(_scale(node, known.dims(q)), "scale"))
    if mask is not None:
        bias = add("Where", mask, c(0.0, "keep"), c(-math.inf, "block")) if mask.dtype == ir.DataType.BOOL else mask
        scores = add("Add", scores, bias)
    probs = add("Softmax", scores, axis=-1)
    anchor = nodes[-1]
    nan = add("IsNaN", probs)
    nan.dtype = ir.DataType.BOOL
    guarded = add("Where", nan, c(0.0, "zero"), probs)
    out = add("MatMul", guarded, v)
    out.shape = node.outputs[0].shape
    return _swap(graph, node, nodes, anchor, out)


# ------------------------------------------------------------------------------------------------ helpers

def _swap(graph: ir.Graph, node: ir.Node, nodes: list[ir.Node], anchor: ir.Node, out: ir.Value) -> Expansion:
    """Insert the expansion where ``node`` was and take it out (kept, with its inputs, for ``restore``)."""
    graph.insert_before(node, nodes)
    original = node.outputs[0]
    name, original.name = original.name, f"{original.name}_standard"
    out.name = name
    _replace(graph, original, out)
    keep = Original(node.op_type, node.domain, node.version, node.name, tuple(node.inputs),
                    {name: attr for name, attr in node.attributes.items()})
    graph.remove(node, safe=True)
    return Expansion(keep, anchor, out)


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """``new`` everywhere ``old`` was read, the graph's outputs included (with ``old``'s declared type)."""
    for i, output in enumerate(graph.outputs):
        if output is old:
            new.dtype, new.shape = old.dtype or new.dtype, old.shape or new.shape
            graph.outputs[i] = new
    ir.convenience.replace_all_uses_with(old, new)


def _float_type(value: ir.Value | None) -> ir.DataType | None:
    """The value's float element type (declared or inferred from its producers), else None."""
    from mlstep.optimizer.passes import element_type

    dtype = element_type(value)
    return dtype if dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16,
                              ir.DataType.DOUBLE) else None


def _constant(graph: ir.Graph, node: ir.Node, name: str, value: float, dtype: ir.DataType) -> ir.Value:
    """A scalar initializer of ``dtype`` (one per value and type, shared by every expansion)."""
    key = f"mlstep_{name}_{dtype.name.lower()}"
    if key in graph.initializers:
        return graph.initializers[key]
    array = np.array(value, dtype=dtype.numpy())
    init = ir.Value(name=key, const_value=ir.tensor(array, name=key))
    init.dtype, init.shape = dtype, ir.Shape([])
    graph.register_initializer(init)
    return init
