"""ONNX's own Gelu (opset 20) and Attention (opset 23), as torch's dynamo exporter emits them at those opsets,
expanded to their definitions (standard_ops.py) and fused like every other layout; put back where no fusion
takes them.

Positive: BERT (native Gelu + Attention) and GPT-2 LM with past (Attention, past concatenated outside) exported by
dynamo at opset 23: fully fused, fp32 and fp16 parity at batch 2 with masks padded right and left, sequences 8
and 64, and for GPT-2 past 1 and 17 with 1 and 8 new tokens. Hand-made opset-20 graphs: ``Gelu`` with
``approximate="none"`` / ``"tanh"`` after a MatMul + bias become BiasGelu / FastGelu(bias), numerically checked.
Negative: an Attention with ``is_causal=1`` (not expanded: kept, the reason in the coverage), a mask inverted so
that it is no padding mask (expanded, refused by the fusion, the standard op put back), the attention-unfused
form (no attention fusion: the standard op, not its decomposition, is what the form holds).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from mlstep.export import ExportSpec
from mlstep.optimizer import OptimizeOptions, optimize
from mlstep.optimizer.fusions._base import MS_DOMAIN
from mlstep.precision import to_fp16
from mlstep.validate.parity import check_parity, parity_cases

BERT23 = ExportSpec("bert", "dynamo", 23, "sdpa")


def ops(model: ir.Model) -> Counter:
    return Counter((n.domain, n.op_type) for n in model.graph)


def assert_parity(source: Path, model: ir.Model, tmp_path: Path, fp16: bool = True) -> None:
    """fp32 (and fp16) parity with the product's own cases: batch 2, no / right / left padding, s8 and s64,
    past {1, 17} x new {1, 8} for a model with past."""
    cases = parity_cases(ir.load(source), batch=2, sequence=8)
    assert any("left" in c.name for c in cases) and any(c.name.startswith("s64") for c in cases)
    for precision, candidate in (("fp32", model),) + ((("fp16", to_fp16(model)),) if fp16 else ()):
        path = tmp_path / f"{precision}.onnx"
        ir.save(candidate, path)
        result = check_parity(source, path, precision, cases)
        assert result.passed, (precision, result.worst_output, result.worst_case, result.max_abs_diff)


def test_bert_opset23_fully_fused(exported, tmp_path):
    source = exported(BERT23)
    before = ops(ir.load(source))
    assert before[("", "Attention")] == 2 and before[("", "Gelu")] == 2       # what dynamo emits at opset 23
    result = optimize(ir.load(source))
    counts = ops(result.model)
    assert counts[(MS_DOMAIN, "Attention")] == 2 and counts[(MS_DOMAIN, "BiasGelu")] == 2
    assert counts[(MS_DOMAIN, "EmbedLayerNormalization")] == 1 and counts[(MS_DOMAIN, "SkipLayerNormalization")] == 4
    assert not counts[("", "Attention")] and not counts[("", "Gelu")] and not counts[("", "Softmax")]
    assert all(c.complete for c in result.coverage.values()), result.coverage
    assert result.coverage["attention"].detected == 2 and result.coverage["gelu"].detected == 2
    assert_parity(source, result.model, tmp_path)


def test_gpt2_with_past_opset23_fully_fused(exported_gpt2, tmp_path):
    source = exported_gpt2("lm", "dynamo", 23, "sdpa", True)
    assert ops(ir.load(source))[("", "Attention")] == 2
    result = optimize(ir.load(source))
    counts = ops(result.model)
    assert counts[(MS_DOMAIN, "MultiHeadAttention")] == 2 and counts[(MS_DOMAIN, "FastGelu")] == 2
    assert not counts[("", "Attention")] and not counts[("", "Softmax")]
    assert all(c.complete for c in result.coverage.values()), result.coverage
    assert_parity(source, result.model, tmp_path)


def _first_attention(model: ir.Model) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "Attention" and n.domain == "")


def test_is_causal_attention_is_kept_with_its_reason(exported, tmp_path):
    """Near miss: layer 0 made causal (is_causal=1): not expanded, not fused, said; layer 1 still fused."""
    model = ir.load(exported(BERT23))
    _first_attention(model).attributes["is_causal"] = ir.AttrInt64("is_causal", 1)
    source = tmp_path / "causal.onnx"
    ir.save(model, source)
    result = optimize(ir.load(source))
    counts = ops(result.model)
    assert counts[("", "Attention")] == 1 and counts[(MS_DOMAIN, "Attention")] == 1
    coverage = result.coverage["attention"]
    assert (coverage.detected, coverage.fused) == (2, 1)
    assert "is_causal=1" in coverage.misses[0], coverage.misses
    assert_parity(source, result.model, tmp_path, fp16=False)


def test_an_inverted_mask_is_refused_and_the_standard_op_put_back(exported, tmp_path):
    """Near miss: layer 0 attends to the padding only (its boolean mask inverted). The expansion is exact but
    no padding mask: the attention fusion refuses it, and the ONNX Attention comes back (not its decomposition)."""
    model = ir.load(exported(BERT23))
    attention = _first_attention(model)
    inverted = ir.node("Not", [attention.inputs[3]], name="inverted_mask")
    inverted.outputs[0].dtype = ir.DataType.BOOL
    inverted.outputs[0].name = "inverted_mask"
    model.graph.insert_before(attention, inverted)
    attention.replace_input_with(3, inverted.outputs[0])
    source = tmp_path / "inverted.onnx"
    ir.save(model, source)
    result = optimize(ir.load(source))
    counts = ops(result.model)
    assert counts[("", "Attention")] == 1 and counts[(MS_DOMAIN, "Attention")] == 1
    assert not counts[("", "Softmax")] and not counts[("", "IsNaN")]        # the decomposition is gone
    coverage = result.coverage["attention"]
    assert (coverage.detected, coverage.fused) == (2, 1) and coverage.misses
    assert_parity(source, result.model, tmp_path, fp16=False)


def test_attention_unfused_form_holds_the_standard_op(exported, tmp_path):
    source = exported(BERT23)
    result = optimize(ir.load(source), OptimizeOptions(disabled_fusions=("attention",)))
    counts = ops(result.model)
    assert counts[("", "Attention")] == 2 and not counts[(MS_DOMAIN, "Attention")]
    assert not counts[("", "Softmax")] and counts[(MS_DOMAIN, "BiasGelu")] == 2
    assert_parity(source, result.model, tmp_path, fp16=False)


def _gelu_graph(approximate: str, bias: bool) -> ir.Model:
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", 16])
    inits = [helper.make_tensor("w", TensorProto.FLOAT, [8, 16], rng.standard_normal(128).tolist()),
             helper.make_tensor("bias", TensorProto.FLOAT, [16], rng.standard_normal(16).tolist())]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"])]
    nodes += [helper.make_node("Add", ["mm", "bias"], ["pre"])] if bias else []
    nodes += [helper.make_node("Gelu", ["pre" if bias else "mm"], ["y"], approximate=approximate)]
    graph = helper.make_graph(nodes, "gelu", [x], [y], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))


@pytest.mark.parametrize("approximate,bias,fused", [("none", True, "BiasGelu"), ("tanh", True, "FastGelu"),
                                                    ("none", False, "Gelu"), ("tanh", False, "FastGelu")])
def test_standard_gelu(tmp_path, approximate, bias, fused):
    model = _gelu_graph(approximate, bias)
    source = tmp_path / "source.onnx"
    ir.save(model, source)
    result = optimize(ir.load(source), OptimizeOptions(model_type="bert"))
    counts = ops(result.model)
    assert counts[(MS_DOMAIN, fused)] == 1 and not counts[("", "Gelu")] and not counts[("", "Add")]
    assert result.coverage["gelu"].detected == 1 and result.coverage["gelu"].complete
    target = tmp_path / "fused.onnx"
    ir.save(result.model, target)
    feed = {"x": np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32) * 3}
    ref = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_standard_gelu_left_as_it_is_when_no_fusion_runs(tmp_path):
    """The unfused form: the Gelu fusions disabled, the ONNX Gelu comes back (not Erf arithmetic)."""
    model = _gelu_graph("none", True)
    result = optimize(model, OptimizeOptions(model_type="bert", disabled_fusions=("gelu", "fast_gelu")))
    counts = ops(result.model)
    assert counts[("", "Gelu")] == 1 and not counts[("", "Erf")]
    assert result.coverage["gelu"].detected == 1 and not result.coverage["gelu"].complete
