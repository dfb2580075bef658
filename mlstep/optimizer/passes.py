"""Whole-graph passes around the fusions: normalisation before, int32 inputs and counting after."""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from mlstep.optimizer.fusions._base import MS_DOMAIN

FUSED_OPS = ("Attention", "MultiHeadAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
             "LayerNormalization", "BiasGelu", "Gelu", "FastGelu", "SkipSimplifiedLayerNormalization")


def prepare(model: ir.Model) -> ir.Model:
    """Normalise exporter noise so that patterns see one form.

    Handles: Identity chains (TorchScript re-exports shared weights through Identity), Casts to the type their
    input already has (Megatron's ``.float()`` on float activations: no-ops that hide residual sums), Constant nodes
    (lifted into initializers so that checks read them uniformly), shape arithmetic that folds to a
    constant, dead nodes. If/Loop/Scan bodies are left as they are (only main-graph Identities go).
    """
    from onnxscript.optimizer import fold_constants_ir

    from mlstep.optimizer.shapes import rebase_shapes

    _eliminate_identities(model)
    _eliminate_noop_casts(model)
    for _ in range(4):
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        fold_constants_ir(model, onnx_shape_inference=False, input_size_limit=1024, output_size_limit=1024)
        common.RemoveUnusedNodesPass()(model)
        if not rebase_shapes(model):
            break
    return model


def _eliminate_identities(model: ir.Model) -> None:
    """onnx_ir's IdentityEliminationPass, or, when the model has subgraphs, the same on the main graph only:
    that pass also rewires a body's Identity outputs and fails on If/Loop bodies (tf2onnx 1.6)."""
    if not any(isinstance(attr.value, ir.Graph) or attr.type == ir.AttributeType.GRAPHS
               for node in model.graph.all_nodes() for attr in node.attributes.values()):
        common.IdentityEliminationPass()(model)
        return
    for node in list(model.graph):
        if node.op_type != "Identity" or node.domain != "" or not node.inputs or node.inputs[0] is None:
            continue
        if node.outputs[0].is_graph_output():
            continue
        ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
        model.graph.remove(node, safe=True)


_SAME_TYPE_AS_INPUTS = {"Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Tanh", "Erf", "Relu", "MatMul", "Softmax",
                        "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
                        "Expand", "Flatten", "ReduceMean", "Pow"}


def _eliminate_noop_casts(model: ir.Model) -> None:
    """A main-graph Cast to the element type its input already has is an Identity: its users read the input.
    The input's type is its declared one or, when the export left it untyped, the one ONNX's typing rules give
    its producer (``element_type``)."""
    memo: dict[int, ir.DataType | None] = {}
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain != "" or node.inputs[0] is None or node.outputs[0].is_graph_output():
            continue
        if element_type(node.inputs[0], memo) == ir.DataType(node.attributes.get_int("to")):
            ir.convenience.replace_all_uses_with(node.outputs[0], node.inputs[0])
            model.graph.remove(node, safe=True)


def element_type(value: ir.Value | None, memo: dict | None = None, depth: int = 0) -> ir.DataType | None:
    """A value's element type: declared, or, when the export left it untyped, the one ONNX's typing rules give its
    producer (an Add's, a MatMul's, a Reshape's output has its inputs' type, a Gather's its table's, a Cast's its
    ``to``); None when that does not tell."""
    memo = {} if memo is None else memo
    if value is None or depth > 64:
        return None
    if value.dtype is not None:
        return value.dtype
    if id(value) not in memo:
        node = value.producer()
        found = None
        if node is not None and node.domain == "":
            if node.op_type == "Cast":
                found = ir.DataType(node.attributes.get_int("to"))
            elif node.op_type == "Gather":
                found = element_type(node.inputs[0], memo, depth + 1)
            elif node.op_type in _SAME_TYPE_AS_INPUTS:
                data = node.inputs[:1] if node.op_type in _FIRST_IS_DATA else node.inputs
                types = {element_type(v, memo, depth + 1) for v in data if v is not None} - {None}
                found = types.pop() if len(types) == 1 else None
        memo[id(value)] = found
    return memo[id(value)]


# ops whose output type is their first input's (the others are shapes, axes or an exponent)
_FIRST_IS_DATA = {"Reshape", "Squeeze", "Unsqueeze", "Split", "Slice", "Expand", "Pow", "ReduceMean"}


PREPASS_DISABLED = ["MatMulScaleFusion"]


def ort_prepass(model: ir.Model, level: int, use_gpu: bool, source_dir: Path | None) -> ir.Model:
    """Run ONNX Runtime's own graph optimizer at ``level`` first; fusing continues on its output."""
    import onnxruntime as ort

    levels = {1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, 2: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              99: ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    with tempfile.TemporaryDirectory(prefix="mlstep-prepass-") as tmp:
        src = Path(tmp) / "in.onnx"
        dst = Path(tmp) / "out.onnx"
        ir.save(model, src, external_data="in.onnx.data")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[level]
        so.optimized_model_filepath = str(dst)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "out.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_gpu else ["CPUExecutionProvider"]
        so.log_severity_level = 3
        # MatMulScaleFusion folds the attention scale into com.microsoft FusedMatMul, which hides the
        # attention subgraph from our fusion; every other ORT transformer runs as at that level.
        ort.InferenceSession(str(src), so, providers=providers, disabled_optimizers=PREPASS_DISABLED)
        result = ir.load(dst)
        # Materialise weights before the temporary folder goes away.
        for value in result.graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    return result


def input_int32(model: ir.Model) -> ir.Model:
    """int64 graph inputs become int32.

    Consumers that take int32 as they are (Gather indices, Shape, Cast, the com.microsoft fused ops' id
    and mask inputs) read the new input directly; any other consumer reads one shared Cast to int64.
    Cast(x -> int32) nodes on the input become no-ops and are removed, so no extra Cast is left behind.
    """
    graph = model.graph
    for value in list(graph.inputs):
        if value.dtype != ir.DataType.INT64:
            continue
        value.dtype = ir.DataType.INT32
        widened: ir.Value | None = None
        for node, index in list(value.uses()):
            if _takes_int32(node, index):
                if node.op_type == "Cast" and node.domain == "" and node.attributes.get_int("to") == ir.DataType.INT32:
                    ir.convenience.replace_all_uses_with(node.outputs[0], value)
                continue
            if widened is None:
                cast = ir.node("Cast", [value], attributes={"to": ir.DataType.INT64}, name=f"{value.name}_int64")
                graph.insert_before(_first_user(graph, value), cast)
                widened = cast.outputs[0]
                widened.name = f"{value.name}_int64"
                widened.dtype = ir.DataType.INT64
                widened.shape = value.shape
            node.replace_input_with(index, widened)
    common.RemoveUnusedNodesPass()(model)
    return model


def _takes_int32(node: ir.Node, index: int) -> bool:
    if node.domain == MS_DOMAIN:
        return True
    if node.op_type in ("Shape", "Cast", "Size"):
        return True
    return node.op_type == "Gather" and index == 1


def _first_user(graph: ir.Graph, value: ir.Value) -> ir.Node:
    users = {id(n) for n, _ in value.uses()}
    for node in graph:
        if id(node) in users:
            return node
    raise ValueError(f"{value.name} has no users")


def count_fused_ops(model: ir.Model) -> dict[str, int]:
    counts = Counter(node.op_type for node in model.graph if node.op_type in FUSED_OPS
                     and (node.domain == MS_DOMAIN or node.op_type == "LayerNormalization"))
    return dict(sorted(counts.items()))
