"""Residual Add + LayerNorm -> SkipLayerNormalization (bias absorbed, sum output), plus near-misses."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ATTENTIONS, LAYOUTS
from onnx import TensorProto, helper
from test_gelu import CTX, assert_parity, ops

from mlstep.export import ENCODER_FAMILIES, ExportSpec
from mlstep.optimizer.fusions import layer_norm
from mlstep.optimizer.fusions._base import MS_DOMAIN, run_fusion
from mlstep.optimizer.fusions.skip_layer_norm import FUSION
from mlstep.optimizer.passes import prepare


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("exporter,opset", LAYOUTS)
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_skip_layer_norm_every_layout(exported, tmp_path, family, exporter, opset, attention):
    path = exported(ExportSpec(family, exporter, opset, attention))
    model = prepare(ir.load(path))
    if opset < 17:
        run_fusion(layer_norm.FUSION, model, CTX)
    log = run_fusion(FUSION, model, CTX)
    counts = ops(model)
    skips = [n for n in model.graph if n.op_type == "SkipLayerNormalization"]
    # 2 residual blocks per layer, output-dense bias absorbed; RoBERTa's embedding sum (position ids from
    # the mask, so [B, S, H]) also qualifies, the others add a [1, S, H] position table and are refused.
    embedding = 1 if family == "roberta" else 0
    assert log.fused == counts[(MS_DOMAIN, "SkipLayerNormalization")] == 4 + embedding
    assert sum(len(n.inputs) == 5 for n in skips) == 4
    assert counts[("", "LayerNormalization")] == 1 - embedding
    assert_parity(path, model, tmp_path)


def _residual(b_shape=("b", "s", 8), b_const=False, axis=-1, sum_used=False) -> ir.Model:
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", "s", 8])
    inputs = [a]
    consts = [helper.make_tensor("g", TensorProto.FLOAT, [8], np.linspace(0.5, 1.5, 8)),
              helper.make_tensor("beta", TensorProto.FLOAT, [8], np.linspace(-0.1, 0.1, 8))]
    if b_const:
        consts.append(helper.make_tensor("b", TensorProto.FLOAT, [8], [0.3] * 8))
    else:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape)))
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "g", "beta"], ["y"], axis=axis, epsilon=1e-5)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if sum_used:  # pre-LN block: the residual stream goes on past the LayerNorm
        nodes.append(helper.make_node("Add", ["sum", "y"], ["z"]))
        outputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, consts),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def test_sum_with_other_users_reads_output_3(tmp_path):
    original = tmp_path / "original.onnx"
    model = _residual(sum_used=True)
    ir.save(model, original)
    assert run_fusion(FUSION, model, CTX).fused == 1
    (skip,) = [n for n in model.graph if n.op_type == "SkipLayerNormalization"]
    assert skip.domain == MS_DOMAIN and skip.outputs[3].uses()
    fused = tmp_path / "fused.onnx"
    ir.save(model, fused)
    feed = {"a": np.random.default_rng(0).standard_normal((2, 8, 8), dtype=np.float32),
            "b": np.random.default_rng(1).standard_normal((2, 8, 8), dtype=np.float32)}
    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                for p in (original, fused))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(b_shape=(1, "s", 8)), "differ or broadcast"),
    (dict(b_const=True), "is a constant"),
    (dict(axis=1), "not the last axis"),
])
def test_near_miss_does_not_fuse(kwargs, reason):
    model = _residual(**kwargs)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[("", "LayerNormalization")] == 1
    assert any(reason in r for r in log.refused), log.refused


def _addends(a_batch: str, b_batch: str, relate: bool) -> ir.Model:
    """LayerNorm(a + b) where a and b spell their batch differently; ``relate``: b = a * c is computed from a
    first (the Mul's broadcast shows the batches equal before the residual Add is reached)."""
    f = helper.make_tensor_value_info
    inputs = [f("a", TensorProto.FLOAT, [a_batch, "s", 8]), f("c", TensorProto.FLOAT, [b_batch, "s", 8])]
    nodes = [helper.make_node("Mul", ["a", "c"], ["b"])] if relate else [helper.make_node("Relu", ["c"], ["b"])]
    nodes += [helper.make_node("Add", ["a", "b"], ["sum"]),
              helper.make_node("LayerNormalization", ["sum", "g", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    consts = [helper.make_tensor("g", TensorProto.FLOAT, [8], np.linspace(0.5, 1.5, 8)),
              helper.make_tensor("beta", TensorProto.FLOAT, [8], np.linspace(-0.1, 0.1, 8))]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, [f("y", TensorProto.FLOAT, None)], consts),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return ir.serde.deserialize_model(proto)


def test_dims_spelled_apart_but_shown_equal_fuse(tmp_path):
    """dynamo's s33 / s6: one batch once an op before the residual relates them; parity at batch 3."""
    model = _addends("s33", "s6", relate=True)
    original = tmp_path / "original.onnx"
    ir.save(model, original)
    assert run_fusion(FUSION, model, CTX, explain=True).fused == 1
    fused = tmp_path / "fused.onnx"
    ir.save(model, fused)
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((3, 5, 8), dtype=np.float32), "c": rng.standard_normal((3, 5, 8), dtype=np.float32)}
    ref, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
                for p in (original, fused))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_dims_nothing_shows_equal_do_not_fuse():
    """Different names and no op before the residual Add relating them: one may be 1 and broadcast, which
    SkipLayerNormalization cannot do; refused (the Add itself is not taken as evidence)."""
    model = _addends("b1", "b2", relate=False)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("differ or broadcast" in r for r in log.refused), log.refused


@pytest.mark.parametrize("family,exporter,opset,attention", [("bert", "torchscript", 14, "eager"),
                                                             ("roberta", "torchscript", 17, "sdpa")])
def test_without_token_type_input_residuals_fuse(exported, tmp_path, family, exporter, opset, attention):
    """No token_type_ids input: the export gathers buffered token types (GatherElements / Expand), whose
    shapes were unknown downstream; every residual (and the attention) now fuses, with parity."""
    from mlstep.optimizer import optimize

    path = exported(ExportSpec(family, exporter, opset, attention, token_type_ids=False))
    result = optimize(ir.load(path))
    assert result.coverage["skip_layer_norm"].complete, result.summary_lines()
    assert result.coverage["attention"].complete, result.summary_lines()
    assert result.fusions["SkipLayerNormalization"] >= 4
    assert_parity(path, result.model, tmp_path)
