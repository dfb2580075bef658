"""Synthesize feeds from a graph's signature: ids inside the vocabulary, masks padded right and left.

Inputs are recognised by name and dtype:
- past tensors: the name starts with ``past`` -> random normal in the input's dtype;
- attention mask: the name contains ``mask`` -> 1 for attended tokens, 0 for padding, in the input's dtype
  (int64, int32, float, bool); with past inputs it spans ``past_sequence + sequence``; a 4-D mask
  ``[B, 1, M, M]`` with a static M is a table the model slices (Megatron): the lower triangle (query i sees
  keys j <= i) times the padding of the keys, as its users build it; M bounds past + new tokens;
- token types: ``token_type_ids`` / ``segment_ids`` (or names containing them) -> 0/1 within their table;
- positions: the name contains ``position`` -> arange, counted from the first real token under left padding;
- ids: ``input_ids`` or any other integer input -> uniform in ``[0, vocab)`` where vocab is the number of rows
  of the smallest table a Gather or an EmbedLayerNormalization indexes with it, reached through
  Reshape/Cast/Squeeze/Unsqueeze/Flatten and other ops that move values unchanged (Slice, Expand, Transpose,
  Tile, Identity; one ``ids`` input may index tables of 101, 100 and 10
  rows: 10 bounds it; default 100 when no table is found);
- any other float input -> random normal.
Symbolic and unknown dims take the value of the same symbol elsewhere, else a value by role and position
(batch first, sequence second, past sequence second to last in past tensors); static dims are kept.
The sequence (past + new tokens) never exceeds the rows of a position table, i.e. a table a Gather reads
with indices computed from shapes only (``Range(0, S)`` and the like). A signature whose synthesized
inputs would exceed ``MAX_ELEMENTS`` values is refused (BadInputError) before anything is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from mlstep.errors import BadInputError

DEFAULT_VOCAB = 100
MS_DOMAIN = "com.microsoft"
MAX_ELEMENTS = 1 << 26          # per input and in all (64 Mi values: 256 MiB of float32)
# ops whose data operand (0) reaches the output with its values unchanged (reshaped, selected, repeated)
# EmbedLayerNormalization: index input -> the table it selects from (ids -> word, segment ids -> segment,
# position ids -> position embeddings)
_ELN_TABLES = {0: 2, 1: 4, 8: 3}
_INDEX_PATH = ("Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Expand", "Transpose",
               "Tile")


@dataclass
class Case:
    name: str
    feeds: dict[str, np.ndarray]


def synthesize_inputs(model: ir.Model, batch: int = 2, sequence: int = 8, seed: int = 0,
                      past_sequence: int = 0) -> list[Case]:
    """Cases "no-padding", "right-padded" and "left-padded" for the model's graph inputs."""
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    roles = {v.name: _role(v) for v in inputs}
    has_past = any(r == "past" for r in roles.values())
    symbols: dict[str, int] = {}
    # Static dims of the token inputs override the requested batch/sequence.
    for v in inputs:
        if roles[v.name] in ("ids", "token_type", "position") and v.shape is not None and len(v.shape) >= 2:
            if isinstance(v.shape[0], int):
                batch = v.shape[0]
            if isinstance(v.shape[1], int):
                sequence = v.shape[1]
    for v in inputs:
        if roles[v.name] == "mask" and _table_size(v):
            continue
        if roles[v.name] == "mask" and v.shape is not None and len(v.shape) >= 2:
            if isinstance(v.shape[0], int):
                batch = v.shape[0]
            if isinstance(v.shape[-1], int) and has_past:
                past_sequence = max(0, v.shape[-1] - sequence)
            elif isinstance(v.shape[-1], int):
                sequence = v.shape[-1]
    tables = [_table_size(v) for v in inputs if roles[v.name] == "mask"]
    rows = min([r for r in [_position_rows(model), *tables] if r], default=None)   # they bound past + new tokens
    if rows is not None and past_sequence + sequence > rows:   # a position table bounds the whole sequence
        past_sequence = min(past_sequence, rows // 2)
        sequence = rows - past_sequence
    total = past_sequence + sequence

    def shape_of(v: ir.Value, role: str) -> tuple[int, ...]:
        dims = list(v.shape) if v.shape is not None else ([batch, sequence] if role != "past" else [])
        out = []
        for i, d in enumerate(dims):
            if isinstance(d, int):
                out.append(d)
                continue
            name = getattr(d, "value", None)
            if name is not None and name in symbols:
                out.append(symbols[name])
                continue
            if role == "past":
                size = past_sequence if (i == len(dims) - 2 or "past" in str(name)) else (
                    batch if i <= 1 and batch not in out else 1)
            elif i == 0:
                size = batch
            elif i == 1:
                size = total if (role == "mask" and has_past) else sequence
            else:
                size = 1
            if name is not None:
                symbols[name] = size
            out.append(size)
        return tuple(out)

    # Token inputs first so their symbols (batch, sequence) are named before past tensors use them.
    order = sorted(inputs, key=lambda v: roles[v.name] in ("past", "float"))
    shapes = {v.name: shape_of(v, roles[v.name]) for v in order}
    _check_sizes(shapes)
    lengths = [total] + [max(1, total - (i * total) // max(batch, 2)) for i in range(1, batch)]

    cases = []
    for case_name, padding in (("no-padding", None), ("right-padded", "right"), ("left-padded", "left")):
        rng = np.random.default_rng(seed)
        rows = [total] * batch if padding is None else lengths
        if padding is not None and batch == 1:
            rows = [max(1, total // 2)]
        attended = np.zeros((batch, total), dtype=bool)
        for r, n in enumerate(rows):
            if padding == "left":
                attended[r, total - n:] = True
            else:
                attended[r, :n] = True
        feeds = {}
        for v in inputs:
            role, shape = roles[v.name], shapes[v.name]
            dtype = _np_dtype(v)
            if role == "mask" and _table_size(v):
                keys = np.zeros((batch, shape[-1]), dtype=bool)
                keys[:, :total] = attended
                causal = np.tril(np.ones(shape[-2:], dtype=bool))
                feeds[v.name] = np.broadcast_to((causal[None] & keys[:, None, :])[:, None], shape).astype(dtype)
            elif role == "mask":
                feeds[v.name] = _fit(attended, shape).astype(dtype)
            elif role == "ids":
                feeds[v.name] = rng.integers(0, _table_rows(v, DEFAULT_VOCAB), size=shape).astype(dtype)
            elif role == "token_type":
                feeds[v.name] = rng.integers(0, min(2, _table_rows(v, 2)), size=shape).astype(dtype)
            elif role == "position":
                first = np.argmax(attended, axis=1)[:, None] if padding == "left" else 0
                pos = np.clip(np.arange(total)[None, :] - first, 0, None)[:, past_sequence:]
                feeds[v.name] = _fit(np.broadcast_to(pos, (batch, sequence)), shape).astype(dtype)
            elif np.issubdtype(dtype, np.integer):
                feeds[v.name] = rng.integers(0, DEFAULT_VOCAB, size=shape).astype(dtype)
            elif dtype == np.bool_:
                feeds[v.name] = np.ones(shape, dtype=bool)
            else:
                feeds[v.name] = rng.standard_normal(shape).astype(dtype)
        cases.append(Case(case_name, feeds))
    return cases


def _role(value: ir.Value) -> str:
    name = (value.name or "").lower()
    dtype = value.dtype
    if name.startswith("past"):
        return "past"
    if "mask" in name:
        return "mask"
    if "token_type" in name or "segment" in name:
        return "token_type"
    if "position" in name:
        return "position"
    if name == "input_ids" or (dtype is not None and dtype.is_integer()):
        return "ids"
    return "float"


def _table_size(value: ir.Value) -> int:
    """M for a 4-D mask ``[B, 1, M, M]`` with a static M (a causal table the model slices), else 0."""
    shape = value.shape
    if shape is None or len(shape) != 4 or not isinstance(shape[2], int) or shape[2] != shape[3] or shape[1] != 1:
        return 0
    return shape[2]


def _np_dtype(value: ir.Value) -> np.dtype:
    return np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.int64)


def _fit(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A [batch, length] array fitted to the input's shape (extra leading dims broadcast)."""
    if array.shape == tuple(shape):
        return array
    if len(shape) == 2:
        return array[: shape[0], -shape[1]:] if shape[1] <= array.shape[1] else np.resize(array, shape)
    return np.broadcast_to(array.reshape((array.shape[0],) + (1,) * (len(shape) - 2) + (array.shape[1],)),
                           shape).copy()


def _table_rows(value: ir.Value, default: int) -> int:
    """Rows of the smallest embedding table this index input selects from, else ``default``.

    Followed from the input through ops that pass indices on unchanged (``_INDEX_PATH``, data operand only):
    every Gather that indexes with it and every EmbedLayerNormalization id input counts.
    """
    frontier, seen, rows = [value], set(), []
    while frontier:
        v = frontier.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        for node, index in v.uses():
            table = None
            if node.op_type in _INDEX_PATH and index == 0:
                frontier.extend(node.outputs)
            elif node.op_type == "Gather" and index == 1:
                table = node.inputs[0]
            elif node.op_type == "EmbedLayerNormalization" and node.domain == MS_DOMAIN and index in _ELN_TABLES:
                at = _ELN_TABLES[index]
                table = node.inputs[at] if len(node.inputs) > at else None
            if table is not None and table.shape is not None and len(table.shape) >= 1 \
                    and isinstance(table.shape[0], int) and table.const_value is not None:
                rows.append(int(table.shape[0]))
    return min(rows) if rows else default


def _position_rows(model: ir.Model) -> int | None:
    """Rows of the smallest constant table a Gather reads with indices computed from shapes alone (position
    ids built as ``Range(0, S)``), or an EmbedLayerNormalization without position ids reads: the longest
    sequence the graph accepts; None when there is none."""
    graph_inputs = {id(v) for v in model.graph.inputs}
    rows = []
    for node in model.graph:
        if node.op_type == "EmbedLayerNormalization" and node.domain == MS_DOMAIN and len(node.inputs) > 3 \
                and (len(node.inputs) < 9 or node.inputs[8] is None):
            table = node.inputs[3]           # no position_ids: it reads positions 0..S-1 of its position table
            if table is not None and table.const_value is not None and table.const_value.shape.dims:
                rows.append(int(table.const_value.shape[0]))
            continue
        if node.op_type != "Gather" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        table = node.inputs[0]
        if table is None or table.const_value is None or not table.const_value.shape.dims:
            continue
        if _from_shapes_only(node.inputs[1], graph_inputs):
            rows.append(int(table.const_value.shape[0]))
    return min(rows) if rows else None


def _from_shapes_only(value: ir.Value, graph_inputs: set[int]) -> bool:
    """True when ``value`` is computed (through a Range) from constants and Shape reads only, not from the
    values of a graph input."""
    stack, seen, ranged = [value], set(), False
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if id(v) in graph_inputs:
            return False
        node = v.producer()
        if node is None:
            continue   # an initializer
        if node.op_type == "Shape":
            continue
        ranged = ranged or node.op_type == "Range"
        stack.extend(x for x in node.inputs if x is not None)
    return ranged


def _check_sizes(shapes: dict[str, tuple[int, ...]]) -> None:
    total = 0
    for name, shape in shapes.items():
        size = int(np.prod([int(d) for d in shape], dtype=object)) if shape else 1
        if any(int(d) < 0 for d in shape) or size > MAX_ELEMENTS:
            raise BadInputError(f"input {name!r} would be synthesized as {list(shape)} ({size} values, more than "
                                f"{MAX_ELEMENTS}); pass a model whose declared input dims are sizes a test can feed")
        total += size
    if total > MAX_ELEMENTS:
        raise BadInputError(f"the synthesized inputs would hold {total} values (more than {MAX_ELEMENTS})")
