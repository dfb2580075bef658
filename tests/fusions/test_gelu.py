"""Erf GELU -> Gelu / BiasGelu: every layout of the encoders that use erf gelu, plus a near-miss."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mlstep.export import ExportSpec
from mlstep.optimizer.fusions._base import MS_DOMAIN, FusionContext, run_fusion
from mlstep.optimizer.fusions.gelu import FUSION
from mlstep.optimizer.passes import prepare
from conftest import ATTENTIONS, LAYOUTS

CTX = FusionContext("bert", 0, 32)
MASKS = {"right": [[1] * 8, [1] * 5 + [0] * 3], "left": [[1] * 8, [0] * 3 + [1] * 5]}


def ops(model: ir.Model) -> Counter:
    return Counter((n.domain, n.op_type) for n in model.graph)


def assert_parity(original, fused: ir.Model, tmp_path) -> None:
    """ORT (no graph optimizations) on the original vs the fused model, masks padded right and left."""
    path = tmp_path / "fused.onnx"
    ir.save(fused, path)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(original), so, providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    names = [i.name for i in ref.get_inputs()]
    for mask in MASKS.values():
        feed = {"input_ids": rng.integers(3, 50, (2, 8)), "attention_mask": np.array(mask),
                "token_type_ids": np.zeros((2, 8), dtype=np.int64)}
        feed = {k: v.astype(np.int64) for k, v in feed.items() if k in names}
        np.testing.assert_allclose(got.run(None, feed)[0], ref.run(None, feed)[0], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("exporter,opset", LAYOUTS)
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta"])
def test_bias_gelu_every_layout(exported, tmp_path, family, exporter, opset, attention):
    path = exported(ExportSpec(family, exporter, opset, attention))
    model = prepare(ir.load(path))
    log = run_fusion(FUSION, model, CTX)
    counts = ops(model)
    assert log.fused == 2
    assert counts[(MS_DOMAIN, "BiasGelu")] == 2          # one per layer, the intermediate bias absorbed
    assert counts[(MS_DOMAIN, "Gelu")] == 0
    assert counts[("", "Erf")] == 0
    assert_parity(path, model, tmp_path)


def _erf_gelu_graph(divisor: float) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 8])
    consts = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in
              (("d", divisor), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["x", "d"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["xp"]),
             helper.make_node("Mul", ["xp", "half"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], consts),
                             opset_imports=[helper.make_opsetid("", 17)])


def test_handmade_gelu_fuses_without_bias():
    model = ir.serde.deserialize_model(_erf_gelu_graph(1.4142135))
    assert run_fusion(FUSION, model, CTX).fused == 1
    assert ops(model)[(MS_DOMAIN, "Gelu")] == 1


def test_wrong_constant_does_not_fuse():
    model = ir.serde.deserialize_model(_erf_gelu_graph(1.5))
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[("", "Erf")] == 1
    assert any("Div(x, 1.5)" in reason for reason in log.refused), log.refused
