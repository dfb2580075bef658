"""Coverage: the blocks the detector sees per kind, how many a fusion took, and a plain reason per miss; the
summary never prints ``fused 0`` without a reason."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "fusions"))
from wild_exports import export_encoder_runtime_scale  # noqa: E402

from mlstep.export import ExportSpec  # noqa: E402
from mlstep.optimizer import OptimizeOptions, optimize  # noqa: E402
from mlstep.optimizer.coverage import incomplete, nothing_detected  # noqa: E402
from mlstep.optimizer.passes import prepare  # noqa: E402


def counts(result) -> dict[str, tuple[int, int]]:
    return {kind: (c.fused, c.detected) for kind, c in result.coverage.items()}


def assert_every_zero_explained(result) -> None:
    for line in result.summary_lines():
        assert not re.search(r"fused 0$", line), result.summary_lines()


@pytest.mark.parametrize("exporter,opset", [("torchscript", 14), ("dynamo", 18)])
def test_a_fully_fused_bert_covers_every_block(exported, exporter, opset):
    result = optimize(ir.load(exported(ExportSpec("bert", exporter, opset, "sdpa"))))
    assert counts(result) == {"attention": (2, 2), "embedding": (1, 1), "layer_norm": (5, 5),
                              "skip_layer_norm": (4, 4), "gelu": (2, 2)}
    assert not incomplete(result.coverage)
    assert_every_zero_explained(result)


def test_gpt2_with_past_covers_every_block(exported_gpt2):
    result = optimize(ir.load(exported_gpt2("lm", "torchscript", 14, "sdpa", True)))
    assert counts(result) == {"attention": (2, 2), "embedding": (0, 0), "layer_norm": (5, 5),
                              "skip_layer_norm": (5, 5), "gelu": (2, 2)}
    assert_every_zero_explained(result)


def test_a_disabled_fusion_is_a_miss_with_its_reason(exported):
    result = optimize(ir.load(exported(ExportSpec("bert", "torchscript", 17, "sdpa"))),
                      OptimizeOptions(disabled_fusions=frozenset({"attention"})))
    attention = result.coverage["attention"]
    assert (attention.fused, attention.detected) == (0, 2)
    assert attention.misses == ("layer 0: disabled by option", "layer 1: disabled by option")
    assert attention.line() == "attention 0/2: layer 0: disabled by option"
    assert_every_zero_explained(result)


def test_a_refused_attention_says_why_without_verbose(tmp_path):
    """A runtime scale read from the sequence axis (not a constant): each layer's miss names the scale."""
    path = export_encoder_runtime_scale("bert", 17, tmp_path / "bert-rt.onnx")
    model = prepare(ir.load(path))
    for node in model.graph:
        if node.op_type == "Slice" and next(iter(node.outputs[0].uses()))[0].op_type == "Cast":
            start = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-2], np.int64))})
            end = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1], np.int64))})
            model.graph.insert_before(node, [start, end])
            node.replace_input_with(1, start.outputs[0])
            node.replace_input_with(2, end.outputs[0])
    result = optimize(model)
    attention = result.coverage["attention"]
    assert (attention.fused, attention.detected) == (0, 2)
    assert len(attention.misses) == 2 and all("scale" in miss for miss in attention.misses), attention.misses
    assert attention.misses[0].startswith("layer 0:") and attention.misses[1].startswith("layer 1:")
    assert result.coverage["skip_layer_norm"].complete                # the rest still fused
    assert_every_zero_explained(result)


def _linear_model(path):
    """y = x @ W + b: no block of any kind."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.ones((4, 4), np.float32), "W"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a_graph_without_transformer_blocks_detects_nothing(tmp_path):
    result = optimize(ir.load(_linear_model(tmp_path / "linear.onnx")))
    assert nothing_detected(result.coverage)
    assert_every_zero_explained(result)
