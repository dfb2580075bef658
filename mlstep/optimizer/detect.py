"""Detect the model family, hidden size and number of heads from the graph itself.

Cases handled: hidden size from the square projection weights (BERT's Q/K/V/O, GPT-2's c_proj), else the
LayerNorm scale length; head size from the reshape that splits heads (a constant shape or a Concat of
pieces ending in ``[num_heads, head_size]``); model type from the producer (tf2onnx: ``bert_keras`` when
the graph is a Keras functional model's, see ``_keras_scoped``, else ``bert_tf``) and weight names
(GPT-2's ``c_attn``). An explicit option that contradicts what the graph shows is overruled by the graph (the
fused ops must compute what the graph computes), never silently: ``Detected.notes`` says what was used.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import onnx_ir as ir

from mlstep.errors import UsageError
from mlstep.optimizer.fusions._base import shape_tail
from mlstep.optimizer.options import OptimizeOptions


@dataclass(frozen=True)
class Detected:
    model_type: str
    num_heads: int
    hidden_size: int
    notes: tuple[str, ...] = ()     # where the graph overruled a given option (said in the report and --verbose)


def detect(model: ir.Model, options: OptimizeOptions) -> Detected:
    hidden = _hidden_size(model)
    heads = _num_heads(model, hidden)
    notes = []
    if options.hidden_size:
        if hidden and options.hidden_size != hidden:
            notes.append(f"hidden_size {options.hidden_size} contradicts the graph: used its hidden size {hidden}")
        else:
            hidden = options.hidden_size
    if options.num_heads:
        if heads and options.num_heads != heads:
            notes.append(f"num_heads {options.num_heads} contradicts the graph: used its {heads} heads")
        elif hidden and hidden % options.num_heads:
            raise UsageError(f"num_heads {options.num_heads} does not divide hidden_size {hidden}")
        else:
            heads = options.num_heads
    model_type = options.model_type if options.model_type != "auto" else _model_type(model)
    return Detected(model_type, heads, hidden, tuple(notes))


def _model_type(model: ir.Model) -> str:
    producer = (model.producer_name or "").lower()
    names = " ".join(model.graph.initializers) + " " + " ".join(n.name or "" for n in model.graph)
    if "tf2onnx" in producer or "keras" in producer:
        keras = "keras" in producer or "keras" in names.lower() or _keras_scoped(model, names)
        return "bert_keras" if keras else "bert_tf"
    if any(v.name.startswith("past") for v in model.graph.inputs) or "c_attn" in names or ".h.0." in names:
        return "gpt2"
    return "bert"


def _keras_scoped(model: ir.Model, names: str) -> bool:
    """tf2onnx ``from_keras``: graph outputs are named after Keras layers (``_1``, ``_2`` for a layer's further
    outputs), and those layers appear as scopes under the functional model's name
    (``model/tf_bert_model/bert/...``); ``from_function`` outputs are the function's own names
    (``last_hidden_state``), never a scope. A label only: both layouts fuse with the same rules."""
    outputs = [v.name for v in model.graph.outputs if v.name and ":" not in v.name]
    scoped = lambda name: re.search(rf"(^|\s)[^/\s]+/{re.escape(name)}/", names) is not None  # noqa: E731
    return bool(outputs) and all(scoped(name) or scoped(re.sub(r"_\d+$", "", name)) for name in outputs)


def _hidden_size(model: ir.Model) -> int:
    square = Counter()
    for value in model.graph.initializers.values():
        shape = value.shape
        if shape is not None and len(shape) == 2 and shape[0] == shape[1] and isinstance(shape[0], int) \
                and shape[0] >= 8 and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            square[shape[0]] += 1
    if square:
        return square.most_common(1)[0][0]
    scales = Counter()
    for node in model.graph:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization") and len(node.inputs) > 1:
            shape = node.inputs[1].shape if node.inputs[1] is not None else None
            if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
                scales[shape[0]] += 1
    return scales.most_common(1)[0][0] if scales else 0


def _num_heads(model: ir.Model, hidden: int) -> int:
    """Count (heads, head_size) pairs ending the head-splitting reshapes; the most common wins."""
    if not hidden:
        return 0
    votes = Counter()
    for node in model.graph:
        if node.op_type in ("Attention", "MultiHeadAttention") and "num_heads" in node.attributes:
            votes[node.attributes.get_int("num_heads")] += 10
        if node.op_type != "Reshape" or node.inputs[1] is None:
            continue
        tail = shape_tail(node.inputs[1])
        if len(tail) < 2 or tail[-1] is None or tail[-1] <= 0 or tail[-1] >= hidden or hidden % tail[-1]:
            continue
        heads = hidden // tail[-1]
        if tail[-2] in (heads, -1) and heads > 1:
            votes[heads] += 1
    return votes.most_common(1)[0][0] if votes else 0
