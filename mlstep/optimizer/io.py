"""Load and save models with onnx_ir. External data stays lazy (memory-mapped) until a fusion packs it."""
from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from mlstep.errors import BadInputError, OutputError

# Above this many bytes of weights the model is saved with its weights as external data beside it.
EXTERNAL_DATA_THRESHOLD = 1 << 30
DATA_SUFFIX = ".data"


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; refuse non-ONNX input and external data that escapes the model's folder."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such file")
    try:
        model = ir.load(path)
    except Exception as err:  # protobuf decode errors have no common base class
        raise BadInputError(f"{path}: not a readable ONNX model ({type(err).__name__}: {_first_line(err)})") from err
    if len(model.graph) == 0 and not model.graph.outputs:
        raise BadInputError(f"{path}: not an ONNX model (empty graph)")
    check_external_data(model, path.parent)
    return model


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
