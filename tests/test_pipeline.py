"""The whole optimizer (optimize / optimize_file) on real exports: exact fused counts with parity, and every
option: input_int32, opt_level pre-pass, disabled fusions, num_heads checks, verbose reasons, nothing to
fuse, detection on every family."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from mlstep.errors import UsageError
from mlstep.export import ENCODER_FAMILIES, ExportSpec
from mlstep.optimizer import FUSIONS, OptimizeOptions, optimize, optimize_file
from mlstep.optimizer.detect import Detected
from mlstep.validate import check_parity, synthesize_inputs

BERT_LAYOUTS = [("dynamo", 18, "sdpa"), ("torchscript", 14, "eager")]
FUSIONS_IN_ORDER = ("gemm_to_matmul", "tensordot", "einsum", "layer_norm", "layer_norm_tf", "gelu", "fast_gelu",
                    "attention", "causal_attention", "packed_causal_attention", "embed_layer_norm", "skip_layer_norm")
FULLY_FUSED = {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}


def op_counts(model: ir.Model) -> Counter:
    return Counter((n.domain or "", n.op_type) for n in model.graph)


def assert_parity(original: Path, model: ir.Model, tmp_path: Path, int32: bool = False) -> None:
    """fp32 parity (|a-b| <= 1e-4 + 1e-3|ref|) against the original under ORT_DISABLE_ALL, batch 3, right-,
    left- and un-padded masks."""
    out = tmp_path / "optimized.onnx"
    ir.save(model, out)
    cases = synthesize_inputs(ir.load(original), batch=3)
    assert {c.name for c in cases} == {"no-padding", "right-padded", "left-padded"}
    assert any(not c.feeds["attention_mask"].all() for c in cases)
    if int32:  # feed what an int32 caller sends (the reference session widens them back)
        for case in cases:
            case.feeds = {k: v.astype(np.int32) for k, v in case.feeds.items()}
    result = check_parity(original, out, "fp32", cases)
    assert result.passed, (result.worst_output, result.worst_case, result.max_abs_diff)


@pytest.fixture(params=BERT_LAYOUTS, ids=lambda p: f"{p[0]}{p[1]}-{p[2]}")
def bert(request, exported) -> Path:
    return exported(ExportSpec("bert", *request.param))


def test_fully_fused_with_parity(bert, tmp_path):
    result = optimize_file(bert)
    assert result.fusions == FULLY_FUSED
    counts = op_counts(result.model)
    assert counts[("", "Softmax")] == counts[("", "Erf")] == counts[("", "LayerNormalization")] == 0
    assert result.detected == Detected("bert", 4, 32)
    assert_parity(bert, result.model, tmp_path)


def test_input_int32(bert, tmp_path):
    model = optimize_file(bert, OptimizeOptions(input_int32=True)).model
    inputs = model.graph.inputs
    assert {v.name: v.dtype for v in inputs} == {n: ir.DataType.INT32 for n in
                                                 ("input_ids", "attention_mask", "token_type_ids")}
    for value in inputs:
        for node, _ in value.uses():
            if node.op_type == "Cast":
                to = node.attributes.get_int("to")
                assert to != ir.DataType.INT32, f"int32 -> int32 Cast left on {value.name}"
                # a widening Cast may exist only for consumers that need int64, never narrowed again
                for user, _ in node.outputs[0].uses():
                    assert not (user.op_type == "Cast" and user.attributes.get_int("to") == ir.DataType.INT32), \
                        f"int32 -> int64 -> int32 round trip left on {value.name}"
    assert sum(n.op_type == "Cast" for n in model.graph) == 0     # the fused ops read int32 directly
    assert_parity(bert, model, tmp_path, int32=True)


@pytest.mark.parametrize("level", [1, 2, 99])
def test_opt_level_prepass_then_fusions(bert, tmp_path, level):
    result = optimize_file(bert, OptimizeOptions(opt_level=level))
    _assert_prepass_then_fused(bert, result, level, tmp_path)


@pytest.mark.parametrize("level", [1, 2])
def test_opt_level_on_torchscript_sdpa(exported, tmp_path, level):
    """ORT's pre-pass constant-folds the mask's shape arithmetic into new forms; attention must still fuse."""
    path = exported(ExportSpec("bert", "torchscript", 17, "sdpa"))
    result = optimize_file(path, OptimizeOptions(opt_level=level))
    _assert_prepass_then_fused(path, result, level, tmp_path)


_ALONE: dict[Path, int] = {}


def _fused_alone(path: Path) -> int:
    """How many blocks mlstep fuses at level 0 (no pre-pass): optimized once per export, not once per level."""
    if path not in _ALONE:
        _ALONE[path] = sum(e.fused for e in optimize_file(path).log)
    return _ALONE[path]


def _assert_prepass_then_fused(bert, result, level, tmp_path):
    # ORT's own pre-pass fuses SkipLayerNormalization (dynamo) or BiasGelu + LayerNorm (TorchScript 14) at
    # level >= 2 but never Attention or EmbedLayerNormalization; mlstep fuses the rest on its output.
    assert result.fusions == FULLY_FUSED
    by_mlstep = {e.name: e.fused for e in result.log}
    assert by_mlstep["attention"] == 2 and by_mlstep["embed_layer_norm"] == 1
    if level >= 2:  # the pre-pass really ran: it took over part of the work mlstep does at level 0
        assert sum(by_mlstep.values()) < _fused_alone(bert), by_mlstep
    assert_parity(bert, result.model, tmp_path)


def test_disabled_attention_leaves_softmax(bert, tmp_path):
    result = optimize_file(bert, OptimizeOptions(disabled_fusions=frozenset({"attention"})))
    counts = op_counts(result.model)
    assert counts[("", "Softmax")] == 2
    assert "Attention" not in result.fusions
    assert result.fusions == {k: v for k, v in FULLY_FUSED.items() if k != "Attention"}
    entry = next(e for e in result.log if e.name == "attention")
    assert entry.fused == 0 and entry.refused == ["disabled by option"]
    assert_parity(bert, result.model, tmp_path)


def test_unknown_fusion_name_is_refused(bert):
    assert "attention" in FUSIONS
    with pytest.raises(UsageError, match="unknown fusion"):
        optimize_file(bert, OptimizeOptions(disabled_fusions=frozenset({"atention"})))


def test_num_heads_explicit(bert):
    result = optimize_file(bert, OptimizeOptions(num_heads=4))
    assert result.detected.num_heads == 4 and result.fusions == FULLY_FUSED
    # a count the graph's head split contradicts: the graph's is used, and said (not silent, not an error)
    overruled = optimize_file(bert, OptimizeOptions(num_heads=8, hidden_size=16))
    assert overruled.detected.num_heads == 4 and overruled.detected.hidden_size == 32
    assert overruled.fusions == FULLY_FUSED
    assert overruled.detected.notes == ("hidden_size 16 contradicts the graph: used its hidden size 32",
                                        "num_heads 8 contradicts the graph: used its 4 heads")
    assert set(overruled.detected.notes) <= set(overruled.summary_lines())


def _softmax_over_queries(model: ir.Model) -> ir.Model:
    for node in model.graph:
        if node.op_type == "Softmax":
            node.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 2)
    return model


def test_verbose_says_why_a_near_miss_did_not_fuse(bert):
    quiet = optimize(_softmax_over_queries(ir.load(bert)), OptimizeOptions())
    loud = optimize(_softmax_over_queries(ir.load(bert)), OptimizeOptions(verbose=True))
    for result in (quiet, loud):
        assert "Attention" not in result.fusions
        assert op_counts(result.model)[("", "Softmax")] == 2
    assert not any(entry.refused for entry in quiet.log)
    attention = next(e for e in loud.log if e.name == "attention")
    assert attention.fused == 0
    assert attention.refused and all("Softmax over axis 2" in r for r in attention.refused), attention.refused
    lines = loud.summary_lines()
    assert any(line.startswith("attention: fused 0 (") and "axis 2" in line for line in lines), lines   # says why
    assert any(line.startswith("  refused: ") and "axis 2" in line for line in lines)


def test_nothing_to_fuse(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.linspace(-1, 1, 12))
    proto = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    original = tmp_path / "matmul.onnx"
    ir.save(ir.serde.deserialize_model(proto), original)
    result = optimize_file(original, OptimizeOptions(verbose=True))
    assert result.fusions == {}
    assert [e.name for e in result.log] == list(FUSIONS_IN_ORDER)
    assert all(e.fused == 0 for e in result.log)
    assert [n.op_type for n in result.model.graph] == ["MatMul"]
    out = tmp_path / "out.onnx"
    ir.save(result.model, out)
    cases = synthesize_inputs(ir.load(original))
    assert check_parity(original, out, "fp32", cases).passed


@pytest.mark.parametrize("exporter,opset,attention", [("torchscript", 14, "eager"), ("dynamo", 18, "sdpa")])
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_detects_sizes_on_every_family(exported, family, exporter, opset, attention):
    result = optimize_file(exported(ExportSpec(family, exporter, opset, attention)))
    assert result.detected == Detected("bert", 4, 32)
    gelu = "FastGelu" if family == "albert" else "BiasGelu"     # ALBERT's gelu_new is the tanh form
    assert result.fusions == {"Attention": 2, gelu: 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}


def test_external_data_source_gives_a_self_contained_output(tmp_path):
    """A source whose weights live in a .data file (under the 1 GiB threshold): the saved variant must carry
    its own weights beside it, not point into the source folder."""
    from mlstep.export import build_model, export_encoder, tiny_config
    from mlstep.optimizer.io import save

    src = export_encoder(build_model(tiny_config("bert")), tmp_path / "src" / "model.onnx", "dynamo", 18,
                         external_data=True)
    assert any(p.suffix == ".data" for p in src.parent.iterdir())
    out = save(optimize_file(src).model, tmp_path / "out" / "model.onnx")
    assert (out.parent / "model.onnx.data").is_file()
    moved = tmp_path / "moved"
    (tmp_path / "out").rename(moved)     # nothing may point back at the source or the old folder
    (tmp_path / "src").rename(tmp_path / "gone")
    original = tmp_path / "gone" / "model.onnx"
    result = check_parity(original, moved / "model.onnx", "fp32", synthesize_inputs(ir.load(original), batch=3))
    assert result.passed, (result.worst_output, result.worst_case, result.max_abs_diff)
