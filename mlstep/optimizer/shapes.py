"""Rebase shape computations onto the graph inputs.

Exporters read sizes off intermediate tensors (``Shape(q)`` to rebuild a head reshape, ``Shape(hidden)``
to size a mask). Those reads keep intermediates alive and pin subgraphs that a fusion wants to replace.
This pass tracks, for every value, each dimension as an integer or as "dimension j of graph input X"
(a tiny symbolic shape inference over the ops transformer exports use), and rewrites every ``Shape(v)``
whose dimensions are all known into ``Shape``-slices of graph inputs and constants. Unknown stays as is.

Cases handled: elementwise ops with broadcasting, Cast and unary math, LayerNormalization, Softmax,
Gather, MatMul, Transpose, Unsqueeze/Squeeze, Reshape and Expand with shapes built from Shape/Gather/
Unsqueeze/Concat/constants, Range(0, n, 1), ConstantOfShape, GlobalAveragePool (tf2onnx's last-axis mean),
Gather of several entries of a shape vector (TF's GatherV2 of [0, 1]), GatherElements, Range(start, limit)
with a symbolic start (past offsets), and small numeric contents folded (values.py asks).
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import onnx_ir as ir

from mlstep.optimizer.fusions._base import const_array

Dim = Union[int, str, None]   # a size, a symbolic dimension's name, or unknown
Dims = Optional[list[Dim]]

_SAME_SHAPE = {"Cast", "Erf", "Tanh", "Sqrt", "Relu", "Softmax", "LayerNormalization", "IsNaN", "Not", "Neg",
               "Identity", "Dropout", "Reciprocal", "Exp", "Log", "Sigmoid", "Abs", "CastLike", "Gelu",
               "FastGelu", "BiasGelu", "SkipLayerNormalization", "Attention", "CumSum"}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Where", "And", "Or", "Equal", "Greater", "Less", "GreaterOrEqual",
              "LessOrEqual", "Max", "Min", "Pow", "Xor", "Mod"}


def rebase_shapes(model: ir.Model) -> int:
    from mlstep.optimizer.values import DimEq, merge_recorded

    graph = model.graph
    dims: dict[int, Dims] = _input_dims(graph)   # id(value) -> dims
    vals: dict[int, list[Dim]] = {}   # id(value) -> symbolic content of a small 1-D int tensor
    where: dict[str, tuple[ir.Value, int]] = {}     # symbolic name -> (graph input, axis) that carries it
    for inp in graph.inputs:
        for j, name in enumerate(dims.get(id(inp), [])):
            if isinstance(name, str):
                where.setdefault(name, (inp, j))
    eq = DimEq(set(where))   # dims the graph makes equal to an input's, whatever the exporter called them
    rewritten = 0
    for node in list(graph):
        _infer(node, dims, vals, eq)
        for value in node.outputs:
            merge_recorded(value, dims, eq)
        if node.op_type == "Shape" and node.domain == "":
            src = node.inputs[0]
            if src in graph.inputs:
                continue
            content = vals.get(id(node.outputs[0]))
            content = None if content is None else [eq.find(d) for d in content]
            if content is None or any(d is None or (isinstance(d, str) and d not in where) for d in content):
                continue   # unknown, or a symbolic sum no single input dimension carries
            replacement, created = _materialise(graph, node, content, where)
            for new in created:
                _infer(new, dims, vals)
            ir.convenience.replace_all_uses_with(node.outputs[0], replacement)
            rewritten += 1
    return rewritten


def _input_dims(graph: ir.Graph) -> dict[int, Dims]:
    """The graph inputs' dims: ints, or symbolic names (an unnamed dim gets a name of its own)."""
    return {id(inp): [d if isinstance(d, int) else _spelling(d.value) or f"{inp.name}:{j}" for j, d in enumerate(inp.shape)]
            for inp in graph.inputs if inp.shape is not None}


def _spelling(name: str | None) -> str | None:
    """One spelling per symbolic sum: ``"past_sequence_length + sequence_length"`` (Optimum) is the same dim
    as this module's ``"past_sequence_length+sequence_length"``; ``-1`` / ``"?"`` spell unknown."""
    if not name or name in ("-1", "?"):
        return None
    return _dim_sum([t.strip() for t in name.split("+")]) if "+" in name else name


def _materialise(graph: ir.Graph, before: ir.Node, content: list[Dim], where):
    pieces, created = [], []
    for d in content:
        if isinstance(d, int):
            tensor = ir.tensor(np.array([d], dtype=np.int64))
            c = ir.node("Constant", [], attributes={"value": tensor})
            c.outputs[0].const_value = tensor
            graph.insert_before(before, c)
            created.append(c)
            pieces.append(c.outputs[0])
        else:
            inp, axis = where[d]   # Shape + Gather rather than Shape(start, end): valid below opset 15 too
            index = ir.tensor(np.array([axis], dtype=np.int64))
            s = ir.node("Shape", [inp])
            c = ir.node("Constant", [], attributes={"value": index})
            c.outputs[0].const_value = index
            g = ir.node("Gather", [s.outputs[0], c.outputs[0]], attributes={"axis": 0})
            for new in (s, c, g):
                graph.insert_before(before, new)
                created.append(new)
            pieces.append(g.outputs[0])
    if len(pieces) == 1:
        return pieces[0], created
    cat = ir.node("Concat", pieces, attributes={"axis": 0})
    graph.insert_before(before, cat)
    return cat.outputs[0], created + [cat]


def _const_ints(value: ir.Value | None) -> list[int] | None:
    arr = const_array(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(x) for x in arr.reshape(-1)]


def _const_numbers(value: ir.Value | None) -> list[int | float] | None:
    """A small (<= 8 entries, rank <= 1) numeric constant: ints stay ints (integer dtypes), floats floats."""
    arr = const_array(value)
    if arr is None or arr.ndim > 1 or arr.size > 8 or arr.dtype.kind not in "iuf":
        return None
    return [int(x) for x in arr.reshape(-1)] if arr.dtype.kind in "iu" else [float(x) for x in arr.reshape(-1)]


def _content(value: ir.Value | None, vals) -> list[Dim] | None:
    if value is None:
        return None
    ints = _const_ints(value)
    if ints is not None:
        return ints
    numbers = _const_numbers(value)
    return numbers if numbers is not None else vals.get(id(value))


def _numeric(content) -> bool:
    return content is not None and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in content)


_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _fold_numbers(node: ir.Node, vals: dict) -> None:
    """Arithmetic on small numeric contents (the runtime attention scale ``1 / sqrt(float(Shape(Q)[-1]))``
    once the head size is known): ints follow ONNX integer semantics, floats are kept in float64."""
    op = node.op_type
    contents = [_content(v, vals) for v in node.inputs if v is not None]
    if not contents or not all(_numeric(c) for c in contents) or not node.outputs:
        return
    if op == "Cast":
        to = ir.DataType(node.attributes.get_int("to", 1))
        vals[id(node.outputs[0])] = [float(c) for c in contents[0]] if to in _FLOAT_TYPES else \
            [int(c) for c in contents[0]]
        return
    unary = {"Sqrt": np.sqrt, "Reciprocal": lambda x: 1.0 / x, "Neg": np.negative}
    binary = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Pow": np.power, "Max": np.maximum,
              "Min": np.minimum}
    if op in unary and len(contents) == 1 and all(isinstance(c, float) for c in contents[0]):
        if op == "Sqrt" and any(c < 0 for c in contents[0]):
            return
        vals[id(node.outputs[0])] = [float(x) for x in unary[op](np.array(contents[0], dtype=np.float64))]
    elif (op in binary or op == "Div") and len(contents) == 2:
        a, b = contents
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return
        ints = all(isinstance(c, int) for c in a + b)
        if ints != any(isinstance(c, int) for c in a + b):
            return   # mixed ints and floats: not a well-typed ONNX op, leave it alone
        width = max(len(a), len(b))
        a, b = (a * width if len(a) == 1 else a), (b * width if len(b) == 1 else b)
        if op == "Div":
            if any(y == 0 for y in b):
                return
            out = [int(x / y) if ints else x / y for x, y in zip(a, b)]   # ONNX integer Div truncates
        elif op == "Pow" and ints:
            return
        else:
            out = [binary[op](x, y) for x, y in zip(a, b)]
            out = [int(x) if ints else float(x) for x in out]
        vals[id(node.outputs[0])] = out


def _broadcast(all_dims: list[Dims], eq=None) -> Dims:
    """Numpy broadcasting of dims; with ``eq`` (values.DimEq), the non-1 dims meeting on one axis are unified
    (a valid run has them equal)."""
    if any(d is None for d in all_dims):
        return None
    rank = max(len(d) for d in all_dims)
    out: list[Dim] = []
    for i in range(rank):
        cands = [d[len(d) - rank + i] for d in all_dims if len(d) - rank + i >= 0]
        known = [c for c in cands if c != 1]
        if eq is not None:
            for a, b in zip(known, known[1:]):
                eq.union(a, b)
            known = [eq.find(c) for c in known]
        if not known:
            out.append(1)
        elif any(c is None for c in known):
            out.append(None)
        else:
            ints = [c for c in known if isinstance(c, int)]
            out.append(ints[0] if ints else known[0])
    return out


def _infer(node: ir.Node, dims: dict, vals: dict, eq=None) -> None:  # noqa: C901 - a table of small cases
    """Dims (and small contents) of ``node``'s outputs from its inputs'. ``eq`` (values.DimEq), when given,
    collects the dim equalities the op's semantics imply and canonicalises what is read."""
    op = node.op_type
    ins = node.inputs
    for v in ins:  # constants know their shape
        if v is not None and id(v) not in dims and v.const_value is not None:
            dims[id(v)] = list(v.const_value.shape)
    d = [dims.get(id(v)) if v is not None else None for v in ins]
    if eq is not None:
        d = [None if x is None else [eq.find(y) for y in x] for x in d]
    out: Dims = None
    attr = node.attributes
    if node.domain not in ("", "ai.onnx"):
        out = d[0] if op in _SAME_SHAPE and d else None
    elif op in _SAME_SHAPE:
        out = d[0]
        if op == "Cast" and _content(ins[0], vals) is not None:
            vals[id(node.outputs[0])] = _content(ins[0], vals)
    elif op in _BROADCAST:
        out = _broadcast([x for x in d], eq)
        if op == "Add" and all(_content(v, vals) is not None and len(_content(v, vals)) == 1 for v in ins):
            vals[id(node.outputs[0])] = [_dim_sum([_content(v, vals)[0] for v in ins])]   # past + sequence
        if op == "Where":  # Where(Equal(x, -1s), 1s, x) on a shape vector whose entries are all sizes: x
            cond = ins[0].producer() if ins[0] is not None else None
            content = _content(ins[2], vals)
            ones = ins[1].producer() if ins[1] is not None else None
            if cond is not None and cond.op_type == "Equal" and cond.inputs[0] is ins[2] and content is not None \
                    and all(c is not None for c in content):
                if all(c != -1 for c in content):
                    vals[id(node.outputs[0])] = content
                elif (ones is not None and ones.op_type == "ConstantOfShape" and const_array_attr(ones) == 1) \
                        or _all_ones(ins[1]):
                    vals[id(node.outputs[0])] = [1 if c == -1 else c for c in content]
    elif op == "Gather" and d[0] is not None and d[1] is not None:
        axis = attr.get_int("axis", 0) % len(d[0])
        out = d[0][:axis] + d[1] + d[0][axis + 1:]
        content = _content(ins[0], vals)
        idx = _const_ints(ins[1])
        if content is not None and idx is not None and idx and all(-len(content) <= i < len(content) for i in idx):
            vals[id(node.outputs[0])] = [content[i] for i in idx]   # one index or a list (TF's GatherV2)
    elif op == "GatherElements" and len(d) > 1 and d[1] is not None:
        out = list(d[1])   # the indices' shape (RoBERTa's buffered token types gathered at the positions)
        if eq is not None and d[0] is not None and len(d[0]) == len(d[1]):
            axis = attr.get_int("axis", 0) % len(d[0])
            for i, (a, b) in enumerate(zip(d[0], d[1])):
                if i != axis and a != 1 and b != 1:
                    eq.union(a, b)
    elif op == "MatMul" and d[0] is not None and d[1] is not None and len(d[0]) >= 2 and len(d[1]) >= 2:
        batch = _broadcast([d[0][:-2], d[1][:-2]], eq) if (d[0][:-2] or d[1][:-2]) else []
        out = None if batch is None else batch + [d[0][-2], d[1][-1]]
        if eq is not None:
            eq.union(d[0][-1], d[1][-2])   # the contracted axis
    elif op == "Transpose" and d[0] is not None:
        perm = attr.get_ints("perm", list(reversed(range(len(d[0])))))
        out = [d[0][p] for p in perm]
    elif op in ("Unsqueeze", "Squeeze") and d[0] is None:
        content = _content(ins[0], vals)
        if content is not None and len(content) == 1:
            vals[id(node.outputs[0])] = content
    elif op in ("Unsqueeze", "Squeeze") and d[0] is not None:
        axes = _const_ints(ins[1]) if len(ins) > 1 else list(attr.get_ints("axes", []))
        if axes is not None:
            if op == "Unsqueeze":
                rank = len(d[0]) + len(axes)
                axes = sorted(a % rank for a in axes)
                out = list(d[0])
                for a in axes:
                    out.insert(a, 1)
            else:
                rank = len(d[0])
                axes = {a % rank for a in axes} if axes else {i for i, x in enumerate(d[0]) if x == 1}
                out = [x for i, x in enumerate(d[0]) if i not in axes]
            content = _content(ins[0], vals)
            if content is not None and len(content) == 1:
                vals[id(node.outputs[0])] = content
    elif op == "Shape" and d[0] is not None:
        rank = len(d[0])
        start = attr.get_int("start", 0)
        end = attr.get_int("end", rank)
        content = d[0][slice(start, end)]
        vals[id(node.outputs[0])] = content
        out = [len(content)]
    elif op == "Concat":
        contents = [_content(v, vals) for v in ins]
        if all(c is not None for c in contents):
            vals[id(node.outputs[0])] = [x for c in contents for x in c]
        if all(x is not None for x in d) and d and len({len(x) for x in d}) == 1 and d[0]:   # same rank (guard)
            axis = attr.get_int("axis", 0) % len(d[0])
            out = list(d[0])
            out[axis] = _dim_sum([x[axis] for x in d])
            if eq is not None:   # every other axis is the same in all pieces
                for i in range(len(out)):
                    for x in d[1:]:
                        if i != axis:
                            eq.union(d[0][i], x[i])
    elif op in ("Reshape", "Expand", "ConstantOfShape"):
        shape_in = ins[0] if op == "ConstantOfShape" else ins[1]
        content = _content(shape_in, vals)
        if eq is not None and content is not None:
            content = [eq.find(c) if isinstance(c, str) else c for c in content]
        if op == "Reshape" and _const_ints(ins[1]) == [-1] and _content(ins[0], vals) is not None:
            vals[id(node.outputs[0])] = _content(ins[0], vals)
        if content is not None:
            if op == "Reshape":
                src = d[0] or []
                allowzero = attr.get_int("allowzero", 0)
                out = [(src[i] if i < len(src) else None) if (c == 0 and not allowzero) else
                       (None if c == -1 else c) for i, c in enumerate(content)]
                if content.count(-1) == 1 and d[0] is not None:
                    out[content.index(-1)] = _solve_minus_one(d[0], [x for x in out if x is not None])
            elif op == "Expand":
                out = _broadcast([d[0], content], eq)
            else:
                out = list(content)
    elif op in ("GlobalAveragePool", "GlobalMaxPool") and d[0] is not None and len(d[0]) >= 3:
        out = d[0][:2] + [1] * (len(d[0]) - 2)   # pools every axis after the second (tf2onnx's ReduceMean)
    elif op in ("ReduceMean", "ReduceSum", "ReduceMax") and d[0] is not None:
        axes = _const_ints(ins[1]) if len(ins) > 1 else list(attr.get_ints("axes", []))
        if axes and attr.get_int("keepdims", 1):
            rank = len(d[0])
            red = {a % rank for a in axes}
            out = [1 if i in red else x for i, x in enumerate(d[0])]
    elif op == "Slice" and _content(ins[0], vals) is not None and _const_ints(ins[1]) is not None \
            and _const_ints(ins[2]) is not None and (len(ins) < 5 or ins[4] is None or _const_ints(ins[4]) == [1]):
        content = _content(ins[0], vals)   # slicing a shape vector: keep the symbolic entries
        start, end = _const_ints(ins[1])[0], _const_ints(ins[2])[0]
        vals[id(node.outputs[0])] = content[slice(start, end)]
        out = [len(content[slice(start, end)])]
    elif op == "Slice" and d[0] is not None:
        starts, axes = _const_ints(ins[1]), _const_ints(ins[3]) if len(ins) > 3 else None
        steps = _const_ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
        ends = _content(ins[2], vals)
        rank = len(d[0])
        axes = axes if axes is not None else list(range(len(starts or [])))
        if starts is not None and ends is not None and (steps is None or all(x == 1 for x in steps)):
            out = list(d[0])
            for a, st, en in zip(axes, starts, ends):
                if st < 0 and isinstance(en, int) and en >= 2**31 and isinstance(out[a % rank], int):
                    out[a % rank] = min(-st, out[a % rank])   # the last -st entries (x[:, -1:])
                    continue
                if st != 0 or en is None:
                    out = None
                    break
                if isinstance(en, int) and en >= 2**31:
                    continue
                out[a % rank] = en if not (isinstance(en, int) and isinstance(out[a % rank], int)) \
                    else min(en, out[a % rank])
    elif op == "Gemm" and d[0] is not None and d[1] is not None and len(d[0]) == 2 and len(d[1]) == 2:
        a = d[0][::-1] if attr.get_int("transA", 0) else d[0]
        b = d[1][::-1] if attr.get_int("transB", 0) else d[1]
        out = [a[0], b[1]]
    elif op == "Split" and d[0] is not None:
        axis = attr.get_int("axis", 0) % len(d[0])
        sizes = _const_ints(ins[1]) if len(ins) > 1 and ins[1] is not None else None
        if sizes is None and isinstance(d[0][axis], int) and d[0][axis] % len(node.outputs) == 0:
            sizes = [d[0][axis] // len(node.outputs)] * len(node.outputs)
        if sizes is not None and len(sizes) == len(node.outputs):
            for value, size in zip(node.outputs[1:], sizes[1:]):
                dims[id(value)] = d[0][:axis] + [size] + d[0][axis + 1:]
            out = d[0][:axis] + [sizes[0]] + d[0][axis + 1:]
            content = _content(ins[0], vals)   # a shape vector split in pieces (ORT turns Slices into a Split)
            if content is not None and len(d[0]) == 1 and sum(sizes) == len(content) and min(sizes) >= 0:
                starts = np.cumsum([0] + sizes[:-1]).tolist()
                for value, start, size in zip(node.outputs, starts, sizes):
                    vals[id(value)] = content[start:start + size]
    elif op == "Range":   # Range(start, limit, 1): limit - start entries; start may be symbolic (past length)
        start, limit, delta = (_content(v, vals) for v in ins[:3])
        if delta == [1] and start is not None and limit is not None and len(start) == 1 and len(limit) == 1:
            out = [_dim_diff(limit[0], start[0])]
    if node.domain in ("", "ai.onnx"):
        _fold_numbers(node, vals)
    if out is not None and node.outputs:
        dims[id(node.outputs[0])] = out
        value = node.outputs[0]
        if value.shape is None and all(x is not None for x in out) and node.domain in ("", "ai.onnx"):
            # Annotate what the exporter left out (TorchScript leaves intermediate shapes empty), so
            # that fusion checks can compare shapes; names are the graph inputs' symbolic dims.
            value.shape = ir.Shape([x if isinstance(x, int) else ir.SymbolicDim(x) for x in out])


def _solve_minus_one(src: list[Dim], known: list[Dim]) -> Dim:
    """The -1 of a reshape: cancel equal symbolic dims, then divide the remaining integer products."""
    if any(x is None for x in src):
        return None
    rest = list(src)
    for k in known:
        if not isinstance(k, int):
            if k not in rest:
                return None
            rest.remove(k)
    symbolic = [x for x in rest if not isinstance(x, int)]
    ints = int(np.prod([x for x in rest if isinstance(x, int)])) if rest else 1
    den_ints = int(np.prod([k for k in known if isinstance(k, int)])) if known else 1
    if len(symbolic) == 1 and ints == den_ints:   # e.g. [batch, sequence] -> [-1, sequence]: -1 is batch
        return symbolic[0]
    if symbolic:
        return None
    num = int(np.prod(rest)) if rest else 1
    den = int(np.prod([k for k in known if isinstance(k, int)])) if known else 1
    return num // den if den and num % den == 0 else None


def const_array_attr(node: ir.Node) -> float | None:
    attr = node.attributes.get("value")
    if attr is None:
        return 0.0
    arr = attr.value.numpy().reshape(-1)
    return float(arr[0]) if arr.size == 1 else None


def infer_dims(graph: ir.Graph | ir.Function, values: list[ir.Value]) -> list[Dims]:
    """Dims of ``values`` (ints / symbolic names): the recorded shape, else this module's symbolic inference
    run forward over the graph until every asked value is reached. For checks that compare shapes."""
    out: list[Dims] = [None] * len(values)
    missing = []
    for i, value in enumerate(values):
        if value.shape is not None and all(isinstance(d, int) or d.value for d in value.shape):
            out[i] = [d if isinstance(d, int) else _spelling(d.value) for d in value.shape]
        else:
            missing.append(i)
    if not missing:
        return out
    graph = graph if isinstance(graph, ir.Graph) else graph.graph
    dims: dict[int, Dims] = _input_dims(graph)
    vals: dict[int, list[Dim]] = {}
    wanted = {id(values[i]) for i in missing}
    for node in graph:
        _infer(node, dims, vals)
        for o in node.outputs:
            if id(o) not in dims and o.shape is not None and all(isinstance(d, int) or d.value for d in o.shape):
                dims[id(o)] = [d if isinstance(d, int) else d.value for d in o.shape]
        wanted -= {id(o) for o in node.outputs}
        if not wanted:
            break
    for i in missing:
        out[i] = dims.get(id(values[i]))
    return out


def _all_ones(value: ir.Value | None) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size > 0 and bool(np.all(arr == 1))


def infer_content(graph: ir.Graph | ir.Function, value: ir.Value) -> list[Dim] | None:
    """The symbolic content of a small 1-D shape tensor (e.g. a Reshape target): each entry an int or a
    symbolic dimension name; None when not known."""
    graph = graph if isinstance(graph, ir.Graph) else graph.graph
    const = _const_ints(value)
    if const is not None:
        return const
    dims: dict[int, Dims] = _input_dims(graph)
    vals: dict[int, list[Dim]] = {}
    for node in graph:
        _infer(node, dims, vals)
        if value in node.outputs:
            return vals.get(id(value))
    return None


def _dim_diff(total: Dim, part: Dim) -> Dim:
    """``total - part`` for symbolic sums: ``past+sequence`` - ``past`` = ``sequence``; None when unknown."""
    if total is None or part is None or isinstance(total, float) or isinstance(part, float):
        return None
    if isinstance(total, int) and isinstance(part, int):
        return total - part
    if part == 0:
        return total
    terms = str(total).split("+")
    const = sum(int(t) for t in terms if t.lstrip("-").isdigit())
    names = [t for t in terms if not t.lstrip("-").isdigit()]
    for t in ([part] if isinstance(part, int) else str(part).split("+")):
        if isinstance(t, int) or t.lstrip("-").isdigit():
            const -= int(t)
        elif t in names:
            names.remove(t)
        else:
            return None
    if not names:
        return const
    if const < 0:
        return None
    return _dim_sum(names + ([const] if const else []))


def _dim_sum(parts: list[Dim]) -> Dim:
    """A symbolic sum of dimensions, in one canonical spelling ("past_sequence+sequence")."""
    if any(p is None or isinstance(p, float) for p in parts):
        return None
    terms = [t for p in parts if isinstance(p, str) for t in p.split("+")]
    const = sum(p for p in parts if isinstance(p, int)) + sum(int(t) for t in terms if t.lstrip("-").isdigit())
    terms = sorted(t for t in terms if not t.lstrip("-").isdigit())
    if not terms:
        return const
    return "+".join(terms + ([str(const)] if const else []))
