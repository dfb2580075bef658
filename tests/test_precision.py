"""fp16 conversion: real BERT exports and a handmade com.microsoft graph, checked by ONNX Runtime parity."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep.export import ExportSpec
from mlstep.precision import DEFAULT_BLOCK_LIST, to_fp16
from mlstep.validate import Case, check_parity, run_reference, synthesize_inputs

BERT_SPECS = [ExportSpec("bert", "dynamo", 18, "sdpa"), ExportSpec("bert", "torchscript", 14, "eager")]


def ms_model(path, hidden: int = 16, heads: int = 2, vocab: int = 30, seed: int = 0):
    """EmbedLayerNormalization -> Attention -> SkipLayerNormalization -> FastGelu/BiasGelu FFN -> LayerNorm.

    Outputs ``last_hidden_state`` (after the FFN) and ``ffn_hidden`` (the FastGelu result).
    """
    rng = np.random.default_rng(seed)

    def w(name, *shape, scale=0.3, offset=0.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)

    inits = [w("word", vocab, hidden), w("pos", 32, hidden), w("seg", 2, hidden), w("g0", hidden, offset=1),
             w("b0", hidden), w("qkv_w", hidden, 3 * hidden), w("qkv_b", 3 * hidden), w("g1", hidden, offset=1),
             w("b1", hidden), w("skip_bias", hidden), w("w1", hidden, 2 * hidden), w("gelu_bias", 2 * hidden),
             w("w2", 2 * hidden, hidden), w("bias_gelu_bias", hidden), w("g2", hidden, offset=1), w("b2", hidden)]
    ms = "com.microsoft"
    nodes = [
        helper.make_node("EmbedLayerNormalization", ["input_ids", "segment_ids", "word", "pos", "seg", "g0", "b0"],
                         ["emb", "mask_index"], domain=ms, epsilon=1e-12),
        helper.make_node("Attention", ["emb", "qkv_w", "qkv_b", "attention_mask"], ["attn"], domain=ms,
                         num_heads=heads),
        helper.make_node("SkipLayerNormalization", ["attn", "emb", "g1", "b1", "skip_bias"], ["sln"], domain=ms,
                         epsilon=1e-12),
        helper.make_node("MatMul", ["sln", "w1"], ["h1"]),
        helper.make_node("FastGelu", ["h1", "gelu_bias"], ["ffn_hidden"], domain=ms),
        helper.make_node("MatMul", ["ffn_hidden", "w2"], ["h2"]),
        helper.make_node("BiasGelu", ["h2", "bias_gelu_bias"], ["h3"], domain=ms),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Mul", ["h3", "half"], ["h4"]),
        helper.make_node("LayerNormalization", ["h4", "g2", "b2"], ["last_hidden_state"], axis=-1, epsilon=1e-5),
    ]
    ints = [helper.make_tensor_value_info(n, TensorProto.INT32, ["batch", "sequence"])
            for n in ("input_ids", "segment_ids", "attention_mask")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "sequence", d])
            for n, d in (("last_hidden_state", hidden), ("ffn_hidden", 2 * hidden))]
    graph = helper.make_graph(nodes, "ms_block", ints, outs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ms, 1)],
                              ir_version=9)
    onnx.save(model, str(path))
    return path


def _signature(model: ir.Model):
    return ([(v.name, v.dtype) for v in model.graph.inputs], [(v.name, v.dtype) for v in model.graph.outputs])


def _fp32_initializers(model: ir.Model) -> list[str]:
    return [name for name, v in model.graph.initializers.items() if v.const_value.dtype == ir.DataType.FLOAT]


def _convert_and_check(src, dst, **kwargs):
    model = ir.load(src)
    before = ir.to_proto(model).SerializeToString()
    fp16 = to_fp16(model, **kwargs)
    assert ir.to_proto(model).SerializeToString() == before, "to_fp16 must not modify its input"
    ir.save(fp16, dst)
    ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])  # loads
    cases = synthesize_inputs(model)
    result = check_parity(src, dst, "fp16", cases)
    return model, fp16, result


@pytest.mark.parametrize("spec", BERT_SPECS, ids=lambda s: s.key)
def test_bert_export_fp16_parity(exported, tmp_path, spec):
    src = exported(spec)
    model, fp16, result = _convert_and_check(src, tmp_path / "fp16.onnx")
    assert result.passed, result
    assert result.max_abs_diff > 0  # it really ran in fp16
    assert _signature(fp16) == _signature(model)
    for name in _fp32_initializers(fp16):  # only blocked ops (and a mask fill beyond fp16) keep float32 weights
        value = fp16.graph.initializers[name]
        wide = np.abs(value.const_value.numpy()).max() > 65504        # its Add -> Softmax chain stays float32
        assert wide or all(n.op_type in DEFAULT_BLOCK_LIST for n, _ in value.uses()), name
    assert any(v.const_value.dtype == ir.DataType.FLOAT16 for v in fp16.graph.initializers.values())
    # compute is fp16: every MatMul reads float16
    matmuls = [n for n in fp16.graph if n.op_type == "MatMul"]
    assert matmuls and all(i.dtype in (ir.DataType.FLOAT16, None) for n in matmuls for i in n.inputs)
    weights = [i for n in matmuls for i in n.inputs if i.is_initializer()]
    assert weights and all(w.const_value.dtype == ir.DataType.FLOAT16 for w in weights)


def test_bert_export_block_list_keeps_softmax_fp32(exported, tmp_path):
    src = exported(BERT_SPECS[0])
    _, fp16, result = _convert_and_check(src, tmp_path / "fp16.onnx",
                                         op_block_list=DEFAULT_BLOCK_LIST | {"Softmax"})
    assert result.passed, result
    softmaxes = [n for n in fp16.graph if n.op_type == "Softmax"]
    assert softmaxes
    for node in softmaxes:
        assert node.inputs[0].dtype == ir.DataType.FLOAT and node.outputs[0].dtype == ir.DataType.FLOAT
        assert node.inputs[0].producer().op_type in ("Cast", "Add")   # Add: the fp32 mask-fill chain
        assert {c.op_type for c, _ in node.outputs[0].uses()} == {"Cast"}


def test_ms_ops_fp16_parity(tmp_path):
    src = ms_model(tmp_path / "ms.onnx")
    model, fp16, result = _convert_and_check(src, tmp_path / "fp16.onnx")
    assert result.passed, result
    assert set(result.per_output) == {"last_hidden_state", "ffn_hidden"}
    assert _signature(fp16) == _signature(model)
    assert _fp32_initializers(fp16) == []
    for node in fp16.graph:
        if node.domain == "com.microsoft":
            floats = [v for v in node.inputs if v is not None and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)]
            assert floats and all(v.dtype == ir.DataType.FLOAT16 for v in floats), node
    const = next(n for n in fp16.graph if n.op_type == "Constant")
    assert const.attributes["value"].value.dtype == ir.DataType.FLOAT16
    # outputs keep their names and float32 type through a Cast
    for out in fp16.graph.outputs:
        assert out.producer().op_type == "Cast" and out.dtype == ir.DataType.FLOAT


def test_ms_ops_fp16_without_io_types(tmp_path):
    src = ms_model(tmp_path / "ms.onnx")
    _, fp16, result = _convert_and_check(src, tmp_path / "fp16.onnx", keep_io_types=False)
    assert result.passed, result
    assert [v.dtype for v in fp16.graph.outputs] == [ir.DataType.FLOAT16] * 2
    assert [v.name for v in fp16.graph.outputs] == ["last_hidden_state", "ffn_hidden"]
    assert [v.dtype for v in fp16.graph.inputs] == [ir.DataType.INT32] * 3  # integers untouched
    assert not any(n.op_type == "Cast" for n in fp16.graph)


def test_blocked_range_stays_fp32_and_float_input_is_cast(tmp_path):
    """Range has no float16 in the schema: it and its constants stay float32, casts meet the fp16 Add."""
    nodes = [helper.make_node("Constant", [], ["start"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
             helper.make_node("Constant", [], ["limit"], value_float=4.5),
             helper.make_node("Constant", [], ["delta"], value_float=1.0),
             helper.make_node("Range", ["start", "limit", "delta"], ["r"]),
             helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("Mul", ["s", "s"], ["y"])]
    graph = helper.make_graph(nodes, "range", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
              str(tmp_path / "range.onnx"))
    model = ir.load(tmp_path / "range.onnx")
    fp16 = to_fp16(model)
    ir.save(fp16, tmp_path / "fp16.onnx")
    rng = next(n for n in fp16.graph if n.op_type == "Range")
    assert all(v.producer().op_type == "Constant" for v in rng.inputs)  # no casts into Range
    assert all(v.producer().attributes.get("value") is None or
               v.producer().attributes["value"].value.dtype == ir.DataType.FLOAT for v in rng.inputs)
    add = next(n for n in fp16.graph if n.op_type == "Add")
    assert [v.producer().op_type for v in add.inputs] == ["Cast", "Cast"]
    assert all(v.dtype == ir.DataType.FLOAT16 for v in add.inputs)
    x = np.array([1.0, -2.0, 3.25, 100.0], np.float32)
    cases = [Case("x", {"x": x})]
    assert run_reference(tmp_path / "range.onnx", cases)[0]["y"].tolist() == ((x + np.arange(0.5, 4.5)) ** 2).tolist()
    assert check_parity(tmp_path / "range.onnx", tmp_path / "fp16.onnx", "fp16", cases).passed


def test_fp16_values_are_clipped_not_overflowed_and_infinities_kept(tmp_path):
    from mlstep.precision import fp16_array

    out = fp16_array(np.array([1e6, -1e6, 1e-12, -1e-12, 0.0, np.inf, -np.inf, np.nan,
                               np.finfo(np.float32).min], np.float32))
    assert out[0] == 65504 and out[1] == -65504
    assert out[2] > 0 and out[3] < 0 and out[4] == 0  # epsilons survive
    # -inf carries meaning (a fully masked row -> NaN -> the export's IsNaN guard): kept, as is NaN.
    assert out[5] == np.inf and out[6] == -np.inf and np.isnan(out[7])
    assert out[8] == -65504                             # a finite "most negative" fill stays finite


@pytest.mark.parametrize("block", [frozenset(), frozenset({"Softmax"})], ids=["all-fp16", "softmax-blocked"])
def test_if_subgraphs_are_converted(tmp_path, block):
    """Subgraph bodies compute in float16; a blocked op's result leaving a branch is cast back to float16."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Softmax", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value_float=0.0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[numpy_helper.from_array(np.arange(1, 5, dtype=np.float32), "w")])
    src, dst = tmp_path / "if.onnx", tmp_path / "if16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(src))
    ir.save(to_fp16(ir.load(src), op_block_list=block), dst)
    x = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    cases = [Case("then", {"x": x}), Case("else", {"x": -x})]
    result = check_parity(src, dst, "fp16", cases)
    assert result.passed, result


# ------------------------------------------------------------------- fully masked rows keep their meaning

@pytest.mark.parametrize("exporter,opset", [("torchscript", 14), ("dynamo", 18)])
def test_unfused_sdpa_gpt2_fp16_keeps_fully_masked_rows(exported_gpt2, tmp_path, exporter, opset):
    """Causal attention + left padding gives fully masked rows. TorchScript fills them with -inf (Softmax ->
    NaN -> the export's IsNaN -> 0 guard): -inf must stay -inf in fp16 (it was clipped to -65504: 0.58 off).
    Dynamo fills with finfo(float32).min (a uniform row in fp32): the fill -> Add -> Softmax chain stays in
    float32 (in fp16 -65504 + score rounds differently per key: 0.03 off). Parity at the long length too."""
    from mlstep.optimizer import OptimizeOptions, optimize_file
    from mlstep.validate.parity import parity_cases

    src = exported_gpt2("lm", exporter, opset, "sdpa", False)
    optimized = optimize_file(src, OptimizeOptions(disabled_fusions=frozenset({"attention"})))
    assert "Softmax" in {n.op_type for n in optimized.model.graph}        # attention left unfused
    fp16 = to_fp16(optimized.model)
    ir.save(fp16, tmp_path / "fp16.onnx")
    cases = parity_cases(ir.load(src), batch=2, sequence=8)
    assert {"s8/left-padded", "s64/left-padded"} <= {c.name for c in cases}
    result = check_parity(src, tmp_path / "fp16.onnx", "fp16", cases)
    assert result.passed, result
    assert result.max_abs_diff < 5e-3
    if exporter == "dynamo":
        assert {n.outputs[0].dtype for n in fp16.graph if n.op_type == "Softmax"} == {ir.DataType.FLOAT}
    else:
        tensors = [n.attributes["value"].value for n in fp16.graph if n.op_type == "Constant" and "value" in n.attributes]
        tensors += [v.const_value for v in fp16.graph.initializers.values()]
        assert any(t.dtype == ir.DataType.FLOAT16 and np.isneginf(t.numpy()).any() for t in tensors)


def test_a_wide_fill_that_reaches_no_softmax_is_clipped(tmp_path):
    """Near miss: the same -3.4e38 fill added to scores, but reduced instead of normalized: nothing to keep in
    float32 (the value is clipped like any other out-of-range constant)."""
    f = TensorProto.FLOAT
    fill = numpy_helper.from_array(np.array([np.finfo(np.float32).min], np.float32), "fill")
    zero = numpy_helper.from_array(np.array([0.0], np.float32), "zero")
    nodes = [helper.make_node("Where", ["m", "zero", "fill"], ["bias"]), helper.make_node("Add", ["x", "bias"], ["s"]),
             helper.make_node("ReduceMax", ["s"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("m", TensorProto.BOOL, [2, 4]),
                                           helper.make_tensor_value_info("x", f, [2, 4])],
                              [helper.make_tensor_value_info("y", f, None)], [fill, zero])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9))
    fp16 = to_fp16(model)
    fill16 = fp16.graph.initializers["fill"].const_value
    assert fill16.dtype == ir.DataType.FLOAT16 and fill16.numpy()[0] == -65504
    casts_up = [n for n in fp16.graph if n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.FLOAT]
    assert [n.outputs[0].name for n in casts_up] == ["y"]         # only the output, kept float32
