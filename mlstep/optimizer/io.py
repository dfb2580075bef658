"""Load and save models with onnx_ir. External data stays lazy (memory-mapped) until a fusion packs it.

Loading reads what ONNX Runtime reads. Legal or tolerated spellings that our passes would misread are
repaired on load, and each repair is said in one line (``Loaded.repairs``, shown by ``--verbose`` and the
report):

- the default opset domain spelled ``ai.onnx`` (legal ONNX) becomes ``""`` (the import is kept);
- dims declared as ``-1`` (old exporters' "unknown") become unknown dims, never the size -1;
- several Constant nodes defining the same output name: ONNX Runtime keeps the last one it reads
  ("the model will use the latest encountered initializer"), so the earlier ones are dropped;
- nodes out of topological order are sorted (If/Loop bodies stay as they are).

Anything else ONNX Runtime would refuse (a name defined twice by a non-Constant node) is a BadInputError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnx_ir import external_data as ir_external_data

from mlstep.errors import BadInputError, OutputError

# Above this many bytes of weights the model is saved with its weights as external data beside it.
EXTERNAL_DATA_THRESHOLD = 1 << 30
DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class Loaded:
    model: ir.Model
    repairs: tuple[str, ...] = ()     # one line per repair made on load, in plain words


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model (repaired as ONNX Runtime reads it); see ``load_with_repairs``."""
    return load_with_repairs(path).model


def load_with_repairs(path: str | os.PathLike) -> Loaded:
    """Load an ONNX model; refuse non-ONNX input and external data that escapes the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    try:
        # As ir.load does (external data stays lazy), with the proto-level repairs in between.
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf decode errors have no common base class
        raise BadInputError(f"{path}: not a readable ONNX model ({type(err).__name__}: {_first_line(err)})") from err
    repairs = [r for fix in (_default_domain, _minus_one_dims, _duplicate_constants) for r in fix(proto, path)]
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as err:  # noqa: BLE001 - the deserializer raises several kinds
        raise BadInputError(f"{path}: not a readable ONNX model ({type(err).__name__}: {_first_line(err)})") from err
    ir_external_data.set_base_dir(model.graph, str(path.parent))
    if len(model.graph) == 0 and not model.graph.outputs:
        raise BadInputError(f"{path}: not an ONNX model (empty graph)")
    if not _sorted(model.graph):
        common.TopologicalSortPass()(model)
        repairs.append("nodes were not in topological order: sorted")
    check_external_data(model, path.parent)
    return Loaded(model, tuple(repairs))


def _default_domain(proto: onnx.ModelProto, path: Path) -> list[str]:
    """``ai.onnx`` is another spelling of the default domain: one spelling, ``""``, for every pass after."""
    if not any(o.domain == "ai.onnx" for o in proto.opset_import):
        return []
    versions = {o.domain: o.version for o in proto.opset_import}
    version = max(v for d, v in versions.items() if d in ("", "ai.onnx"))
    kept = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(kept + [onnx.helper.make_opsetid("", version)])
    renamed = 0
    for graph in _graphs(proto):
        for node in graph.node:
            if node.domain == "ai.onnx":
                node.domain = ""
                renamed += 1
    for function in proto.functions:
        for node in function.node:
            if node.domain == "ai.onnx":
                node.domain = ""
                renamed += 1
    return [f"default opset domain spelled 'ai.onnx' (version {version}): read as the default domain"
            + (f" ({renamed} nodes)" if renamed else "")]


def _minus_one_dims(proto: onnx.ModelProto, path: Path) -> list[str]:
    """A dim declared as a negative size means "unknown" to ONNX Runtime: make it an unknown dim."""
    names = []
    g = proto.graph
    for info in list(g.input) + list(g.output) + list(g.value_info):
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        fixed = False
        for dim in info.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 0:
                dim.ClearField("dim_value")
                fixed = True
        if fixed:
            names.append(info.name)
    if not names:
        return []
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return [f"dims declared as -1 read as unknown: {shown}"]


def _duplicate_constants(proto: onnx.ModelProto, path: Path) -> list[str]:
    """Several nodes defining one name: ONNX Runtime keeps the last Constant it reads; anything else is an error."""
    nodes = list(proto.graph.node)
    last: dict[str, int] = {}
    count: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.output:
            if name:
                last[name] = i
                count[name] = count.get(name, 0) + 1
    duplicated = [name for name, n in count.items() if n > 1]
    if not duplicated:
        return []
    for name in duplicated:
        makers = {nodes[i].op_type for i, node in enumerate(nodes) if name in node.output}
        if makers != {"Constant"}:
            raise BadInputError(f"{path}: output name {name!r} is defined by several nodes "
                                f"({', '.join(sorted(makers))}); ONNX Runtime refuses such a graph")
    dropped = {i for i, node in enumerate(nodes) if any(name in count and count[name] > 1 and last[name] != i
                                                       for name in node.output)}
    del proto.graph.node[:]
    proto.graph.node.extend(node for i, node in enumerate(nodes) if i not in dropped)
    shown = ", ".join(repr(n) for n in duplicated[:4])
    shown += f" and {len(duplicated) - 4} more" if len(duplicated) > 4 else ""
    return [f"{len(duplicated)} names defined by several Constant nodes ({shown}): the last definition kept, "
            "as ONNX Runtime reads it"]


def _graphs(proto: onnx.ModelProto):
    """The main graph and every subgraph (If/Loop/Scan bodies), depth first."""
    stack = [proto.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    stack.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    stack.extend(attr.graphs)


def _sorted(graph: ir.Graph) -> bool:
    """True when every node's inputs are defined before it (graph inputs, initializers, earlier nodes)."""
    seen: set[int] = set()
    for node in graph:
        for value in node.inputs:
            if value is None:
                continue
            producer = value.producer()
            if producer is not None and producer.graph is graph and id(producer) not in seen:
                return False
        seen.add(id(node))
    return True


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Every external tensor must live inside the model's folder (no path traversal, no absolute paths):
    initializers of the graph and of every subgraph (If/Loop/Scan bodies), and tensor attributes
    (``Constant`` nodes) anywhere."""
    base = base_dir.resolve()
    for name, tensor in _tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.location)
            target = (base / location).resolve()
            if location.is_absolute() or (target != base and base not in target.parents):
                raise BadInputError(
                    f"external data location {tensor.location!r} of {name!r} escapes the model folder")
            if not target.is_file():
                raise BadInputError(f"external data file {tensor.location!r} of {name!r} is missing")


def _tensors(model: ir.Model):
    graphs = [model.graph, *model.graph.subgraphs()]
    for function in model.functions.values():
        graphs += [function.graph if hasattr(function, "graph") else function]
    for graph in graphs:
        for value in graph.initializers.values() if hasattr(graph, "initializers") else ():
            yield value.name, value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    yield f"{node.op_type} {node.name or ''}".strip(), attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    for tensor in attr.value:
                        yield f"{node.op_type} {node.name or ''}".strip(), tensor


def weight_bytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def save(model: ir.Model, path: str | os.PathLike) -> Path:
    """Save; weights go to ``<name>.data`` beside the model when they are large (never one >2 GB protobuf)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # External data when the weights are large, and also when the source kept its weights outside:
        # untouched initializers still point into the source's data file, so they must be written out.
        if weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or _has_external(model):
            ir.save(model, path, external_data=path.name + DATA_SUFFIX)
        else:
            ir.save(model, path)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from err
    return path


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else ""
