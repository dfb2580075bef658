"""Decomposed LayerNorm (TorchScript below opset 17) -> LayerNormalization, plus a near-miss."""
from __future__ import annotations

import onnx_ir as ir
import pytest
from conftest import ATTENTIONS
from onnx import TensorProto, helper
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
