"""Tanh GELU ('gelu_new') -> FastGelu with the bias absorbed: ALBERT on every layout, plus a near-miss."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ATTENTIONS, LAYOUTS
from onnx import TensorProto, helper
from test_gelu import CTX, assert_parity, ops

from mlstep.export import ExportSpec, tiny_config
from mlstep.optimizer.fusions._base import MS_DOMAIN, const_scalar, run_fusion
from mlstep.optimizer.fusions.fast_gelu import FUSION
from mlstep.optimizer.passes import prepare


def test_albert_uses_gelu_new():
    assert tiny_config("albert").hidden_act == "gelu_new"


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("exporter,opset", LAYOUTS)
def test_fast_gelu_every_layout(exported, tmp_path, exporter, opset, attention):
    path = exported(ExportSpec("albert", exporter, opset, attention))
    model = prepare(ir.load(path))
    log = run_fusion(FUSION, model, CTX)
    counts = ops(model)
    assert log.fused == 2                                  # ALBERT shares one layer, run twice
    assert counts[(MS_DOMAIN, "FastGelu")] == 2
    assert all(len(n.inputs) == 2 for n in model.graph if n.op_type == "FastGelu")   # bias absorbed
    assert counts[("", "Tanh")] == 0
    assert not [n for n in model.graph if n.op_type == "Pow" and const_scalar(n.inputs[1]) == 3.0]
    assert_parity(path, model, tmp_path)


def _tanh_gelu_graph(coeff: float, cube: str = "pow") -> ir.Model:
    """0.5 * x * (1 + tanh(0.79788 * (x + coeff * x^3))), constants on the left as dynamo writes them."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
              (("three", 3.0), ("c", coeff), ("k", 0.7978845608), ("one", 1.0), ("half", 0.5))]
    cube_nodes = [helper.make_node("Pow", ["x", "three"], ["x3"])] if cube == "pow" else \
        [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"])]
    nodes = cube_nodes + [
        helper.make_node("Mul", ["c", "x3"], ["cx3"]), helper.make_node("Add", ["cx3", "x"], ["s"]),
        helper.make_node("Mul", ["k", "s"], ["ks"]), helper.make_node("Tanh", ["ks"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["p"]), helper.make_node("Mul", ["half", "x"], ["hx"]),
        helper.make_node("Mul", ["p", "hx"], ["y"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], consts),
                              opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_handmade_forms_fuse(cube):
    model = _tanh_gelu_graph(0.044715, cube)
    assert run_fusion(FUSION, model, CTX).fused == 1
    assert ops(model)[(MS_DOMAIN, "FastGelu")] == 1 and ops(model)[("", "Tanh")] == 0


def test_wrong_coefficient_does_not_fuse():
    model = _tanh_gelu_graph(0.05)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[("", "Tanh")] == 1
    assert any("cubic coefficient is 0.05" in reason for reason in log.refused), log.refused


def _megatron_gelu_graph(inner_one: float = 1.0):
    """Megatron's gelu_impl: 0.5 * x * (1 + tanh(0.79788 * x * (1 + 0.044715 * x * x))), x a Cast as exported."""
    x = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
              (("half", 0.5), ("k", 0.7978846), ("c", 0.044715), ("one_in", inner_one), ("one", 1.0))]
    nodes = [helper.make_node("Cast", ["h"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["x", "k"], ["kx"]),
             helper.make_node("Mul", ["x", "c"], ["cx"]), helper.make_node("Mul", ["cx", "x"], ["cxx"]),
             helper.make_node("Add", ["cxx", "one_in"], ["p_in"]), helper.make_node("Mul", ["kx", "p_in"], ["inner"]),
             helper.make_node("Tanh", ["inner"], ["t"]), helper.make_node("Add", ["t", "one"], ["p"]),
             helper.make_node("Mul", ["hx", "p"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], consts),
                             opset_imports=[helper.make_opsetid("", 12)], ir_version=8)


@pytest.mark.parametrize("inner_one", [1.0, 2.0])
def test_megatron_factored_form(inner_one):
    proto = _megatron_gelu_graph(inner_one)
    model = ir.serde.deserialize_model(proto)
    log = run_fusion(FUSION, model, CTX, explain=True)
    fused = inner_one == 1.0
    assert log.fused == int(fused) and ops(model)[(MS_DOMAIN, "FastGelu")] == int(fused)
    if not fused:
        assert any("inner offset is 2" in reason for reason in log.refused), log.refused
    h = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
    np.testing.assert_allclose(run(ir.serde.serialize_model(model)), run(proto), atol=1e-5, rtol=1e-4)
