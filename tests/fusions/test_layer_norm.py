"""Decomposed LayerNorm (TorchScript below opset 17) -> LayerNormalization, plus a near-miss."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ATTENTIONS
from onnx import TensorProto, helper, numpy_helper
from test_gelu import CTX, assert_parity, ops

from mlstep.export import ENCODER_FAMILIES, ExportSpec
from mlstep.optimizer.fusions._base import run_fusion
from mlstep.optimizer.fusions.layer_norm import FUSION
from mlstep.optimizer.passes import prepare


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_decomposed_layer_norm_opset14(exported, tmp_path, family, attention):
    path = exported(ExportSpec(family, "torchscript", 14, attention))
    model = prepare(ir.load(path))
    log = run_fusion(FUSION, model, CTX)
    counts = ops(model)
    assert log.fused == 5                        # embeddings + 2 per layer (ALBERT: its shared layer, twice)
    assert counts[("", "LayerNormalization")] == 5
    assert counts[("", "ReduceMean")] == 0 and counts[("", "Sqrt")] == 0
    assert model.opset_imports[""] == 14         # ORT takes LayerNormalization in an opset-14 model
    assert_parity(path, model, tmp_path)


@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), ("dynamo", 18)])
def test_native_layer_norm_untouched(exported, exporter, opset):
    model = prepare(ir.load(exported(ExportSpec("bert", exporter, opset, "sdpa"))))
    assert run_fusion(FUSION, model, CTX).fused == 0


def _decomposed(axis: int, scale: bool = True) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-5]),
              helper.make_tensor("g", TensorProto.FLOAT, [8], [1.5] * 8),
              helper.make_tensor("beta", TensorProto.FLOAT, [8], [0.1] * 8)]
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[axis]), helper.make_node("Sub", ["x", "m"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["v"], axes=[axis]),
             helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Reciprocal", ["sd"], ["r"]), helper.make_node("Mul", ["d", "r"], ["n"])]
    nodes += [helper.make_node("Mul", ["g", "n"], ["gn"]), helper.make_node("Add", ["beta", "gn"], ["y"])] if scale \
        else [helper.make_node("Add", ["n", "beta"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], consts),
                              opset_imports=[helper.make_opsetid("", 14)])
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("scale", [True, False])
def test_handmade_forms_fuse(scale):
    model = _decomposed(axis=-1, scale=scale)
    assert run_fusion(FUSION, model, CTX).fused == 1
    (node,) = [n for n in model.graph]
    assert node.op_type == "LayerNormalization" and node.attributes.get_float("epsilon") == pytest.approx(1e-5)


def test_non_last_axis_does_not_fuse():
    model = _decomposed(axis=1)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[("", "ReduceMean")] == 2
    assert any("not over the last axis" in reason for reason in log.refused), log.refused


def _megatron_layer_norm(other_mean: bool = False):
    """Megatron's export (PyTorch 1.9, opset 12): x - mean written twice (one Sub for the square, one for the
    division), a Cast to float around the division, then * gamma + beta. ``other_mean``: the division's Sub takes a
    mean over axis 1 instead (a near-miss: not a LayerNorm)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "gamma"),
             numpy_helper.from_array((0.1 * rng.standard_normal(8)).astype(np.float32), "beta")]
    nodes = [helper.make_node("Cast", ["h"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("ReduceMean", ["x"], ["mean1"], axes=[1], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["d"]), helper.make_node("Pow", ["d", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "mean1" if other_mean else "mean"], ["d2"]),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["d2", "std"], ["n"]),
             helper.make_node("Cast", ["n"], ["nc"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["gamma", "nc"], ["s"]), helper.make_node("Add", ["s", "beta"], ["y"])]
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 8])
    graph = helper.make_graph(nodes, "megatron_ln", [h],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=7)


def _run_h(proto, h):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]


@pytest.mark.parametrize("other_mean", [False, True])
def test_megatron_layer_norm(other_mean):
    proto = _megatron_layer_norm(other_mean)
    model = prepare(ir.serde.deserialize_model(proto))
    log = run_fusion(FUSION, model, CTX)
    assert log.fused == (0 if other_mean else 1)
    assert ops(model)[("", "LayerNormalization")] == (0 if other_mean else 1)
    h = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run_h(ir.serde.serialize_model(model), h), _run_h(proto, h), atol=1e-5, rtol=1e-4)
